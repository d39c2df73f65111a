# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Reward-function conventions: validation of returned rewards, the error type, and the name registry."""

import math
from collections.abc import Callable
from typing import Any


RewardFunction = Callable[..., list[float | None]]

_REGISTRY: dict[str, Callable[..., RewardFunction]] = {}


class RewardFunctionError(RuntimeError):
    """A reward function raised, timed out, or returned something that is not one reward per sample."""


def register_reward(name: str) -> Callable[[Callable[..., RewardFunction]], Callable[..., RewardFunction]]:
    """
    Register a reward factory under `name`, so that `reward_funcs=["name"]` or `"name:<argument>"` builds it.

    The factory is called with the text after the first `:` (if any) as its single positional argument.
    """

    def decorator(factory: Callable[..., RewardFunction]) -> Callable[..., RewardFunction]:
        if name in _REGISTRY:
            raise ValueError(f"A reward named {name!r} is already registered.")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_rewards() -> list[str]:
    """Names understood by [`get_reward_function`]."""
    from . import builtin  # noqa: F401  (registers the built-in rewards)

    return sorted(_REGISTRY)


def get_reward_function(spec: str) -> RewardFunction:
    """
    Build a reward function from its name.

    `spec` is a registered name (`"jpeg_compressibility"`), a name with an argument (`"clip_score:<hub id or path>"`),
    or an `http(s)://` URL of a reward server started with `trl-ddrl-reward-server`.
    """
    from . import builtin  # noqa: F401  (registers the built-in rewards)

    if spec.startswith(("http://", "https://")):
        from .remote import RemoteReward

        return RemoteReward(spec)
    name, _, argument = spec.partition(":")
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown reward function {spec!r}. Known names: {', '.join(available_rewards())}; or pass an "
            "http(s):// URL of a reward server, or a callable."
        )
    return _REGISTRY[name](argument) if argument else _REGISTRY[name]()


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
