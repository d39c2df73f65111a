# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Built-in rewards that need no model: JPEG (in)compressibility and brightness."""

import io

import numpy as np
import torch
from PIL import Image

from .frames import to_uint8_frames
from .registry import register_reward


def jpeg_size_kb(frame: np.ndarray, quality: int = 95) -> float:
    """Size in kB of one `[H, W, C]` uint8 frame saved as JPEG."""
    buffer = io.BytesIO()
    image = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def _per_sample(images: torch.Tensor, values: list[float]) -> list[float]:
    frames = images.shape[1] if images.ndim == 5 else 1
    return [float(np.mean(values[i * frames : (i + 1) * frames])) for i in range(images.shape[0])]


@register_reward("jpeg_compressibility")
def jpeg_compressibility():
    """Negative JPEG size in kB (DDPO's compressibility task): rewards simple, flat images."""

    def jpeg_compressibility(prompts, images, **kwargs):
        return _per_sample(images, [-jpeg_size_kb(frame) for frame in to_uint8_frames(images)])

    return jpeg_compressibility


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility():
    """JPEG size in kB (DDPO's incompressibility task): rewards detail, and noise, so it invites hacking."""

    def jpeg_incompressibility(prompts, images, **kwargs):
        return _per_sample(images, [jpeg_size_kb(frame) for frame in to_uint8_frames(images)])

    return jpeg_incompressibility


@register_reward("brightness")
def brightness():
    """Mean pixel value in [0, 1]: the simplest reward to hack (washed-out images)."""

    def brightness(prompts, images, **kwargs):
        dims = tuple(range(1, images.ndim))
        return images.float().mean(dim=dims).tolist()

    return brightness


# Model-based rewards. The text after `name:` is split on commas into the class's leading positional arguments.


def _arguments(argument: str) -> list[str]:
    return [part.strip() for part in argument.split(",")] if argument else []


@register_reward("clip_score")
def clip_score(argument: str = ""):
    """`clip_score[:<CLIP model>[,<tokenizer>]]`: [`~trl_ddrl.rewards.CLIPScore`], cosine of CLIP embeddings."""
    from .models import CLIPScore

    return CLIPScore(*_arguments(argument))


@register_reward("pickscore")
def pickscore(argument: str = ""):
    """`pickscore[:<model>[,<tokenizer>]]`: [`~trl_ddrl.rewards.PickScore`]."""
    from .models import PickScore

    return PickScore(*_arguments(argument))


@register_reward("hpsv2")
def hpsv2(argument: str = ""):
    """`hpsv2:<converted CLIPModel checkpoint>[,<tokenizer>]`: [`~trl_ddrl.rewards.HPSv2Score`]."""
    from .models import HPSv2Score

    return HPSv2Score(*_arguments(argument))


@register_reward("aesthetic")
def aesthetic(argument: str = ""):
    """`aesthetic[:<MLP weights file, directory or hub repo>[,<CLIP model>]]`: [`~trl_ddrl.rewards.AestheticScore`]."""
    from .models import AestheticScore

    return AestheticScore(*_arguments(argument))


@register_reward("image_reward")
def image_reward(argument: str = ""):
    """`image_reward[:<name or checkpoint>]`: [`~trl_ddrl.rewards.ImageRewardScore`] (`pip install image-reward`)."""
    from .models import ImageRewardScore

    return ImageRewardScore(*_arguments(argument))


@register_reward("ocr")
def ocr():
    """`ocr`: [`~trl_ddrl.rewards.OCRReward`] with pytesseract; pass `OCRReward(recognize=...)` for another engine."""
    from .ocr import OCRReward

    return OCRReward()
