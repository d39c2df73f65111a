# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Adapter for FLUX.1 (`FluxPipeline`): a guidance-distilled MMDiT rectified-flow transformer on packed latents."""

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import nn

from .base import Conditioning, FlowMatchingAdapter, SamplingSettings


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

    def __init__(self, pipeline, settings: SamplingSettings):
        super().__init__(pipeline, settings)
        height, width = self.resolution
        multiple = pipeline.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(
                f"height={height} and width={width} must be multiples of {multiple} (VAE factor x 2x2 packing) for "
                "FluxPipeline; set height and width accordingly."
            )

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the distilled guidance as an input (FLUX.1-dev) rather than using CFG."""
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def embedded_guidance(self) -> float:
        """The guidance value fed to a guidance-distilled transformer."""
        return self.settings.guidance_scale if self.settings.guidance_scale > 1.0 else self.default_guidance

    @property
    def resolution(self) -> tuple[int, int]:
        default = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return self.settings.height or default, self.settings.width or default

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
        steps = self.settings.num_inference_steps
        config = self.pipeline.scheduler.config
        mu = calculate_shift(
            self.latent_shape()[0],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": mu}

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

    def predict(self, denoiser, latents, step_index, conditioning):
        if self.guidance_embeds:
            # The guidance is embedded in the model input: one conditional pass, never CFG.
            return self.velocity(denoiser, latents, self._sigma_table()[step_index], conditioning)
        return super().predict(denoiser, latents, step_index, conditioning)

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
        vae = self.pipeline.vae
        height, width = self.resolution
        latents = self.pipeline._unpack_latents(latents, height, width, self.pipeline.vae_scale_factor)
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator=generator)
        latents = ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float()
        batch, channels, height, width = latents.shape
        return self.pipeline._pack_latents(latents, batch, channels, height, width)
