# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Sample quality of a digits generator: fixed-noise samples of every digit, judged by a digit classifier."""

import torch
from torch import nn

from .pipeline import DigitsFlowPipeline
from .prompts import digits_prompt


def fixed_noise(samples_per_digit: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """
    The evaluation noise `[10 * samples_per_digit, 1, size, size]`, digit-major (all samples of 0, then of 1, ...).
    The same seed gives the same noise, so before/after comparisons start every sample from the same point.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(10 * samples_per_digit, 1, size, size, generator=generator)


@torch.no_grad()
def sample_digits(
    pipeline: DigitsFlowPipeline,
    samples_per_digit: int,
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Sample every digit from fixed noise with the pipeline's deterministic sampler.

    Returns:
        `tuple`: images `[10 * samples_per_digit, 1, 16, 16]` in `[0, 1]` (digit-major) and their prompted labels
        `[10 * samples_per_digit]`.
    """
    labels = torch.arange(10).repeat_interleave(samples_per_digit)
    noise = fixed_noise(samples_per_digit, seed, pipeline.unet.config.sample_size)
    images = pipeline(
        [digits_prompt(label) for label in labels.tolist()],
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        latents=noise,
        output_type="pt",
    ).images
    return images, labels


@torch.no_grad()
def per_digit_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """
    Accuracy of `classifier` on images `[N, 1, H, W]` against their prompted labels `[N]`: one entry per digit
    (`"0"`..`"9"`) and the overall `"mean"`.
    """
    predictions = classifier(images.to(next(classifier.parameters()).device)).argmax(dim=1).cpu()
    correct = (predictions == labels).float()
    accuracy = {str(digit): correct[labels == digit].mean().item() for digit in labels.unique().tolist()}
    accuracy["mean"] = correct.mean().item()
    return accuracy
