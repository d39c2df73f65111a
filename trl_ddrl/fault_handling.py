# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Never lose finished work, never train on garbage: the trainer's failure handling.

- [`PreemptionCallback`]: SIGTERM (Slurm, Kubernetes, spot preemption) finishes the current optimizer step, saves a
  checkpoint on every process (a collective save under DDP / DeepSpeed / FSDP) and exits with status 143.
- Atomic checkpoints: a checkpoint is written into `<output_dir>/_incomplete-checkpoints/checkpoint-N` and renamed to
  `<output_dir>/checkpoint-N` once every file is on disk ([`staged_checkpoint`]), so a `checkpoint-N` folder is
  always complete.
- Resuming: [`resolve_resume_checkpoint`] skips incomplete or truncated checkpoints with a warning naming the one
  used; [`check_resume_settings`] refuses or warns when the new configuration changes the run; [`check_fresh_start`]
  refuses to start over in an `output_dir` that holds another run's checkpoints.
- [`DivergenceGuard`]: non-finite loss or gradients stop training before the optimizer step that would apply them;
  non-finite sampled latents or decoded images stop it before any reward function sees them; non-finite weights are
  never written ([`check_finite_state`]).
"""

import contextlib
import difflib
import errno
import json
import math
import os
import re
import shutil
import signal
import struct
import threading
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging

from .reward_calls import RewardCaller


logger = logging.get_logger(__name__)

STAGING_DIR = "_incomplete-checkpoints"
"""Folder of `output_dir` where checkpoints are written before they are renamed into place (`_*` is never pushed)."""

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class TrainingDiverged(RuntimeError):
    """The loss, the gradients, the sampled latents or the weights became NaN or infinite."""


class CheckpointError(ValueError):
    """A checkpoint is incomplete, truncated, from another run, or does not match the current configuration."""


# ---- SIGTERM ----------------------------------------------------------------------------------------------------------


class PreemptionCallback(TrainerCallback):
    """
    Turn SIGTERM into "finish this optimizer step, save a checkpoint, exit 143", on every process.

    The signal handler only sets a flag. At the end of each optimizer step the flag is combined over the processes
    (one all-reduce of a scalar, only when there are several), so all of them save the same step together and stop.
    A second SIGTERM raises `KeyboardInterrupt` at once, as Ctrl-C does (a single-process run then saves its last
    finished step). With `save_strategy="no"` nothing is saved, as for Ctrl-C.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.received = False
        self.stopped_at: int | None = None
        self._previous_handler = None

    def _handle(self, signum, frame) -> None:
        if self.received:
            raise KeyboardInterrupt("second SIGTERM: stopping at once")
        self.received = True
        logger.warning("Received SIGTERM: saving a checkpoint after the current optimizer step, then exiting.")

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self.stopped_at = False, None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        received = self.received
        accelerator = self.trainer.accelerator
        if accelerator.num_processes > 1:
            flag = torch.tensor(float(received), device=accelerator.device)
            received = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        if received:
            control.should_training_stop = True
            control.should_save = args.save_strategy != "no"
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_signal_handler()

    def restore_signal_handler(self) -> None:
        """Reinstall the SIGTERM handler that was in place before training began."""
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None

    def exit_if_stopped(self) -> None:
        """After `train()`: when a SIGTERM stopped it, say what was saved and exit with status 143."""
        self.restore_signal_handler()
        if self.stopped_at is None:
            return
        args = self.trainer.args
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.stopped_at}")
        if args.save_strategy == "no":
            logger.warning(f"Stopped by SIGTERM at step {self.stopped_at}; save_strategy='no', so nothing was saved.")
        else:
            logger.warning(
                f"Stopped by SIGTERM at step {self.stopped_at}; saved {folder}. Resume with "
                f"trainer.train(resume_from_checkpoint=True), or --resume_from_checkpoint {folder} on the command line."
            )
        raise SystemExit(SIGTERM_EXIT_CODE)


# ---- atomic checkpoints -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_checkpoint(trainer: Trainer) -> Iterator[None]:
    """
    Make the Trainer's checkpoint save atomic.

    Inside the block, `trainer._get_output_dir` points at `<output_dir>/_incomplete-checkpoints`, so the Trainer writes
    `checkpoint-N` there (every process its own files). When every process is done, the saving processes rename it to
    `<output_dir>/checkpoint-N` (replacing an older folder of that name), then delete the oldest checkpoints beyond
    `save_total_limit`, never the one just written. A kill at any point leaves either the previous checkpoints or the
    new one complete. Hub pushes of the checkpoint wait for the rename.
    """
    args, accelerator = trainer.args, trainer.accelerator
    staging = os.path.join(args.output_dir, STAGING_DIR)
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    if args.should_save:
        shutil.rmtree(os.path.join(staging, name), ignore_errors=True)  # left by a save that was killed
    accelerator.wait_for_everyone()
    trainer._checkpoint_staging = staging
    trainer._deferred_push = None
    try:
        yield
    except Exception as error:
        if args.should_save:  # an error or a full disk leaves no partial checkpoint (the next save clears a kill's)
            shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(staging)
        if is_disk_full(error):
            raise DiskFullError(_disk_full_message(trainer, name)) from error
        raise
    finally:
        trainer._checkpoint_staging = None
    final = os.path.join(args.output_dir, name)
    best = trainer.state.best_model_checkpoint
    if best is not None and os.path.abspath(best) == os.path.abspath(os.path.join(staging, name)):
        # The Trainer looked the best checkpoint up in the staging folder: point at its final place.
        trainer.state.best_model_checkpoint = final
        if args.should_save:
            trainer.state.save_to_json(os.path.join(staging, name, "trainer_state.json"))
    accelerator.wait_for_everyone()
    if args.should_save:
        _replace_folder(os.path.join(staging, name), final)
        with contextlib.suppress(OSError):
            os.rmdir(staging)  # only when empty
        rotate_checkpoints(
            output_dir=args.output_dir,
            save_total_limit=args.save_total_limit,
            best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=True,
        )
    accelerator.wait_for_everyone()
    trainer._checkpoints_written.add(os.path.abspath(final))
    if trainer._deferred_push is not None:
        trainer._deferred_push = None
        trainer._push_from_checkpoint(final)


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of disk space (the previous checkpoints are intact)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


_DISK_FULL_SIGNS = ("unexpected pos", "failed writing", "file write failed", "no space left")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or its cause) is a full disk: `ENOSPC`, or torch's zip writer failing mid-file."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and any(sign in str(error).lower() for sign in _DISK_FULL_SIGNS):
            return True
        error = error.__cause__ or error.__context__
    return False


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, file)) for root, _, files in os.walk(folder) for file in files)


def _disk_full_message(trainer: Trainer, name: str) -> str:
    output_dir = trainer.args.output_dir
    checkpoints = _checkpoint_folders(output_dir)
    if checkpoints:  # a checkpoint takes what the last one took
        needed, kept = _folder_bytes(checkpoints[-1][1]), f"The last good checkpoint, {checkpoints[-1][1]}, is intact"
    else:  # weights plus the optimizer's two moments of the trained parameters
        trained = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
        weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        needed, kept = weights + 2 * trained, "There is no earlier checkpoint"
    free = shutil.disk_usage(output_dir).free if os.path.isdir(output_dir) else 0
    return (
        f"No space left on device at {os.path.abspath(output_dir)} while saving {name}: about {needed} bytes are "
        f"needed, {free} are free. {kept}; the partial {name} was removed. Free disk space, lower save_total_limit, "
        "or set output_dir on a larger disk, then resume."
    )


def _replace_folder(source: str, target: str) -> None:
    """Rename `source` to `target`; an existing `target` is moved aside first and deleted after the swap."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"The checkpoint being saved was not written to {source}.")
    old = None
    if os.path.exists(target):
        old = os.path.join(os.path.dirname(source), f"replaced-{os.path.basename(source)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_fresh_start(trainer: Trainer) -> None:
    """
    Refuse to start a new run (no `resume_from_checkpoint`) in an `output_dir` that already holds checkpoints.

    Their steps would collide with this run's: a failure save at such a step would be skipped, and
    `resume_from_checkpoint=True` would load the other run's weights.
    """
    check_fresh_output_dir(trainer.args)


def check_fresh_output_dir(args) -> None:
    """[`check_fresh_start`] on a config alone, so that the `trl-ddrl` script runs it before loading the model."""
    if args.save_strategy == "no" or not os.path.isdir(args.output_dir):
        return
    found = sorted(_checkpoint_folders(args.output_dir), key=lambda item: item[0])
    if found:
        names = ", ".join(os.path.basename(path) for _, path in found)
        raise CheckpointError(
            f"output_dir={args.output_dir!r} already holds checkpoints of an earlier run ({names}). Resume that run "
            "with resume_from_checkpoint=True (--resume_from_checkpoint on the command line), choose another "
            "output_dir, or delete those folders to start over."
        )


# ---- resuming -----------------------------------------------------------------------------------------------------


def _checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    folders = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        path = os.path.join(output_dir, name)
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isdir(path):
            folders.append((int(step), path))
    return folders


def _safetensors_problem(path: str) -> str | None:
    """Why the safetensors file at `path` is unreadable (header missing or data shorter than it says), or None."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            if 8 + header_size > size:
                return f"{os.path.basename(path)} is truncated ({size} bytes, shorter than its header)"
            header = json.loads(file.read(header_size))
    except (struct.error, ValueError, UnicodeDecodeError):
        return f"{os.path.basename(path)} is not a readable safetensors file ({size} bytes)"
    end = max((value["data_offsets"][1] for key, value in header.items() if key != "__metadata__"), default=0)
    if 8 + header_size + end > size:
        return f"{os.path.basename(path)} is truncated ({size} of {8 + header_size + end} bytes)"
    return None


def checkpoint_problem(folder: str, denoiser_name: str, is_peft: bool, needs_optimizer: bool = True) -> str | None:
    """
    Why `folder` cannot be resumed from (a missing or truncated file), or None when it looks complete.

    Cheap: reads `trainer_state.json`, the safetensors headers and the zip directories of `optimizer.pt` /
    `scheduler.pt`, not the tensors.
    """
    state_path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state_path):
        return "it has no trainer_state.json (the save did not finish)"
    try:
        with open(state_path, encoding="utf-8") as file:
            json.load(file)
    except (ValueError, UnicodeDecodeError):
        return "its trainer_state.json is truncated or not JSON"
    if any(name.startswith("global_step") for name in os.listdir(folder)):
        return None  # a DeepSpeed checkpoint: its engine checks its own files
    if is_peft:
        weights = [os.path.join(folder, "pytorch_lora_weights.safetensors")]
    else:
        denoiser = os.path.join(folder, denoiser_name)
        weights = (
            [os.path.join(denoiser, name) for name in sorted(os.listdir(denoiser))] if os.path.isdir(denoiser) else []
        )
        weights = [path for path in weights if path.endswith(".safetensors")]
    if not weights or not all(os.path.isfile(path) for path in weights):
        return f"it has no {'pytorch_lora_weights.safetensors' if is_peft else denoiser_name + '/*.safetensors'}"
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            return problem
    if needs_optimizer:
        for name in ("optimizer.pt", "scheduler.pt"):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not zipfile.is_zipfile(path):
                return f"{name} is truncated or not a torch.save file"
    return None


def resolve_resume_checkpoint(trainer: Trainer, resume_from_checkpoint: str | bool | None) -> str | None:
    """
    The checkpoint folder to resume from, checked for completeness.

    `True` picks the newest complete `checkpoint-N` of `output_dir`, with a warning naming each one skipped and why,
    and the one used; an explicit path that is incomplete raises a [`CheckpointError`] naming the missing or truncated
    file and the newest complete checkpoint to use instead.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    args = trainer.args
    needs_optimizer = not args.save_only_model

    def problem(folder: str) -> str | None:
        return checkpoint_problem(folder, trainer.adapter.denoiser_name, trainer.is_peft, needs_optimizer)

    folders = sorted(_checkpoint_folders(args.output_dir), reverse=True) if os.path.isdir(args.output_dir) else []
    if resume_from_checkpoint is True:
        skipped = []
        for _, folder in folders:
            reason = problem(folder)
            if reason is None:
                if skipped:
                    logger.warning(
                        "Skipping incomplete checkpoints: "
                        + "; ".join(f"{os.path.basename(path)} ({why})" for path, why in skipped)
                        + f". Resuming from {folder}."
                    )
                return folder
            skipped.append((folder, reason))
        details = "; ".join(f"{os.path.basename(path)}: {why}" for path, why in skipped)
        raise CheckpointError(
            f"resume_from_checkpoint=True, but output_dir={args.output_dir!r} holds no complete checkpoint"
            + (f" ({details})" if details else "")
            + ". Start without resume_from_checkpoint, or pass the path of a checkpoint folder."
        )
    folder = str(resume_from_checkpoint)
    if not os.path.isdir(folder):
        raise CheckpointError(f"resume_from_checkpoint={folder!r} is not a folder.")
    reason = problem(folder)
    if reason is not None:
        complete = next((path for _, path in folders if problem(path) is None), None)
        instead = f" The newest complete one is {complete}." if complete else ""
        raise CheckpointError(f"Cannot resume from {folder}: {reason}.{instead}")
    return folder


# Settings whose change on resume the optimizer/scheduler state in the checkpoint cannot honour.
_SCHEDULE_FIELDS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio")
# Settings that change what a step computes: the resumed run is then not the run that was interrupted.
_RUN_FIELDS = (
    "num_inference_steps",
    "train_timesteps",
    "eta",
    "sampler",
    "sde_window_size",
    "sde_window_position",
    "sde_window_range",
    "sde_window_shift_every",
    "sde_window_share_prefix",
    "guidance_scale",
    "guidance_scale_2",
    "guidance_unconditional",
    "train_experts",
    "height",
    "width",
    "num_frames",
    "num_conditioning_frames",
    "num_conditioning_frames_choices",
    "num_generations",
    "prompts_per_step",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_iterations",
    "data_beta",
    "kl_beta",
    "clip_range",
    "advantage_clip",
    "scale_rewards",
    "reward_weights",
    "data_source",
    "data_noise",
    "karras_sigmas",
    "data_text_dropout",
    "data_latents",
    "reward_clip",
    "reward_error_policy",
    "seed",
    "weight_decay",
    "max_grad_norm",
    "use_ema",
    "ema_sigma_rel",
    "ema_iteration_shift",
    "ema_decay",
)
_CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def check_resume_settings(checkpoint: str, args) -> None:
    """
    Compare the configuration saved in `checkpoint` (`ddrl_config.json`) with `args`.

    A changed learning-rate schedule (`learning_rate`, `lr_scheduler_type`, warm-up, or `max_steps` /
    `num_train_epochs` under a decaying schedule) raises a [`CheckpointError`]: the optimizer and scheduler state in
    the checkpoint keep the old schedule (a raised `max_steps` would run its next step at the old schedule's final
    learning rate, 0). Other settings that change the run (`num_inference_steps`, `eta`, ...) log a warning naming
    each field.
    """
    path = os.path.join(checkpoint, "ddrl_config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as file:
            saved = json.load(file)
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"Cannot resume from {checkpoint}: ddrl_config.json is unreadable ({error}).") from None
    current = _jsonable(args.to_dict())

    def differs(name: str) -> bool:
        return name in saved and name in current and saved[name] != current[name]

    schedule = [name for name in _SCHEDULE_FIELDS if differs(name)]
    if saved.get("lr_scheduler_type", current.get("lr_scheduler_type")) not in _CONSTANT_SCHEDULES:
        schedule += [name for name in ("max_steps", "num_train_epochs") if differs(name)]
    if schedule:
        changes = ", ".join(f"{name}: {saved[name]!r} -> {current[name]!r}" for name in schedule)
        raise CheckpointError(
            f"Resuming from {checkpoint} with a changed learning-rate schedule ({changes}). The optimizer and "
            "scheduler state in the checkpoint continue the old schedule, so the new values would be ignored (and a "
            "raised max_steps would run the next step at the old schedule's final learning rate). Resume with the "
            "checkpoint's values, or start a new run from its weights."
        )
    changed = [name for name in _RUN_FIELDS if differs(name)]
    if changed:
        changes = ", ".join(f"{name}: {saved[name]!r} -> {current[name]!r}" for name in changed)
        logger.warning(
            f"Resuming from {checkpoint} with changed settings ({changes}): the resumed run differs from the one "
            "that was interrupted."
        )


def check_lora_load(checkpoint: str, result: Any, loaded: int) -> None:
    """
    Refuse a LoRA checkpoint that does not fit the adapter being trained (other target modules or denoiser).

    `result` is what `set_peft_model_state_dict` returned for the `loaded` tensors of the checkpoint.
    """
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    missing = [key for key in getattr(result, "missing_keys", None) or [] if "lora_" in key]
    if loaded and not unexpected and not missing:
        return
    example = unexpected[:1] or missing[:1]
    raise CheckpointError(
        f"The LoRA weights in {checkpoint} do not match the adapter being trained: {len(unexpected)} of its {loaded} "
        f"tensors have no place in the adapter and {len(missing)} adapter tensors are not in it"
        + (f" (for example {example[0]})" if example else "")
        + ". It was saved with other LoRA target_modules (or for another denoiser): resume with the peft_config it "
        "was trained with."
    )


@contextlib.contextmanager
def same_architecture(checkpoint: str, component: str):
    """
    Turn torch's `size mismatch for ...` error of a state-dict load into a `CheckpointError` that says the checkpoint
    was written for another architecture (or LoRA rank) and how to resume, with the first mismatching tensor.
    """
    try:
        yield
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        if not lines:
            raise
        raise CheckpointError(
            f"resume_from_checkpoint={checkpoint!r} was written for another architecture: {len(lines)} tensor(s) of "
            f"its {component} do not fit this model's, for example {lines[0].removesuffix('.')}. Resume with the model "
            "(and LoRA rank) the checkpoint was trained with, or start a new run in a new output_dir."
        ) from None


# ---- out of memory ---------------------------------------------------------------------------------------------------


def _failing_phase(error: BaseException) -> str:
    """Where in an iteration `error` was raised: the rollout, the replay (loss and backward), the evaluation, or else."""
    functions = []
    traceback = error.__traceback__
    while traceback is not None:
        code = traceback.tb_frame.f_code
        functions.append((os.path.basename(code.co_filename), code.co_name))
        traceback = traceback.tb_next
    if any(name == "rollout.py" and function == "generate" for name, function in functions):
        return "rollout"
    if any(function in ("compute_loss", "_backward_now", "backward") for _, function in functions):
        return "replay"
    if any(function == "evaluate" for _, function in functions):
        return "evaluation"
    return "training step"


def out_of_memory_note(error: BaseException, args, model_id: str) -> str:
    """
    What to change after a device out-of-memory error, by the phase it hit, and how to find a setting that fits before
    the next launch (`trl-ddrl estimate-memory --fit`, docs/memory.md).
    """
    phase = _failing_phase(error)
    changes = []
    if phase in ("rollout", "evaluation"):
        if args.rollout_batch_size != 1:
            changes.append("--rollout_batch_size 1 (samples denoised at once)")
        if not args.offload_trajectories:
            changes.append("--offload_trajectories (the trained transitions on the host)")
    else:
        if args.per_device_train_batch_size > 1:
            changes.append("--per_device_train_batch_size 1 (transitions per micro-batch)")
        if not (args.activation_checkpointing or args.gradient_checkpointing):
            changes.append("--activation_checkpointing True")
    if not (args.offload_text_encoders or args.precompute_prompt_embeddings):
        changes.append("--offload_text_encoders (the text encoders on the host between encodings)")
    if args.use_ema and args.ema_device is None:
        changes.append("--ema_device cpu (the EMA in host memory)")
    changes.append("LoRA (--use_peft), FSDP2 over more GPUs (--accelerate_config fsdp), or --context_parallel_size N")
    listed = "\n".join(f"  - {change}" for change in changes)
    return (
        f"trl_ddrl: out of memory in the {phase}. What lowers it:\n{listed}\n"
        f"Before the next launch, estimate the peak per GPU and let it find the flags that fit (no GPU needed): "
        f"`trl-ddrl estimate-memory --model_name_or_path {model_id} <this run's options> --fit` (docs/memory.md)."
    )


# ---- divergence ---------------------------------------------------------------------------------------------------


def _likely_causes(trainer: Trainer) -> str:
    args = trainer.args
    causes = [
        f"learning_rate={args.learning_rate:g} too high (lower it; see loss and grad_norm in the last logs)",
        f"eta={args.eta:g} (the sampler noise; keep it in (0, 1])",
    ]
    dtype = next(trainer.accelerator.unwrap_model(trainer.model).parameters()).dtype
    if args.fp16 or dtype == torch.float16:
        causes.append("an overflow in float16 (train in bf16 or fp32)")
    return f"Likely causes: {', or '.join(causes)}."


class DivergenceGuard(TrainerCallback):
    """
    Stop at the first non-finite value, before it does harm, with an error naming it and the likely cause.

    - The loss of every micro-batch is kept on the device ([`track_loss`]) and, with the gradients, checked once per
      optimizer step, before the optimizer applies them (one host read per optimizer step).
    - Each rollout chunk is checked ([`check_samples`]) before its rewards are computed: NaN images are never scored.
    Raises [`TrainingDiverged`]; the weights are still those of the last finished step, which a single-process run
    then saves as usual.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self._losses: list[torch.Tensor] = []

    def track_loss(self, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_train_begin(self, args, state, control, **kwargs):
        self._losses.clear()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        named = [(name, p.grad) for name, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        checks = [torch.stack(self._losses).isfinite().all()] if self._losses else []
        if named:
            norms = torch._foreach_norm([grad for _, grad in named])
            checks.append(torch.stack([norm.float() for norm in norms]).isfinite().all())
        if not checks:
            return
        finite = torch.stack(checks).all().float()
        accelerator = self.trainer.accelerator
        if accelerator.num_processes > 1:
            finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
        ok = bool(finite.item() == 1.0)  # one host read per optimizer step
        losses, self._losses = self._losses, []
        if ok:
            return
        step = state.global_step + 1
        loss_values = [value for value in torch.stack(losses).tolist()] if losses else []
        bad_losses = [value for value in loss_values if not math.isfinite(value)]
        parts = []
        if bad_losses:
            parts.append(
                f"the loss is {bad_losses[0]} in {len(bad_losses)} of {len(loss_values)} micro-batches"
                + self._loss_terms()
            )
        bad_grads = [name for name, grad in named if not torch.isfinite(grad).all()]
        if bad_grads:
            parts.append(f"the gradients of {len(bad_grads)} of {len(named)} parameters (first: {bad_grads[0]})")
        what = " and ".join(parts) or "the loss or gradients on another process"
        raise TrainingDiverged(
            f"Training diverged at optimizer step {step}: {what} are not finite. The step was not applied; the "
            f"weights are those of step {state.global_step}. {_likely_causes(self.trainer)}"
        )

    def _loss_terms(self) -> str:
        terms = []
        for key, values in self.trainer._loss_metrics.items():
            if values and not torch.stack(values).isfinite().all():
                terms.append(key)
        return f" (non-finite terms: {', '.join(terms)})" if terms else ""

    def check_samples(self, latents: torch.Tensor, images: torch.Tensor, iteration: int) -> None:
        """
        Raise [`TrainingDiverged`] when a rollout chunk's trajectory `[B, T + 1, ...]` or decoded images are not
        finite, naming the first sampler step that went non-finite. One host read per chunk.
        """
        if bool(torch.isfinite(latents[:, -1]).all() & torch.isfinite(images).all()):
            return
        per_step = torch.isfinite(latents.flatten(2)).all(dim=2).all(dim=0)  # [T + 1]
        if bool(per_step.all()):
            raise TrainingDiverged(
                f"The VAE decoded non-finite pixels from finite latents in the rollout of iteration {iteration}, "
                "before any reward was computed. Likely cause: the VAE overflows in half precision (fp16); run it in "
                "bf16 or fp32."
            )
        first = int((~per_step).float().argmax())
        raise TrainingDiverged(
            f"The sampler produced non-finite latents (NaN or inf) at step {first} of {latents.shape[1] - 1} in the "
            f"rollout of iteration {iteration}, before any reward was computed (the reward functions are not to "
            f"blame). {_likely_causes(self.trainer)}"
        )


def check_finite_state(state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Raise [`TrainingDiverged`] instead of writing `what` when a tensor of `state_dict` holds NaN or inf."""
    tensors = [
        (key, value) for key, value in state_dict.items() if torch.is_tensor(value) and value.is_floating_point()
    ]
    if not tensors:
        return
    if bool(torch.stack([value.isfinite().all() for _, value in tensors]).all()):
        return
    bad = [key for key, value in tensors if not bool(value.isfinite().all())]
    raise TrainingDiverged(
        f"Not saving {what}: {len(bad)} of {len(tensors)} weight tensors hold NaN or inf (first: {bad[0]}). The model "
        "diverged; resume from the last checkpoint with a lower learning_rate."
    )


# ---- inputs -------------------------------------------------------------------------------------------------------

# The text-branch projections of MMDiT blocks (SD3, FLUX), in the command line's default LoRA targets: other denoisers
# lack them, so their absence is not a typo.
OPTIONAL_LORA_TARGETS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def check_lora_target_modules(model: torch.nn.Module, peft_config: Any) -> None:
    """
    Raise a `ValueError` naming each entry of a LoRA `target_modules` list that matches no module of `model` (PEFT
    only fails when none matches, and silently trains the others), with the closest module names; or naming a
    `target_modules` string (a regular expression over whole names for PEFT) that matches no module.
    """
    targets = getattr(peft_config, "target_modules", None)
    names = [name for name, _ in model.named_modules() if name]
    suffixes = sorted({".".join(name.split(".")[-depth:]) for name in names for depth in (1, 2)})
    if isinstance(targets, str) and targets != "all-linear":
        # PEFT reads a string as a regular expression over whole module names.
        try:
            matched = any(re.fullmatch(targets, name) for name in names)
        except re.error as error:
            raise ValueError(f"LoRA target_modules={targets!r} is not a valid regular expression: {error}.") from None
        if not matched:
            close = difflib.get_close_matches(targets, suffixes, n=3)
            raise ValueError(
                f"LoRA target_modules={targets!r} matches no module of the {type(model).__name__}: PEFT reads a "
                "string as a regular expression that must match a whole module name (e.g. "
                f"'.*(to_q|to_k|to_v)', {names[-1]!r})"
                + (f"; did you mean the list [{', '.join(map(repr, close))}]?" if close else ".")
                + " Pass a list of module-name suffixes (target_modules=['to_q', 'to_k']), a regular expression "
                "matching full names, or 'all-linear'."
            )
        return
    if not isinstance(targets, (list, tuple, set)):
        return  # "all-linear" or None: PEFT resolves it
    unmatched = [
        target
        for target in targets
        if target not in OPTIONAL_LORA_TARGETS and not any(n == target or n.endswith(f".{target}") for n in names)
    ]
    if unmatched:
        hints = []
        for target in unmatched:
            close = difflib.get_close_matches(target, suffixes, n=3)
            hints.append(f"{target!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise ValueError(
            f"LoRA target_modules {', '.join(hints)} match no module of the {type(model).__name__}; the other targets "
            "would be trained without them. Fix or remove them (module names are suffixes of "
            "denoiser.named_modules(), e.g. 'to_q' or 'to_out.0')."
        )


# ---- interrupted rollouts -----------------------------------------------------------------------------------------


def cancel_pending_rewards(futures: Sequence[Any], caller: RewardCaller | None = None) -> None:
    """
    After an error, Ctrl-C or a second SIGTERM, cancel the reward calls of `futures` that have not started, and
    abandon the one running (`caller.abandon()`: its waiting thread is released, the call itself is left running in a
    daemon thread), so that the process saves what is finished and exits at once, also while a reward never returns.
    """
    pending = [future for future in futures if isinstance(future, Future)]
    cancelled = sum(future.cancel() for future in pending)
    running = caller.abandon() if caller is not None else []
    if cancelled or running:
        abandoned = "".join(
            f"; abandoned the running call of '{name}' after {seconds:.1f} s (left running in the background)"
            for name, seconds in running
        )
        logger.warning(f"Rollout interrupted: cancelled {cancelled} queued reward call(s){abandoned}.")
