# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The Qwen-Image adapter on a tiny random pipeline."""

import numpy as np
import pytest
import torch
from family_checks import (
    CPU,
    assert_lora_loads_into_a_fresh_pipeline,
    assert_reloaded_pipeline_has_the_trained_weights,
    changed_components,
    lora_config,
    module_states,
    train_one_step,
)
from test_pipelines_flow import assert_replay_ratio_is_one
from tiny_models import tiny_qwenimage_pipeline

from trl_ddrl.pipelines import QwenImageAdapter, SamplingSettings, get_adapter


# Prompts of different token counts, so that the padding mask is exercised.
PROMPTS = ["a cat", "a red car in the rain"]


def settings(**overrides) -> SamplingSettings:
    kwargs = dict(num_inference_steps=3, eta=1.0, max_sequence_length=64, height=32, width=32)
    kwargs.update(overrides)
    return SamplingSettings(**kwargs)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_deterministic_sampling_matches_the_pipeline(guidance_scale):
    """Without CFG, and with the pipeline's true CFG (its per-token norm rescaling) against the prompt " "."""
    pipeline = tiny_qwenimage_pipeline()
    adapter = get_adapter(pipeline, settings(eta=0.0, guidance_scale=guidance_scale))
    assert isinstance(adapter, QwenImageAdapter) and adapter.latent_shape() == (4, 16)
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    assert not conditioning["prompt_embeds_mask"].all()  # the shorter prompt is padded
    noise = adapter.sample_noise(2, torch.Generator().manual_seed(0))
    ours = adapter.sample(adapter.denoiser, conditioning, noise).latents[:, -1]
    cfg = dict(true_cfg_scale=guidance_scale, negative_prompt=" ") if guidance_scale > 1 else {}
    theirs = pipeline(
        PROMPTS,
        height=32,
        width=32,
        num_inference_steps=3,
        max_sequence_length=64,
        latents=noise,
        output_type="latent",
        **cfg,
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    vae = pipeline.vae
    shape = (1, vae.config.z_dim, 1, 1, 1)
    latents = pipeline._unpack_latents(theirs, 32, 32, pipeline.vae_scale_factor)
    latents = latents * torch.tensor(vae.config.latents_std).view(shape) + torch.tensor(vae.config.latents_mean).view(
        shape
    )
    images = pipeline.image_processor.postprocess(vae.decode(latents).sample[:, :, 0], output_type="pt")
    torch.testing.assert_close(adapter.decode(ours), images, atol=1e-5, rtol=1e-5)


def test_cfg_rollouts_have_on_policy_ratio_one_and_sizes_are_checked():
    pipeline = tiny_qwenimage_pipeline()
    adapter = get_adapter(pipeline, settings(guidance_scale=4.0))
    assert_replay_ratio_is_one(adapter, adapter.encode_prompts(PROMPTS, CPU))
    with pytest.raises(ValueError, match=r"height=40 and width=24 must be multiples of 16 .* height=32, width=32"):
        get_adapter(pipeline, settings(height=40, width=24))


def image_rows() -> dict:
    rng = np.random.default_rng(0)
    return {"prompt": PROMPTS, "image": [rng.random((32, 32, 3), dtype=np.float32) for _ in PROMPTS]}


def test_training_changes_only_the_transformer_and_reloads(tmp_path):
    pipeline = tiny_qwenimage_pipeline()
    before = module_states(pipeline)
    trainer = train_one_step(pipeline, tmp_path, image_rows(), max_sequence_length=64, height=32, width=32)
    assert changed_components(pipeline, before) == {"transformer"}
    assert_reloaded_pipeline_has_the_trained_weights(trainer, ("transformer",))


def test_lora_loads_with_load_lora_weights(tmp_path):
    config = dict(max_sequence_length=64, height=32, width=32, learning_rate=1e-2)
    trainer = train_one_step(tiny_qwenimage_pipeline(), tmp_path, image_rows(), peft_config=lora_config(), **config)
    assert_lora_loads_into_a_fresh_pipeline(
        trainer, tiny_qwenimage_pipeline, lambda adapter: adapter.encode_prompts(PROMPTS, CPU)
    )
