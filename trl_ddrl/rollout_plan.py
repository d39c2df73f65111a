# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Which sampling steps one RL iteration trains on, without an SDE window (see `sde_window.py` for one), as a pure
function of the configuration, the seed and the iteration: every process draws the same steps without communicating
and a resumed run draws what an uninterrupted one would have.
"""

import torch


def _iteration_generator(seed: int, iteration: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + iteration * 7_919 + stream * 15_485_863) % (2**63))


def select_train_steps(
    train_timesteps: list[int], num_inference_steps: int, selection: str, seed: int, iteration: int
) -> list[int]:
    """
    The sampling steps trained on in one iteration.

    `"fixed"` returns `train_timesteps`. `"random"` draws, without replacement, as many steps as `train_timesteps`
    holds from all stochastic steps `0 .. num_inference_steps - 2`, with a generator seeded by `(seed, iteration)`:
    the authors' `train_on = [-1, ...]`, each `-1` a fresh random step per iteration.

    Args:
        train_timesteps (`list[int]`): The resolved steps of the configuration (`DDRLConfig.train_timesteps`).
        num_inference_steps (`int`): Sampling steps of a rollout; the last one is deterministic and never trained.
        selection (`str`): `"fixed"` or `"random"`.
        seed (`int`): The run's seed.
        iteration (`int`): The RL iteration.

    Returns:
        `list[int]`: Sorted step indices.
    """
    if selection == "fixed":
        return list(train_timesteps)
    if selection != "random":
        raise ValueError(f"train_timestep_selection={selection!r} is not valid; choose 'fixed' or 'random'.")
    num_trainable = num_inference_steps - 1
    order = torch.randperm(num_trainable, generator=_iteration_generator(seed, iteration, 0))
    return sorted(order[: len(train_timesteps)].tolist())
