# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The rollout: prompts -> the buffer of trained transitions of one RL iteration.

[`RolloutEngine.generate`] samples the group's rollouts in chunks of `rollout_batch_size` with the stochastic
sampler (recording each step's latents and log-likelihood), decodes each chunk and scores it (on a reward thread,
overlapping the sampling of the next chunk, with `async_rewards`), turns the gathered rewards into group-normalised
advantages, builds the data-term batch and cuts the transitions into micro-batches: a [`RolloutBuffer`] that the trainer
replays, micro-batch by micro-batch, in `compute_loss`. Where the big tensors live: latents `[S, T + 1, ...]` on the
accelerator for the rollout; each chunk's decoded images (float, `[chunk, C, H, W]` or `[chunk, F, C, H, W]`) on it
only until their rewards are computed, with uint8 CPU copies of the first few kept on rollouts that serve a step that
logs samples or saves a checkpoint ([`RolloutEngine.samples_to_keep`]); the buffer keeps only the trained steps'
states.

The engine knows nothing of the trainer: it gets the adapter, configuration, rewards and the two model contexts
(`policy`, `reference`) it samples from. The evaluation uses [`generation_policy`] for its fixed-noise sampling.
"""

import contextlib
import math
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather
from datasets import Dataset
from torch import nn
from transformers import TrainerState
from transformers.utils import logging
from trl.models.utils import unwrap_model_for_generation

from .config import DDRLConfig
from .data import DiffusionDataCollator, read_row
from .losses import clip_and_fill_rewards, compute_advantages
from .parallel import ProcessMesh, TrajectoryShard
from .pipelines import Conditioning, DiffusionAdapter
from .reward_calls import DroppedGroups, RewardCallAbandoned, RewardCaller, RewardTimeoutError, group_slices
from .rewards import RewardFunctionError, check_rewards
from .rollout_plan import default_rollout_chunk, overlaps_sampling
from .sde_window import initial_states, join_prefix, rollout_steps
from .tracking import Samples
from .utils import to_uint8, unique_with_index


LAST_IMAGES = 16
"""Samples kept (uint8, CPU) for the `samples.png` grid of checkpoints (`RolloutEngine.last_images`)."""


logger = logging.get_logger(__name__)


@dataclass
class RolloutBuffer:
    """
    The transitions of one RL iteration on this process.

    `S` samples, `K` trained steps each. `order` is a permutation of the `S * K` (sample, step) pairs, cut into
    micro-batches of `per_device_train_batch_size`; the data term of micro-batch `i` uses its first
    `data_rows[i]` rows (known on the host, so that selecting them never waits for the device).
    """

    states: torch.Tensor  # [S, K, ...] state before each trained step
    next_states: torch.Tensor  # [S, K, ...] state after it
    old_means: torch.Tensor  # [S, K, ...] each transition's mean at rollout time (the log-ratio is taken against it)
    step_indices: torch.Tensor  # [K] sampler step index of each trained step
    advantages: torch.Tensor  # [S]
    conditioning: Conditioning  # [S, ...] each
    initial_noise: torch.Tensor  # [S, ...]
    data_latents: torch.Tensor | None  # [S, ...]
    data_conditioning: Conditioning | None  # [S, ...] each
    order: torch.Tensor  # [S * K] flat indices sample * K + position
    data_rows: list[int]  # per micro-batch: how many of its leading rows the data term uses
    previous_denoised: torch.Tensor | None = None  # [S, K, ...] multistep samplers: the previous step's estimate
    # With `offload_trajectories`: the device micro-batches go to; the per-transition tensors above (states,
    # next_states, old_means, initial_noise, previous_denoised) and `order` then live on the CPU (the transitions
    # pinned when CUDA is available), so that gathering a micro-batch's rows needs no device read-back.
    device: torch.device | None = None
    # `precompute_reference_means`: each transition's mean under the reference model, computed once after the
    # rollout (`DDRLTrainer._reference_means`), where the KL term's replay would run the reference model. [S, K, ...]
    reference_means: torch.Tensor | None = None
    # Under context parallelism: the per-transition tensors above hold this rank's share of each latent
    # (`[S, K, chunk]`, `[S, chunk]`), all-gathered over the group when a micro-batch takes its rows.
    shard: TrajectoryShard | None = None

    def micro_batch(self, index: int, size: int) -> dict[str, Any]:
        flat = self.order[index * size : (index + 1) * size]
        sample, position = flat // self.states.shape[1], flat % self.states.shape[1]
        batch = {
            "states": self._rows(self.states, sample, position),
            "next_states": self._rows(self.next_states, sample, position),
            "old_means": self._rows(self.old_means, sample, position),
            "step_index": self.step_indices[position],
            "num_data_rows": self.data_rows[index],
            "advantages": self.advantages[sample],
            "conditioning": {key: value[sample] for key, value in self.conditioning.items()},
            "initial_noise": self._rows(self.initial_noise, sample),
        }
        if self.previous_denoised is not None:
            batch["previous_denoised"] = self._rows(self.previous_denoised, sample, position)
        if self.reference_means is not None:
            batch["reference_means"] = self._rows(self.reference_means, sample, position)
        if self.data_latents is not None:
            batch["data_latents"] = self.data_latents[sample]
            batch["data_conditioning"] = {key: value[sample] for key, value in self.data_conditioning.items()}
        return batch

    def _rows(self, tensor: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
        """
        `tensor[index]`, copied to `device` when the buffer is offloaded (asynchronously from pinned memory), and
        gathered whole over the context-parallel group when the buffer is split (`shard`).
        """
        rows = tensor[index]
        if self.device is not None:
            if torch.cuda.is_available():
                rows = rows.pin_memory().to(self.device, non_blocking=True)
            else:
                rows = rows.to(self.device)
        return rows if self.shard is None else self.shard.gather(rows)


def transition_step(adapter: DiffusionAdapter, model: nn.Module, inputs: dict[str, Any]):
    """The adapter's Gaussian transition of `model` on a micro-batch of [`RolloutBuffer.micro_batch`]."""
    return adapter.transition_log_prob(
        model,
        inputs["states"],
        inputs["next_states"],
        inputs["step_index"],
        inputs["conditioning"],
        inputs.get("previous_denoised"),
    )


def data_term_loss(
    adapter: DiffusionAdapter, model: nn.Module, inputs: dict[str, Any], data_noise: str
) -> torch.Tensor:
    """
    The data term of a micro-batch of [`RolloutBuffer.micro_batch`]: the diffusion loss on the data batch at the
    transitions' noise levels (with the rollout's initial noise, or fresh noise with `data_noise="independent"`),
    summed over the rows that use it and divided by the micro-batch's size. Averaged over an iteration's
    micro-batches, each sample's data loss then counts once per transition using it: once per trained step (the
    mean), or with `data_on_first_step_only` once among its `K` trained steps, the authors' weight `1 / K` exactly.
    Without data rows it is a constant 0 and runs no forward (every rank has data rows in the same micro-batches:
    their orders are the same, see `RolloutEngine.generate`); the policy term already gives every parameter its
    gradient, and a `p.sum() * 0` term would fail on FSDP2's DTensor parameters.
    """
    rows = inputs["num_data_rows"]  # the leading rows, counted on the host: no device read-back here
    if rows == 0:
        return torch.zeros((), device=inputs["advantages"].device)
    x0 = inputs["data_latents"][:rows]
    noise = inputs["initial_noise"][:rows] if data_noise == "rollout" else torch.randn_like(x0)
    conditioning = {key: value[:rows] for key, value in inputs["data_conditioning"].items()}
    losses = adapter.diffusion_loss(model, x0, conditioning, inputs["step_index"][:rows], noise)
    return losses.sum() / len(inputs["advantages"])


def order_micro_batches(
    order: torch.Tensor, num_steps: int, micro_batch_size: int, data_on_first_step_only: bool
) -> tuple[torch.Tensor, list[int]]:
    """
    Cut a permutation of the flat `sample * num_steps + position` indices into micro-batches and count, per
    micro-batch, the rows the data term uses: all of them, or with `data_on_first_step_only` the transitions of the
    first trained step, which are moved to the front of their micro-batch (the losses are means over rows, so the
    order within a micro-batch does not matter). Runs on the host.

    Returns:
        The reordered permutation and the number of data rows of each micro-batch.
    """
    chunks, data_rows = [], []
    for chunk in order.split(micro_batch_size):
        if data_on_first_step_only:
            is_first = chunk % num_steps == 0
            chunk = torch.cat([chunk[is_first], chunk[~is_first]])
            data_rows.append(int(is_first.sum()))
        else:
            data_rows.append(len(chunk))
        chunks.append(chunk)
    return torch.cat(chunks), data_rows


def trained_transitions(adapter: DiffusionAdapter, trajectory, steps: torch.Tensor) -> list[torch.Tensor]:
    """
    What the buffer keeps of one chunk's trajectory (`adapter.sample`): the trained steps' states, next states and
    means, the chunk's standard initial noise and, for multistep samplers, the previous step's estimate, in the order
    `[states, next_states, means, initial_noise(, previous_denoised)]`. Each is a tensor of its own (indexing with
    `steps` copies; the noise is cloned), so none keeps the whole trajectory `[chunk, T + 1, ...]` alive. Also run by
    the memory estimator (`trl_ddrl.memory.run_iteration`).
    """
    trained = [
        trajectory.latents[:, steps],
        trajectory.latents[:, steps + 1],
        trajectory.means[:, steps],
        # A copy: the state itself for most families, a view that would keep the whole trajectory alive.
        adapter.standard_noise(trajectory.latents[:, 0]).clone(),
    ]
    if trajectory.denoised is not None:
        trained.append(trajectory.denoised[:, (steps - 1).clamp(min=0)])
    return trained


@contextlib.contextmanager
def gradient_checkpointing_paused(denoiser: nn.Module):
    """
    Turn a diffusers model's gradient checkpointing off for a rollout and back on after it.

    TRL's `unwrap_model_for_generation` pauses checkpointing with transformers' method names
    (`gradient_checkpointing_disable`), which diffusers models do not have; pausing it first with diffusers' own
    switch keeps TRL from trying. Rollouts run without grad, where checkpointing does nothing anyway.
    """
    enabled = getattr(denoiser, "is_gradient_checkpointing", False)
    if enabled:
        denoiser.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if enabled:
            denoiser.enable_gradient_checkpointing()


@contextlib.contextmanager
def generation_policy(model: nn.Module, model_wrapped: nn.Module, accelerator: Accelerator):
    """
    The denoiser to sample from: gradient checkpointing paused, gathered for generation (ZeRO-3), under autocast.
    `model` is the trainer's (possibly wrapped) denoiser, `model_wrapped` the engine-wrapped one.
    """
    with (
        gradient_checkpointing_paused(accelerator.unwrap_model(model)),
        unwrap_model_for_generation(model_wrapped, accelerator) as policy,
        accelerator.autocast(),
    ):
        yield policy


def read_prompt_rows(dataset: Dataset, positions: list[int]) -> list[dict]:
    """The rows at `positions` (the sampler repeats each one `num_generations` times), each read and decoded once."""
    distinct, index = unique_with_index([int(position) for position in positions])
    distinct_rows = [read_row(dataset, position, "train_dataset") for position in distinct]
    return [dict(distinct_rows[i]) for i in index]


class RolloutEngine:
    """
    Turns prompt rows into a [`RolloutBuffer`]: sample, decode, score, advantages, data batch, micro-batches.

    Args:
        args ([`DDRLConfig`]): The configuration (group size, chunking, sampler schedule, data term, seeds).
        adapter ([`~trl_ddrl.pipelines.DiffusionAdapter`]): The model family's sampling, decoding and encoding.
        collator ([`~trl_ddrl.data.DiffusionDataCollator`]): Encodes prompts, conditioning frames and data images.
        reward_funcs, reward_names, reward_weights: The resolved training rewards, their metric names and weights `[R]`.
        accelerator (`Accelerator`), mesh (`ProcessMesh`): Device, autocast, and the data-/context-parallel grid.
        data_dataset ([`~datasets.Dataset`], *optional*): Separate data for the data term.
        metrics (`dict[str, list[float]]`): Where the rollout metrics are appended (the trainer logs and clears them).
        policy (`Callable[[], ContextManager[nn.Module]]`): Enters the denoiser to sample from ([`generation_policy`]).
        reference (`Callable[[], ContextManager[nn.Module]]`): Enters the reference denoiser (`data_source="base_model"`).
        check_samples (`Callable`): Called with each chunk's latents, images and the iteration (the divergence guard).
    """

    def __init__(
        self,
        args: DDRLConfig,
        adapter: DiffusionAdapter,
        collator: DiffusionDataCollator,
        reward_funcs: list[Callable],
        reward_names: list[str],
        reward_weights: torch.Tensor,
        accelerator: Accelerator,
        mesh: ProcessMesh,
        data_dataset: Dataset | None,
        metrics: dict[str, list[float]],
        policy: Callable[[], AbstractContextManager[nn.Module]],
        reference: Callable[[], AbstractContextManager[nn.Module]],
        check_samples: Callable[[torch.Tensor, torch.Tensor, int], None],
    ):
        self.args, self.adapter, self.collator = args, adapter, collator
        self.reward_funcs, self.reward_names, self.reward_weights = reward_funcs, reward_names, reward_weights
        self.accelerator, self.mesh, self.data_dataset, self.metrics = accelerator, mesh, data_dataset, metrics
        self.policy, self.reference, self.check_samples = policy, reference, check_samples
        # One worker: reward functions run one at a time, beside the sampling of the next rollout chunk.
        self.reward_executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddrl-reward") if args.async_rewards else None
        )
        self.pending_rewards: list = []  # this rollout's reward calls (futures with async_rewards)
        self.reward_caller = RewardCaller(args.reward_timeout)  # timeouts; abandoned on an error or interrupt
        self.dropped_groups = DroppedGroups(args.max_dropped_rollouts, args.reward_error_policy)
        self.reward_errors: list[str] = []  # this rollout's reward errors under drop_group / group_mean
        self.rewards_that_worked: set[str] = set()  # names of rewards that returned at least once
        self.reward_device = torch.device(args.reward_device) if args.reward_device else accelerator.device
        # On the sampling GPU, background scoring gets a stream of its own so that its kernels overlap the sampler's.
        same_gpu = self.reward_device.type == "cuda" and self.reward_device == accelerator.device
        self.reward_stream = torch.cuda.Stream(self.reward_device) if same_gpu and self.reward_executor else None
        self.synthetic_latents: dict[str, torch.Tensor] = {}  # data_source="base_model": one sample per prompt, CPU
        self.last_images: torch.Tensor | None = None  # the latest kept rollout's first 16 images, uint8, CPU
        self.last_samples: Samples | None = None

    @torch.no_grad()
    def generate(self, rows: list[dict], iteration: int, trainer_state: TrainerState) -> RolloutBuffer:
        """
        Roll out one iteration: `rows` (one per sample, the `num_generations` samples of a prompt next to each other)
        -> the [`RolloutBuffer`] of this process's trained transitions. `trainer_state` is handed to the reward
        functions. Also records the rollout metrics, the last images and samples (`last_images`, `last_samples`).
        """
        args = self.args
        device = self.accelerator.device
        prompts = [row["prompt"] for row in rows]
        overlap = args.async_rewards and any(overlaps_sampling(reward_func) for reward_func in self.reward_funcs)
        chunk = args.rollout_batch_size or default_rollout_chunk(len(prompts), overlap)
        start = time.perf_counter()
        # Per chunk, only what the buffer needs: the trained steps' states, means and previous estimates, the noise.
        states, next_states, means, denoised, initial_noise = [], [], [], [], []
        shard: TrajectoryShard | None = None
        keep = self.samples_to_keep(trainer_state)
        kept: list[torch.Tensor] = []  # uint8 CPU copies of the first `keep` samples, for logging and checkpoints
        scored = self.pending_rewards = []  # cancelled by `train` if it stops on an error or Ctrl-C
        self.reward_errors = []
        with self.policy() as policy:
            conditioning = self.collator.conditioning(prompts, rows)  # each distinct prompt once
            if self.adapter.num_conditioning_frames:
                # Video-to-world: every sample continues its row's ground-truth frames.
                conditioning.update(self.encode_condition_frames(rows, iteration))
            modes: Conditioning = {}
            if args.num_conditioning_frames_choices:
                # Mixed modes: a group's rollouts (and its data rows, below) share one number of given frames.
                frames = self.group_conditioning_frames(len(prompts), iteration)
                self.metrics["num_conditioning_frames"].append(frames.float().mean().item())
                modes = self.adapter.frame_mode_conditioning(frames.to(device))
                conditioning.update(modes)
            schedule = rollout_steps(args, iteration)
            noise, prefix = initial_states(
                self.adapter,
                policy,
                conditioning,
                len(prompts),
                args,
                iteration,
                schedule.prefix,
                process_index=self.mesh.data_parallel_rank,
                generator=self.generator(iteration, 0),
                chunk_size=chunk,
            )
            sampler_generator = self.generator(iteration, 1)
            steps = torch.tensor(schedule.trained, device=device)
            for i in range(0, len(prompts), chunk):
                trajectory = self.adapter.sample(
                    policy,
                    {key: value[i : i + chunk] for key, value in conditioning.items()},
                    noise[i : i + chunk],
                    generator=sampler_generator,
                    steps=range(schedule.prefix, args.num_inference_steps),
                    stochastic_steps=schedule.stochastic,
                )
                if schedule.prefix:
                    trajectory = join_prefix(prefix[i : i + chunk], trajectory)
                chunk_images = self.adapter.decode(trajectory.latents[:, -1])
                self.check_samples(trajectory.latents, chunk_images, iteration)
                trained = trained_transitions(self.adapter, trajectory, steps)
                if self.mesh.enabled:  # every rank of the group holds these samples: each keeps its share
                    shard = shard or TrajectoryShard(self.mesh, trajectory.latents.shape[2:])
                    trained = [shard.split(tensor) for tensor in trained]
                if args.offload_trajectories:
                    trained = [tensor.cpu() for tensor in trained]
                for parts, tensor in zip((states, next_states, means, initial_noise, denoised), trained):
                    parts.append(tensor)
                if i < keep:
                    kept.append(to_uint8(chunk_images[: keep - i]))
                # Scoring this chunk overlaps the sampling of the next one. The decoded chunk lives only as long as
                # its scoring: nothing here keeps it once handed to the rewards.
                # `first`: the chunk's position in the gathered rollout, where the groups' boundaries are.
                first = self.mesh.data_parallel_rank * len(prompts) + i
                score_args = (prompts[i : i + chunk], chunk_images, rows[i : i + chunk], trainer_state, first)
                scored.append(
                    self.reward_executor.submit(self.score, *score_args, ready=images_ready(chunk_images))
                    if self.reward_executor
                    else self.score(*score_args)
                )
                del chunk_images, score_args, trajectory, trained  # the next chunk samples without them
        rollout_time = time.perf_counter() - start

        start = time.perf_counter()
        results = [item.result() if isinstance(item, Future) else item for item in scored]
        reward_wait_time = time.perf_counter() - start
        rewards_per_func = torch.cat([rewards for rewards, _ in results])
        self.metrics["time/reward"].append(sum(seconds for _, seconds in results))

        # Groups may span processes: normalise on the gathered rewards (one copy per sample), then keep this slice.
        all_rewards = clip_and_fill_rewards(
            self.mesh.unique_rows(gather(rewards_per_func)),
            args.num_generations,
            args.reward_clip,
            fill_group_mean=args.reward_error_policy == "group_mean",
        )
        result = compute_advantages(
            all_rewards,
            self.reward_weights,
            args.num_generations,
            scale_rewards=args.scale_rewards,
            multi_objective_aggregation=args.multi_objective_aggregation,
            exp_advantage=args.exp_advantage,
            advantage_clip=args.advantage_clip,
        )
        self.dropped_groups.record(result.dropped_groups, result.num_groups, self.reward_errors)
        offset = self.mesh.data_parallel_rank * len(prompts)
        advantages = result.advantages[offset : offset + len(prompts)].to(device)

        data_latents = data_conditioning = None
        if args.data_beta > 0 and args.data_source == "base_model":
            data_latents, data_conditioning = self.base_model_latents(prompts, conditioning), conditioning
        elif args.data_beta > 0:
            data_batch = self.collator(self.data_rows(rows, iteration), generator=self.generator(iteration, 2))
            data_latents, data_conditioning = data_batch["latents"], {**data_batch["conditioning"], **modes}

        num_steps = len(schedule.trained)
        order, data_rows = order_micro_batches(
            # The same order on every rank, so that all or none run a micro-batch's data forward (its collectives).
            torch.randperm(len(prompts) * num_steps, generator=self.generator(iteration, 3, per_rank=False)),
            num_steps,
            args.per_device_train_batch_size,
            args.data_on_first_step_only,
        )

        self.log_metrics(all_rewards, result, advantages, rollout_time, reward_wait_time)
        if schedule.stochastic is not None:
            self.metrics["sde_window/first_step"].append(float(schedule.stochastic[0]))
        if kept:
            kept_images = torch.cat(kept)
            self.last_images = kept_images[:LAST_IMAGES].clone()
            self.last_samples = Samples.first(
                args.num_samples_to_log, kept_images, prompts, rewards_per_func, self.reward_names
            )
        transitions = [
            torch.cat(parts) if parts else None for parts in (states, next_states, means, initial_noise, denoised)
        ]
        if args.offload_trajectories and torch.cuda.is_available():
            transitions = [None if tensor is None else tensor.pin_memory() for tensor in transitions]
        states, next_states, means, initial_noise, denoised = transitions
        return RolloutBuffer(
            states=states,
            next_states=next_states,
            old_means=means,
            step_indices=steps,
            advantages=advantages,
            conditioning=conditioning,
            initial_noise=initial_noise,
            data_latents=data_latents,
            data_conditioning=data_conditioning,
            order=order if args.offload_trajectories else order.to(device),
            data_rows=data_rows,
            previous_denoised=denoised,
            device=device if args.offload_trajectories else None,
            shard=shard,
        )

    def samples_to_keep(self, state: TrainerState) -> int:
        """
        How many leading samples of this rollout are copied to the host (uint8) for the trackers' grids and the
        checkpoints' `samples.png`: `max(LAST_IMAGES, num_samples_to_log)` when one of the optimizer steps it serves
        logs samples (`log_samples_steps`), saves a checkpoint (`save_steps`, or any save strategy but `"steps"` and
        `"no"`) or is the last; `0` otherwise (the previous copies stay).
        """
        args = self.args
        per_rollout = math.ceil(args.steps_per_generation * args.num_iterations / args.gradient_accumulation_steps)
        needed = False
        for step in range(state.global_step + 1, state.global_step + per_rollout + 1):
            logs = bool(args.log_samples_steps) and step % args.log_samples_steps == 0
            saves = args.save_strategy not in ("steps", "no") or (
                args.save_strategy == "steps" and bool(state.save_steps) and step % state.save_steps == 0
            )
            needed = needed or logs or saves or step >= state.max_steps
        return max(LAST_IMAGES, args.num_samples_to_log) if needed else 0

    def score(
        self,
        prompts: list[str],
        images: torch.Tensor,
        rows: list[dict],
        trainer_state: TrainerState,
        first: int = 0,
        ready: "torch.cuda.Event | None" = None,
    ) -> tuple[torch.Tensor, float]:
        """
        Rewards `[S, R]` of these `S` samples (`images`: `[S, C, H, W]` or `[S, F, C, H, W]`), NaN where a function
        gave None (or, when dropping, for each invalid value and for every sample of a group whose call failed), and
        the seconds the reward functions took. Each call runs under `reward_timeout` ([`RewardCaller`]).
        `first` is the position of the first sample in the gathered rollout: when dropping, a call that raised on
        samples of several groups is made again once per group ([`group_slices`]), so that only the failing groups
        lose their rewards.
        The functions see `images` on `reward_device` (see [`reward_placement`]); `ready` marks when the sampler
        finished writing them.
        """
        rewards = torch.full((len(prompts), len(self.reward_funcs)), float("nan"), dtype=torch.float32)
        if not self.mesh.is_context_parallel_leader:  # the group's first rank scores its (shared) samples
            return rewards.to(self.accelerator.device), 0.0
        with reward_placement(images, self.reward_device, self.reward_stream, ready) as placed:
            return self._score_placed(prompts, placed, rows, trainer_state, rewards, first)

    def _score_placed(
        self,
        prompts: list[str],
        images: torch.Tensor,
        rows: list[dict],
        trainer_state: TrainerState,
        rewards: torch.Tensor,
        first: int,
    ) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        raising = self.args.reward_error_policy == "raise"
        for index, (reward_func, name) in enumerate(zip(self.reward_funcs, self.reward_names, strict=True)):
            try:
                rewards[:, index] = self._call_reward(name, reward_func, prompts, images, columns, trainer_state)
            except RewardCallAbandoned:
                raise
            except Exception as error:
                if raising:
                    if isinstance(error, RewardFunctionError):
                        raise
                    # drop_group is offered only for a reward that worked before, not for one that fails every call.
                    hint = (
                        ", or set reward_error_policy='drop_group' to skip the failing groups"
                        if name in self.rewards_that_worked
                        else ""
                    )
                    raise RewardFunctionError(
                        f"Reward function '{name}' failed on prompts starting with {prompts[0]!r}: "
                        f"{type(error).__name__}: {error}. Fix the function{hint}."
                    ) from error
                self.metrics["reward/errors"].append(1.0)
                groups = group_slices(first, len(prompts), self.args.num_generations)
                if len(groups) == 1 or isinstance(error, RewardTimeoutError):
                    # One group, or a call that hung: another call would not say which group is at fault.
                    self.reward_errors.append(
                        f"Reward function '{name}' failed on the {len(prompts)} samples from {prompts[0]!r}: "
                        f"{type(error).__name__}: {error}"
                    )
                    continue
                logger.warning(
                    f"Reward function '{name}' failed on {len(prompts)} samples of {len(groups)} groups "
                    f"({type(error).__name__}: {error}); scoring them again group by group (one call per group), "
                    "so that only the failing groups are dropped."
                )
                for part in groups:
                    try:
                        rewards[part, index] = self._call_reward(
                            name,
                            reward_func,
                            prompts[part],
                            images[part],
                            {key: values[part] for key, values in columns.items()},
                            trainer_state,
                        )
                    except RewardCallAbandoned:
                        raise
                    except Exception as group_error:
                        self.metrics["reward/errors"].append(1.0)
                        self.reward_errors.append(
                            f"Reward function '{name}' failed on the group of {prompts[part][0]!r}: "
                            f"{type(group_error).__name__}: {group_error}"
                        )
        missing = torch.isnan(rewards).all(dim=1)
        if missing.any() and self.args.reward_error_policy == "raise":
            first_missing = prompts[int(missing.nonzero()[0])]
            raise RewardFunctionError(
                f"No reward function gave a reward for the prompt {first_missing!r} (all returned None). Return a "
                "value for every sample from at least one function, or set reward_error_policy='drop_group'."
            )
        return rewards.to(self.accelerator.device), time.perf_counter() - start

    def _call_reward(
        self,
        name: str,
        reward_func: Callable,
        prompts: list[str],
        images: torch.Tensor,
        columns: dict[str, list],
        trainer_state: TrainerState,
    ) -> torch.Tensor:
        """
        One checked call of `reward_func` under `reward_timeout`: its rewards `[S]` for the `S` samples of `images`,
        NaN for None. When dropping, an invalid value becomes NaN (dropping only its sample's group) and is recorded
        in `reward_errors`; with `raise`, it raises.
        """
        values = self.reward_caller(
            name,
            on_stream(self.reward_stream, reward_func),
            prompts=prompts,
            images=images,
            trainer_state=trainer_state,
            **columns,
        )
        problems = None if self.args.reward_error_policy == "raise" else []
        checked = torch.tensor(check_rewards(values, len(prompts), name, prompts, problems))
        self.rewards_that_worked.add(name)
        self.reward_errors.extend(problems or [])
        return checked

    def log_metrics(self, all_rewards, result, advantages, rollout_time, reward_wait_time) -> None:
        """Append the rewards' and advantages' statistics and the timings of one rollout to `metrics`."""
        for index, name in enumerate(self.reward_names):
            column = all_rewards[:, index]
            column = column[~torch.isnan(column)]
            self.metrics[f"rewards/{name}/mean"].append(column.mean().item() if column.numel() else float("nan"))
            self.metrics[f"rewards/{name}/std"].append(column.std().item() if column.numel() > 1 else float("nan"))
        total = result.total_rewards[~torch.isnan(result.total_rewards)]
        self.metrics["reward"].append(total.mean().item() if total.numel() else float("nan"))
        self.metrics["reward_std"].append(total.std().item() if total.numel() > 1 else float("nan"))
        all_advantages = result.advantages
        self.metrics["advantages/mean"].append(all_advantages.mean().item())
        self.metrics["advantages/std"].append(all_advantages.std().item())
        self.metrics["advantages/abs_max"].append(all_advantages.abs().max().item())
        self.metrics["frac_reward_zero_std"].append(result.zero_std_groups / result.num_groups)
        self.metrics["reward/dropped_groups"].append(float(result.dropped_groups))
        self.metrics["time/rollout"].append(rollout_time)
        # Time spent blocked on rewards after the last chunk was sampled; `time/reward` sums the reward calls.
        self.metrics["time/reward_wait"].append(reward_wait_time)

    def encode_condition_frames(self, rows: list[dict], iteration: int) -> Conditioning:
        """Encode each distinct row's conditioning frames once, so that all samples of a group share one encoding."""
        unique, index = unique_with_index(list(self.collator.condition_pixels(rows)), same=torch.equal)
        encoded = self.adapter.encode_condition_frames(torch.stack(unique), generator=self.generator(iteration, 4))
        return {key: value[torch.tensor(index, device=value.device)] for key, value in encoded.items()}

    def group_conditioning_frames(self, num_samples: int, iteration: int) -> torch.Tensor:
        """
        This process's samples' numbers of conditioning frames `[num_samples]` (long, CPU) under
        `num_conditioning_frames_choices`: one uniform draw per group of the iteration, from a generator seeded by
        `seed` and the iteration and the same on every rank (a group may span processes; the draw is the same after a
        resume). Samples are laid out as for the advantages: global sample `rank * num_samples + i`, groups of
        `num_generations` consecutive samples.
        """
        choices = torch.tensor(self.args.num_conditioning_frames_choices)
        draws = torch.randint(
            len(choices), (self.args.prompts_per_step,), generator=self.generator(iteration, 5, per_rank=False)
        )
        first = self.mesh.data_parallel_rank * num_samples
        return choices[draws[(first + torch.arange(num_samples)) // self.args.num_generations]]

    def generator(self, iteration: int, stream: int, per_rank: bool = True) -> torch.Generator:
        """
        The CPU generator of `stream` (0 noise, 1 sampler, 2 data batch, 3 micro-batch order, 4 frames, 5 modes) this
        iteration: this rank's own, or with `per_rank=False` the same on every rank (rank 0's).
        """
        rank = self.mesh.data_parallel_rank if per_rank else 0
        seed = self.args.seed * 1_000_003 + iteration * 7_919 + rank * 104_729 + stream
        return torch.Generator().manual_seed(seed % (2**63))

    def data_rows(self, prompt_rows: list[dict], iteration: int) -> list[dict]:
        """Rows for the data term of this iteration: from `data_dataset` (resumable order) or the prompt rows."""
        if self.data_dataset is None:
            return [{**row, self.args.caption_column: row["prompt"]} for row in prompt_rows]
        size = len(self.data_dataset)
        per_iteration = self.args.samples_per_process * self.mesh.data_parallel_size
        start = iteration * per_iteration + self.mesh.data_parallel_rank * self.args.samples_per_process
        base_seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        permutations: dict[int, torch.Tensor] = {}
        rows = []
        for position in range(start, start + self.args.samples_per_process):
            epoch, offset = divmod(position, size)
            if epoch not in permutations:
                permutations[epoch] = torch.randperm(size, generator=torch.Generator().manual_seed(base_seed + epoch))
            rows.append(read_row(self.data_dataset, int(permutations[epoch][offset]), "data_dataset"))
        return rows

    @torch.no_grad()
    def base_model_latents(self, prompts: list[str], conditioning: Conditioning) -> torch.Tensor:
        """
        Synthetic data for `data_source="base_model"`: one deterministic sample of the reference model per prompt,
        from noise seeded by the prompt's text, drawn the first time the prompt is seen and cached. `[S, ...]`.
        """
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self.synthetic_latents]
        if missing:
            rows = torch.tensor([prompts.index(prompt) for prompt in missing], device=self.accelerator.device)
            noise = torch.cat(
                [
                    self.adapter.sample_noise(
                        1, generator=torch.Generator().manual_seed(self.args.seed + zlib.crc32(prompt.encode()))
                    )
                    for prompt in missing
                ]
            )
            with self.reference() as reference, self.accelerator.autocast():
                trajectory = self.adapter.sample(
                    reference, {key: value[rows] for key, value in conditioning.items()}, noise, eta=0.0
                )
            for prompt, latents in zip(missing, trajectory.latents[:, -1]):
                self.synthetic_latents[prompt] = latents.cpu()
        return torch.stack([self.synthetic_latents[prompt] for prompt in prompts]).to(self.accelerator.device)


def images_ready(images: torch.Tensor) -> "torch.cuda.Event | None":
    """An event recorded after the kernels that wrote `images` (on the current CUDA stream); None off CUDA."""
    if images.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(images.device))
    return event


@contextlib.contextmanager
def reward_placement(
    images: torch.Tensor,
    device: torch.device,
    stream: "torch.cuda.Stream | None",
    ready: "torch.cuda.Event | None",
):
    """
    `images` as the reward functions see them: on `device`, and, with a `stream` on the images' own GPU, with every
    reward kernel on that stream after the sampler's `ready` event (the images' memory is held for the stream until
    its work ends, so the sampler's next chunk cannot reuse it early). Without a stream (CPU, another device, or
    scoring on the main thread) the copy waits for `ready` in the calling thread, then runs as usual.
    """
    if stream is None or images.device != stream.device:
        if ready is not None:
            ready.synchronize()
        yield images.to(device)
        return
    with torch.cuda.stream(stream):
        if ready is not None:
            stream.wait_event(ready)
        images.record_stream(stream)
        yield images


def on_stream(stream: "torch.cuda.Stream | None", func: Callable) -> Callable:
    """`func` running its kernels on `stream` in whichever thread calls it (the current stream is per thread)."""
    if stream is None:
        return func

    def call(*args: Any, **kwargs: Any) -> Any:
        with torch.cuda.stream(stream):
            return func(*args, **kwargs)

    return call
