# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Adapter for Wan 2.1 / 2.2 text-to-video (`WanPipeline`): a rectified-flow video transformer on the latents of the
causal 3D Wan VAE, conditioned on UMT5 text embeddings.
"""

import torch
from torch import nn

from .base import Conditioning, SamplingSettings, VideoFlowMatchingAdapter, encode_prompt_pairs


class WanAdapter(VideoFlowMatchingAdapter):
    """
    `WanPipeline` (text-to-video): UMT5 prompt embeddings, video latents `[C, F', H', W']` normalised by the VAE's
    `latents_mean` / `latents_std`, `num_frames = 4k + 1` frames (81 by default).

    Sampling schedule: the Wan checkpoints ship a `UniPCMultistepScheduler` (a multistep ODE solver) with flow sigmas
    `shift(1 - i / T)` (`flow_shift`, 3.0 for 480p and 5.0 for 720p). DDRL needs one Gaussian transition per step,
    so it takes the scheduler's own noise levels and timesteps (`1000 * sigma`) and steps between them with the
    Euler-Maruyama step of the rectified-flow SDE instead of UniPC's predictor-corrector update; with `eta = 0` this
    is the Euler sampler of `FlowMatchEulerDiscreteScheduler`. A pipeline with a `FlowMatchEulerDiscreteScheduler`
    is sampled on that scheduler's sigmas, matching the pipeline's own output at `eta = 0`.

    Wan 2.2 pipelines with two experts (`transformer_2`, the A14B models) are not supported: DDRL trains one denoiser.
    Wan 2.2 TI2V (`expand_timesteps=True`) is supported for text-to-video.
    """

    pipeline_class_names = ("WanPipeline",)
    denoiser_name = "transformer"
    default_resolution = (480, 832)
    default_num_frames = 81
    default_max_sequence_length = 512

    def __init__(self, pipeline, settings: SamplingSettings):
        if getattr(pipeline, "transformer_2", None) is not None:
            raise ValueError(
                f"{type(pipeline).__name__} has two denoisers (transformer and transformer_2, the Wan 2.2 A14B "
                "mixture of experts); DDRLTrainer trains a single denoiser. Use a single-transformer Wan checkpoint "
                "such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers or Wan-AI/Wan2.2-TI2V-5B-Diffusers."
            )
        super().__init__(pipeline, settings)

    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        return encode_prompt_pairs(self, prompts, device)

    def velocity(self, denoiser: nn.Module, latents, sigma, conditioning):
        dtype = conditioning["prompt_embeds"].dtype
        timestep = sigma * self.pipeline.scheduler.config.num_train_timesteps
        if self.pipeline.config.get("expand_timesteps", False):
            # Wan 2.2 TI2V takes one timestep per latent token (2x2 patches): all equal for text-to-video.
            _, frames, height, width = latents.shape[1:]
            timestep = timestep[:, None].expand(-1, frames * (height // 2) * (width // 2))
        return denoiser(
            hidden_states=latents.to(dtype),
            timestep=timestep,
            encoder_hidden_states=conditioning["prompt_embeds"],
            return_dict=False,
        )[0]
