# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
A tiny CNN digit classifier, trained in seconds on one digits split.

Trained on the `"reward"` split it is the default reward model; trained on the held-out `"eval"` split it judges
samples (accuracy on the prompted digit) without having seen the generator's data or the reward's.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .data import RESOLUTION, load_digits_split


class DigitClassifier(nn.Module):
    """
    Two conv layers and a linear head on 16x16 grayscale images.

    Takes images `[B, C, H, W]` in `[0, 1]` (RGB is averaged to gray, other sizes are resized to 16x16) and returns
    logits `[B, 10]`.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 4 * 4, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"DigitClassifier takes images [B, C, H, W]; got shape {tuple(images.shape)}.")
        images = images.float()
        if images.shape[1] != 1:
            images = images.mean(dim=1, keepdim=True)
        if images.shape[-2:] != (RESOLUTION, RESOLUTION):
            images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
        return self.head(self.features(images))


def _random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image `[B, 1, H, W]` by up to `max_shift` pixels (zero padding): a cheap augmentation."""
    padded = F.pad(images, [max_shift] * 4)
    shifts = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    height, width = images.shape[-2:]
    return torch.stack([padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(shifts.tolist())])


def train_digit_classifier(split: str, seed: int = 0, epochs: int = 30, batch_size: int = 64) -> DigitClassifier:
    """
    Train a [`DigitClassifier`] on one digits split (AdamW, random 1-pixel shifts); a few seconds on a CPU.

    Args:
        split (`str`): `"reward"` for the reward model, `"eval"` for the held-out judge (or `"base"`).
        seed (`int`, *optional*, defaults to `0`): Seed of the initialisation and of the batch order.
        epochs (`int`, *optional*, defaults to `30`): Passes over the split.
        batch_size (`int`, *optional*, defaults to `64`): Batch size.

    Returns:
        [`DigitClassifier`]: In eval mode, with gradients off.
    """
    images, labels = load_digits_split(split)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(_random_shift(images[index], generator)), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images `[N, C, H, W]` in `[0, 1]` that `classifier` labels as `labels` `[N]`."""
    predictions = classifier(images.to(next(classifier.parameters()).device)).argmax(dim=1).cpu()
    return (predictions == labels.cpu()).float().mean().item()
