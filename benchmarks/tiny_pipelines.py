# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Benchmark-sized random pipelines: bigger denoisers than the test pipelines, so that the denoiser's compute dominates
the per-call overhead as it does for real models, but still built from configs (no download) in seconds on a CPU.

The tokenizers, text encoders and VAE are the tests' tiny ones (`tests/tiny_models.py`); the VAE downsamples by 2, so
32x32 latents are 64x64 images.
"""

import os
import sys

from diffusers import (
    DDIMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from tiny_models import (  # noqa: E402
    tiny_clip_text_model,
    tiny_clip_tokenizer,
    tiny_sd3_pipeline,
    tiny_unet,
    tiny_vae,
)


def bench_sd3_pipeline(
    num_layers: int = 2, latent_size: int = 32, num_heads: int = 4, head_dim: int = 32, seed: int = 0
) -> StableDiffusion3Pipeline:
    """
    A random `StableDiffusion3Pipeline` with an MMDiT of `num_layers` blocks of width `num_heads * head_dim` on
    `[4, latent_size, latent_size]` latents (patch 2: `(latent_size / 2)^2` image tokens), two tiny CLIP encoders and
    no T5: the tests' builder at benchmark size.
    """
    return tiny_sd3_pipeline(
        seed=seed,
        with_t5=False,
        num_layers=num_layers,
        latent_size=latent_size,
        num_heads=num_heads,
        head_dim=head_dim,
        vae_scaling_factor=1.5035,
    )


def bench_sd15_pipeline(
    latent_size: int = 32, block_out_channels: tuple[int, ...] = (32, 64), seed: int = 0
) -> StableDiffusionPipeline:
    """
    A random SD 1.5-style `StableDiffusionPipeline` (UNet with cross-attention, epsilon prediction, SD 1.5's noise
    schedule in a `DDIMScheduler`) on `[4, latent_size, latent_size]` latents.
    """
    tokenizer = tiny_clip_tokenizer()
    unet = tiny_unet(cross_attention_dim=16, seed=seed, block_out_channels=block_out_channels)
    unet.register_to_config(sample_size=latent_size)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=tiny_vae(seed=seed, scaling_factor=0.18215),
        text_encoder=tiny_clip_text_model(len(tokenizer), seed=seed + 1),
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
