# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Adapter for Qwen-Image (`QwenImagePipeline`): an MMDiT rectified-flow transformer on packed Wan-style latents."""

import torch
from torch import nn

from .base import Conditioning, FlowMatchingAdapter, SamplingSettings
from .latents import normalized_vae_decode, normalized_vae_encode, pack_2x2, unpack_2x2


class QwenImageAdapter(FlowMatchingAdapter):
    """
    `QwenImagePipeline` (`Qwen/Qwen-Image`): Qwen2.5-VL prompt embeddings (the last hidden states after the
    pipeline's chat template, with their padding mask), latents of `AutoencoderKLQwenImage` normalised by its
    `latents_mean` / `latents_std` and packed into 2x2 patches, so the adapter's latents are the transformer's tokens
    `[H/16 * W/16, 4 C]`.

    Schedule: as in the pipeline, sigmas `linspace(1, 1 / T, T)` shifted with the resolution-dependent `mu`, then 0;
    the transformer takes the timestep as `sigma`.

    Guidance: `guidance_scale > 1` is the pipeline's `true_cfg_scale` against the negative prompt `" "`, including
    its rescaling of the guided velocity to the conditional one's norm per token. The positive and negative prompts
    are encoded in one batch, so their embeddings share one padded length.
    """

    pipeline_class_names = ("QwenImagePipeline",)
    denoiser_name = "transformer"
    default_max_sequence_length = 512
    negative_prompt = " "

    def __init__(self, pipeline, settings: SamplingSettings):
        super().__init__(pipeline, settings)
        if self.denoiser.config.guidance_embeds:
            raise ValueError(
                f"{type(pipeline).__name__} has a guidance-distilled transformer (guidance_embeds=True), which "
                "QwenImageAdapter does not support; use a Qwen-Image checkpoint without guidance embedding."
            )

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
        use_cfg = self.settings.guidance_scale > 1.0
        texts = prompts + [self.negative_prompt] * len(prompts) if use_cfg else prompts
        embeds, mask = self.pipeline.encode_prompt(
            prompt=texts,
            device=device,
            max_sequence_length=self.settings.max_sequence_length or self.default_max_sequence_length,
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        count = len(prompts)
        conditioning = {"prompt_embeds": embeds[:count], "prompt_embeds_mask": mask[:count]}
        if use_cfg:
            conditioning.update(negative_prompt_embeds=embeds[count:], negative_prompt_embeds_mask=mask[count:])
        return conditioning

    def guide(
        self, uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """`QwenImagePipeline`'s true CFG: `uncond + g (cond - uncond)`, rescaled per token to the norm of `cond`."""
        guided = super().guide(uncond, cond, scale)
        return guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    def velocity(self, denoiser: nn.Module, latents, sigma, conditioning):
        embeds = conditioning["prompt_embeds"]
        height, width = self._latent_size()
        return denoiser(
            hidden_states=latents.to(embeds.dtype),
            # QwenImagePipeline passes `timestep / 1000` with `timestep = 1000 * sigma`: the transformer takes sigma.
            timestep=sigma.to(embeds.dtype),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=conditioning["prompt_embeds_mask"],
            img_shapes=[[(1, height // 2, width // 2)]] * latents.shape[0],
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = unpack_2x2(latents, *self._latent_size())[:, :, None]
        return normalized_vae_decode(self.pipeline.vae, latents)[:, 0]

    @torch.no_grad()
    def encode_pixels(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        latents = normalized_vae_encode(self.pipeline.vae, pixels[:, :, None], generator, mode=mode)
        return pack_2x2(latents[:, :, 0])
