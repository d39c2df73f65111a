# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Console progress of a DDRL run: the phase of the current iteration under transformers' step bar, and one compact line
per log instead of transformers' dict of every metric.

Every metric still goes to `trainer.state.log_history` and the `report_to` trackers; the console line keeps those a
person watches ([`CONSOLE_METRICS`]). An iteration is one rollout (sampling and scoring `prompts_per_step x
num_generations` samples) followed by training on its transitions in micro-batches; by default it is one optimizer
step, so the step bar moves once per iteration and the phase bar shows what the iteration is doing meanwhile.
"""

import math
from typing import Any

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback


# (log key, console label) in the order shown; keys absent from a log are skipped.
CONSOLE_METRICS = (
    ("reward", "reward"),
    ("reward_std", "±"),
    ("loss", "loss"),
    ("loss/data", "data_loss"),
    ("kl", "kl"),
    ("clip_ratio", "clipped"),
    ("grad_norm", "grad_norm"),
    ("learning_rate", "lr"),
    ("reward/errors", "reward_errors"),
    ("time/rollout", "rollout_s"),
)
EVAL_CONSOLE_METRICS = (
    ("eval_reward", "reward"),
    ("eval_reward_gap", "reward_gap"),
    ("eval_data_loss", "data_loss"),
    ("eval_data_loss_drift", "data_loss_drift"),
    ("eval_diversity_drop", "diversity_drop"),
    ("eval_runtime", "s"),
)
SUMMARY_CONSOLE_METRICS = (
    ("train_runtime", "s"),
    ("train_samples_per_second", "samples/s"),
    ("train_steps_per_second", "steps/s"),
    ("train_loss", "mean loss"),
)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.4g}"


def format_logs(logs: dict[str, Any], step: int, max_steps: int) -> str:
    """
    One console line for a log: the training metrics of [`CONSOLE_METRICS`], an evaluation's
    ([`EVAL_CONSOLE_METRICS`]) or the end-of-training summary, each `label value`, separated by `|`.
    """
    if "train_runtime" in logs:
        head, keys = "training done", SUMMARY_CONSOLE_METRICS
    elif any(key.startswith("eval_") for key in logs):
        head, keys = f"eval @ step {step}", EVAL_CONSOLE_METRICS
    else:
        head, keys = f"step {step}/{max_steps}", CONSOLE_METRICS
    parts = [head]
    for key, label in keys:
        value = logs.get(key)
        if value is None:
            continue
        if label == "±":
            parts[-1] += f" ± {_number(value)}"
        elif key == "eval_data_loss_drift":
            parts.append(f"{label} {value:+.3f}")
        else:
            parts.append(f"{label} {_number(value)}")
    return " | ".join(parts)


def iteration_phase(micro_batch: int, micro_batches: int, evaluating: bool = False) -> str:
    """The phase shown while an iteration runs: its rollout before the first micro-batch is done, then training."""
    if evaluating:
        return "evaluating"
    if micro_batch == 0:
        return "rollout: sampling and scoring"
    return f"training: micro-batch {micro_batch}/{micro_batches}"


class DDRLProgressCallback(ProgressCallback):
    """
    transformers' step bar, with a second bar under it naming the phase of the iteration (rollout, training
    micro-batch k/n, evaluation), and compact log lines ([`format_logs`]). Replaces `ProgressCallback`.
    """

    def __init__(self):
        super().__init__()
        self.phase_bar = None
        self.micro_batch = 0

    def _set_phase(self, args, state, evaluating: bool = False) -> None:
        if self.phase_bar is None:
            return
        micro_batches = args.gradient_accumulation_steps
        self.phase_bar.set_description_str(iteration_phase(self.micro_batch, micro_batches, evaluating))
        self.phase_bar.n = self.micro_batch
        self.phase_bar.total = micro_batches
        self.phase_bar.refresh()

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if state.is_world_process_zero:
            self.training_bar.set_description_str("optimizer steps")
            self.phase_bar = tqdm(total=args.gradient_accumulation_steps, position=1, leave=False, dynamic_ncols=True)

    def on_step_begin(self, args, state, control, **kwargs):
        # Several optimizer steps per iteration (a set gradient_accumulation_steps): only the first one rolls out.
        starts_iteration = state.global_step * args.gradient_accumulation_steps % args.steps_per_generation == 0
        self.micro_batch = 0 if starts_iteration else 1
        self._set_phase(args, state)
        self.micro_batch = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batch += 1
        self._set_phase(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.micro_batch = args.gradient_accumulation_steps
        self._set_phase(args, state, evaluating=control.should_evaluate)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(format_logs(logs, state.global_step, state.max_steps))

    def on_train_end(self, args, state, control, **kwargs):
        if self.phase_bar is not None:
            self.phase_bar.close()
            self.phase_bar = None
        super().on_train_end(args, state, control, **kwargs)


class DDRLPrinterCallback(PrinterCallback):
    """`PrinterCallback` (`disable_tqdm=True`) printing the compact lines of [`format_logs`]."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs is not None:
            print(format_logs(logs, state.global_step, state.max_steps))


def use_ddrl_progress(trainer) -> None:
    """Replace the trainer's `ProgressCallback` / `PrinterCallback` by [`DDRLProgressCallback`] / [`DDRLPrinterCallback`]."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(DDRLProgressCallback)
    if trainer.pop_callback(PrinterCallback) is not None:
        trainer.add_callback(DDRLPrinterCallback)


def samples_per_second(logs: dict[str, float], num_trained_steps: int) -> dict[str, float]:
    """
    `logs` with `train_samples_per_second` counting samples instead of transitions.

    The Trainer counts `per_device_train_batch_size x gradient_accumulation_steps x processes` items per optimizer
    step: transitions, `num_trained_steps` per sample. The transitions' rate stays as `train_transitions_per_second`.
    """
    if "train_samples_per_second" not in logs:
        return logs
    transitions = logs["train_samples_per_second"]
    return {
        **logs,
        "train_samples_per_second": round(transitions / num_trained_steps, 3),
        "train_transitions_per_second": transitions,
    }
