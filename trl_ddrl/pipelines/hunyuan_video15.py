# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Adapter for HunyuanVideo 1.5 text-to-video (`HunyuanVideo15Pipeline`): a rectified-flow video transformer on the
latents of a causal 3D VAE (16x spatial, 4x temporal compression), conditioned on a Qwen2.5-VL prompt encoding and a
ByT5 encoding of the prompt's quoted text.
"""

import numpy as np
import torch
from torch import nn

from .base import Conditioning, SamplingSettings, VideoFlowMatchingAdapter
from .latents import to_unit_range


class HunyuanVideo15Adapter(VideoFlowMatchingAdapter):
    """
    `HunyuanVideo15Pipeline`.

    Latents: `[C, (F - 1) / 4 + 1, H / 16, W / 16]` (`C = 32`), the VAE posterior scaled by `vae.config.scaling_factor`
    (no mean / std normalisation), as the pipeline decodes them. The transformer's input concatenates, as in the
    pipeline, the latents with the image-to-video conditioning channels, which are zero for text-to-video (conditioning
    latents and mask: `2 C + 1` input channels), and takes zero SigLIP image embeddings. The VAE's attention blocks
    broadcast their causal mask wrongly for batches of more than one video (diffusers 0.42), so videos are encoded and
    decoded one at a time.

    Prompts: the Qwen2.5-VL hidden states (third from last layer, the system prompt's tokens cropped) with their
    attention mask, and the ByT5 encoding of the text in quotes in the prompt (zeros without quoted text), as
    `HunyuanVideo15Pipeline.encode_prompt` computes them; `max_sequence_length` sets the Qwen2.5-VL length (the
    pipeline's 1000 by default).

    Guidance: with `guidance_scale > 1`, CFG `uncond + g * (cond - uncond)` against the empty prompt, which is what the
    pipeline's `ClassifierFreeGuidance` guider computes with `guidance_scale=g` (its own start / stop window and
    rescale are not used). Schedule: the pipeline's sigmas `linspace(1, 0, T + 1)[:-1]`, shifted by the scheduler's
    `shift`, then 0; the transformer takes the timestep `1000 * sigma`.
    """

    pipeline_class_names = ("HunyuanVideo15Pipeline",)
    denoiser_name = "transformer"
    default_num_frames = 121

    def __init__(self, pipeline, settings: SamplingSettings):
        super().__init__(pipeline, settings)
        if self.denoiser.config.in_channels != 2 * self.latent_channels + 1:
            raise ValueError(
                f"{type(self.denoiser).__name__} has in_channels={self.denoiser.config.in_channels}, but "
                f"HunyuanVideo15Pipeline feeds 2 * out_channels + 1 = {2 * self.latent_channels + 1} (latents, "
                "conditioning latents, mask). Load a HunyuanVideo 1.5 checkpoint's transformer."
            )

    @property
    def resolution(self) -> tuple[int, int]:
        # The pipeline's default: the bucket of its target size closest to its 16:9 aspect ratio.
        aspect_width, aspect_height = self.pipeline.default_aspect_ratio
        height, width = self.pipeline.video_processor.calculate_default_height_width(
            aspect_height, aspect_width, self.pipeline.target_size
        )
        return self.settings.height or height, self.settings.width or width

    @property
    def resolution_multiple(self) -> int:
        return self.spatial_compression * self.denoiser.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.out_channels

    def scheduler_kwargs(self) -> dict:
        steps = self.settings.num_inference_steps
        return {"sigmas": np.linspace(1.0, 0.0, steps + 1)[:-1]}

    def _encode_text(self, prompts: list[str], device: torch.device) -> Conditioning:
        pipeline = self.pipeline
        embeds, mask = pipeline._get_mllm_prompt_embeds(
            text_encoder=pipeline.text_encoder,
            tokenizer=pipeline.tokenizer,
            prompt=prompts,
            device=device,
            tokenizer_max_length=self.settings.max_sequence_length or pipeline.tokenizer_max_length,
            system_message=pipeline.system_message,
            crop_start=pipeline.prompt_template_encode_start_idx,
        )
        glyph_embeds, glyph_mask = pipeline._get_byt5_prompt_embeds(
            tokenizer=pipeline.tokenizer_2,
            text_encoder=pipeline.text_encoder_2,
            prompt=prompts,
            device=device,
            tokenizer_max_length=pipeline.tokenizer_2_max_length,
        )
        # As `encode_prompt`: everything, masks included, in the transformer's dtype.
        dtype = self.denoiser.dtype
        return {
            "prompt_embeds": embeds.to(device, dtype),
            "prompt_embeds_mask": mask.to(device, dtype),
            "prompt_embeds_2": glyph_embeds.to(device, dtype),
            "prompt_embeds_mask_2": glyph_mask.to(device, dtype),
        }

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        conditioning = self._encode_text(prompts, device)
        if self.settings.guidance_scale > 1.0:
            negative = self._encode_text([""] * len(prompts), device)
            conditioning.update({f"negative_{key}": value for key, value in negative.items()})
        return conditioning

    def velocity(self, denoiser: nn.Module, latents, sigma, conditioning):
        embeds = conditioning["prompt_embeds"]
        batch = latents.shape[0]
        # Text-to-video: the conditioning latents and their mask are zero, as are the image embeddings.
        condition = latents.new_zeros(batch, self.latent_channels + 1, *latents.shape[2:])
        image_embeds = embeds.new_zeros(
            batch, self.pipeline.vision_num_semantic_tokens, self.denoiser.config.image_embed_dim
        )
        timestep = sigma * self.pipeline.scheduler.config.num_train_timesteps
        return denoiser(
            hidden_states=torch.cat([latents, condition], dim=1).to(embeds.dtype),
            image_embeds=image_embeds,
            timestep=timestep.to(embeds.dtype),
            encoder_hidden_states=embeds,
            encoder_attention_mask=conditioning["prompt_embeds_mask"],
            encoder_hidden_states_2=conditioning["prompt_embeds_2"],
            encoder_attention_mask_2=conditioning["prompt_embeds_mask_2"],
            return_dict=False,
        )[0]

    @torch.no_grad()
    def encode_video(
        self, video: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        vae = self.pipeline.vae
        video = video.permute(0, 2, 1, 3, 4).to(vae.device, vae.dtype)
        latents = []
        for sample in video.split(1):
            distribution = vae.encode(sample).latent_dist
            latents.append(distribution.mode() if mode else distribution.sample(generator=generator))
        return torch.cat(latents).float() * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = (latents.float() / vae.config.scaling_factor).to(vae.device, vae.dtype)
        video = torch.cat([vae.decode(sample, return_dict=False)[0] for sample in latents.split(1)])
        return to_unit_range(video).permute(0, 2, 1, 3, 4)
