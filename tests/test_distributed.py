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


def two_process_command(script: str, *script_args: str) -> list[str]:
    """`accelerate launch` of `script` on two CPU processes (gloo), without mixed precision or dynamo."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), script, *script_args]  # fmt: skip


def zero3_single_process(tmp_path) -> tuple[str, dict[str, str]]:
    """
    A DeepSpeed ZeRO-3 config written under `tmp_path` and the environment of a one-process run of it. Threshold 0:
    every parameter is partitioned, as a real model's large ones are (tiny ones stay whole by default).
    """
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
    }
    return str(config_path), env


def run(command: list[str], env: dict[str, str], timeout: int = 400) -> None:
    # ACCELERATE_USE_CPU would silently turn DeepSpeed off: only the runs that ask for it get it.
    environment = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run(command, env={**environment, **env}, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def brightness(prompts, images, **kwargs):
    # The script's own `brightness` signals SIGTERM_RANK's process, which outside `accelerate launch` is this one.
    return images.mean(dim=(1, 2, 3)).tolist()


def check_ema(ranks: list[dict], saved: dict[str, torch.Tensor], sharded: bool) -> None:
    """
    The EMA: one update per optimizer step, kept whole (identical on every rank) or as per-rank shards that add up to
    the trainable parameters; the exported weights are the EMA (their sum is the EMA's, not the raw weights'); the run
    resumed from the step-1 checkpoint ends on the same EMA, shard by shard.
    """
    emas = [rank["ema"] for rank in ranks]
    assert all(ema["sharded"] == sharded and ema["updates"] == 2 for ema in emas)
    total = emas[0]["trainable_numel"]
    if sharded:
        assert sum(ema["numel"] for ema in emas) == total
        assert all(ema["numel"] < total for ema in emas) or len(emas) == 1
        ema_sum, raw_sum = sum(ema["sum"] for ema in emas), sum(ema["raw_sum"] for ema in emas)
    else:
        assert all(ema["numel"] == total and ema["sum"] == emas[0]["sum"] for ema in emas)
        ema_sum, raw_sum = emas[0]["sum"], emas[0]["raw_sum"]
    names = emas[0]["names"]
    saved_sum = sum(saved[name].double().sum().item() for name in names)
    assert saved_sum == pytest.approx(ema_sum, rel=1e-6, abs=1e-4)
    assert abs(raw_sum - ema_sum) > 1e-3, "the export holds the raw weights, not the EMA"
    for rank in ranks:
        assert rank["resumed_ema_updates"] == 2
        assert rank["resumed_ema_max_diff"] < 1e-6


def test_two_processes_keep_identical_weights_and_whole_groups(tiny_sd3_path, tmp_path):
    command = two_process_command(SCRIPT, tiny_sd3_path, str(tmp_path))
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
    saved = load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    check_ema(ranks, saved, sharded=False)

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


@pytest.mark.parametrize(
    "train_experts, trained",
    [
        ("all", {"transformer", "transformer_2"}),
        pytest.param("low_noise", {"transformer_2"}, marks=pytest.mark.slow),  # one expert frozen: ZeRO-3's test
    ],
)
def test_two_processes_train_wan22_experts_with_single_expert_micro_batches(train_experts, trained, tmp_path):
    # Every micro-batch holds one transition, so one expert gets no gradient in it: DDP must not wait for it.
    script = os.path.join(os.path.dirname(__file__), "scripts", "wan22_experts_train.py")
    run(two_process_command(script, train_experts, str(tmp_path)), {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert ranks[0]["after"] == ranks[1]["after"]
    for expert, before in ranks[0]["before"].items():
        assert (ranks[0]["after"][expert] != before) == (expert in trained), expert
    check_saved_experts(tmp_path, trained)


def check_saved_experts(output_dir, trained: set[str]) -> None:
    """The saved pipeline holds the trained experts changed and the frozen one exactly as the base model's."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import tiny_wan22_pipeline

    base = tiny_wan22_pipeline()
    for expert in ("transformer", "transformer_2"):
        saved = load_file(output_dir / expert / "diffusion_pytorch_model.safetensors")
        original = getattr(base, expert).state_dict()
        assert set(saved) == set(original), expert
        assert all(saved[key].shape == value.shape for key, value in original.items()), expert
        unchanged = all(torch.equal(saved[key], value) for key, value in original.items())
        assert unchanged != (expert in trained), expert


@pytest.mark.slow  # 30-65 s; the default suite keeps test_deepspeed_zero3_trains_and_saves_full_weights
def test_deepspeed_zero3_saves_the_frozen_wan22_expert_whole(tmp_path):
    # ZeRO-3 partitions the frozen expert too: saving the pipeline as it stands would write its empty shards.
    pytest.importorskip("deepspeed")
    config_path, env = zero3_single_process(tmp_path)
    script = os.path.join(os.path.dirname(__file__), "scripts", "wan22_experts_train.py")
    output_dir = tmp_path / "out"
    run([sys.executable, script, "low_noise", str(output_dir), str(config_path)], env)
    check_saved_experts(output_dir, {"transformer_2"})


@pytest.mark.slow
def test_sigterm_on_one_process_saves_a_collective_checkpoint_on_all(tiny_sd3_path, tmp_path):
    command = two_process_command(SCRIPT, tiny_sd3_path, str(tmp_path))
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
    config_path, env = zero3_single_process(tmp_path)
    run(
        [sys.executable, SCRIPT, tiny_sd3_path, str(tmp_path / "out"), str(config_path)],
        {**env, "OMP_NUM_THREADS": "2"},
    )

    rank0 = json.loads((tmp_path / "out" / "rank0.json").read_text())
    records = rank0["records"]
    assert len(records) == 2
    saved = load_file(tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(os.path.join(tiny_sd3_path, "transformer", "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(base)
    for key, value in base.items():
        assert saved[key].shape == value.shape and saved[key].numel() > 0, key
    assert any(not torch.equal(saved[key], base[key]) for key in base), "ZeRO-3 run saved untrained weights"
    check_ema([rank0], saved, sharded=True)  # the EMA of the ZeRO-3 partitions


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
    # On a CPU (ACCELERATE_USE_CPU) accelerate runs this FSDP config as multi-CPU DDP: the EMA is then whole on each
    # rank. The sharded EMA under FSDP2 is checked by test_ema_of_fsdp2_shards.
    fsdp = ranks[0]["fsdp"]
    check_ema(ranks, saved, sharded=fsdp)
    expected = (
        [f"ema_state-rank{rank:05d}-of-00002.safetensors" for rank in (0, 1)] if fsdp else ["ema_state.safetensors"]
    )
    assert sorted(os.listdir(tmp_path / "checkpoint-1" / "ema")) == expected


def test_ema_of_fsdp2_shards(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "fsdp2_ema.py")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        script, str(tmp_path),
    ]  # fmt: skip
    run(command, {"OMP_NUM_THREADS": "1"})
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # Each rank averages its own shard of the trainable parameters (the frozen bias is left out)...
    assert all(rank["sharded"] and rank["names"] == ["0.weight", "0.bias", "2.weight"] for rank in ranks)
    assert sum(rank["local_numel"] for rank in ranks) == ranks[0]["trainable_numel"] == 48
    for rank in ranks:
        assert rank["updates"] == rank["reloaded_updates"] == 6
        # ...and the shards put together are the EMA of the same training without sharding,
        assert rank["ema_error"] < 1e-6
        # swapped in, the sharded model computes with the EMA, and afterwards with its own weights again,
        assert rank["ema_vs_raw"] > 1e-3 and rank["swapped_output_error"] < 1e-6 and rank["restored_output_error"] == 0
        # the full state dict gathered while swapped in (what an export writes) is the EMA,
        assert rank["export_error"] < 1e-6
        # and each rank's shard file loads back into a freshly sharded model.
        assert rank["loaded"] and rank["reload_error"] == 0
    assert sorted(os.listdir(tmp_path / "ema")) == [
        f"ema_state-rank{rank:05d}-of-00002.safetensors" for rank in (0, 1)
    ]


def test_data_term_without_data_rows_under_fsdp2(tmp_path):
    # data_on_first_step_only leaves micro-batches without data rows: no `p.sum() * 0` term on DTensor parameters.
    script = os.path.join(os.path.dirname(__file__), "scripts", "fsdp2_data_term.py")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        script, str(tmp_path),
    ]  # fmt: skip
    run(command, {"OMP_NUM_THREADS": "1"})
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["sharded"] and rank["data_terms"][0] == 0 and rank["data_terms"][1] > 0
        # the data rows' losses summed over the micro-batch's size (2 of 4 rows)
        assert rank["data_term_after"] == pytest.approx(rank["expected_after"], rel=1e-6)
        assert rank["gradient_norm"] > 0 and rank["separate_backward_max_diff"] < 1e-6
    assert ranks[0]["data_terms"] == ranks[1]["data_terms"]
