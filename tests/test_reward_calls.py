# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Reward calls: per-call timeout, abandonment on interrupt, signature check (no model needed)."""

import logging
import os
import signal
import threading
import time

import pytest
import torch

from trl_ddrl.reward_calls import (
    DroppedGroups,
    RewardCallAbandoned,
    RewardCaller,
    RewardTimeoutError,
    check_reward_signature,
    group_slices,
)
from trl_ddrl.rewards import RewardFunctionError, get_reward_function


@pytest.fixture
def capture_warnings(caplog):
    """trl_ddrl's warnings (transformers' loggers do not propagate to the root logger by default)."""
    logger = logging.getLogger("trl_ddrl")
    propagate, logger.propagate = logger.propagate, True
    with caplog.at_level(logging.WARNING, logger="trl_ddrl"):
        yield caplog
    logger.propagate = propagate


def never_returns(prompts, images, **kwargs):
    threading.Event().wait()


def test_a_call_that_never_returns_times_out_naming_the_reward_and_the_duration():
    caller = RewardCaller(timeout=0.5)
    start = time.monotonic()
    with pytest.raises(RewardTimeoutError, match=r"'stuck' did not return within reward_timeout=0.5 s \(it ran 0\.\d"):
        caller("stuck", never_returns, prompts=["a"], images=None)
    assert time.monotonic() - start < 2


def test_results_errors_and_grad_mode_pass_through():
    caller = RewardCaller(timeout=10)
    with torch.no_grad():
        assert caller("grad", lambda: torch.is_grad_enabled()) is False
    assert caller("sum", lambda a, b: a + b, 1, b=2) == 3
    with pytest.raises(ZeroDivisionError):
        caller("fails", lambda: 1 / 0)


def test_a_slow_call_is_announced_while_it_runs(capture_warnings):
    caller = RewardCaller(timeout=None, heartbeat=0.3)
    assert caller("slow", lambda: time.sleep(0.8) or 1) == 1
    assert "Reward function 'slow' has been running for 0 s (no reward_timeout)" in capture_warnings.text


def test_abandon_releases_a_waiting_thread_and_refuses_new_calls():
    caller = RewardCaller(timeout=None)
    errors = []

    def wait():
        try:
            caller("stuck", never_returns, prompts=[], images=None)
        except RewardCallAbandoned as error:
            errors.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    running = caller.abandon()
    waiter.join(timeout=2)
    assert not waiter.is_alive() and "'stuck' was abandoned after" in str(errors[0])
    assert [name for name, _ in running] == ["stuck"]
    with pytest.raises(RewardCallAbandoned, match="was not called"):
        caller("next", lambda: 1)
    caller.reset()
    assert caller("next", lambda: 1) == 1


def test_ctrl_c_interrupts_a_call_waited_for_on_the_main_thread():
    caller = RewardCaller(timeout=None)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        caller("stuck", never_returns, prompts=[], images=None)
    assert time.monotonic() - start < 2
    assert [name for name, _ in caller.abandon()] == ["stuck"]  # still running in the background, reported


def test_signature_check_accepts_the_trainers_calls():
    def plain(prompts, images, **kwargs):
        return [0.0] * len(prompts)

    def named(prompts, images, trainer_state=None, label=None):
        return [0.0] * len(prompts)

    for func in (plain, get_reward_function("brightness"), get_reward_function("http://127.0.0.1:1")):
        check_reward_signature(func, "r", columns=["label"])
    check_reward_signature(named, "named", columns=["label"])


def test_signature_check_names_grpo_rewards_and_missing_kwargs():
    def grpo(completions, **kwargs):
        return [0.0] * len(completions)

    def no_kwargs(prompts, images):
        return [0.0] * len(prompts)

    with pytest.raises(TypeError, match=r"'grpo' has the signature grpo\(completions, \*\*kwargs\), a GRPO"):
        check_reward_signature(grpo, "grpo")
    with pytest.raises(
        TypeError, match=r"unexpected keyword argument 'trainer_state'.*def no_kwargs\(prompts, images"
    ):
        check_reward_signature(no_kwargs, "no_kwargs")


def test_dropped_groups_warn_then_fail_after_max_rollouts_in_a_row(capture_warnings):
    dropped = DroppedGroups(max_rollouts=2, policy="drop_group")
    dropped.record(1, 4, ["Reward function 'r' returned nan for the prompt 'a'"])
    assert "Dropped 1 of 4 groups of this rollout (reward_error_policy='drop_group'" in capture_warnings.text
    dropped.record(4, 4, ["e1"])
    dropped.record(0, 4, [])  # a good rollout resets the count
    dropped.record(4, 4, ["e2"])
    with pytest.raises(
        RewardFunctionError, match=r"Every group of 2 rollout\(s\) in a row.*max_dropped_rollouts=2.*e3"
    ):
        dropped.record(4, 4, ["e3"])


def refuse_to_load(monkeypatch):
    from trl_ddrl import DDRLTrainer

    def fail(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the reward was checked")

    monkeypatch.setattr(DDRLTrainer, "_load_pipeline", fail)


def test_the_trainer_checks_reward_signatures_before_loading(tiny_sd3_path, tmp_path, monkeypatch):
    from test_trainer import make_args, prompt_dataset

    from trl_ddrl import DDRLTrainer

    refuse_to_load(monkeypatch)

    def grpo_style(completions, **kwargs):
        return [0.0] * len(completions)

    def no_kwargs(prompts, images):
        return [0.0] * len(prompts)

    for reward, message in [(grpo_style, "a GRPO \\(text\\) reward"), (no_kwargs, "def no_kwargs\\(prompts, images,")]:
        with pytest.raises(TypeError, match=message):
            DDRLTrainer(tiny_sd3_path, reward, args=make_args(tmp_path), train_dataset=prompt_dataset())


def test_all_zero_reward_weights_warn(tmp_path):
    from trl_ddrl import DDRLConfig

    with pytest.warns(UserWarning, match=r"reward_weights=\[0.0\] are all 0: every advantage is 0"):
        DDRLConfig(output_dir=str(tmp_path), reward_weights=[0.0], report_to="none")
    with pytest.raises(ValueError, match="reward_timeout=0 must be > 0 seconds, or None"):
        DDRLConfig(output_dir=str(tmp_path), reward_timeout=0, report_to="none")


def reward_trainer(path, output_dir, reward, **overrides):
    from test_trainer import make_args, prompt_dataset

    from trl_ddrl import DDRLTrainer

    return DDRLTrainer(path, reward, args=make_args(output_dir, **overrides), train_dataset=prompt_dataset())


@pytest.mark.parametrize("async_rewards", [True, False])
def test_a_local_reward_that_never_returns_times_out(tiny_sd3_path, tmp_path, async_rewards):
    def stuck(prompts, images, **kwargs):
        threading.Event().wait()

    trainer = reward_trainer(tiny_sd3_path, tmp_path, stuck, reward_timeout=1.0, async_rewards=async_rewards)
    with pytest.raises(RewardTimeoutError, match=r"'stuck' did not return within reward_timeout=1 s \(it ran 1\.\d s"):
        trainer.train()


def test_a_second_sigterm_ends_a_run_stuck_in_a_reward_after_saving_the_finished_step(
    tiny_sd3_path, tmp_path, capture_warnings
):
    calls = []

    def stuck_on_the_second_call(prompts, images, **kwargs):
        calls.append(time.monotonic())
        if len(calls) == 2:
            threading.Event().wait()
        return images.mean(dim=(1, 2, 3)).tolist()

    trainer = reward_trainer(
        tiny_sd3_path, tmp_path, stuck_on_the_second_call, reward_timeout=None, save_strategy="steps", save_steps=10
    )

    def two_sigterms():
        while len(calls) < 2:
            time.sleep(0.05)
        for _ in range(2):
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=two_sigterms, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert time.monotonic() - calls[1] < 5
    assert "abandoned the running call of 'stuck_on_the_second_call'" in capture_warnings.text
    assert os.listdir(tmp_path / "checkpoint-1")  # the finished step was saved


def test_drop_group_drops_only_the_failing_group_and_says_why(tiny_sd3_path, tmp_path, capture_warnings):
    def one_nan(prompts, images, **kwargs):
        return [float("nan")] + [1.0 + index for index in range(1, len(prompts))]

    trainer = reward_trainer(tiny_sd3_path, tmp_path, one_nan, reward_error_policy="drop_group", max_steps=1)
    trainer.train()
    assert trainer.state.log_history[0]["reward/dropped_groups"] == 1.0  # of the call's two groups
    assert "Dropped 1 of 2 groups of this rollout" in capture_warnings.text
    assert "'one_nan' returned nan for the prompt" in capture_warnings.text


def test_drop_group_fails_the_run_when_every_group_is_dropped(tiny_sd3_path, tmp_path):
    def server_down(prompts, images, **kwargs):
        raise ConnectionError("reward server down")

    trainer = reward_trainer(tiny_sd3_path, tmp_path, server_down, reward_error_policy="drop_group")
    with pytest.raises(RewardFunctionError, match=r"Every group of 1 rollout\(s\) in a row was dropped.*server down"):
        trainer.train()
    assert trainer.state.global_step == 0  # no step trained on nothing


def test_a_reward_that_fails_its_first_call_is_not_offered_drop_group(tiny_sd3_path, tmp_path):
    def broken(prompts, images, **kwargs):
        raise ZeroDivisionError("boom")

    with pytest.raises(RewardFunctionError, match="ZeroDivisionError: boom") as error:
        reward_trainer(tiny_sd3_path, tmp_path, broken).train()
    assert "drop_group" not in str(error.value)


# rollout_batch_size=6: chunks that start and end inside a group of 4.
@pytest.mark.parametrize(("policy", "rollout_batch_size"), [("drop_group", None), ("group_mean", 6)])
def test_a_reward_that_raises_on_one_prompt_drops_only_that_prompts_group(
    tiny_sd3_path, tmp_path, capture_warnings, policy, rollout_batch_size
):
    calls, failing = [], []

    def fails_on_one_prompt(prompts, images, **kwargs):
        calls.append(len(prompts))
        failing[:] = failing or [prompts[-1]]  # the last prompt of the first call: a group cut by the chunks of 6
        if failing[0] in prompts:
            raise ValueError(f"cannot score {failing[0]!r}")
        return images.mean(dim=(1, 2, 3)).tolist()

    trainer = reward_trainer(
        tiny_sd3_path,
        tmp_path,
        fails_on_one_prompt,
        reward_error_policy=policy,
        max_steps=1,
        prompts_per_step=3,
        rollout_batch_size=rollout_batch_size,
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["reward/dropped_groups"] == 1.0  # of 3 groups of 4, the failing prompt's only
    assert logs["frac_reward_zero_std"] == 0.0 and logs["advantages/abs_max"] > 0  # the other two groups train
    # One call of 12 and a retry per group; or per chunk of 6 (two groups each), one call and a retry per group.
    assert calls == ([12, 4, 4, 4] if rollout_batch_size is None else [6, 4, 2, 6, 2, 4])
    assert f"Dropped 1 of 3 groups of this rollout (reward_error_policy='{policy}'" in capture_warnings.text
    assert f"ValueError: cannot score {failing[0]!r}" in capture_warnings.text
    assert "scoring them again group by group" in capture_warnings.text


def test_group_slices_cut_a_chunk_where_its_groups_end():
    assert group_slices(0, 12, 4) == [slice(0, 4), slice(4, 8), slice(8, 12)]
    assert group_slices(6, 6, 4) == [slice(0, 2), slice(2, 6)]  # a chunk starting and ending inside groups
    assert group_slices(8, 4, 4) == [slice(0, 4)]
    assert group_slices(5, 2, 4) == [slice(0, 2)]  # inside one group
