# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The SDE window (Flow-GRPO-Fast, MixGRPO): only `k` consecutive sampling steps of a rollout are stochastic and
trained; the steps before and after the window run the deterministic sampler (`eta = 0`).

Why it is cheaper: the policy gradient is computed on `k` transitions per sample instead of a fixed share of all of
them, and the deterministic steps before the window do not depend on the sample's own noise. When every sample of a
group starts from the same initial noise (`sde_window_share_prefix`), those steps are identical within the group and
are computed once per prompt instead of `num_generations` times; the group's samples branch at the window.

When prefix sharing is valid: the states before the window are a deterministic function of the initial noise and the
conditioning, so they are the same for every sample of a group exactly when the group shares its initial noise and
its conditioning (one prompt per group, and for video-to-world one conditioning video per group, which the trainer
guarantees). It is not valid without a window (every step is stochastic) or with independent initial noise per
sample. Sharing the initial noise changes what the group compares: the samples of a group then differ only by the
window's noise, so the advantages score the window's choices from one common starting state.

Everything here is a pure function of the configuration and the iteration number (never of a global random state),
so every process draws the same window and a resumed run draws the same windows as an uninterrupted one.
"""

from dataclasses import dataclass, replace

import torch

from .rollout_plan import select_train_steps


SDE_WINDOW_POSITION_CHOICES = ("random", "sliding")

# Distinct odd multipliers keep the window's and the group noise's seeds apart from each other and from the trainer's
# other generators, for every (seed, iteration).
_WINDOW_SEED_STRIDE = 1_000_033
_GROUP_NOISE_SEED_STRIDE = 2_000_029


def resolve_sde_window_range(num_inference_steps: int, size: int, window_range: list[int] | None) -> tuple[int, int]:
    """
    The half-open range `[first, end)` of sampling steps the window may cover, checked.

    The last step (index `num_inference_steps - 1`) lands on the clean sample deterministically and is never in the
    window, so `end` is at most `num_inference_steps - 1` (the default).

    Raises:
        `ValueError`: naming `sde_window_size` / `sde_window_range` and the valid values.
    """
    last_end = num_inference_steps - 1
    if window_range is not None and len(window_range) != 2:
        raise ValueError(f"sde_window_range={window_range} must be two step indices [first, end).")
    first, end = (0, last_end) if window_range is None else (int(window_range[0]), int(window_range[1]))
    if not 0 <= first < end <= last_end:
        raise ValueError(
            f"sde_window_range={[first, end]} must satisfy 0 <= first < end <= {last_end}: the window covers steps "
            f"first .. end - 1, and with num_inference_steps={num_inference_steps} the final step {last_end} is "
            "deterministic. Flow-GRPO-Fast uses [0, num_inference_steps // 2]."
        )
    if not 1 <= size <= end - first:
        raise ValueError(
            f"sde_window_size={size} must be between 1 and the {end - first} steps of sde_window_range="
            f"{[first, end]}. Lower sde_window_size or widen sde_window_range."
        )
    return first, end


def sde_window_steps(
    num_inference_steps: int,
    size: int,
    iteration: int,
    seed: int,
    position: str = "random",
    window_range: list[int] | None = None,
    shift_every: int = 1,
) -> list[int]:
    """
    The sampling steps of the SDE window of one RL iteration: `size` consecutive indices inside `window_range`.

    `position="random"` draws the window's first step uniformly for every iteration from a generator seeded by
    `(seed, iteration)` (Flow-GRPO-Fast); `"sliding"` starts at the range's first step and moves one step later every
    `shift_every` iterations, wrapping around at the range's end (MixGRPO).

    Args:
        num_inference_steps (`int`): Sampling steps of a rollout.
        size (`int`): Steps in the window.
        iteration (`int`): RL iteration (0-based).
        seed (`int`): The run's seed.
        position (`str`, *optional*, defaults to `"random"`): `"random"` or `"sliding"`.
        window_range (`list[int]`, *optional*): Half-open `[first, end)` range the window lies in; defaults to every
            stochastic step, `[0, num_inference_steps - 1)`.
        shift_every (`int`, *optional*, defaults to `1`): Iterations between two moves of a sliding window.

    Returns:
        `list[int]`: The window's step indices, ascending.
    """
    first, end = resolve_sde_window_range(num_inference_steps, size, window_range)
    num_starts = end - first - size + 1
    if position == "random":
        generator = torch.Generator().manual_seed((seed * _WINDOW_SEED_STRIDE + iteration) % (2**63))
        start = first + int(torch.randint(num_starts, (1,), generator=generator))
    elif position == "sliding":
        start = first + (iteration // shift_every) % num_starts
    else:
        raise ValueError(
            f"sde_window_position={position!r} is not valid; choose one of {SDE_WINDOW_POSITION_CHOICES}."
        )
    return list(range(start, start + size))


@dataclass
class RolloutSteps:
    """
    Which sampling steps of one iteration's rollouts are stochastic and which are trained.

    Attributes:
        trained (`list[int]`): Step indices whose transitions are trained on, ascending.
        stochastic (`list[int]` or `None`): Step indices sampled with `eta`; `None` for every step but the last.
        prefix (`int`): Number of leading deterministic steps computed once per group (0: no sharing).
    """

    trained: list[int]
    stochastic: list[int] | None
    prefix: int


def rollout_steps(args, iteration: int) -> RolloutSteps:
    """
    The [`RolloutSteps`] of `iteration` for a [`DDRLConfig`] `args`: every step stochastic and the `train_timesteps`
    trained (or, with `train_timestep_selection="random"`, the iteration's random subset of that size), or, with
    `sde_window_size` set, the iteration's window for both.
    """
    if args.sde_window_size is None:
        trained = select_train_steps(
            args.train_timesteps, args.num_inference_steps, args.train_timestep_selection, args.seed, iteration
        )
        return RolloutSteps(trained=trained, stochastic=None, prefix=0)
    window = sde_window_steps(
        args.num_inference_steps,
        args.sde_window_size,
        iteration,
        args.seed,
        position=args.sde_window_position,
        window_range=args.sde_window_range,
        shift_every=args.sde_window_shift_every,
    )
    return RolloutSteps(trained=window, stochastic=window, prefix=window[0] if args.sde_window_share_prefix else 0)


def trainable_steps(args) -> list[int]:
    """
    Every step a [`DDRLConfig`] `args` may train: `train_timesteps`, or with an SDE window every step of its range.
    Fixed for a run, so that a measurement over the trained steps (the evaluation's data loss) compares across steps.
    """
    if args.sde_window_size is None:
        return list(args.train_timesteps)
    return list(
        range(*resolve_sde_window_range(args.num_inference_steps, args.sde_window_size, args.sde_window_range))
    )


def group_noise_generator(seed: int, iteration: int) -> torch.Generator:
    """The generator of an iteration's per-group initial noise: the same on every process, a function of the seed."""
    return torch.Generator().manual_seed((seed * _GROUP_NOISE_SEED_STRIDE + iteration) % (2**63))


def group_index(num_samples: int, num_generations: int, process_index: int) -> torch.Tensor:
    """
    The group (prompt of the iteration) of each of this process's `num_samples` samples, `[num_samples]` long.

    Samples are laid out group-major across processes (process `p` holds global samples `p * num_samples ..`), so a
    group may span two processes; both then compute the same shared prefix.
    """
    start = process_index * num_samples
    return torch.arange(start, start + num_samples) // num_generations


@torch.no_grad()
def sample_shared_prefix(
    adapter,
    denoiser: torch.nn.Module,
    conditioning: dict[str, torch.Tensor],
    group_noise: torch.Tensor,
    groups: torch.Tensor,
    num_steps: int,
    chunk_size: int,
) -> torch.Tensor:
    """
    The deterministic first `num_steps` steps of every sample, computed once per distinct group.

    Args:
        adapter ([`DiffusionAdapter`]): The family adapter.
        denoiser (`nn.Module`): The policy.
        conditioning (`dict[str, torch.Tensor]`): Conditioning of this process's samples, `[S, ...]` each.
        group_noise (`torch.Tensor` of shape `[P, ...]`): Initial noise of every group of the iteration.
        groups (`torch.Tensor` of shape `[S]`): Group of each sample (see [`group_index`]).
        num_steps (`int`): Steps before the window.
        chunk_size (`int`): Groups denoised at once.

    Returns:
        `torch.Tensor` of shape `[S, num_steps + 1, ...]`: the states `0 .. num_steps` of each sample, identical
        within a group.
    """
    distinct, inverse = torch.unique(groups, return_inverse=True)
    first_rows = [int((groups == group).nonzero()[0, 0]) for group in distinct.tolist()]
    device = group_noise.device
    states = []
    for i in range(0, len(first_rows), chunk_size):
        rows = torch.tensor(first_rows[i : i + chunk_size], device=device)
        trajectory = adapter.sample(
            denoiser,
            {key: value[rows.to(value.device)] for key, value in conditioning.items()},
            group_noise[distinct[i : i + chunk_size].to(device)],
            eta=0.0,
            steps=range(num_steps),
        )
        states.append(trajectory.latents)
    return torch.cat(states)[inverse.to(device)]


def join_prefix(prefix: torch.Tensor, trajectory):
    """
    Prepend a shared prefix's states `[B, p + 1, ...]` to a [`~trl_ddrl.pipelines.Trajectory`] sampled from its last
    state (`T - p` steps): the whole trajectory of `T` steps. The deterministic prefix steps have log-likelihood 0
    and their means are their next states. (The churn sampler, the one recording `denoised`, has no window.)
    """
    log_probs = trajectory.log_probs
    prefix_log_probs = torch.zeros(prefix.shape[0], prefix.shape[1] - 1, device=log_probs.device)
    return replace(
        trajectory,
        latents=torch.cat([prefix[:, :-1], trajectory.latents], dim=1),
        log_probs=torch.cat([prefix_log_probs, log_probs], dim=1),
        means=torch.cat([prefix[:, 1:], trajectory.means], dim=1),
    )


def initial_states(
    adapter,
    denoiser: torch.nn.Module,
    conditioning: dict[str, torch.Tensor],
    num_samples: int,
    args,
    iteration: int,
    prefix_steps: int,
    process_index: int,
    generator: torch.Generator,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    The state each of this process's samples starts its sampled steps from, and the shared prefix that led there.

    - With a shared prefix (`prefix_steps > 0`): one initial noise per group and its deterministic first
      `prefix_steps` steps computed once per group ([`sample_shared_prefix`]); the samples branch at the window.
    - With `same_initial_noise` (the authors' `use_same_seed`): one initial noise per group, also for groups
      straddling processes.
    - Otherwise independent noise per sample from `generator`.

    Returns:
        `tuple`: the starting states `[S, ...]` and the prefix states `[S, prefix_steps + 1, ...]` (`None` without
        a prefix).
    """
    if not prefix_steps and not args.same_initial_noise:
        return adapter.sample_noise(num_samples, generator=generator), None
    groups = group_index(num_samples, args.num_generations, process_index)
    group_noise = adapter.sample_noise(args.prompts_per_step, generator=group_noise_generator(args.seed, iteration))
    if not prefix_steps:
        return group_noise[groups.to(adapter.device)], None
    prefix = sample_shared_prefix(adapter, denoiser, conditioning, group_noise, groups, prefix_steps, chunk_size)
    return prefix[:, -1], prefix
