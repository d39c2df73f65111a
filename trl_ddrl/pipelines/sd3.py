# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Adapter for Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): an MMDiT rectified-flow transformer."""

import torch
from torch import nn

from .base import Conditioning, FlowMatchingAdapter
from .latents import scaled_vae_decode, scaled_vae_encode


class StableDiffusion3Adapter(FlowMatchingAdapter):
    """
    `StableDiffusion3Pipeline`: three text encoders (CLIP-L, CLIP-G, optional T5) give sequence and pooled
    embeddings; the VAE latents are shifted and scaled by `vae.config.shift_factor` / `scaling_factor`.
    """

    pipeline_class_names = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"

    @property
    def resolution_multiple(self) -> int:
        return self.pipeline.vae_scale_factor * self.denoiser.config.patch_size

    def latent_shape(self) -> tuple[int, ...]:
        height, width = self.resolution
        factor = self.pipeline.vae_scale_factor
        return (self.denoiser.config.in_channels, height // factor, width // factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        use_cfg = self.settings.guidance_scale > 1.0
        kwargs = {}
        if self.settings.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.settings.max_sequence_length
        embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=use_cfg,
            **kwargs,
        )
        conditioning = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if use_cfg:
            conditioning.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
        return conditioning

    def velocity(self, denoiser: nn.Module, latents, sigma, conditioning):
        dtype = conditioning["prompt_embeds"].dtype
        return denoiser(
            hidden_states=latents.to(dtype),
            timestep=sigma * self.pipeline.scheduler.config.num_train_timesteps,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return scaled_vae_decode(self.pipeline.vae, latents)

    @torch.no_grad()
    def encode_pixels(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        return scaled_vae_encode(self.pipeline.vae, pixels, generator, mode=mode)
