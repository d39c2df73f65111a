# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The latent conventions of the diffusers VAEs, shared by the adapters: pixels in `[-1, 1]` to the denoiser's latents
and back.

- `scaled_vae_*` (`AutoencoderKL` of SD3 and FLUX.1): `(z - shift_factor) * scaling_factor`.
- `normalized_vae_*` (`AutoencoderKLWan` of Wan and Cosmos, `AutoencoderKLQwenImage`): per-channel
  `(z - latents_mean) / latents_std`, times the EDM data scale `sigma_data` where the model has one.
- `pack_2x2` / `unpack_2x2`: FLUX.1's and Qwen-Image's 2x2 patch tokens.
"""

import torch


def enable_vae_slicing(pipeline) -> bool:
    """
    Make the pipeline's VAE decode and encode one sample at a time (diffusers' slicing), where it has it, so that the
    VAE's activations of a whole rollout chunk are never alive at once (SD3's decoder: ~0.38 GiB per 512 px image,
    ~1.5 GiB at 1024 px; a batch of 32 is 12 and 48 GiB). Each sample's result is the same; returns whether slicing
    is on.
    """
    vae = getattr(pipeline, "vae", None)
    if vae is None or not hasattr(vae, "use_slicing"):
        return False
    vae.use_slicing = True
    return True


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output in `[-1, 1]` to float32 pixels clamped to `[0, 1]`."""
    return (pixels.float() / 2 + 0.5).clamp(0, 1)


def posterior_latents(distribution, generator: torch.Generator | None, mode: bool) -> torch.Tensor:
    """A sample of a VAE's `latent_dist`, or with `mode` its mode (the mean of the diagonal Gaussian)."""
    return distribution.mode() if mode else distribution.sample(generator=generator)


@torch.no_grad()
def scaled_vae_encode(
    vae, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
) -> torch.Tensor:
    """
    Images `[B, C, H, W]` in `[-1, 1]` to `(z - shift_factor) * scaling_factor`, float32 (`z` a posterior sample, or
    with `mode` the posterior's mode).
    """
    latents = posterior_latents(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist, generator, mode)
    return ((latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).float()


@torch.no_grad()
def scaled_vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Undo [`scaled_vae_encode`]'s scaling and decode: images `[B, C, H, W]` in `[0, 1]`, float32."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return to_unit_range(vae.decode(latents, return_dict=False)[0])


def _latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and std, `[1, C, 1, 1, 1]` each, on `like`'s device and dtype."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def normalized_vae_encode(
    vae, video: torch.Tensor, generator: torch.Generator | None = None, sigma_data: float = 1.0, mode: bool = False
) -> torch.Tensor:
    """
    Encode pixels with a VAE that has per-channel latent statistics and normalise the latents as the Wan, Cosmos and
    Qwen-Image pipelines do: `(z - latents_mean) / latents_std * sigma_data`.

    Args:
        vae (`AutoencoderKLWan` or `AutoencoderKLQwenImage`): The VAE.
        video (`torch.Tensor` of shape `[B, C, F, H, W]`): Pixels in `[-1, 1]` (the VAE's channel-first layout).
        generator (`torch.Generator`, *optional*): Generator for the posterior sample.
        sigma_data (`float`): Data scale of EDM-preconditioned models (Cosmos Predict2); 1 for the others.
        mode (`bool`): Take the posterior's mode instead of a sample (as Cosmos Predict2.5 and Wan image-to-video do
            for their conditioning frames).

    Returns:
        `torch.Tensor` of shape `[B, z_dim, (F - 1) // 4 + 1, H / 8, W / 8]` (for the usual 4x/8x compression), float32.
    """
    distribution = vae.encode(video.to(vae.device, vae.dtype)).latent_dist
    latents = (distribution.mode() if mode else distribution.sample(generator=generator)).float()
    mean, std = _latent_statistics(vae, latents)
    return (latents - mean) / std * sigma_data


@torch.no_grad()
def normalized_vae_decode(vae, latents: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """
    Undo [`normalized_vae_encode`]'s normalisation and decode.

    Args:
        vae (`AutoencoderKLWan` or `AutoencoderKLQwenImage`): The VAE.
        latents (`torch.Tensor` of shape `[B, z_dim, F', H', W']`): Normalised latents.
        sigma_data (`float`): As in [`normalized_vae_encode`].

    Returns:
        `torch.Tensor` of shape `[B, F, C, H, W]`: frames in `[0, 1]`, float32.
    """
    latents = latents.to(vae.device, torch.float32)
    mean, std = _latent_statistics(vae, latents)
    video = vae.decode((latents / sigma_data * std + mean).to(vae.dtype), return_dict=False)[0]
    return to_unit_range(video).permute(0, 2, 1, 3, 4)


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """Latents `[B, C, H, W]` to 2x2 patch tokens `[B, H / 2 * W / 2, 4 C]` (row-major patches, channels first)."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_2x2(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Undo [`pack_2x2`]: tokens `[B, H / 2 * W / 2, 4 C]` to latents `[B, C, H, W]` (`height`, `width` in latents)."""
    batch, _, channels = tokens.shape
    latents = tokens.view(batch, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // 4, height, width)
