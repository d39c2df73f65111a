# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""`benchmarks/gpu_check.py --tiny`: the GPU check's code path on the CPU with tiny pipelines, so it never rots."""

import json
import os
import subprocess
import sys


ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_gpu_check_tiny_measures_an_image_and_a_video_case(tmp_path):
    output = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_check.py",
            "--tiny",
            "--cases",
            "sd35m-lora",
            "wan13b-lora",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["tiny"] and results["environment"]["device_name"] == "cpu"
    for name in ("sd35m-lora", "wan13b-lora"):
        case = results["cases"][name]
        assert "error" not in case, case.get("error")
        trainer = case["trainer"]
        assert trainer["iteration_s"] > 0 and trainer["rollout_s"] > 0 and trainer["replay_s"] > 0
        assert trainer["rollout_s"] + trainer["replay_s"] + trainer["optimizer_s"] <= trainer["iteration_s"] * 1.001
        assert case["raw"]["iteration_s"] > 0 and case["raw"]["train_flops"] > 0 and case["raw"]["rollout_flops"] > 0
        assert case["ratio_trainer_over_raw"] > 0
        # Every trained transition's ratio is recorded, per trained step; on-policy on the CPU it is exactly 1.
        steps = case["on_policy_ratio_per_step"]
        assert len(steps) == case["trained_steps"]
        assert sum(step["transitions"] for step in steps.values()) == case["samples_per_iteration"] * len(steps) * 2
        assert all(step["abs_log_ratio_max"] == 0 and step["clip_fraction"] == 0 for step in steps.values())
        assert case["trained_weights_changed"]["changed"] > 0
        assert case["trained_parameter_dtypes"] == ["torch.float32"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| sd35m-lora |" in table and "| wan13b-lora |" in table
