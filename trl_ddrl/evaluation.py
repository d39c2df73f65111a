# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Evaluation of a DDRL run on held-out prompts (and data): what `DDRLTrainer.evaluate()` computes.

Every eval prompt is sampled `eval_num_generations` times, each sample from its own fixed noise (seeded by
`eval_seed`, the prompt's position and the sample's index) with the deterministic sampler (eta 0), so two evaluations
of the same weights give the same samples and the curves of different steps and runs are comparable. The metrics,
with the Trainer's `eval_` prefix (trackers show them as `eval/...`):

- `eval_rewards/<name>/mean`, `/std`: every training reward and every extra judge of `eval_reward_funcs` (never
  trained on); `eval_reward`: the weighted sum of the training rewards, defined as the training metric `reward`.
- `eval_reward_gap`: the last logged training `reward` minus `eval_reward`. Training samples use the stochastic
  sampler on training prompts, so the gap has an offset at the start; its growth means the policy is learning
  something that does not carry over to held-out prompts.
- `eval_diversity`: the within-prompt spread, the per-pixel standard deviation across the samples of one prompt in
  `[0, 1]` pixel space, averaged over pixels and prompts; `eval_diversity_drop` is `1 - diversity / first`, its fall
  from the first evaluation of the run (a collapse to one image per prompt gives 1).
- `eval_data_loss` (when the eval rows carry images or videos in `image_column`): the diffusion loss on those held-out
  data at every trained sampling step (`train_timesteps`, or every step an SDE window may cover) with fixed noise,
  which is DDRL's own fidelity measure (the forward KL to the data, up to a constant); `eval_data_loss_drift` is `loss / first - 1`, its relative rise from the
  first evaluation. Set `eval_on_start=True` to make that first evaluation the step-0 model.

Each process samples and scores its shard of the prompts; the per-sample values are gathered, so every process
returns the same metrics. Samples use `eval_guidance_scale` (default `guidance_scale`), against the unconditional
branch of `guidance_unconditional`. Under
`num_conditioning_frames_choices` each prompt's samples and its data loss share one mode, drawn per prompt from
`eval_seed` and the prompt's position.
"""

import contextlib
import math
import time
import zlib
from typing import Any

import torch
from datasets import Dataset
from transformers import Trainer
from transformers.utils import logging

from .reward_calls import RewardCallAbandoned
from .rewards import RewardFunctionError, check_rewards, resolve_reward_funcs
from .rollout import generation_policy
from .sde_window import trainable_steps
from .tracking import Samples


logger = logging.get_logger(__name__)


def eval_noise_seed(eval_seed: int, position: int, generation: int) -> int:
    """Seed of the initial noise of sample `generation` of the eval prompt at `position` of the eval dataset."""
    return (eval_seed * 1_000_003 + position * 1_009 + generation) % (2**63)


def shard_positions(size: int, num_processes: int, process_index: int) -> tuple[list[int], list[bool]]:
    """
    This process's contiguous share of `range(size)`, padded (with position 0) to the same length on every process
    so that the gathered tensors line up; the second list says which entries are real.
    """
    per_process = math.ceil(size / num_processes)
    positions = list(range(process_index * per_process, min(size, (process_index + 1) * per_process)))
    valid = [True] * len(positions) + [False] * (per_process - len(positions))
    return positions + [0] * (per_process - len(positions)), valid


def _score(
    reward_funcs: list, names: list[str], prompts: list[str], images: torch.Tensor, rows: list[dict], trainer
) -> torch.Tensor:
    """
    Rewards `[S, R]` of the `S` samples (`images` `[S, C, H, W]` or `[S, F, C, H, W]`), NaN where a function gave
    None (or failed, with `drop_group` / `group_mean`: a warning names it). Each call runs under `reward_timeout`, as
    in the rollout (the rollout engine's [`~trl_ddrl.reward_calls.RewardCaller`]).
    """
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    images = images.to(trainer.args.reward_device or images.device)  # where the reward models are
    rewards = torch.full((len(prompts), len(reward_funcs)), float("nan"))
    policy = trainer.args.reward_error_policy
    for index, (reward_func, name) in enumerate(zip(reward_funcs, names, strict=True)):
        try:
            values = trainer.rollout.reward_caller(
                name, reward_func, prompts=prompts, images=images, trainer_state=trainer.state, **columns
            )
            rewards[:, index] = torch.tensor(check_rewards(values, len(prompts), name, prompts))
        except RewardCallAbandoned:
            raise
        except Exception as error:
            if policy == "raise":
                if isinstance(error, RewardFunctionError):
                    raise
                raise RewardFunctionError(
                    f"Reward function '{name}' failed during evaluation on prompts starting with {prompts[0]!r}: "
                    f"{type(error).__name__}: {error}."
                ) from error
            logger.warning(
                f"Evaluation: reward function '{name}' failed on the {len(prompts)} samples from {prompts[0]!r} "
                f"(reward_error_policy='{policy}': its eval metrics leave them out): {type(error).__name__}: {error}"
            )
    return rewards


def _first_logged(log_history: list[dict[str, Any]], key: str) -> float | None:
    return next((entry[key] for entry in log_history if entry.get(key) is not None), None)


def _last_logged(log_history: list[dict[str, Any]], key: str) -> float | None:
    return next((entry[key] for entry in reversed(log_history) if entry.get(key) is not None), None)


def _nanmean(values: torch.Tensor) -> float | None:
    values = values[~torch.isnan(values)]
    return values.mean().item() if values.numel() else None


def _nanstd(values: torch.Tensor) -> float | None:
    values = values[~torch.isnan(values)]
    return values.std().item() if values.numel() > 1 else None


class Evaluator:
    """
    Held-out evaluation of a [`DDRLTrainer`]'s policy; see the module docstring for the metrics.

    Args:
        trainer (`Trainer`): The [`DDRLTrainer`] (its adapter, rewards, collator, mesh, accelerator and state are used).
        args ([`DDRLConfig`]): Its configuration (the trainer is still being built).
        eval_reward_funcs: Extra judges, in any form `reward_funcs` takes, or `None`.
        eval_dataset: The trainer's eval dataset(s), checked here.
    """

    def __init__(self, trainer: Trainer, args, eval_reward_funcs, eval_dataset: Dataset | dict[str, Dataset] | None):
        self.trainer = trainer
        self.image_column = args.image_column
        eval_reward_funcs, eval_reward_names = (
            resolve_reward_funcs(eval_reward_funcs) if eval_reward_funcs else ([], [])
        )
        self.reward_funcs = [*trainer.reward_funcs, *eval_reward_funcs]
        self.reward_names = [*trainer.reward_func_names, *eval_reward_names]
        clashes = sorted(set(trainer.reward_func_names) & set(eval_reward_names))
        if clashes or len(set(eval_reward_names)) != len(eval_reward_names):
            raise ValueError(
                f"eval_reward_funcs repeat the reward names {clashes or eval_reward_names}: the training rewards are "
                "evaluated anyway; give each extra judge its own name (a `name` attribute or function name)."
            )
        self.last_samples: Samples | None = None
        for name, dataset in (eval_dataset if isinstance(eval_dataset, dict) else {"": eval_dataset}).items():
            if dataset is not None:
                self.check_dataset(dataset, f"eval_dataset[{name!r}]" if name else "eval_dataset")

    def check_dataset(self, dataset: Dataset, name: str = "eval_dataset") -> None:
        if "prompt" not in dataset.column_names:
            raise ValueError(
                f"{name} has no 'prompt' column (columns: {dataset.column_names}). Rename the prompt column with "
                "dataset.rename_column(<name>, 'prompt')."
            )
        if len(dataset) == 0:
            raise ValueError(f"{name} is empty: give it at least one prompt.")
        image_column = self.image_column
        if self.trainer.adapter.num_conditioning_frames and image_column not in dataset.column_names:
            raise ValueError(
                f"{type(self.trainer.pipeline).__name__} generates from conditioning frames, but {name} has no "
                f"'{image_column}' column (columns: {dataset.column_names}). Add an image or video per prompt."
            )

    def run(self, dataset: Dataset | dict[str, Dataset] | None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """What `DDRLTrainer.evaluate` does: evaluate each dataset (a dict: `<prefix>_<name>_...`), log, return."""
        trainer = self.trainer
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset: pass one to DDRLTrainer or to evaluate().")
        if isinstance(dataset, dict):
            metrics = {}
            for name, part in dataset.items():
                metrics.update(self.run(part, f"{metric_key_prefix}_{name}"))
            return metrics
        metrics = self.evaluate(dataset, metric_key_prefix)
        trainer.log(metrics)
        trainer.control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self, dataset: Dataset, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Sample, score and (with data) compute the held-out loss; returns the metrics, the same on every process."""
        trainer, args = self.trainer, self.trainer.args
        accelerator = trainer.accelerator
        self.check_dataset(dataset)
        start = time.perf_counter()
        # Shards follow the data-parallel rank: the ranks of a context-parallel group sample the same prompts together.
        mesh = trainer.mesh
        positions, valid = shard_positions(len(dataset), mesh.data_parallel_size, mesh.data_parallel_rank)
        rows = [dataset[position] for position in positions]
        with self._policy() as policy:
            with trainer.adapter.using_guidance_scale(args.eval_guidance_scale):
                images, rewards = self._sample_and_score(policy, rows, positions)
            data_loss = None
            if args.image_column in dataset.column_names:
                data_loss = self._data_loss(policy, rows, positions)

        generations = args.eval_num_generations
        is_real = torch.tensor(valid, device=accelerator.device)
        sample_is_real = is_real.repeat_interleave(generations)
        nan = torch.tensor(float("nan"), device=accelerator.device)
        rewards = torch.where(sample_is_real[:, None], rewards.to(accelerator.device), nan)
        rewards = mesh.unique_rows(accelerator.gather(rewards)).cpu()
        prefix = f"{metric_key_prefix}_"
        metrics: dict[str, float] = {}
        for index, name in enumerate(self.reward_names):
            metrics[f"{prefix}rewards/{name}/mean"] = _nanmean(rewards[:, index])
            metrics[f"{prefix}rewards/{name}/std"] = _nanstd(rewards[:, index])
        trained = rewards[:, : len(trainer.reward_funcs)]
        scored = ~torch.isnan(trained)
        total = torch.where(scored, trained * trainer.reward_weights, torch.zeros_like(trained)).sum(dim=1)
        metrics[f"{prefix}reward"] = _nanmean(torch.where(scored.any(dim=1), total, torch.nan))
        train_reward = _last_logged(trainer.state.log_history, "reward")
        if train_reward is not None and metrics[f"{prefix}reward"] is not None:
            metrics[f"{prefix}reward_gap"] = train_reward - metrics[f"{prefix}reward"]

        if generations > 1:
            spread = images.float().flatten(1).view(len(positions), generations, -1).std(dim=1).mean(dim=1)
            spread = torch.where(is_real, spread.to(accelerator.device), nan)
            spread = mesh.unique_rows(accelerator.gather(spread)).cpu()
            self._add_with_baseline(metrics, f"{prefix}diversity", _nanmean(spread), relative_drop=True)
        if data_loss is not None:
            data_loss = torch.where(is_real, data_loss.to(accelerator.device), nan)
            data_loss = mesh.unique_rows(accelerator.gather(data_loss)).cpu()
            self._add_with_baseline(metrics, f"{prefix}data_loss", _nanmean(data_loss), relative_drop=False)
        metrics[f"{prefix}runtime"] = time.perf_counter() - start

        count = min(args.num_samples_to_log, len(images))
        prompts = [rows[index // generations]["prompt"] for index in range(count)]
        self.last_samples = Samples.first(count, images, prompts, rewards, self.reward_names)
        return {key: value for key, value in metrics.items() if value is not None}

    def _add_with_baseline(self, metrics: dict, key: str, value: float | None, relative_drop: bool) -> None:
        """Add `key` and its change from its first logged value: `_drop` (1 - v / v0) or `_drift` (v / v0 - 1)."""
        if value is None:
            return
        metrics[key] = value
        first = _first_logged(self.trainer.state.log_history, key)
        first = value if first is None else first
        if first != 0:
            metrics[f"{key}_drop" if relative_drop else f"{key}_drift"] = (
                1 - value / first if relative_drop else value / first - 1
            )

    @contextlib.contextmanager
    def _policy(self):
        """The denoiser to evaluate, gathered for generation (ZeRO-3), with checkpointing paused."""
        trainer = self.trainer
        with self._weights(), generation_policy(trainer.model, trainer.model_wrapped, trainer.accelerator) as policy:
            yield policy

    def _weights(self):
        """
        The weights evaluated: the EMA's with `eval_use_ema` (as the authors validate) when the trainer keeps one, else
        the denoiser's current ones. Entered before `unwrap_model_for_generation`, so that ZeRO-3 gathers the EMA's.
        """
        if self.trainer.args.eval_use_ema:
            return self.trainer.ema_weights()
        return contextlib.nullcontext()

    def _sample_and_score(self, policy, rows: list[dict], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `[P * G, ...]` on the CPU (prompt-major) and rewards `[P * G, R]` of this process's rows."""
        trainer, args = self.trainer, self.trainer.args
        adapter = trainer.adapter
        generations = args.eval_num_generations
        items = [(row, position, g) for row, position in zip(rows, positions, strict=True) for g in range(generations)]
        batch = args.per_device_eval_batch_size
        images, rewards = [], []
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            chunk_rows = [row for row, _, _ in chunk]
            prompts = [row["prompt"] for row in chunk_rows]
            conditioning = trainer.data_collator_for_loss.conditioning(prompts, chunk_rows)
            if adapter.num_conditioning_frames:
                # One encoding per row, from a generator of its own: independent of batching and sharding.
                pixels = trainer.data_collator_for_loss.condition_pixels(chunk_rows)
                encoded = [
                    adapter.encode_condition_frames(
                        pixels[j : j + 1], generator=_row_generator(args, position, "frames")
                    )
                    for j, (_, position, _) in enumerate(chunk)
                ]
                conditioning.update({key: torch.cat([part[key] for part in encoded]) for key in encoded[0]})
            if args.num_conditioning_frames_choices:
                positions_of_chunk = [position for _, position, _ in chunk]
                conditioning.update(
                    adapter.frame_mode_conditioning(_row_modes(args, positions_of_chunk).to(adapter.device))
                )
            noise = torch.cat(
                [
                    adapter.sample_noise(
                        1, generator=torch.Generator().manual_seed(eval_noise_seed(args.eval_seed, position, g))
                    )
                    for _, position, g in chunk
                ]
            )
            trajectory = adapter.sample(policy, conditioning, noise, eta=0.0)
            chunk_images = adapter.decode(trajectory.latents[:, -1]).float()
            rewards.append(_score(self.reward_funcs, self.reward_names, prompts, chunk_images, chunk_rows, trainer))
            images.append(chunk_images.cpu())
        return torch.cat(images), torch.cat(rewards)

    def _data_loss(self, policy, rows: list[dict], positions: list[int]) -> torch.Tensor:
        """
        Per row `[P]`: the diffusion loss on its image/video, averaged over the trained steps (`train_timesteps`, or
        every step an SDE window may cover), with fixed noise.
        """
        trainer, args = self.trainer, self.trainer.args
        adapter = trainer.adapter
        device = trainer.accelerator.device
        losses = []
        batch = args.per_device_eval_batch_size
        for i in range(0, len(rows), batch):
            # Each row is encoded and noised with generators of its own, so its loss does not depend on the batching
            # or on the number of processes.
            data = [
                trainer.data_collator_for_loss(
                    [{**row, args.caption_column: row["prompt"]}], generator=_row_generator(args, position, "latents")
                )
                for row, position in zip(rows[i : i + batch], positions[i : i + batch], strict=True)
            ]
            x0 = torch.cat([part["latents"] for part in data])
            conditioning = {
                key: torch.cat([part["conditioning"][key] for part in data]) for key in data[0]["conditioning"]
            }
            if args.num_conditioning_frames_choices:
                conditioning.update(
                    adapter.frame_mode_conditioning(_row_modes(args, positions[i : i + batch]).to(device))
                )
            noise = torch.cat(
                [
                    torch.randn((1, *x0.shape[1:]), generator=_row_generator(args, position, "noise"))
                    for position in positions[i : i + batch]
                ]
            ).to(device)
            per_step = [
                adapter.diffusion_loss(policy, x0, conditioning, torch.full((len(x0),), step, device=device), noise)
                for step in trainable_steps(args)
            ]
            losses.append(torch.stack(per_step).float().mean(dim=0).cpu())
        return torch.cat(losses)


def _row_modes(args, positions: list[int]) -> torch.Tensor:
    """
    Under `num_conditioning_frames_choices`, the number of conditioning frames of each eval row `[P]` (long, CPU):
    drawn uniformly per row from its own generator, so that it does not depend on the batching or the step.
    """
    choices = args.num_conditioning_frames_choices
    return torch.tensor(
        [
            choices[int(torch.randint(len(choices), (1,), generator=_row_generator(args, position, "mode")))]
            for position in positions
        ]
    )


def _row_generator(args, position: int, stream: str) -> torch.Generator:
    """A CPU generator for one eval row's `stream` (data latents, data noise, conditioning frames, mode)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{stream}-{args.eval_seed}-{position}".encode()))
