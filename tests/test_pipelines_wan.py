# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The Wan image-to-video adapter (Wan 2.1 I2V and Wan 2.2 TI2V forms) on tiny random pipelines."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from family_checks import (
    CPU,
    PROMPTS,
    assert_lora_loads_into_a_fresh_pipeline,
    assert_reloaded_pipeline_has_the_trained_weights,
    changed_components,
    lora_config,
    module_states,
    train_one_step,
)
from PIL import Image
from test_pipelines_flow import assert_replay_ratio_is_one
from tiny_models import tiny_wan_i2v_pipeline

from trl_ddrl.data import DiffusionDataCollator
from trl_ddrl.pipelines import SamplingSettings, WanImageToVideoAdapter, get_adapter


def settings(**overrides) -> SamplingSettings:
    kwargs = dict(num_inference_steps=3, eta=1.0, max_sequence_length=16, height=32, width=32, num_frames=5)
    kwargs.update(overrides)
    return SamplingSettings(**kwargs)


def image_to_video_latents(pipeline, adapter, **guidance) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The final latents of the adapter's rollout and of the pipeline's own sampling, from the same random image and
    noise, for a 32x32, 5-frame, 3-step image-to-video pipeline (`adapter` built with `eta=0`).
    """
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    conditioning = adapter.encode_prompts(PROMPTS[:1], CPU)
    conditioning.update(
        adapter.encode_condition_frames(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 * 2 - 1)
    )
    noise = adapter.sample_noise(1, torch.Generator().manual_seed(0))
    ours = adapter.sample(adapter.denoiser, conditioning, noise).latents[:, -1]
    theirs = pipeline(
        image=Image.fromarray(image),
        prompt=PROMPTS[:1],
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=3,
        max_sequence_length=16,
        latents=noise,
        output_type="latent",
        **guidance,
    ).frames
    return ours, theirs


@pytest.mark.parametrize("expand_timesteps, guidance_scale", [(False, 3.0), (True, 1.0)])
def test_deterministic_sampling_matches_the_pipeline(expand_timesteps, guidance_scale):
    """Wan 2.1 I2V (concatenated conditioning, CLIP image embeddings) with CFG; Wan 2.2 TI2V (first-frame replacement)."""
    pipeline = tiny_wan_i2v_pipeline(expand_timesteps=expand_timesteps)
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    adapter = get_adapter(pipeline, settings(eta=0.0, guidance_scale=guidance_scale))
    assert isinstance(adapter, WanImageToVideoAdapter) and adapter.latent_shape() == (4, 2, 4, 4)
    ours, theirs = image_to_video_latents(pipeline, adapter, guidance_scale=guidance_scale)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert adapter.decode(ours).shape == (1, 5, 3, 32, 32)


def test_on_policy_ratio_is_one_and_the_image_is_required():
    adapter = get_adapter(tiny_wan_i2v_pipeline(), settings())
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    with pytest.raises(ValueError, match="needs the conditioning image"):
        adapter.predict(adapter.denoiser, adapter.sample_noise(2), torch.zeros(2, dtype=torch.long), conditioning)
    conditioning.update(adapter.encode_condition_frames(torch.rand(2, 3, 32, 32) * 2 - 1))
    assert_replay_ratio_is_one(adapter, conditioning)


def video_rows() -> dict:
    rng = np.random.default_rng(0)
    return {"prompt": PROMPTS, "image": [rng.random((5, 32, 32, 3), dtype=np.float32) for _ in PROMPTS]}


def test_the_data_term_is_conditioned_on_each_data_videos_first_frame():
    adapter = get_adapter(tiny_wan_i2v_pipeline(), settings())
    rows = [dict(zip(video_rows(), values)) for values in zip(*video_rows().values())]
    batch = DiffusionDataCollator(adapter)(rows)
    first_frames = torch.stack([torch.from_numpy(row["image"][0]).permute(2, 0, 1) * 2 - 1 for row in rows])
    expected = adapter.encode_condition_frames(first_frames)
    for key in ("condition", "image_embeds"):
        torch.testing.assert_close(batch["conditioning"][key], expected[key])


def test_training_changes_only_the_transformer_and_reloads(tmp_path):
    pipeline = tiny_wan_i2v_pipeline()
    before = module_states(pipeline)
    trainer = train_one_step(
        pipeline, tmp_path, video_rows(), max_sequence_length=16, height=32, width=32, num_frames=5
    )
    assert changed_components(pipeline, before) == {"transformer"}
    assert_reloaded_pipeline_has_the_trained_weights(trainer, ("transformer",))


def test_lora_loads_with_load_lora_weights(tmp_path):
    config = dict(max_sequence_length=16, height=32, width=32, num_frames=5, learning_rate=1e-2)
    trainer = train_one_step(
        tiny_wan_i2v_pipeline(expand_timesteps=True), tmp_path, video_rows(), peft_config=lora_config(), **config
    )

    def conditioning_for(adapter):
        conditioning = adapter.encode_prompts(PROMPTS, CPU)
        conditioning.update(adapter.encode_condition_frames(torch.rand(2, 3, 32, 32) * 2 - 1))
        return conditioning

    assert_lora_loads_into_a_fresh_pipeline(
        trainer, lambda: tiny_wan_i2v_pipeline(expand_timesteps=True), conditioning_for
    )
