# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Console progress: the phase of each iteration, compact log lines, samples per second counting samples."""

import pytest
from test_trainer import brightness, make_args, prompt_dataset

from trl_ddrl import DDRLTrainer
from trl_ddrl.progress import DDRLPrinterCallback, DDRLProgressCallback, format_logs, samples_per_second


def test_a_training_log_is_one_short_line():
    logs = {
        "loss": 7.451e-08,
        "grad_norm": 4.742,
        "learning_rate": 1e-05,
        "time/reward": 0.0008,
        "rewards/brightness/mean": 0.4606,
        "reward": 0.4606,
        "reward_std": 0.008635,
        "advantages/mean": 0.0,
        "time/rollout": 5.241,
        "time/reward_wait": 3.1e-05,
        "clip_ratio": 0.0,
        "loss/policy": 7.451e-09,
        "ratio/mean": 1.0,
        "epoch": 1.0,
    }
    line = format_logs(logs, step=1, max_steps=3)
    assert line == (
        "step 1/3 | reward 0.4606 ± 0.008635 | loss 7.451e-08 | clipped 0 | grad_norm 4.742 | lr 1e-05 | rollout_s 5.241"
    )
    assert len(line) < 120


def test_evaluation_and_summary_lines():
    evaluation = {"eval_reward": 0.5, "eval_data_loss": 0.1, "eval_data_loss_drift": 0.021, "eval_runtime": 3.0}
    assert (
        format_logs(evaluation, 20, 60) == "eval @ step 20 | reward 0.5 | data_loss 0.1 | data_loss_drift +0.021 | s 3"
    )
    summary = {"train_runtime": 22.66, "train_samples_per_second": 1.059, "train_steps_per_second": 0.132}
    assert format_logs(summary, 3, 3) == "training done | s 22.66 | samples/s 1.059 | steps/s 0.132"


def test_samples_per_second_counts_samples_not_transitions():
    logs = samples_per_second({"train_samples_per_second": 108.0, "train_runtime": 1.0}, num_trained_steps=10)
    assert logs == {"train_samples_per_second": 10.8, "train_transitions_per_second": 108.0, "train_runtime": 1.0}
    assert samples_per_second({"loss": 1.0}, 10) == {"loss": 1.0}


def test_training_shows_each_phase_and_compact_lines(tiny_sd3_path, tmp_path, monkeypatch, capsys):
    phases = []
    original = DDRLProgressCallback._set_phase

    def record(self, args, state, evaluating=False):
        original(self, args, state, evaluating)
        if self.phase_bar is not None:
            phases.append(self.phase_bar.desc)

    monkeypatch.setattr(DDRLProgressCallback, "_set_phase", record)
    # 2 prompts x 4 samples x 2 trained steps = 16 transitions: two micro-batches of 8 per iteration.
    args = make_args(tmp_path, disable_tqdm=False, max_steps=2, logging_steps=1)
    trainer = DDRLTrainer(tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset())
    assert any(isinstance(callback, DDRLProgressCallback) for callback in trainer.callback_handler.callbacks)
    output = trainer.train()

    assert phases[:3] == ["rollout: sampling and scoring", "training: micro-batch 1/2", "training: micro-batch 2/2"]
    assert phases.count("rollout: sampling and scoring") == 2
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert "step 1/2 | reward" in err and "training done" in err and "{'loss'" not in err
    samples = args.prompts_per_step * args.num_generations * 2
    assert output.metrics["train_samples_per_second"] * output.metrics["train_runtime"] == pytest.approx(
        samples, rel=0.01
    )


def test_disable_tqdm_prints_compact_lines(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(tiny_sd3_path, brightness, args=make_args(tmp_path), train_dataset=prompt_dataset())
    assert any(isinstance(callback, DDRLPrinterCallback) for callback in trainer.callback_handler.callbacks)
