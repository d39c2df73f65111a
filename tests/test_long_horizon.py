# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The pure pieces of `benchmarks/long_horizon.py`: the matched-reward comparison, the plan, the run claims."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import long_horizon  # noqa: E402


def test_interpolate_follows_the_front_in_weight_order_and_refuses_extrapolation():
    front = [(0.5, 0.8), (0.7, 0.6), (0.9, 0.2)]  # strongest weight first
    assert long_horizon.interpolate(front, 0.6) == pytest.approx(0.7)
    assert long_horizon.interpolate(front, 0.8) == pytest.approx(0.4)
    assert long_horizon.interpolate(front, 0.9) == pytest.approx(0.2)
    # Reward not monotone in the weight: the weakest weight (0.95) beats reward-only (0.93). The front first reaches
    # 0.94 on its way from the strongest weight to the weakest (metric 10 + 20 * 0.44 / 0.45); sorting by reward
    # would have read it between reward-only and the weakest weight instead (35).
    noisy_end = [(0.5, 10.0), (0.95, 30.0), (0.93, 40.0)]
    assert long_horizon.interpolate(noisy_end, 0.94) == pytest.approx(10.0 + 20.0 * 0.44 / 0.45)
    with pytest.raises(ValueError, match="outside the front"):
        long_horizon.interpolate(front, 0.95)


def test_matched_reward_compares_each_seed_on_the_common_reward_range():
    # At every reward DDRL's accuracy equals the reverse KL's for seed 0 and is 0.2 above it for seed 1.
    def point(reward, accuracy, fd, diversity=2.0):
        return {"reward": reward, "accuracy": accuracy, "fd": fd, "diversity": diversity}

    def fronts(gap: float) -> dict:
        return {
            "data_beta": [point(0.4, 0.9, 10.0), point(0.8, 0.5, 50.0)],
            "kl_beta": [point(0.5, 0.8 - gap, 20.0, 1.0), point(0.9, 0.4 - gap, 60.0)],
        }

    comparison = long_horizon.matched_reward_comparison({0: fronts(0.0), 1: fronts(0.2)}, levels=3)
    assert comparison["reward_range"] == [0.5, 0.8]
    assert [level["reward"] for level in comparison["levels"]] == pytest.approx([0.5, 0.65, 0.8])
    first = comparison["levels"][0]
    # At reward 0.5 DDRL's accuracy is 0.8 (on its line from (0.4, 0.9) to (0.8, 0.5)); the reverse KL's 0.8 - gap.
    assert first["accuracy_ddrl"]["mean"] == pytest.approx(0.8)
    assert first["accuracy_reverse_kl"]["mean"] == pytest.approx(0.7)
    assert first["accuracy_ddrl_minus_reverse_kl"]["mean"] == pytest.approx(0.1)
    assert first["accuracy_ddrl_minus_reverse_kl"]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert first["fd_ddrl_minus_reverse_kl"]["mean"] == pytest.approx(20.0 - 20.0)
    assert first["diversity_ddrl_minus_reverse_kl"]["mean"] == pytest.approx(2.0 - 1.0)


def test_matched_reward_reports_fronts_that_do_not_overlap():
    def point(reward):
        return {"reward": reward, "accuracy": 0.5, "fd": 1.0, "diversity": 2.0}

    fronts = {0: {"data_beta": [point(0.1), point(0.2)], "kl_beta": [point(0.5), point(0.6)]}}
    assert long_horizon.matched_reward_comparison(fronts, levels=3)["levels"] == []


def test_plan_runs_the_main_reward_under_the_authors_recipe_first_and_keys_are_unique():
    opts = long_horizon.parse_args(["--worker"])
    plan = long_horizon.study_plan(opts)
    keys = [long_horizon.run_key(spec) for spec in plan]
    assert len(set(keys)) == len(keys)
    assert plan[0] == long_horizon.make_spec("classifier", "authors", "reward_only", 0)
    first_seed = [spec for spec in plan[: len(opts.data_betas) + len(opts.kl_betas) + 2]]
    assert {spec["seed"] for spec in first_seed} == {0}
    assert {spec["method"] for spec in first_seed} == {"reward_only", "ddrl", "reverse_kl", "data_only"}
    assert {(spec["reward"], spec["scaling"]) for spec in plan} == {
        ("classifier", "authors"),
        ("classifier", "flow_grpo"),
        ("ink", "authors"),
        ("jpeg", "authors"),
    }
    base_model = [spec for spec in plan if spec["data_source"] == "base_model"]
    assert base_model and all(spec["scaling"] == "authors" for spec in base_model)


def test_a_claim_is_exclusive_while_its_process_lives_and_taken_over_after(tmp_path):
    path = tmp_path / "run.claim"
    assert long_horizon.claim(path)
    assert path.read_text() == str(os.getpid())
    assert not long_horizon.claim(path)  # held by a live process (this one)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(finished.stdout.strip())  # a claim left by a process that is gone
    assert long_horizon.claim(path)
    assert path.read_text() == str(os.getpid())


def test_second_half_change_is_the_last_value_minus_the_one_at_half_the_steps():
    curve = [{"step": step, "fd": 10.0 + step} for step in (0, 25, 50, 75, 100)]
    assert long_horizon.second_half_change(curve, "fd") == pytest.approx(110.0 - 60.0)
