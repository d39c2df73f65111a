# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Adapter for Wan 2.1 / 2.2 text-to-video (`WanPipeline`): a rectified-flow video transformer on the latents of the
causal 3D Wan VAE, conditioned on UMT5 text embeddings.
"""

import torch
from torch import nn

from .base import Conditioning, SamplingSettings, VideoFlowMatchingAdapter, encode_prompt_pairs
from .experts import EXPERTS_OF_CHOICE, HIGH_NOISE, TimestepExperts


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

    Wan 2.2 A14B (two experts: `transformer` for the high-noise steps, `transformer_2` for the low-noise ones, split at
    `boundary_ratio * num_train_timesteps` in the pipeline config): the denoiser is a
    [`~trl_ddrl.pipelines.experts.TimestepExperts`] holding both, which routes every model call as the pipeline does;
    `settings.train_experts` picks the experts that train (the others are frozen) and [`trainable_steps`] the sampling
    steps they compute. Wan 2.2 TI2V (`expand_timesteps=True`) is supported for text-to-video.
    """

    pipeline_class_names = ("WanPipeline",)
    denoiser_name = "transformer"
    default_resolution = (480, 832)
    default_num_frames = 81
    default_max_sequence_length = 512

    def __init__(self, pipeline, settings: SamplingSettings):
        if getattr(pipeline, "transformer_2", None) is not None and pipeline.config.get("boundary_ratio") is None:
            raise ValueError(
                f"{type(pipeline).__name__} has a transformer_2 but no boundary_ratio in its config, so the pipeline "
                "never calls transformer_2. Set the checkpoint's boundary_ratio (Wan 2.2 T2V A14B: 0.875, I2V A14B: "
                "0.9) with pipeline.register_to_config(boundary_ratio=...), or drop transformer_2."
            )
        if getattr(pipeline, "transformer", None) is None:
            raise ValueError(f"{type(pipeline).__name__} has no transformer; DDRLTrainer needs the high-noise expert.")
        super().__init__(pipeline, settings)

    @property
    def has_experts(self) -> bool:
        return getattr(self.pipeline, "transformer_2", None) is not None

    @property
    def denoiser(self) -> nn.Module:
        """`transformer`, or for Wan 2.2 A14B both experts in one [`TimestepExperts`] (built once)."""
        if not self.has_experts:
            return self.pipeline.transformer
        experts = self.__dict__.get("_experts")
        if experts is None:
            choice = self.settings.train_experts
            if choice not in EXPERTS_OF_CHOICE:
                raise ValueError(
                    f"train_experts={choice!r} is not valid; choose one of {', '.join(map(repr, EXPERTS_OF_CHOICE))}."
                )
            boundary = self.pipeline.config.boundary_ratio * self.pipeline.scheduler.config.num_train_timesteps
            experts = self._experts = TimestepExperts(
                self.pipeline.transformer, self.pipeline.transformer_2, boundary, EXPERTS_OF_CHOICE[choice]
            )
        return experts

    def frozen_modules(self) -> list[nn.Module]:
        # The experts are both in the denoiser, which keeps the untrained one frozen.
        return [module for module in super().frozen_modules() if module is not self.pipeline.transformer_2]

    def _guided_velocity(self, denoiser, latents, sigma, conditioning):
        # Wan 2.2 A14B: the low-noise expert's steps guided with `guidance_scale_2`, as in the pipeline.
        scale_2 = self.settings.guidance_scale_2
        if scale_2 is None or self.settings.guidance_scale <= 1.0:
            return super()._guided_velocity(denoiser, latents, sigma, conditioning)
        high = self.denoiser.is_high_noise(sigma * self.pipeline.scheduler.config.num_train_timesteps)
        scale = torch.where(high, self.settings.guidance_scale, scale_2).view(-1, *[1] * (latents.ndim - 1))

        def velocity(latents, sigma, conditioning):
            return self.velocity(denoiser, latents, sigma, conditioning)

        return self.guided(velocity, latents, sigma, conditioning, scale)

    def trainable_steps(self) -> list[int] | None:
        """
        With one of two experts trained, the stochastic steps whose model calls it computes: the timesteps of the
        sampler's noise levels (`model_sigmas() * num_train_timesteps`, as passed to the denoiser) routed to it.
        """
        if not self.has_experts or self.settings.train_experts == "all":
            return None
        experts = self.denoiser
        timesteps = self.model_sigmas()[:-2] * self.pipeline.scheduler.config.num_train_timesteps
        high = experts.is_high_noise(timesteps).tolist()
        trains_high = HIGH_NOISE in experts.trained
        return [step for step, is_high in enumerate(high) if is_high == trains_high]

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


class WanImageToVideoAdapter(WanAdapter):
    """
    `WanImageToVideoPipeline` (image-to-video): videos of `num_frames = 4k + 1` frames continuing the first frame of
    each row's `image_column` (an image, or a clip's first frame), in the pipeline's two conditioning forms:

    - Wan 2.1 I2V (`Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`): the transformer takes the latents concatenated with the
      conditioning `condition` `[4 + C, F', H', W']`: a first-frame mask (ones on the first latent frame) and the
      latents of the image followed by `num_frames - 1` zero frames (posterior mode, normalised), and cross-attends to
      the CLIP vision encoder's penultimate hidden states of the image (`image_embeds`). The sampled latents are the
      video's own `[C, F', H', W']`.
    - Wan 2.2 TI2V (`expand_timesteps=True`, `Wan-AI/Wan2.2-TI2V-5B-Diffusers`): the first latent frame is the
      image's latents (`condition_latents`), seen at timestep 0, the others noisy; the velocity there is replaced by
      `(x_t - c) / t`, so rollouts land on the image's latents exactly as the pipeline's final replacement does, and
      the data term puts no loss on it.

    The data term conditions each data video on its own first frame. Rollouts with CFG use the same image
    conditioning in both branches, as the pipeline does. Last-frame conditioning (`last_image`, FLF2V) is not
    supported. The pipeline cleans prompts with `ftfy` (`pip install ftfy`).
    """

    pipeline_class_names = ("WanImageToVideoPipeline",)
    num_conditioning_frames = 1

    @property
    def expand_timesteps(self) -> bool:
        return bool(self.pipeline.config.get("expand_timesteps", False))

    @property
    def latent_channels(self) -> int:
        # Wan 2.1 I2V's transformer also takes the mask and the image-video latents.
        return self.pipeline.vae.config.z_dim

    def _first_frame_indicator(self, like: torch.Tensor) -> torch.Tensor:
        """`[1, 1, F', 1, 1]`: 1 on the first latent frame, 0 elsewhere."""
        indicator = like.new_zeros(1, 1, like.shape[2], 1, 1)
        indicator[:, :, 0] = 1.0
        return indicator

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIP vision encoder's penultimate hidden states of `images` `[B, C, H, W]` in `[-1, 1]`, `[B, L, D]`."""
        # As 8-bit images, the form in which the pipeline gets them (PIL) and its image processor resizes them.
        images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        inputs = self.pipeline.image_processor(images=list(images.numpy()), return_tensors="pt")
        encoder = self.pipeline.image_encoder
        pixel_values = inputs.pixel_values.to(encoder.device, encoder.dtype)
        return encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]

    @torch.no_grad()
    def encode_condition_frames(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> Conditioning:
        """
        The image conditioning of the pipeline from the first frame of `pixels` (`[B, C, H, W]` or `[B, F, C, H, W]`
        in `[-1, 1]`): `condition` and `image_embeds` (Wan 2.1), or `condition_latents` (Wan 2.2 TI2V), with their
        `negative_` copies when `guidance_scale > 1`. Merge it into the conditioning from `encode_prompts`.
        """
        image = pixels[:, 0] if pixels.ndim == 5 else pixels
        if self.expand_timesteps:
            conditioning = {"condition_latents": self.encode_video(image[:, None], mode=True)}
        else:
            frames = torch.cat(
                [image[:, None], image.new_zeros(image.shape[0], self.num_frames - 1, *image.shape[1:])], 1
            )
            latents = self.encode_video(frames, mode=True)
            mask = self._first_frame_indicator(latents).expand(
                latents.shape[0], self.temporal_compression, -1, *latents.shape[3:]
            )
            conditioning = {"condition": torch.cat([mask, latents], dim=1)}
            if self.denoiser.config.image_dim is not None:
                conditioning["image_embeds"] = self.encode_image(image)
        if self.settings.guidance_scale > 1.0:
            conditioning.update({f"negative_{key}": value for key, value in conditioning.items()})
        return conditioning

    def data_conditioning(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> Conditioning:
        return self.encode_condition_frames(pixels, generator)

    def velocity(self, denoiser: nn.Module, latents, sigma, conditioning):
        key = "condition_latents" if self.expand_timesteps else "condition"
        if key not in conditioning:
            raise ValueError(
                f"{type(self.pipeline).__name__} needs the conditioning image: add the output of "
                "adapter.encode_condition_frames(pixels) to the conditioning."
            )
        embeds = conditioning["prompt_embeds"]
        timestep = sigma * self.pipeline.scheduler.config.num_train_timesteps
        if not self.expand_timesteps:
            return denoiser(
                hidden_states=torch.cat([latents.float(), conditioning["condition"].float()], dim=1).to(embeds.dtype),
                timestep=timestep,
                encoder_hidden_states=embeds,
                encoder_hidden_states_image=conditioning.get("image_embeds"),
                return_dict=False,
            )[0]
        latents, condition = latents.float(), conditioning["condition_latents"].float()
        indicator = self._first_frame_indicator(latents)
        _, frames, height, width = latents.shape[1:]
        # One timestep per latent token (2x2 patches): 0 on the given first frame.
        per_frame = (1 - indicator.view(1, frames, 1)) * timestep.view(-1, 1, 1)
        output = denoiser(
            hidden_states=(indicator * condition + (1 - indicator) * latents).to(embeds.dtype),
            timestep=per_frame.expand(-1, -1, (height // 2) * (width // 2)).flatten(1),
            encoder_hidden_states=embeds,
            return_dict=False,
        )[0]
        # Where the frame is given, the denoised estimate is the image itself: x0 = c, v = (x_t - c) / t.
        sigma = sigma.float().view(-1, 1, 1, 1, 1)
        return indicator * (latents - condition) / sigma + (1 - indicator) * output.float()
