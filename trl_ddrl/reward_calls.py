# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Calling reward functions from the rollout without hanging and without failing silently.

- [`RewardCaller`]: each reward call runs in a daemon thread while the caller waits, at most `reward_timeout`
  seconds, saying every `heartbeat` seconds that the call is still running. Ctrl-C or a second SIGTERM interrupts the
  wait at once, and [`RewardCaller.abandon`] releases every waiting caller (also the reward thread of
  `async_rewards`), so the process can save what is finished and exit while a stuck reward call is left behind.
- [`group_slices`]: the groups a chunk of a rollout touches, to score again one by one the samples of a call that
  failed under `drop_group` / `group_mean`, so that one failing group does not drop the others of its call.
- [`DroppedGroups`]: with `reward_error_policy="drop_group"` (or `"group_mean"`), logs which groups of a rollout were
  dropped and why, and fails the run when every group of `max_dropped_rollouts` rollouts in a row was dropped.
- [`check_reward_signature`]: before the pipeline is loaded, a reward that cannot be called as
  `f(prompts=..., images=..., trainer_state=..., **columns)` (a GRPO-style `f(completions, **kwargs)`, a function
  without `**kwargs`) is refused with the signature it needs.
"""

import inspect
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers.utils import logging

from .rewards import RewardFunctionError


logger = logging.get_logger(__name__)

_POLL_SECONDS = 0.2
"""How often a waiting caller checks for a timeout or an abandonment."""


class RewardTimeoutError(RewardFunctionError):
    """A reward call ran longer than `reward_timeout`."""


class RewardCallAbandoned(RewardFunctionError):
    """The rollout was interrupted (Ctrl-C, a second SIGTERM, an error) while this reward call was running."""


class _Call:
    """One reward call running in its own daemon thread."""

    def __init__(self, name: str):
        self.name = name
        self.started = time.monotonic()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class RewardCaller:
    """
    Runs reward calls with a per-call timeout, a periodic "still running" message, and a way out when interrupted.

    A call runs in a daemon thread (with the caller's grad mode and CUDA device); the caller waits for it in short
    slices, so that a signal handler (Ctrl-C, the second SIGTERM) interrupts the wait at once, also on the main thread
    with `async_rewards=False`. Python cannot stop a thread: a call that timed out or was abandoned keeps running in
    the background until it returns (or the process exits), and its result is discarded.

    Args:
        timeout (`float` or `None`):
            Seconds a call may run before [`RewardTimeoutError`]; `None` waits for ever.
        heartbeat (`float`, *optional*, defaults to `60.0`):
            Seconds between the warnings that a call is still running.
    """

    def __init__(self, timeout: float | None, heartbeat: float = 60.0):
        self.timeout = timeout
        self.heartbeat = heartbeat
        self._abandoned = threading.Event()
        self._lock = threading.Lock()
        self._running: set[_Call] = set()

    def reset(self) -> None:
        """Accept calls again after [`abandon`] (a new `train()`)."""
        self._abandoned.clear()

    def abandon(self) -> list[tuple[str, float]]:
        """
        Release every caller waiting for a reward call (they raise [`RewardCallAbandoned`]) and refuse new calls until
        [`reset`]. Returns the calls still running, as `(name, seconds running)`.
        """
        self._abandoned.set()
        with self._lock:
            return [(call.name, call.elapsed) for call in self._running]

    def __call__(self, name: str, func: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """`func(*args, **kwargs)`, or [`RewardTimeoutError`] / [`RewardCallAbandoned`] naming the reward `name`."""
        if self._abandoned.is_set():
            raise RewardCallAbandoned(f"Reward function '{name}' was not called: the rollout was interrupted.")
        call = _Call(name)
        grad_enabled = torch.is_grad_enabled()
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

        def run() -> None:
            try:
                if device is not None:
                    torch.cuda.set_device(device)
                with torch.set_grad_enabled(grad_enabled):
                    call.result = func(*args, **kwargs)
            except BaseException as error:  # handed to the caller, whatever it is
                call.error = error
            finally:
                with self._lock:
                    self._running.discard(call)
                call.done.set()

        with self._lock:
            self._running.add(call)
        threading.Thread(target=run, name=f"ddrl-reward-{name}", daemon=True).start()
        next_note = self.heartbeat
        while not call.done.wait(_POLL_SECONDS):
            elapsed = call.elapsed
            if self._abandoned.is_set():
                raise RewardCallAbandoned(
                    f"Reward function '{name}' was abandoned after {elapsed:.1f} s: the rollout was interrupted."
                )
            if self.timeout is not None and elapsed >= self.timeout:
                raise RewardTimeoutError(
                    f"Reward function '{name}' did not return within reward_timeout={self.timeout:g} s (it ran "
                    f"{elapsed:.1f} s; the call is abandoned and left running in the background). Fix the function "
                    "(a server that never answers, a deadlock), or raise reward_timeout for a slower reward."
                )
            if elapsed >= next_note:
                limit = f"reward_timeout={self.timeout:g} s" if self.timeout is not None else "no reward_timeout"
                logger.warning(f"Reward function '{name}' has been running for {elapsed:.0f} s ({limit}).")
                next_note += self.heartbeat
        if call.error is not None:
            raise call.error
        return call.result


class DroppedGroups:
    """
    Watches the groups each rollout drops for want of a reward (`reward_error_policy="drop_group"` or
    `"group_mean"`): a warning names how many were dropped and the reward errors behind them; when every group of
    `max_rollouts` rollouts in a row was dropped, [`RewardFunctionError`] stops the run with those errors, instead of
    letting it "succeed" while training nothing.

    Args:
        max_rollouts (`int`): Rollouts in a row with every group dropped that stop the run (1: the first one).
        policy (`str`): The `reward_error_policy`, for the messages.
    """

    def __init__(self, max_rollouts: int, policy: str):
        self.max_rollouts, self.policy = max_rollouts, policy
        self.in_a_row = 0

    def record(self, dropped: int, num_groups: int, errors: list[str]) -> None:
        """After a rollout: `dropped` of its `num_groups` groups had a sample without any reward; `errors` says why."""
        if dropped == 0:
            self.in_a_row = 0
            return
        why = "; ".join(errors[:3]) + (f"; and {len(errors) - 3} more errors" if len(errors) > 3 else "")
        why = why or "the reward functions returned None for some samples"
        self.in_a_row = self.in_a_row + 1 if dropped == num_groups else 0
        if self.in_a_row >= self.max_rollouts:
            raise RewardFunctionError(
                f"Every group of {self.in_a_row} rollout(s) in a row was dropped (reward_error_policy="
                f"'{self.policy}', max_dropped_rollouts={self.max_rollouts}), so nothing would be trained. Reward "
                f"errors: {why}. Fix the reward, or raise max_dropped_rollouts to ride out a longer outage."
            )
        logger.warning(
            f"Dropped {dropped} of {num_groups} groups of this rollout (reward_error_policy='{self.policy}': zero "
            f"advantage): {why}."
        )


def group_slices(first: int, count: int, group_size: int) -> list[slice]:
    """
    The samples `first, ..., first + count - 1` of a rollout (whose groups are `group_size` consecutive samples), cut
    where a group ends: one slice of these `count` samples per group they touch, in order. A chunk of a rollout may
    start or end inside a group; e.g. `group_slices(6, 6, 4)` is `[slice(0, 2), slice(2, 6)]`.
    """
    cuts = [0, *range(-first % group_size or group_size, count, group_size), count]
    return [slice(start, end) for start, end in zip(cuts, cuts[1:])]


def check_reward_signature(func: Callable, name: str, columns: Iterable[str] = ()) -> None:
    """
    Refuse a reward function that cannot be called the way the trainer calls it:
    `func(prompts=[...], images=tensor, trainer_state=state, **columns)`, with one keyword per dataset column other
    than the prompt. A GRPO-style `f(completions, **kwargs)` gets a message saying so. Callables whose signature
    cannot be read (some builtins) pass.
    """
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return
    parameters = signature.parameters
    expected = f"def {name}(prompts, images, **kwargs) -> list[float | None]"
    if "completions" in parameters and "images" not in parameters:
        raise TypeError(
            f"Reward function '{name}' has the signature {name}{signature}, a GRPO (text) reward taking completions. "
            f"DDRL rewards score images: define it as `{expected}` (images: float [B, C, H, W] or videos "
            "[B, F, C, H, W] in [0, 1]; the dataset's other columns and trainer_state come as keyword arguments)."
        )
    keywords = {"prompts": [], "images": None, "trainer_state": None, **{column: [] for column in columns}}
    try:
        signature.bind(**keywords)
    except TypeError as error:
        raise TypeError(
            f"Reward function '{name}' cannot be called as {name}({', '.join(f'{key}=...' for key in keywords)}): "
            f"{error} (its signature is {name}{signature}). Define it as `{expected}`, so that it accepts the "
            "trainer's keyword arguments."
        ) from None


def check_reward_signatures(reward_funcs: list[Callable], names: list[str], dataset_columns: Iterable[str]) -> None:
    """[`check_reward_signature`] for each reward, with the prompt dataset's columns other than `prompt`."""
    columns = [column for column in dataset_columns if column != "prompt"]
    for reward_func, name in zip(reward_funcs, names, strict=True):
        check_reward_signature(reward_func, name, columns)
