# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The embedded digits generator: a pixel-space, class-conditional rectified-flow model as a diffusers pipeline.

[`DigitsFlowPipeline`] has three components, all saved and loaded with the usual diffusers methods:

- `prompt_encoder` ([`DigitPromptEncoder`]): parses the digit in the prompt and looks up a learned embedding
  `[B, 1, D]` (an unconditional embedding for prompts that name no digit, which classifier-free guidance uses);
- `unet` (`UNet2DConditionModel`): a tiny convolutional UNet on 16x16x1 pixels in `[-1, 1]` that predicts the flow
  velocity `noise - x0`; the prompt embedding enters through the timestep embedding (`addition_embed_type="text"`);
- `scheduler` (`FlowMatchEulerDiscreteScheduler`, shift 1): the deterministic Euler sampler.

There is no VAE: the latents are the pixels. Load a saved pipeline with `DigitsFlowPipeline.from_pretrained(path)`.
"""

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image
from torch import nn

from .prompts import parse_digit


class DigitPromptEncoder(ModelMixin, ConfigMixin):
    """
    Prompt text to a learned digit embedding.

    The digit is parsed from the prompt with [`~trl_ddrl.digits.prompts.parse_digit`] (`"a handwritten digit 7"` -> 7);
    a prompt that names no digit (the empty negative prompt, for instance) maps to the unconditional index 10.

    Args:
        embedding_dim (`int`, *optional*, defaults to `32`): Size `D` of the embedding; the UNet's
            `cross_attention_dim`.
    """

    num_classes = 10

    @register_to_config
    def __init__(self, embedding_dim: int = 32):
        super().__init__()
        self.embedding = nn.Embedding(self.num_classes + 1, embedding_dim)

    @property
    def unconditional_index(self) -> int:
        """Index of the learned unconditional embedding."""
        return self.num_classes

    def labels(self, prompts: list[str]) -> torch.Tensor:
        """Digit of each prompt, or the unconditional index: `[B]` int64 on the encoder's device."""
        digits = [parse_digit(prompt) for prompt in prompts]
        labels = [self.unconditional_index if digit is None else digit for digit in digits]
        return torch.tensor(labels, dtype=torch.long, device=self.embedding.weight.device)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Embeddings `[B, 1, D]` of labels `[B]` (0..9, or `unconditional_index`)."""
        return self.embedding(labels)[:, None]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Embeddings `[B, 1, D]` of the prompts."""
        return self(self.labels(prompts))


def tiny_digits_unet(embedding_dim: int = 32, sample_size: int = 16, seed: int = 0) -> UNet2DConditionModel:
    """
    A randomly initialised UNet on `[B, 1, sample_size, sample_size]` pixels: two resolution levels (32 and 64
    channels) and no attention, for CPU speed. The `[B, 1, embedding_dim]` prompt embedding is pooled into the
    timestep embedding (`addition_embed_type="text"`), so it conditions every residual block.
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=embedding_dim,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
    )


class DigitsFlowPipeline(DiffusionPipeline):
    """
    Class-conditional rectified-flow pipeline for 16x16 grayscale digits, in pixel space.

    Args:
        unet (`UNet2DConditionModel`): Velocity model on `[B, 1, 16, 16]` pixels in `[-1, 1]`, conditioned by
            `encoder_hidden_states` `[B, 1, D]` and the timestep `sigma * num_train_timesteps`.
        scheduler (`FlowMatchEulerDiscreteScheduler`): The Euler sampler (shift 1).
        prompt_encoder ([`DigitPromptEncoder`]): Prompt text to embeddings `[B, 1, D]`.
    """

    model_cpu_offload_seq = "prompt_encoder->unet"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        prompt_encoder: DigitPromptEncoder,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, prompt_encoder=prompt_encoder)

    def encode_prompt(self, prompt: str | list[str]) -> torch.Tensor:
        """Prompt embeddings `[B, 1, D]`."""
        return self.prompt_encoder.encode([prompt] if isinstance(prompt, str) else list(prompt))

    @staticmethod
    def latents_to_pixels(latents: torch.Tensor) -> torch.Tensor:
        """Model pixels in `[-1, 1]` to images in `[0, 1]` (clamped): `[B, 1, H, W]`."""
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """
        Sample digits with the deterministic Euler (ODE) sampler.

        Args:
            prompt (`str` or `list[str]`): Prompts such as `"a handwritten digit 7"`; one sample per prompt.
            num_inference_steps (`int`, *optional*, defaults to `20`): Euler steps.
            guidance_scale (`float`, *optional*, defaults to `1.0`): Classifier-free guidance scale against the
                unconditional embedding; `1.0` disables it.
            generator (`torch.Generator`, *optional*): Generator of the initial noise (drawn on the CPU).
            latents (`torch.Tensor`, *optional*): Initial noise `[B, 1, 16, 16]`; overrides `generator`.
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"` (grayscale PIL images) or `"pt"` (a float
                tensor `[B, 1, 16, 16]` in `[0, 1]`).
            return_dict (`bool`, *optional*, defaults to `True`): Return an `ImagePipelineOutput` instead of a tuple.
        """
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type={output_type!r} is not supported; use 'pil' or 'pt'.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self.unet.device
        shape = (
            len(prompts),
            self.unet.config.in_channels,
            self.unet.config.sample_size,
            self.unet.config.sample_size,
        )
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}; {len(prompts)} prompts need {shape}.")
        latents = latents.to(device, self.unet.dtype)
        embeds = self.encode_prompt(prompts).to(self.unet.dtype)
        if guidance_scale > 1.0:
            embeds = torch.cat([self.encode_prompt([""] * len(prompts)).to(self.unet.dtype), embeds])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for timestep in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guidance_scale > 1.0 else latents
            velocity = self.unet(
                model_input, timestep.expand(model_input.shape[0]), encoder_hidden_states=embeds
            ).sample
            if guidance_scale > 1.0:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, timestep, latents).prev_sample

        images = self.latents_to_pixels(latents).cpu()
        if output_type == "pil":
            images = [Image.fromarray((image[0].numpy() * 255).round().astype("uint8"), mode="L") for image in images]
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def random_digits_pipeline(embedding_dim: int = 32, seed: int = 0) -> DigitsFlowPipeline:
    """A randomly initialised [`DigitsFlowPipeline`] with the default architecture (what pretraining starts from)."""
    unet = tiny_digits_unet(embedding_dim=embedding_dim, seed=seed)
    torch.manual_seed(seed + 1)
    return DigitsFlowPipeline(
        unet=unet,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        prompt_encoder=DigitPromptEncoder(embedding_dim),
    )
