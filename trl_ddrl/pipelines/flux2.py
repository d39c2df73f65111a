# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Adapter for FLUX.2 (`Flux2Pipeline`, FLUX.2-dev, and `Flux2KleinPipeline`, FLUX.2-klein): a rectified-flow MMDiT on
2x2-patchified, batch-normalised VAE latents, conditioned on the hidden states of an LLM text encoder (Mistral 3 for
FLUX.2-dev, Qwen 3 for klein).
"""

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from torch import nn

from .base import Conditioning, FlowMatchingAdapter, SamplingSettings
from .latents import pack_2x2, posterior_latents, to_unit_range, unpack_2x2


class Flux2Adapter(FlowMatchingAdapter):
    """
    `Flux2Pipeline` / `Flux2KleinPipeline`.

    Latents: the VAE latents `[C, H / 8, W / 8]` are patchified in 2x2 patches (`[4 C, H / 16, W / 16]`), normalised
    per channel with the VAE's batch-norm running statistics, `(z - bn.running_mean) / sqrt(bn.running_var + eps)`,
    and flattened to tokens, so the adapter's latents are the transformer's tokens `[H / 16 * W / 16, 4 C]` as in the
    pipelines; the data term encodes its images the same way.

    Guidance: FLUX.2-dev is guidance-distilled (`guidance_embeds=True`): its guidance strength is a model input, so
    rollouts stay one forward pass per step; `guidance_scale` sets it, and at its default (1.0) the pipeline's default
    of 4.0 is used. FLUX.2-klein has no guidance embedding: `guidance_scale > 1` is classifier-free guidance against
    the empty prompt, `uncond + g * (cond - uncond)` as in `Flux2KleinPipeline`; the step-distilled klein checkpoints
    (`is_distilled=True`) take no guidance at all.

    Schedule: the pipelines' sigmas `linspace(1, 1 / T, T)`, shifted with `mu = compute_empirical_mu(image tokens,
    T)` (FLUX.2's fit of the shift to resolution and step count), then 0.
    """

    pipeline_class_names = ("Flux2Pipeline", "Flux2KleinPipeline")
    denoiser_name = "transformer"
    default_guidance = 4.0
    default_max_sequence_length = 512

    def __init__(self, pipeline, settings: SamplingSettings):
        super().__init__(pipeline, settings)
        if settings.guidance_scale > 1.0 and pipeline.config.get("is_distilled", False):
            raise ValueError(
                f"guidance_scale={settings.guidance_scale} but this {type(pipeline).__name__} is step-distilled "
                "(is_distilled=True) and takes no guidance; set guidance_scale=1.0."
            )

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the distilled guidance as an input (FLUX.2-dev) rather than using CFG."""
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def resolution_multiple(self) -> int:
        # The VAE's downsampling, then 2x2 patches.
        return self.pipeline.vae_scale_factor * 2

    def _token_grid(self) -> tuple[int, int]:
        """Height and width of the patchified latents, in tokens."""
        height, width = self.resolution
        multiple = self.resolution_multiple
        return height // multiple, width // multiple

    def latent_shape(self) -> tuple[int, ...]:
        height, width = self._token_grid()
        return (height * width, self.denoiser.config.in_channels)

    def scheduler_kwargs(self) -> dict:
        steps = self.settings.num_inference_steps
        mu = compute_empirical_mu(image_seq_len=self.latent_shape()[0], num_steps=steps)
        if self.pipeline.scheduler.config.get("use_flow_sigmas", False):
            return {"mu": mu}
        return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": mu}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        max_length = self.settings.max_sequence_length or self.default_max_sequence_length
        embeds, _ = self.pipeline.encode_prompt(prompt=prompts, device=device, max_sequence_length=max_length)
        conditioning = {"prompt_embeds": embeds}
        if self.guidance_embeds:
            guidance = self.settings.guidance_scale if self.settings.guidance_scale > 1.0 else self.default_guidance
            conditioning["guidance"] = torch.full((len(prompts),), guidance, device=device)
        elif self.settings.guidance_scale > 1.0:
            negative, _ = self.pipeline.encode_prompt(
                prompt=[""] * len(prompts), device=device, max_sequence_length=max_length
            )
            conditioning["negative_prompt_embeds"] = negative
        return conditioning

    def _guided_velocity(self, denoiser, latents, sigma, conditioning):
        if self.guidance_embeds:
            # The guidance is embedded in the model input: one conditional pass, never CFG.
            return self.velocity(denoiser, latents, sigma, conditioning)
        return super()._guided_velocity(denoiser, latents, sigma, conditioning)

    def _position_ids(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipelines' 4-D (T, H, W, L) RoPE coordinates: text `[L_text, 4]` and image tokens `[L_image, 4]`."""
        height, width = self._token_grid()
        text_ids = self.pipeline._prepare_text_ids(embeds[:1])[0]
        image_ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
        return text_ids.to(embeds.device), image_ids.to(embeds.device)

    def velocity(self, denoiser: nn.Module, latents, sigma, conditioning):
        embeds = conditioning["prompt_embeds"]
        text_ids, image_ids = self._position_ids(embeds)
        guidance = conditioning.get("guidance")
        return denoiser(
            hidden_states=latents.to(embeds.dtype),
            # The pipelines pass `timestep / 1000` with `timestep = 1000 * sigma`: the transformer takes sigma.
            timestep=sigma.to(embeds.dtype),
            guidance=guidance.float() if guidance is not None else None,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]

    def _batch_norm_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's batch-norm mean and std of the token channels (the 2x2-patchified latents), `[1, 1, 4 C]` each."""
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, 1, -1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, 1, -1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        height, width = self._token_grid()
        mean, std = self._batch_norm_statistics(latents.float())
        latents = unpack_2x2(latents.float() * std + mean, 2 * height, 2 * width)
        return to_unit_range(vae.decode(latents.to(vae.dtype), return_dict=False)[0])

    @torch.no_grad()
    def encode_pixels(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        # `pack_2x2` is the pipelines' `_patchify_latents` followed by `_pack_latents`: the same token layout.
        vae = self.pipeline.vae
        latents = posterior_latents(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist, generator, mode).float()
        tokens = pack_2x2(latents)
        mean, std = self._batch_norm_statistics(tokens)
        return (tokens - mean) / std
