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


def overlaps_sampling(reward_func) -> bool:
    """
    Whether a reward is worth scoring beside the sampling of the next chunk: a reward model (an `nn.Module`) or the
    client of a server (an object with a `url`: `RemoteReward`, `OpenAIJudge`), unlike a cheap function.
    """
    return isinstance(reward_func, torch.nn.Module) or isinstance(getattr(reward_func, "url", None), str)


def default_rollout_chunk(num_samples: int, overlap: bool) -> int:
    """
    Samples denoised at once when `rollout_batch_size` is unset: half of a process's samples (rounded up) when rewards
    `overlap` the sampling, so that the first half is scored while the second is sampled; all of them otherwise.
    """
    return max(1, -(-num_samples // 2)) if overlap else num_samples
