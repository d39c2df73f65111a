# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Reward functions for DDRL, following TRL's conventions: callables `(prompts, images, **columns) -> list[float]`."""

import importlib
from typing import TYPE_CHECKING

from . import builtin, hpsv3, videoalign, vlm_judge  # noqa: F401  (register their rewards; a new reward module adds its import here)
from .base import RewardFunctionError, check_rewards
from .registry import available_rewards, get_reward_function, register_reward, resolve_reward_funcs


# Classes imported on first use: the reward models pull in transformers, the server needs the `rewards` extra.
_LAZY_IMPORTS = {
    "AestheticMLP": "models",
    "AestheticScore": "models",
    "CLIPScore": "models",
    "HPSv2Score": "models",
    "HPSv3Reward": "hpsv3",
    "ImageRewardScore": "models",
    "PickScore": "models",
    "OCRReward": "ocr",
    "PerFrameReward": "video",
    "RemoteReward": "remote",
    "OpenAIJudge": "vlm_judge",
    "VLMJudge": "vlm_judge",
    "VideoAlignReward": "videoalign",
    "create_app": "server",
}

if TYPE_CHECKING:
    from .hpsv3 import HPSv3Reward
    from .models import AestheticMLP, AestheticScore, CLIPScore, HPSv2Score, ImageRewardScore, PickScore
    from .ocr import OCRReward
    from .remote import RemoteReward
    from .server import create_app
    from .video import PerFrameReward
    from .videoalign import VideoAlignReward
    from .vlm_judge import OpenAIJudge, VLMJudge


def __getattr__(name: str):
    if name in _LAZY_IMPORTS:
        return getattr(importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "RewardFunctionError",
    "available_rewards",
    "check_rewards",
    "get_reward_function",
    "register_reward",
    "resolve_reward_funcs",
    *_LAZY_IMPORTS,
]
