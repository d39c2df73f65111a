# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The reward-name registry: `register_reward("name")` decorates a factory, `get_reward_function("name[:arg]")` builds one.

The registry imports none of the rewards it holds: each reward module registers its own factories when imported, and
`trl_ddrl/rewards/__init__.py` imports those modules (so `import trl_ddrl.rewards` fills the registry). A new reward
module adds `@register_reward(...)` to its factories and one import line to the package `__init__`.
"""

from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from .base import RewardFunction


_REGISTRY: dict[str, Callable[..., RewardFunction]] = {}


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
    return sorted(_REGISTRY)


def get_reward_function(spec: str) -> RewardFunction:
    """
    Build a reward function from its name.

    `spec` is a registered name (`"jpeg_compressibility"`), a name with an argument (`"clip_score:<hub id or path>"`),
    or an `http(s)://` URL of a reward server started with `trl-ddrl-reward-server`.
    """
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


def split_spec_argument(argument: str, name: str, keywords: dict[str, type]) -> tuple[list[str], dict[str, object]]:
    """
    Split the argument of `name:a,b,key=value` into positional parts (`["a", "b"]`) and keyword values converted with
    `keywords[key]` (`{"key": value}`); an unknown key or a value that does not convert raises, naming the choices.
    """
    positional, named = [], {}
    for part in (part.strip() for part in argument.split(",") if part.strip()):
        key, equals, value = part.partition("=")
        if not equals:
            positional.append(part)
            continue
        if key not in keywords:
            raise ValueError(f"{name!r} has no option {key!r}; its options are {', '.join(sorted(keywords))}.")
        try:
            named[key] = keywords[key](value)
        except ValueError:
            raise ValueError(f"{name!r} option {key}={value!r} is not a {keywords[key].__name__}.") from None
    return positional, named


def resolve_reward_funcs(reward_funcs: Any) -> tuple[list[RewardFunction], list[str]]:
    """
    Reward functions in any form `reward_funcs` takes (a callable, an `nn.Module`, a registered name or spec, a
    server URL, or a list of these) -> the callables and the names their metrics are logged under.
    """
    if not isinstance(reward_funcs, (list, tuple)):
        reward_funcs = [reward_funcs]
    if not reward_funcs:
        raise ValueError("reward_funcs is empty: pass at least one reward function.")
    resolved, names = [], []
    for reward_func in reward_funcs:
        if isinstance(reward_func, str):
            # A server URL is logged by its host and port: `rewards/remote_127.0.0.1:8000/mean`.
            name = f"remote_{urlparse(reward_func).netloc}" if "://" in reward_func else reward_func
            reward_func = get_reward_function(reward_func)
        elif callable(reward_func):
            name = getattr(reward_func, "name", None) or getattr(reward_func, "__name__", None)
            name = name or type(reward_func).__name__
        else:
            raise TypeError(
                f"reward function {reward_func!r} is neither callable nor a reward name; pass a function "
                "(prompts, images, **columns) -> list[float], an nn.Module, or a name such as 'jpeg_compressibility'."
            )
        resolved.append(reward_func)
        names.append(str(name).replace("/", "_"))
    return resolved, names
