# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Adapter for the embedded digits model ([`~trl_ddrl.digits.DigitsFlowPipeline`]): pixel-space rectified flow."""

import torch
from torch import nn

from ..digits.pipeline import DigitsFlowPipeline
from .base import Conditioning, FlowMatchingAdapter


class DigitsFlowAdapter(FlowMatchingAdapter):
    """
    `DigitsFlowPipeline`: a UNet on 16x16x1 pixels, conditioned by the `[B, 1, D]` embedding of the prompt's digit.

    There is no VAE, so latents are pixels in `[-1, 1]`: `encode_pixels` is the identity and `decode` maps to `[0, 1]`.
    With CFG, the negative conditioning is the learned unconditional embedding (the empty prompt).

    diffusers does not define `DigitsFlowPipeline`, so `DiffusionPipeline.from_pretrained` cannot load a saved one;
    `pipeline_class` names the class that loads it (`DigitsFlowPipeline.from_pretrained(path)`).
    """

    pipeline_class_names = ("DigitsFlowPipeline",)
    pipeline_class = DigitsFlowPipeline
    denoiser_name = "unet"

    @property
    def resolution(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size
        return self.settings.height or size, self.settings.width or size

    def latent_shape(self) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, *self.resolution)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        encoder = self.pipeline.prompt_encoder
        conditioning = {"prompt_embeds": encoder.encode(prompts).to(device)}
        if self.settings.guidance_scale > 1.0:
            conditioning["negative_prompt_embeds"] = encoder.encode([""] * len(prompts)).to(device)
        return conditioning

    def velocity(self, denoiser: nn.Module, latents, sigma, conditioning):
        embeds = conditioning["prompt_embeds"]
        timestep = sigma * self.pipeline.scheduler.config.num_train_timesteps
        return denoiser(latents.to(embeds.dtype), timestep, encoder_hidden_states=embeds, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return DigitsFlowPipeline.latents_to_pixels(latents)

    @torch.no_grad()
    def encode_pixels(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        return pixels.float().clamp(-1, 1)
