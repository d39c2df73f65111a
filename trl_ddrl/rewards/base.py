# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Reward-function conventions: the callable type, the error type, and validation of returned rewards."""

import math
from collections.abc import Callable
from typing import Any


RewardFunction = Callable[..., list[float | None]]


class RewardFunctionError(RuntimeError):
    """A reward function raised, timed out, or returned something that is not one reward per sample."""


def check_rewards(values: Any, expected: int, name: str, prompts: list[str]) -> list[float]:
    """
    Validate what a reward function returned: one finite float (or None = no reward for that sample) per sample.

    Returns the values as floats with None mapped to NaN; raises [`RewardFunctionError`] naming the function and the
    prompt otherwise.
    """
    if hasattr(values, "tolist") and getattr(values, "ndim", None) == 1:
        values = values.tolist()  # a 1-D numpy array or torch tensor
    if not isinstance(values, (list, tuple)):
        shape = f" of shape {tuple(values.shape)}" if hasattr(values, "shape") else ""
        raise RewardFunctionError(
            f"Reward function '{name}' returned {type(values).__name__}{shape}; it must return a list (or 1-D array) "
            f"of {expected} floats (one per sample, None for no reward)."
        )
    if len(values) != expected:
        raise RewardFunctionError(
            f"Reward function '{name}' returned {len(values)} rewards for {expected} samples (first prompt "
            f"{prompts[0]!r}); return exactly one value per sample."
        )
    checked = []
    for value, prompt in zip(values, prompts, strict=True):
        if value is None:
            checked.append(math.nan)
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RewardFunctionError(
                f"Reward function '{name}' returned {value!r} for the prompt {prompt!r}; rewards must be numbers "
                "or None."
            ) from None
        if math.isnan(value) or math.isinf(value):
            raise RewardFunctionError(
                f"Reward function '{name}' returned {value} for the prompt {prompt!r}. Return None to mark a sample "
                "as unscored, or fix the function."
            )
        checked.append(value)
    return checked
