# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Reward-function conventions: the callable type, the error type, and validation of returned rewards."""

import math
from collections.abc import Callable
from typing import Any


RewardFunction = Callable[..., list[float | None]]


class RewardFunctionError(RuntimeError):
    """A reward function raised, timed out, or returned something that is not one reward per sample."""


MAX_REWARD_MAGNITUDE = 1e15
"""Largest reward magnitude accepted: float32 sums and squares of larger values overflow (float32 ends at 3.4e38)."""


def check_rewards(
    values: Any, expected: int, name: str, prompts: list[str], problems: list[str] | None = None
) -> list[float]:
    """
    Validate what a reward function returned: one finite float (or None = no reward for that sample) per sample, of
    magnitude at most [`MAX_REWARD_MAGNITUDE`].

    Returns the values as floats with None mapped to NaN; raises [`RewardFunctionError`] naming the function and the
    prompt otherwise. With a `problems` list, an invalid value (not a number, NaN, infinite, too large) becomes NaN
    (that sample unscored) and its message is appended to `problems` instead; a wrong type or count still raises.
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
        problem = None
        if value is None:
            value = math.nan
        else:
            try:
                value = float(value)
            except (TypeError, ValueError):
                problem = f"returned {value!r} for the prompt {prompt!r}; rewards must be numbers or None."
            else:
                if math.isnan(value) or math.isinf(value):
                    problem = (
                        f"returned {value} for the prompt {prompt!r}. Return None to mark a sample as unscored, or "
                        "fix the function."
                    )
                elif abs(value) > MAX_REWARD_MAGNITUDE:
                    problem = (
                        f"returned {value:g} for the prompt {prompt!r}, beyond +-{MAX_REWARD_MAGNITUDE:g}, where "
                        "float32 arithmetic overflows. Scale the reward down: rewards are normalised within each "
                        "group, so their scale does not change the advantages."
                    )
        if problem is not None:
            if problems is None:
                raise RewardFunctionError(f"Reward function '{name}' {problem}")
            problems.append(f"Reward function '{name}' {problem}")
            value = math.nan
        checked.append(value)
    return checked
