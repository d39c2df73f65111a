# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The Qwen-Image-Edit adapter, the (source image, edited image, caption) data rows and image-conditioned training."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
from family_checks import (
    CPU,
    assert_lora_loads_into_a_fresh_pipeline,
    assert_reloaded_pipeline_has_the_trained_weights,
    changed_components,
    lora_config,
    module_states,
    train_one_step,
)
from PIL import Image
from test_pipelines_flow import assert_replay_ratio_is_one
from test_pipelines_unet import ddrl_config
from tiny_models import tiny_qwenimage_edit_pipeline

from trl_ddrl import DDRLTrainer
from trl_ddrl.data import DiffusionDataCollator
from trl_ddrl.pipelines import QwenImageEditAdapter, SamplingSettings, get_adapter


PROMPTS = ["make it red", "add a hat to the cat"]


def settings(**overrides) -> SamplingSettings:
    kwargs = dict(num_inference_steps=3, eta=1.0, height=32, width=32)
    kwargs.update(overrides)
    return SamplingSettings(**kwargs)


def source_images(seed: int = 0, count: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 `[H, W, C]` images to `[B, C, H, W]` in `[-1, 1]`, as the collator and the pipeline compute them."""
    return torch.stack([torch.from_numpy(image).permute(2, 0, 1).float() / 255 * 2 - 1 for image in images])


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_deterministic_sampling_matches_the_pipeline(guidance_scale, monkeypatch):
    """Two prompts, each with its own source image; with and without the pipeline's true CFG."""
    pipeline = tiny_qwenimage_edit_pipeline()
    adapter = get_adapter(pipeline, settings(eta=0.0, guidance_scale=guidance_scale))
    assert type(adapter) is QwenImageEditAdapter and adapter.conditioned_on_source_image
    images = source_images()
    conditioning = adapter.encode_prompts(PROMPTS, CPU, source_images=to_pixels(images))
    assert conditioning["image_latents"].shape == (2, *adapter.latent_shape())
    noise = adapter.sample_noise(2, torch.Generator().manual_seed(0))
    ours = adapter.sample(adapter.denoiser, conditioning, noise).latents[:, -1]
    # The pipeline sizes the source to ~1 megapixel; DDRL conditions at the training resolution.
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (32, 32, None))
    cfg = dict(true_cfg_scale=guidance_scale, negative_prompt=[" "] * 2) if guidance_scale > 1 else {}
    theirs = pipeline(
        image=[Image.fromarray(image) for image in images],
        prompt=PROMPTS,
        height=32,
        width=32,
        num_inference_steps=3,
        latents=noise,
        output_type="latent",
        **cfg,
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_on_policy_ratio_is_one_with_cfg():
    adapter = get_adapter(tiny_qwenimage_edit_pipeline(), settings(guidance_scale=4.0))
    assert_replay_ratio_is_one(adapter, adapter.encode_prompts(PROMPTS, CPU, source_images=to_pixels(source_images())))


def test_the_data_term_is_conditioned_on_each_rows_source_image(monkeypatch):
    adapter = get_adapter(tiny_qwenimage_edit_pipeline(), settings())
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    collator = DiffusionDataCollator(adapter)
    sources, targets, others = source_images(0), source_images(1), source_images(2)
    rows = [{"source_image": s, "image": t, "prompt": p} for s, t, p in zip(sources, targets, PROMPTS)]
    batch = collator(rows)
    # The latents are the targets'; the conditioning holds the sources' (not the targets') latents.
    torch.testing.assert_close(
        batch["conditioning"]["image_latents"], adapter.encode_source_images(to_pixels(sources))
    )
    assert not torch.allclose(batch["conditioning"]["image_latents"], adapter.encode_source_images(to_pixels(targets)))
    torch.testing.assert_close(batch["latents"], adapter.encode_pixels(to_pixels(targets)))
    # The loss on the same targets changes with the source image.
    other_batch = collator([{**row, "source_image": other} for row, other in zip(rows, others)])
    noise = torch.randn_like(batch["latents"], generator=torch.Generator().manual_seed(1))
    step_index = torch.tensor([0, 1])
    with torch.no_grad():
        loss = adapter.diffusion_loss(adapter.denoiser, batch["latents"], batch["conditioning"], step_index, noise)
        other = adapter.diffusion_loss(
            adapter.denoiser, batch["latents"], other_batch["conditioning"], step_index, noise
        )
        # The transformer itself attends to the source latents, not only the prompt encoder to the source.
        swapped = {**batch["conditioning"], "image_latents": other_batch["conditioning"]["image_latents"]}
        latents_only = adapter.diffusion_loss(adapter.denoiser, batch["latents"], swapped, step_index, noise)
    assert not torch.allclose(loss, other) and not torch.allclose(loss, latents_only)


def test_missing_source_images_are_clear_errors(tmp_path):
    pipeline = tiny_qwenimage_edit_pipeline()
    adapter = get_adapter(pipeline, settings())
    collator = DiffusionDataCollator(adapter, source_image_column="before")
    with pytest.raises(KeyError, match=r"Row 0 has no 'before' value .*source_image_column"):
        collator([{"image": source_images()[0], "prompt": "make it red"}])
    with pytest.raises(ValueError, match="source_images"):
        adapter.encode_prompts(PROMPTS, CPU)
    args = dict(height=32, width=32)
    prompts_only = {"prompt": PROMPTS, "image": source_images()}
    with pytest.raises(ValueError, match=r"train_dataset has no 'source_image' column"):
        train_one_step(pipeline, tmp_path, prompts_only, **args)
    rows = {"prompt": PROMPTS, "source_image": source_images()}
    with pytest.raises(ValueError, match="data_dataset has no 'source_image' column"):
        DDRLTrainer(
            pipeline,
            lambda prompts, images, **kwargs: [0.0] * len(prompts),
            args=ddrl_config(tmp_path, **args),
            train_dataset=Dataset.from_dict(rows),
            data_dataset=Dataset.from_dict({"prompt": PROMPTS, "image": source_images()}),
        )


def test_one_step_edits_each_rows_source_and_trains_only_the_transformer(tmp_path):
    pipeline = tiny_qwenimage_edit_pipeline()
    before = module_states(pipeline)
    seen_sources = []

    def records_sources(prompts, images, source_image, **kwargs):
        seen_sources.extend(source_image)  # the reward sees each sample's source image
        return images.flatten(1).mean(dim=1).tolist()

    rows = {"prompt": PROMPTS, "source_image": source_images(0), "image": source_images(1)}
    args = ddrl_config(tmp_path, max_steps=1, height=32, width=32)
    trainer = DDRLTrainer(pipeline, records_sources, args=args, train_dataset=Dataset.from_dict(rows))
    sampled = []
    sample = trainer.adapter.sample

    def recording_sample(denoiser, conditioning, noise, **kwargs):
        sampled.append(conditioning["image_latents"].clone())
        return sample(denoiser, conditioning, noise, **kwargs)

    trainer.adapter.sample = recording_sample
    trainer.train()
    assert any("loss/data" in entry for entry in trainer.state.log_history)
    assert changed_components(pipeline, before) == {"transformer"}
    assert len(seen_sources) == 4 and all(np.asarray(image).shape == (32, 32, 3) for image in seen_sources)
    # Groups of 2: the two samples of a group share their row's source; the groups' sources differ.
    latents = sampled[0]
    torch.testing.assert_close(latents[0], latents[1])
    assert not torch.allclose(latents[0], latents[2])
    assert_reloaded_pipeline_has_the_trained_weights(trainer, ("transformer",))


def test_lora_loads_with_load_lora_weights(tmp_path):
    rows = {"prompt": PROMPTS, "source_image": source_images(0), "image": source_images(1)}
    trainer = train_one_step(
        tiny_qwenimage_edit_pipeline(), tmp_path, rows, peft_config=lora_config(), height=32, width=32
    )
    pixels = to_pixels(source_images(0))
    assert_lora_loads_into_a_fresh_pipeline(
        trainer,
        tiny_qwenimage_edit_pipeline,
        lambda adapter: adapter.encode_prompts(PROMPTS, CPU, source_images=pixels),
    )
