# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Multi-process (gloo, CPU) and DeepSpeed ZeRO-3 runs of the trainer, each in a subprocess."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "distributed_train.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], env: dict[str, str], timeout: int = 400) -> None:
    # ACCELERATE_USE_CPU would silently turn DeepSpeed off: only the runs that ask for it get it.
    environment = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run(command, env={**environment, **env}, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def brightness(prompts, images, **kwargs):
    # The script's own `brightness` signals SIGTERM_RANK's process, which outside `accelerate launch` is this one.
    return images.mean(dim=(1, 2, 3)).tolist()


def test_two_processes_keep_identical_weights_and_whole_groups(tiny_sd3_path, tmp_path):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        SCRIPT,
        tiny_sd3_path,
        str(tmp_path),
    ]
    run(command, {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert len(ranks[0]["records"]) == len(ranks[1]["records"]) == 2
    for first, second in zip(ranks[0]["records"], ranks[1]["records"]):
        assert first["weight_sum"] == second["weight_sum"]
        assert first["weight_abs_sum"] == second["weight_abs_sum"]
        # One group of 4 split 2 + 2: advantages were normalised over the gathered group, so each rank's half does
        # not sum to zero but the whole group does.
        group = first["advantages"] + second["advantages"]
        assert len(group) == 4
        assert sum(group) == pytest.approx(0.0, abs=1e-5)
        assert abs(sum(first["advantages"])) > 1e-4
    assert ranks[0]["records"][0]["weight_sum"] != ranks[0]["records"][1]["weight_sum"]

    # Evaluation: each rank sampled its shard (2 prompts, and 1 plus padding); the gathered metrics are the same on
    # both ranks and equal to a single-process evaluation of the saved weights.
    first, second = ({k: v for k, v in rank["eval"].items() if k != "eval_runtime"} for rank in ranks)
    assert first == second
    sys.path.insert(0, os.path.dirname(SCRIPT))
    from distributed_train import EVAL_SETTINGS, eval_dataset

    from trl_ddrl import DDRLConfig, DDRLTrainer

    args = DDRLConfig(str(tmp_path / "single"), report_to="none", max_sequence_length=16, num_generations=4,
                      prompts_per_step=1, num_inference_steps=4, per_device_train_batch_size=2, data_beta=0.0,
                      **EVAL_SETTINGS)  # fmt: skip
    single = DDRLTrainer(
        str(tmp_path), brightness, args=args, train_dataset=eval_dataset(), eval_dataset=eval_dataset()
    )
    expected = single.evaluate()
    for key in ("eval_rewards/brightness/mean", "eval_diversity", "eval_data_loss"):
        assert ranks[0]["eval"][key] == pytest.approx(expected[key], rel=1e-4), key


@pytest.mark.slow
def test_sigterm_on_one_process_saves_a_collective_checkpoint_on_all(tiny_sd3_path, tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), SCRIPT,
        tiny_sd3_path, str(tmp_path),
    ]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    environment.update({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "SIGTERM_RANK": "1"})
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=400)
    assert result.returncode != 0, "the processes should exit with status 143 after saving"
    assert result.stderr.count("Stopped by SIGTERM at step 1") == 2, result.stderr[-5000:]
    checkpoint = tmp_path / "checkpoint-1"
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "trainer_state.json"} <= set(os.listdir(checkpoint))
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1
    assert not (tmp_path / "rank0.json").exists()  # neither process went on to step 2


def test_deepspeed_zero3_trains_and_saves_full_weights(tiny_sd3_path, tmp_path):
    pytest.importorskip("deepspeed")
    config = {
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": False},
    }
    config_path = tmp_path / "zero3.json"
    config_path.write_text(json.dumps(config))
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "2",
    }
    run([sys.executable, SCRIPT, tiny_sd3_path, str(tmp_path / "out"), str(config_path)], env)

    records = json.loads((tmp_path / "out" / "rank0.json").read_text())["records"]
    assert len(records) == 2
    saved = load_file(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(os.path.join(tiny_sd3_path, "transformer", "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(base)
    for key, value in base.items():
        assert saved[key].shape == value.shape and saved[key].numel() > 0, key
    assert any(not torch.equal(saved[key], base[key]) for key in base), "ZeRO-3 run saved untrained weights"


def test_fsdp2_two_processes_train_and_save_full_weights(tiny_sd3_path, tmp_path):
    config = os.path.join(os.path.dirname(__file__), "..", "trl_ddrl", "accelerate_configs", "fsdp.yaml")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(free_port()), SCRIPT, tiny_sd3_path, str(tmp_path),
    ]  # fmt: skip
    run(command, {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [record["weight_sum"] for record in ranks[0]["records"]] == [
        record["weight_sum"] for record in ranks[1]["records"]
    ]
    saved = load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(os.path.join(tiny_sd3_path, "transformer", "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(base)
    assert all(saved[key].shape == value.shape for key, value in base.items())
    assert any(not torch.equal(saved[key], base[key]) for key in base), "FSDP run saved untrained weights"
