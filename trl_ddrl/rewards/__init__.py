# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Reward functions for DDRL, following TRL's conventions: callables `(prompts, images, **columns) -> list[float]`."""

from .base import RewardFunctionError, available_rewards, check_rewards, get_reward_function, register_reward


__all__ = ["RewardFunctionError", "available_rewards", "check_rewards", "get_reward_function", "register_reward"]
