# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Adapter for FLUX.1 (`FluxPipeline`): a guidance-distilled MMDiT rectified-flow transformer on packed latents."""

import torch
from torch import nn

from .base import Conditioning, FlowMatchingAdapter
from .latents import pack_2x2, scaled_vae_decode, scaled_vae_encode, unpack_2x2


class FluxAdapter(FlowMatchingAdapter):
    """
    `FluxPipeline`: CLIP-L gives the pooled embedding and T5 the sequence embeddings; the VAE latents `[C, H', W']`
    are shifted and scaled by `vae.config.shift_factor` / `scaling_factor` and packed into 2x2 patches, so the
    adapter's latents are the transformer's tokens `[H' / 2 * W' / 2, 4 C]`.

    Guidance: FLUX.1-dev is guidance-distilled. Its guidance strength is a model input (`guidance`, embedded like the
    timestep), not classifier-free guidance, so rollouts stay one forward pass per step. For such transformers
    (`guidance_embeds=True`) `guidance_scale` sets the embedded guidance, as `FluxPipeline`'s own `guidance_scale`
    does; at its default (1.0) the pipeline's default of 3.5 is used. Transformers without the guidance embedding
    (FLUX.1-schnell) use real CFG with an empty negative prompt when `guidance_scale > 1`.

    Schedule: `FluxPipeline`'s sigmas `linspace(1, 1 / T, T)`, shifted with the resolution-dependent `mu`
    (`calculate_shift` of the image sequence length), then 0.
    """

    pipeline_class_names = ("FluxPipeline",)
    denoiser_name = "transformer"
    default_guidance = 3.5
    default_max_sequence_length = 512

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the distilled guidance as an input (FLUX.1-dev) rather than using CFG."""
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def embedded_guidance(self) -> float:
        """The guidance value fed to a guidance-distilled transformer."""
        return self.settings.guidance_scale if self.settings.guidance_scale > 1.0 else self.default_guidance

    @property
    def resolution_multiple(self) -> int:
        # Latents are packed in 2x2 patches.
        return self.pipeline.vae_scale_factor * 2

    def _latent_size(self) -> tuple[int, int]:
        """Height and width of the unpacked VAE latents."""
        height, width = self.resolution
        return height // self.pipeline.vae_scale_factor, width // self.pipeline.vae_scale_factor

    def latent_shape(self) -> tuple[int, ...]:
        height, width = self._latent_size()
        return ((height // 2) * (width // 2), self.denoiser.config.in_channels)

    def scheduler_kwargs(self) -> dict:
        return self.dynamic_shift_kwargs(self.latent_shape()[0])

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        max_length = self.settings.max_sequence_length or self.default_max_sequence_length
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_length
        )
        conditioning = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.guidance_embeds:
            conditioning["guidance"] = torch.full((len(prompts),), self.embedded_guidance, device=device)
        elif self.settings.guidance_scale > 1.0:
            negative, negative_pooled, _ = self.pipeline.encode_prompt(
                prompt=[""] * len(prompts), prompt_2=None, device=device, max_sequence_length=max_length
            )
            conditioning.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
        return conditioning

    def _guided_velocity(self, denoiser, latents, sigma, conditioning):
        if self.guidance_embeds:
            # The guidance is embedded in the model input: one conditional pass, never CFG.
            return self.velocity(denoiser, latents, sigma, conditioning)
        return super()._guided_velocity(denoiser, latents, sigma, conditioning)

    def velocity(self, denoiser: nn.Module, latents, sigma, conditioning):
        embeds = conditioning["prompt_embeds"]
        height, width = self._latent_size()
        image_ids = self.pipeline._prepare_latent_image_ids(
            None, height // 2, width // 2, latents.device, embeds.dtype
        )
        text_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype)
        guidance = conditioning.get("guidance")
        return denoiser(
            hidden_states=latents.to(embeds.dtype),
            # FluxPipeline passes `timestep / 1000` with `timestep = 1000 * sigma`: the transformer takes sigma.
            timestep=sigma.to(embeds.dtype),
            guidance=guidance.float() if guidance is not None else None,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return scaled_vae_decode(self.pipeline.vae, unpack_2x2(latents, *self._latent_size()))

    @torch.no_grad()
    def encode_pixels(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        return pack_2x2(scaled_vae_encode(self.pipeline.vae, pixels, generator, mode=mode))
