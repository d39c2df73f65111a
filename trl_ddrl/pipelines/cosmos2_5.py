# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Adapter for NVIDIA Cosmos Predict2.5 (`Cosmos2_5_PredictBasePipeline`), the model of the DDRL paper's headline
results: one rectified-flow video transformer for text-to-world, image-to-world and video-to-world.
"""

import torch

from .base import Conditioning, VideoFlowMatchingAdapter, encode_prompt_pairs
from .cosmos import CosmosFrameConditioning


class Cosmos2_5PredictAdapter(CosmosFrameConditioning, VideoFlowMatchingAdapter):
    """
    `Cosmos2_5_PredictBasePipeline` (`nvidia/Cosmos-Predict2.5-2B`, `-14B`): Qwen2.5-VL prompt embeddings (every
    layer's hidden states, each normalised, concatenated; the transformer projects them), Wan-VAE latents `[C, F', H',
    W']` normalised by `latents_mean` / `latents_std`, `num_frames = 4k + 1` frames (93 by default; 1 generates an
    image, returned as a one-frame video).

    Unlike Cosmos Predict2 the model is a plain rectified flow: the transformer takes the flow sigma as its timestep
    and predicts the velocity, the sampler starts from standard noise, and the schedule is the scheduler's flow
    sigmas (the checkpoints' `UniPCMultistepScheduler`, stepped with the flow SDE's Euler-Maruyama step as for Wan;
    with a `FlowMatchEulerDiscreteScheduler`, `eta = 0` reproduces the pipeline exactly).

    Modes, from `num_conditioning_frames` (see [`CosmosFrameConditioning`]): 0 (the default) is text-to-world; 1 is
    image-to-world (one latent frame given); 5 is video-to-world (two latent frames given, the pipeline's
    `num_latent_conditional_frames=2`). The given frames are seen at flow noise level `1e-4` (the pipeline's
    `conditional_frame_timestep`) and encoded with the posterior's mode, as in the pipeline. The causal VAE encodes
    the first `4k + 1` frames independently of the ones after them, so only the given frames are encoded (the
    pipeline pads them to `num_frames` first, which changes none of the latent frames used).

    CFG: DDRL's `guidance_scale = g` means `uncond + g (cond - uncond)` against the pipeline's default negative
    prompt, or with `guidance_unconditional="zeros"` against a zeroed prompt embedding (the authors' unconditional
    branch; the conditioning frames are kept in both branches, as theirs); the pipeline's `guidance_scale = g` means
    `cond + g (cond - uncond)`, that is DDRL's `g + 1`.
    """

    pipeline_class_names = ("Cosmos2_5_PredictBasePipeline",)
    # The model of the authors' DDRL recipe (configs/cosmos-predict2-5/*-ddrl.toml): their churn sampler by default.
    samplers = ("churn", "flow_sde")
    guidance_unconditional_choices = ("negative_prompt", "zeros")
    denoiser_name = "transformer"
    default_resolution = (704, 1280)
    default_num_frames = 93
    default_max_sequence_length = 512
    num_conditioning_frames = 0
    conditioning_frame_choices = (0, 1, 5)
    condition_sigma = 1e-4

    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        return encode_prompt_pairs(self, prompts, device)

    def _padding_mask(self, like: torch.Tensor) -> torch.Tensor:
        """The pipeline's all-zero pixel padding mask `[1, 1, H, W]`."""
        return like.new_zeros(1, 1, *self.resolution)

    def encode_conditioning_video(self, frames, generator):
        latents = self.encode_video(frames, mode=True)
        missing = self.latent_frames() - latents.shape[2]
        return torch.cat([latents, latents.new_zeros(*latents.shape[:2], missing, *latents.shape[3:])], dim=2)
