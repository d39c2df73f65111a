# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Scoring videos `[B, F, C, H, W]` with image rewards: one score per frame, averaged per video."""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .base import check_rewards


def reward_name(reward_func: Callable) -> str:
    """The name the trainer logs a reward under: its `name`, else its `__name__`, else its class name."""
    return getattr(reward_func, "name", None) or getattr(reward_func, "__name__", None) or type(reward_func).__name__


def frame_indices(total: int, num_frames: int | None) -> torch.Tensor:
    """`num_frames` evenly spaced frame indices out of `total` (first and last included); all frames if None."""
    if num_frames is None or num_frames >= total:
        return torch.arange(total)
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be at least 1 (or None for every frame).")
    return torch.linspace(0, total - 1, num_frames).round().long()


def score_per_frame(
    image_reward: Callable, prompts: list[str], videos: torch.Tensor, num_frames: int | None = None, **kwargs: Any
) -> list[float | None]:
    """
    Score each frame of each video with `image_reward` and average the frame scores per video.

    Args:
        image_reward (`Callable`):
            An image reward `(prompts, images, **kwargs) -> list[float | None]` taking images `[N, C, H, W]`.
        prompts (`list[str]`):
            One prompt per video, `B` in all.
        videos (`torch.Tensor`):
            Videos of shape `[B, F, C, H, W]`, floats in `[0, 1]`.
        num_frames (`int`, *optional*):
            Score only this many evenly spaced frames per video (first and last included); every frame if None.
        **kwargs:
            Forwarded to `image_reward`. Per-sample columns (lists or tuples of length `B`) are repeated for every
            scored frame; anything else (such as `trainer_state`) is passed unchanged.

    Returns:
        `list[float | None]`: one value per video, the mean over its frames that got a reward; None if none did.
    """
    if videos.ndim != 5:
        raise ValueError(f"score_per_frame expects videos of shape [B, F, C, H, W], got shape {tuple(videos.shape)}.")
    batch_size = videos.shape[0]
    indices = frame_indices(videos.shape[1], num_frames).to(videos.device)
    per_video = len(indices)
    frames = videos.index_select(1, indices).flatten(0, 1)
    frame_prompts = [prompt for prompt in prompts for _ in range(per_video)]
    frame_kwargs = {
        key: [item for item in value for _ in range(per_video)]
        if isinstance(value, (list, tuple)) and len(value) == batch_size
        else value
        for key, value in kwargs.items()
    }
    values = image_reward(prompts=frame_prompts, images=frames, **frame_kwargs)
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().tolist()
    checked = check_rewards(values, len(frame_prompts), reward_name(image_reward), frame_prompts)
    checked = torch.tensor(checked, dtype=torch.float64).view(batch_size, per_video)
    scored = ~torch.isnan(checked)
    means = torch.where(scored, checked, 0.0).sum(dim=1) / scored.sum(dim=1).clamp(min=1)
    return [
        mean if any_scored else None
        for mean, any_scored in zip(means.tolist(), scored.any(dim=1).tolist(), strict=True)
    ]


class PerFrameReward(nn.Module):
    """
    Turn an image reward into a video reward: score every frame (or `num_frames` evenly spaced frames) and average.

    Images `[B, C, H, W]` go to the wrapped reward unchanged, so the wrapper also works for image models. It is an
    `nn.Module` so that the trainer moves a wrapped reward model to the device.

    Args:
        image_reward (`Callable`):
            An image reward function or `nn.Module`, `(prompts, images, **kwargs) -> list[float | None]`.
        num_frames (`int`, *optional*):
            How many evenly spaced frames to score per video; every frame if None.

    Example:

    ```python
    >>> from trl_ddrl.rewards import PerFrameReward, get_reward_function

    >>> video_reward = PerFrameReward(get_reward_function("jpeg_compressibility"), num_frames=4)
    ```
    """

    def __init__(self, image_reward: Callable, num_frames: int | None = None):
        super().__init__()
        if not callable(image_reward):
            raise TypeError(f"PerFrameReward needs a callable image reward, got {image_reward!r}.")
        frame_indices(1, num_frames)  # validates num_frames
        self.image_reward = image_reward
        self.num_frames = num_frames
        self.name = reward_name(image_reward)

    def forward(self, prompts: list[str], images: torch.Tensor, **kwargs: Any) -> list[float | None]:
        """Rewards, one per sample, for `images` `[B, C, H, W]` or videos `[B, F, C, H, W]` in `[0, 1]`."""
        if images.ndim == 4:
            return self.image_reward(prompts=prompts, images=images, **kwargs)
        return score_per_frame(self.image_reward, prompts, images, self.num_frames, **kwargs)
