# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Adapter for Wan 2.1 / 2.2 text-to-video (`WanPipeline`): a rectified-flow video transformer on the latents of the
causal 3D Wan VAE, conditioned on UMT5 text embeddings.

The VAE helpers here (`wan_vae_encode`, `wan_vae_decode`) are shared with the Cosmos Predict2 adapters, whose
pipelines use the same `AutoencoderKLWan`.
"""

import torch
from torch import nn

from .base import Conditioning, FlowMatchingAdapter, SamplingSettings


def _latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and std, `[1, C, 1, 1, 1]` each, on `like`'s device and dtype."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def wan_vae_encode(
    vae, video: torch.Tensor, generator: torch.Generator | None = None, sigma_data: float = 1.0
) -> torch.Tensor:
    """
    Encode pixels with an `AutoencoderKLWan` and normalise the latents as the Wan and Cosmos pipelines do:
    `(z - latents_mean) / latents_std * sigma_data`.

    Args:
        vae (`AutoencoderKLWan`): The VAE.
        video (`torch.Tensor` of shape `[B, C, F, H, W]`): Pixels in `[-1, 1]` (the VAE's channel-first layout).
        generator (`torch.Generator`, *optional*): Generator for the posterior sample.
        sigma_data (`float`): Data scale of EDM-preconditioned models (Cosmos); 1 for Wan.

    Returns:
        `torch.Tensor` of shape `[B, z_dim, (F - 1) // 4 + 1, H / 8, W / 8]` (for the usual 4x/8x compression), float32.
    """
    latents = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.sample(generator=generator).float()
    mean, std = _latent_statistics(vae, latents)
    return (latents - mean) / std * sigma_data


@torch.no_grad()
def wan_vae_decode(vae, latents: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """
    Undo [`wan_vae_encode`]'s normalisation and decode.

    Args:
        vae (`AutoencoderKLWan`): The VAE.
        latents (`torch.Tensor` of shape `[B, z_dim, F', H', W']`): Normalised latents.
        sigma_data (`float`): As in [`wan_vae_encode`].

    Returns:
        `torch.Tensor` of shape `[B, F, C, H, W]`: frames in `[0, 1]`, float32.
    """
    latents = latents.to(vae.device, torch.float32)
    mean, std = _latent_statistics(vae, latents)
    video = vae.decode((latents / sigma_data * std + mean).to(vae.dtype), return_dict=False)[0]
    return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)


def check_num_frames(num_frames: int, temporal: int) -> None:
    """The Wan VAE (also Cosmos Predict2's) encodes `temporal * k + 1` frames: the first alone, then groups."""
    if (num_frames - 1) % temporal:
        raise ValueError(
            f"num_frames={num_frames} is not {temporal}k + 1, which the Wan VAE needs (its first frame is encoded "
            f"alone, then every {temporal} frames make one latent frame). Use for example "
            f"{(num_frames - 1) // temporal * temporal + 1}."
        )


@torch.no_grad()
def encode_t5_prompts(adapter: FlowMatchingAdapter, prompts: list[str], device: torch.device) -> Conditioning:
    """
    Prompt conditioning of the pipelines whose `encode_prompt` returns `(prompt_embeds, negative_prompt_embeds)` from
    one T5-family encoder (Wan, Cosmos Predict2); the empty negative prompt only when CFG is on.
    """
    use_cfg = adapter.settings.guidance_scale > 1.0
    embeds, negative_embeds = adapter.pipeline.encode_prompt(
        prompt=prompts,
        do_classifier_free_guidance=use_cfg,
        max_sequence_length=adapter.settings.max_sequence_length or adapter.default_max_sequence_length,
        device=device,
    )
    conditioning = {"prompt_embeds": embeds}
    if use_cfg:
        conditioning["negative_prompt_embeds"] = negative_embeds
    return conditioning


class WanAdapter(FlowMatchingAdapter):
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
    default_num_frames = 81
    default_max_sequence_length = 512

    def __init__(self, pipeline, settings: SamplingSettings):
        super().__init__(pipeline, settings)
        if getattr(pipeline, "transformer_2", None) is not None:
            raise ValueError(
                f"{type(pipeline).__name__} has two denoisers (transformer and transformer_2, the Wan 2.2 A14B "
                "mixture of experts); DDRLTrainer trains a single denoiser. Use a single-transformer Wan checkpoint "
                "such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers or Wan-AI/Wan2.2-TI2V-5B-Diffusers."
            )
        check_num_frames(self.num_frames, pipeline.vae_scale_factor_temporal)

    @property
    def resolution_multiple(self) -> int:
        return self.pipeline.vae_scale_factor_spatial * self.denoiser.config.patch_size[1]

    @property
    def num_frames(self) -> int:
        """Frames per generated video."""
        return self.settings.num_frames or self.default_num_frames

    @property
    def resolution(self) -> tuple[int, int]:
        return self.settings.height or 480, self.settings.width or 832

    def latent_shape(self) -> tuple[int, ...]:
        height, width = self.resolution
        spatial, temporal = self.pipeline.vae_scale_factor_spatial, self.pipeline.vae_scale_factor_temporal
        frames = (self.num_frames - 1) // temporal + 1
        return (self.denoiser.config.in_channels, frames, height // spatial, width // spatial)

    def sigmas(self) -> torch.Tensor:
        """
        The scheduler's flow sigmas. UniPC's first level is `shift(1 - 1 / 1000)` (0.9997 for `flow_shift=3`), pure
        noise in all but name; it is set to 1 so that the SDE's noise coefficient, which diverges at 1, is clamped at
        the second level as for the other flow-matching families (at 0.9997 the first step's noise would be ~7x
        larger).
        """
        sigmas = super().sigmas().clone()
        if sigmas[0] > 1 - 1 / self.pipeline.scheduler.config.num_train_timesteps:
            sigmas[0] = 1.0
        if not (sigmas[0] <= 1.0 and sigmas[-1] == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())):
            raise ValueError(
                f"The scheduler of {type(self.pipeline).__name__} ({type(self.pipeline.scheduler).__name__}) gives "
                f"sigmas {sigmas.tolist()}, not flow-matching noise levels from 1 to 0. Use the checkpoint's scheduler "
                "(UniPCMultistepScheduler with use_flow_sigmas=True, prediction_type='flow_prediction' and flow_shift) "
                "or a FlowMatchEulerDiscreteScheduler."
            )
        return sigmas

    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        return encode_t5_prompts(self, prompts, device)

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

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return wan_vae_decode(self.pipeline.vae, latents)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if pixels.ndim != 5:
            raise ValueError(
                f"{type(self.pipeline).__name__} trains on videos [B, F, C, H, W]; got pixels of shape "
                f"{tuple(pixels.shape)}. Give the data term videos of num_frames={self.num_frames} frames."
            )
        return wan_vae_encode(self.pipeline.vae, pixels.permute(0, 2, 1, 3, 4), generator=generator)
