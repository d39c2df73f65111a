# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Adapter for Qwen-Image-Edit (`QwenImageEditPipeline`): Qwen-Image conditioned on a source image, which the
Qwen2.5-VL prompt encoder sees next to the edit instruction and whose VAE latents the transformer attends to.
"""

import numpy as np
import torch
from PIL import Image
from torch import nn

from .base import Conditioning
from .latents import normalized_vae_encode, pack_2x2
from .qwenimage import QwenImageAdapter


def to_pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels `[B, C, H, W]` in `[-1, 1]` to 8-bit RGB PIL images (what the Qwen2.5-VL processor reads)."""
    values = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if values.shape[1] == 1:
        values = values.expand(-1, 3, -1, -1)
    return [Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())) for image in values]


class QwenImageEditAdapter(QwenImageAdapter):
    """
    `QwenImageEditPipeline` (`Qwen/Qwen-Image-Edit`): image-conditioned generation. Every sample edits a source image
    (`conditioned_on_source_image`): `encode_prompts(prompts, device, source_images=...)` encodes each instruction with
    its source image through the Qwen2.5-VL processor and text encoder (the pipeline's edit chat template), and the
    source's VAE latents (posterior mode, normalised and packed like the samples, under `image_latents`) are appended
    to the transformer's image tokens at each step, as in the pipeline; the velocity is read off the sample's tokens.
    The data term conditions the same way on each data row's source image, so it learns the edit from source to
    target.

    The pipeline resizes the source to about 1 megapixel whatever the output size; DDRL conditions on the source at the
    training resolution (`height` x `width`, 1024 x 1024 by default, which is the pipeline's own size for a square
    source). Everything else (schedule, true CFG against `" "` with its norm rescaling, latents) is
    [`QwenImageAdapter`]'s.
    """

    pipeline_class_names = ("QwenImageEditPipeline",)
    conditioned_on_source_image = True

    @torch.no_grad()
    def encode_source_images(self, source_images: torch.Tensor) -> torch.Tensor:
        """Source pixels `[B, C, H, W]` in `[-1, 1]` to packed, normalised latent tokens `[B, L, 4 C]` (posterior mode)."""
        latents = normalized_vae_encode(self.pipeline.vae, source_images[:, :, None], mode=True)
        return pack_2x2(latents[:, :, 0])

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], device: torch.device, source_images: torch.Tensor | None = None
    ) -> Conditioning:
        """
        Args:
            prompts (`list[str]`): Edit instructions.
            device (`torch.device`): Device of the conditioning.
            source_images (`torch.Tensor` of shape `[B, C, H, W]`): The images to edit, in `[-1, 1]`, at the adapter's
                resolution, one per prompt.

        Returns:
            `dict` with `prompt_embeds`, `prompt_embeds_mask` and `image_latents` (and their `negative_` twins, the
            negative prompt `" "` with the same source, when `guidance_scale > 1`).
        """
        name = type(self.pipeline).__name__
        if source_images is None:
            raise ValueError(
                f"{name} edits a source image: encode_prompts needs source_images ([B, C, H, W] in [-1, 1]); "
                "DDRLTrainer reads them from each row's source_image_column."
            )
        if source_images.ndim != 4 or source_images.shape[0] != len(prompts):
            raise ValueError(
                f"{name}: source_images must be [B, C, H, W] with one image per prompt; got shape "
                f"{tuple(source_images.shape)} for {len(prompts)} prompts."
            )
        use_cfg = self.settings.guidance_scale > 1.0
        count = len(prompts)
        images = to_pil_images(source_images)
        texts = prompts + [self.negative_prompt] * count if use_cfg else prompts
        embeds, mask = self.pipeline.encode_prompt(
            prompt=texts, image=images * 2 if use_cfg else images, device=device
        )
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        source = self.encode_source_images(source_images.to(device)).to(embeds.device)
        conditioning = {"prompt_embeds": embeds[:count], "prompt_embeds_mask": mask[:count], "image_latents": source}
        if use_cfg:
            conditioning.update(
                negative_prompt_embeds=embeds[count:],
                negative_prompt_embeds_mask=mask[count:],
                negative_image_latents=source,
            )
        return conditioning

    def velocity(self, denoiser: nn.Module, latents, sigma, conditioning):
        if "image_latents" not in conditioning:
            raise ValueError(
                f"{type(self.pipeline).__name__} needs the source image: build the conditioning with "
                "adapter.encode_prompts(prompts, device, source_images=...)."
            )
        embeds = conditioning["prompt_embeds"]
        height, width = self._latent_size()
        # The sample's tokens, then the source's, at the same size (DDRL conditions at the training resolution).
        shapes = [(1, height // 2, width // 2)] * 2
        output = denoiser(
            hidden_states=torch.cat([latents.float(), conditioning["image_latents"].float()], dim=1).to(embeds.dtype),
            timestep=sigma.to(embeds.dtype),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=conditioning["prompt_embeds_mask"],
            img_shapes=[shapes] * latents.shape[0],
            return_dict=False,
        )[0]
        return output[:, : latents.shape[1]]
