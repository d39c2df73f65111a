# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The HunyuanVideo 1.5 text-to-video adapter on a tiny random `HunyuanVideo15Pipeline`."""

import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import ClassifierFreeGuidance, DiffusionPipeline, HunyuanVideo15Pipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft import LoraConfig
from test_pipelines_flow import assert_replay_ratio_is_one, mean_pixel
from test_pipelines_unet import ddrl_config
from tiny_models import tiny_hunyuan_video15_pipeline

from trl_ddrl import DDRLTrainer
from trl_ddrl.pipelines import HunyuanVideo15Adapter, SamplingSettings, get_adapter


# The second prompt has quoted text, which the ByT5 glyph encoder reads.
PROMPTS = ["a cat", 'a sign that says "hi"']
CPU = torch.device("cpu")


def settings(**overrides) -> SamplingSettings:
    kwargs = dict(num_inference_steps=3, eta=1.0, height=32, width=32, num_frames=5, max_sequence_length=16)
    kwargs.update(overrides)
    return SamplingSettings(**kwargs)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_deterministic_sampling_matches_the_pipeline(guidance_scale):
    pipeline = tiny_hunyuan_video15_pipeline()
    adapter = get_adapter(pipeline, settings(eta=0.0, guidance_scale=guidance_scale))
    assert type(adapter) is HunyuanVideo15Adapter and adapter.latent_shape() == (4, 2, 4, 4)
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    assert conditioning["prompt_embeds_2"][0].abs().max() == 0 < conditioning["prompt_embeds_2"][1].abs().max()
    noise = adapter.sample_noise(2, torch.Generator().manual_seed(0))
    ours = adapter.sample(adapter.denoiser, conditioning, noise).latents[:, -1]
    # The pipeline encodes with its own Qwen2.5-VL length and guider: set them to the adapter's.
    pipeline.tokenizer_max_length = 16
    pipeline.guider = ClassifierFreeGuidance(guidance_scale=guidance_scale)
    call = dict(prompt=PROMPTS, height=32, width=32, num_frames=5, num_inference_steps=3, latents=noise)
    torch.testing.assert_close(ours, pipeline(**call, output_type="latent").frames, atol=1e-5, rtol=1e-5)
    pipeline.vae.enable_slicing()  # the VAE decodes one video at a time (see the adapter)
    videos = pipeline(**call, output_type="pt").frames
    assert videos.shape == (2, 5, 3, 32, 32)
    torch.testing.assert_close(adapter.decode(ours), videos, atol=1e-5, rtol=1e-5)


def test_on_policy_ratio_is_one_with_cfg():
    adapter = get_adapter(tiny_hunyuan_video15_pipeline(), settings(guidance_scale=3.0))
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    assert conditioning["negative_prompt_embeds"].shape == conditioning["prompt_embeds"].shape
    assert_replay_ratio_is_one(adapter, conditioning)


def test_data_latents_are_the_scaled_posterior_of_each_video(monkeypatch):
    pipeline = tiny_hunyuan_video15_pipeline()
    adapter = get_adapter(pipeline, settings())
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    videos = torch.rand(2, 5, 3, 32, 32) * 2 - 1
    latents = adapter.encode_pixels(videos)
    assert latents.shape == (2, *adapter.latent_shape())
    vae = pipeline.vae
    for index in range(2):
        expected = vae.encode(videos[index : index + 1].permute(0, 2, 1, 3, 4)).latent_dist.mode()
        torch.testing.assert_close(latents[index : index + 1], expected * vae.config.scaling_factor)
    with pytest.raises(ValueError, match="videos"):
        adapter.encode_pixels(videos[:, 0])


def test_resolution_and_frame_count_errors_name_the_nearest_valid_values():
    with pytest.raises(ValueError, match=r"height=36 and width=32 must be multiples of 8 pixels .* height=32"):
        get_adapter(tiny_hunyuan_video15_pipeline(), settings(height=36))
    with pytest.raises(ValueError, match=r"num_frames=7 is not 4k \+ 1.*num_frames=9"):
        get_adapter(tiny_hunyuan_video15_pipeline(), settings(num_frames=7))


def test_default_resolution_is_the_pipelines_16_by_9_bucket():
    pipeline = tiny_hunyuan_video15_pipeline()
    adapter = get_adapter(pipeline, SamplingSettings(num_inference_steps=3, eta=1.0))
    assert adapter.resolution == pipeline.video_processor.calculate_default_height_width(9, 16, 32)
    assert adapter.num_frames == 121


def test_one_step_trains_only_the_transformer_and_the_saved_pipeline_reloads(tmp_path):
    pipeline = tiny_hunyuan_video15_pipeline()
    before = {
        name: {key: value.clone() for key, value in module.state_dict().items()}
        for name, module in pipeline.components.items()
        if isinstance(module, torch.nn.Module)
    }
    rng = np.random.default_rng(0)
    videos = [rng.random((5, 32, 32, 3), dtype=np.float32) for _ in PROMPTS]
    args = ddrl_config(tmp_path, max_sequence_length=16, height=32, width=32, num_frames=5, max_steps=1)
    trainer = DDRLTrainer(
        pipeline, mean_pixel, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS, "image": videos})
    )
    trainer.train()
    assert any(np.isfinite(entry.get("loss/data", np.nan)) for entry in trainer.state.log_history)
    for name, state in before.items():
        after = getattr(pipeline, name).state_dict()
        changed = any(not torch.equal(value, after[key]) for key, value in state.items())
        assert changed == (name == "transformer"), name

    trainer.save_model()
    assert os.path.isfile(tmp_path / "samples.gif")
    reloaded = DiffusionPipeline.from_pretrained(str(tmp_path))
    assert isinstance(reloaded, HunyuanVideo15Pipeline)
    for key, value in pipeline.transformer.state_dict().items():
        assert torch.equal(value, reloaded.transformer.state_dict()[key])


def test_lora_saves_without_a_pipeline_loader_and_loads_into_the_transformer(tmp_path):
    """HunyuanVideo15Pipeline has no `load_lora_weights`: the LoRA loads with `transformer.load_lora_adapter`."""
    pipeline = tiny_hunyuan_video15_pipeline()
    rng = np.random.default_rng(0)
    videos = [rng.random((5, 32, 32, 3), dtype=np.float32) for _ in PROMPTS]
    args = ddrl_config(tmp_path, max_sequence_length=16, height=32, width=32, num_frames=5, max_steps=1)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    trainer = DDRLTrainer(
        pipeline,
        mean_pixel,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS, "image": videos}),
        peft_config=lora,
    )
    trainer.train()
    trainer.save_model()
    assert os.path.isfile(tmp_path / "pytorch_lora_weights.safetensors")

    fresh = tiny_hunyuan_video15_pipeline()
    fresh.transformer.load_lora_adapter(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    adapter = get_adapter(fresh, settings())
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    latents = torch.randn(2, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    step_index = torch.tensor([0, 1])
    with torch.no_grad():
        trained = trainer.adapter.predict(trainer.adapter.denoiser, latents, step_index, conditioning)
        loaded = adapter.predict(adapter.denoiser, latents, step_index, conditioning)
        base = adapter.predict(tiny_hunyuan_video15_pipeline().transformer, latents, step_index, conditioning)
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, trained, atol=1e-5)
