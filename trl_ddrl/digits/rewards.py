# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Rewards of the embedded digits job, with the trainer's reward signature `(prompts, images, **columns) -> list[float]`.

- [`DigitClassifierReward`]: how confidently a digit classifier (trained on the `"reward"` split) recognises the
  prompted digit in the sample. The held-out `"eval"` classifier checks that gains are not a hack of this one.
- [`ink_reward`]: mean brightness (ink coverage), a reward that is trivially hacked by thick blobs.
"""

import torch
from torch import nn

from .classifier import train_digit_classifier
from .prompts import parse_digit


REWARD_MODES = ("prob", "log_prob")


class DigitClassifierReward(nn.Module):
    """
    Classifier confidence in the prompted digit: `p(digit | image)` (`mode="prob"`, in `[0, 1]`) or its log
    (`mode="log_prob"`). The digit is parsed from each prompt (`"a handwritten digit 7"` -> 7); a prompt naming no
    digit gets no reward (`None`).

    Args:
        classifier (`nn.Module`, *optional*): A classifier of images `[B, 1, H, W]` in `[0, 1]` to logits `[B, 10]`.
            Defaults to a [`DigitClassifier`] trained on the `"reward"` split with `seed`.
        mode (`str`, *optional*, defaults to `"prob"`): `"prob"` or `"log_prob"`.
        seed (`int`, *optional*, defaults to `0`): Seed of the default classifier's training.
    """

    name = "digit_classifier"

    def __init__(self, classifier: nn.Module | None = None, mode: str = "prob", seed: int = 0):
        super().__init__()
        if mode not in REWARD_MODES:
            raise ValueError(f"mode={mode!r} is not valid; choose one of {', '.join(map(repr, REWARD_MODES))}.")
        self.classifier = classifier if classifier is not None else train_digit_classifier("reward", seed=seed)
        self.mode = mode

    @torch.no_grad()
    def forward(self, prompts: list[str], images: torch.Tensor, **columns) -> list[float | None]:
        """Rewards of images `[B, C, H, W]` in `[0, 1]` for their prompts (`B` of them)."""
        if images.ndim != 4:
            raise ValueError(f"DigitClassifierReward scores images [B, C, H, W]; got shape {tuple(images.shape)}.")
        digits = [parse_digit(prompt) for prompt in prompts]
        device = next(self.classifier.parameters()).device
        log_probs = self.classifier(images.float().to(device)).log_softmax(dim=1).cpu()
        rewards = []
        for row, digit in zip(log_probs, digits, strict=True):
            if digit is None:
                rewards.append(None)
            else:
                value = row[digit]
                rewards.append((value.exp() if self.mode == "prob" else value).item())
        return rewards


def ink_reward(prompts: list[str], images: torch.Tensor, **columns) -> list[float]:
    """Mean pixel value of each image `[B, C, H, W]` in `[0, 1]`: how much ink the digit uses."""
    return images.float().mean(dim=tuple(range(1, images.ndim))).tolist()
