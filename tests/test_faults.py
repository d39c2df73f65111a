# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Failure handling: preemption, atomic checkpoints, resume checks, divergence and silently wrong inputs."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from safetensors.torch import load_file
from test_trainer import assert_same_weights, brightness, make_args, prompt_dataset

from trl_ddrl import DDRLTrainer
from trl_ddrl.data import DiffusionDataCollator, to_pixel_tensor
from trl_ddrl.fault_handling import CheckpointError, TrainingDiverged


SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def fault_args(output_dir, **overrides):
    """4 optimizer steps, a checkpoint every 2; the runs the tests interrupt and resume."""
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, data_beta=0.1)
    settings.update(overrides)
    return make_args(output_dir, **settings)


def fault_trainer(path, output_dir, reward=brightness, **overrides):
    return DDRLTrainer(path, reward, args=fault_args(output_dir, **overrides), train_dataset=prompt_dataset(True))


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd3_path, tmp_path_factory):
    """The weights after the 4 steps of an uninterrupted run."""
    trainer = fault_trainer(tiny_sd3_path, tmp_path_factory.mktemp("full"), save_strategy="no")
    trainer.train()
    return {key: value.clone() for key, value in trainer.pipeline.transformer.state_dict().items()}


@pytest.fixture
def capture_warnings(caplog):
    """The trainer's warnings (transformers' loggers do not propagate to the root logger by default)."""
    logger = logging.getLogger("trl_ddrl")
    propagate, logger.propagate = logger.propagate, True
    with caplog.at_level(logging.WARNING, logger="trl_ddrl"):
        yield caplog
    logger.propagate = propagate


def test_sigterm_saves_the_finished_step_exits_143_and_resumes_exactly(tiny_sd3_path, tmp_path, uninterrupted):
    output_dir = tmp_path / "preempted"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "sigterm_train.py"), tiny_sd3_path, str(output_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "Stopped by SIGTERM at step 3" in result.stderr, result.stderr[-3000:]
    # SIGTERM came while step 3 was being scored: step 3 finished, then was saved beside the regular checkpoint-2.
    assert {"optimizer.pt", "trainer_state.json", "transformer"} <= set(os.listdir(output_dir / "checkpoint-3"))
    assert json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3

    resumed = fault_trainer(tiny_sd3_path, output_dir)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert_same_weights(resumed.pipeline.transformer, uninterrupted)


class _Killed(BaseException):
    """Stands for kill -9: not an Exception, so no failure save runs."""


def test_a_kill_during_a_save_leaves_the_last_good_checkpoint_to_resume_from(
    tiny_sd3_path, tmp_path, uninterrupted, capture_warnings
):
    trainer = fault_trainer(tiny_sd3_path, tmp_path, save_total_limit=1)
    save_rng_state = trainer._save_rng_state

    def killed_at_step_4(output_dir):
        if trainer.state.global_step == 4:
            raise _Killed  # after the weights and the optimizer state of checkpoint-4 were written
        save_rng_state(output_dir)

    trainer._save_rng_state = killed_at_step_4
    with pytest.raises(_Killed):
        trainer.train()
    # The half-written checkpoint is not a checkpoint-N, and save_total_limit=1 kept checkpoint-2.
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("checkpoint-")) == ["checkpoint-2"]

    resumed = fault_trainer(tiny_sd3_path, tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert_same_weights(resumed.pipeline.transformer, uninterrupted)
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("checkpoint-")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]


def test_a_full_disk_during_a_save_names_the_space_keeps_the_last_checkpoint_and_cleans_up(
    tiny_sd3_path, tmp_path, monkeypatch
):
    trainer = fault_trainer(tiny_sd3_path, tmp_path)
    save, saves = torch.save, []

    def disk_full_at_step_4(*args, **kwargs):
        if trainer.state.global_step == 4:
            saves.append(1)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1984 vs 1876")
        return save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    with pytest.raises(OSError, match=r"No space left on device at .* while saving checkpoint-4: about \d+ bytes"):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["README.md", "checkpoint-2"]  # no staging folder left
    assert len(saves) == 1  # the after-failure save does not repeat it
    monkeypatch.undo()
    resumed = fault_trainer(tiny_sd3_path, tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4


@pytest.mark.parametrize("damage", ["no_trainer_state", "truncated_weights", "truncated_optimizer"])
def test_resume_skips_an_incomplete_checkpoint_and_names_the_one_used(
    damage, tiny_sd3_path, tmp_path, capture_warnings
):
    fault_trainer(tiny_sd3_path, tmp_path).train()
    latest = tmp_path / "checkpoint-4"
    if damage == "no_trainer_state":
        (latest / "trainer_state.json").unlink()
    else:
        path = latest / ("optimizer.pt" if damage == "truncated_optimizer" else "transformer")
        if path.is_dir():
            path = next(path.glob("*.safetensors"))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    trainer = fault_trainer(tiny_sd3_path, tmp_path, max_steps=4)
    with pytest.raises(CheckpointError, match="checkpoint-4.*The newest complete one is .*checkpoint-2"):
        trainer.train(resume_from_checkpoint=str(latest))
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    assert "Skipping incomplete checkpoints: checkpoint-4" in capture_warnings.text
    assert f"Resuming from {tmp_path / 'checkpoint-2'}" in capture_warnings.text


def test_a_new_run_refuses_an_output_dir_with_another_runs_checkpoints(tiny_sd3_path, tmp_path):
    fault_trainer(tiny_sd3_path, tmp_path, max_steps=2).train()
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of an earlier run \(checkpoint-2\)"):
        fault_trainer(tiny_sd3_path, tmp_path).train()


@pytest.mark.parametrize(
    "schedule, changes, field",
    [
        ({}, {"learning_rate": 2e-3}, "learning_rate"),
        # max_steps shapes a decaying schedule only (DDRL's default, the authors' constant rate, ignores it)
        ({"lr_scheduler_type": "linear"}, {"max_steps": 6}, "max_steps"),
        ({}, {"lr_scheduler_type": "cosine"}, "lr_scheduler_type"),
    ],
)
def test_resume_refuses_a_changed_learning_rate_schedule(schedule, changes, field, tiny_sd3_path, tmp_path):
    fault_trainer(tiny_sd3_path, tmp_path, **schedule).train()
    trainer = fault_trainer(tiny_sd3_path, tmp_path, **schedule, **changes)
    with pytest.raises(CheckpointError, match=f"changed learning-rate schedule \\({field}: "):
        trainer.train(resume_from_checkpoint=True)


def test_resume_warns_about_changed_sampling_settings(tiny_sd3_path, tmp_path, capture_warnings):
    fault_trainer(tiny_sd3_path, tmp_path, max_steps=2).train()
    trainer = fault_trainer(tiny_sd3_path, tmp_path, max_steps=2, num_inference_steps=6)
    trainer.train(resume_from_checkpoint=True)
    assert "num_inference_steps: 4 -> 6" in capture_warnings.text


def test_resume_refuses_a_lora_checkpoint_of_other_target_modules(tiny_sd3_path, tmp_path):
    from peft import LoraConfig

    def lora(targets):
        return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian")

    args = fault_args(tmp_path, max_steps=2)
    DDRLTrainer(
        tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset(True), peft_config=lora(["to_q"])
    ).train()
    trainer = DDRLTrainer(
        tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset(True), peft_config=lora(["to_k"])
    )
    with pytest.raises(CheckpointError, match="other LoRA target_modules"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_into_another_architecture_names_the_checkpoint_and_the_fix(tiny_sd3_path, tmp_path):
    """A LoRA of another rank (same targets) used to end in torch's raw `size mismatch for ...` RuntimeError."""
    from peft import LoraConfig

    def lora(rank):
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q"], init_lora_weights="gaussian")

    args = fault_args(tmp_path, max_steps=2)
    DDRLTrainer(tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset(True), peft_config=lora(4)).train()
    trainer = DDRLTrainer(
        tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset(True), peft_config=lora(8)
    )
    with pytest.raises(CheckpointError, match=r"was written for another architecture: .* size mismatch for .*lora_A"):
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"data_beta": float("nan")}, "data_beta=nan must be a finite number"),
        ({"eta": float("nan")}, "eta=nan must be a finite number"),
        ({"train_timesteps": []}, r"train_timesteps=\[\] is empty"),
        ({"train_timesteps": 2}, "train_timesteps=2 must be a list"),
        ({"num_generations": "8"}, "num_generations='8' must be an integer, not the string '8'"),
        ({"num_generations": 4.5}, "num_generations=4.5 must be a whole number"),
        ({"max_steps": 1.7}, "max_steps=1.7 must be a whole number"),
        ({"data_beta": [0.1]}, r"data_beta=\[0.1\] must be a number, not a list"),
        ({"reward_weights": [1.0, "2"]}, "reward_weights=.* the item '2' must be a number"),
        ({"async_rewards": "no"}, "async_rewards='no' must be True or False"),
        ({"height": -16}, "height=-16 must be a positive number of pixels"),
    ],
)
def test_wrong_config_values_name_the_field(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **kwargs)


def test_whole_floats_become_integers(tmp_path):
    args = make_args(tmp_path, num_generations=4.0, max_steps=2.0)
    assert type(args.num_generations) is int and type(args.max_steps) is int


def all_finite(folder) -> bool:
    return all(
        bool(value.isfinite().all()) for path in folder.rglob("*.safetensors") for value in load_file(path).values()
    )


def test_a_diverging_policy_stops_before_its_nan_images_are_scored(tiny_sd3_path, tmp_path):
    scored = []

    def image_reward(prompts, images, **kwargs):
        scored.append(bool(images.isfinite().all()))
        return images.mean(dim=(1, 2, 3)).tolist()

    trainer = fault_trainer(tiny_sd3_path, tmp_path, image_reward, learning_rate=1e6, save_steps=1)
    with pytest.raises(TrainingDiverged, match=r"non-finite latents.*not to blame.*learning_rate=1e\+06 too high"):
        trainer.train()
    assert scored == [True]  # the second rollout's NaN images never reached the reward function
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert checkpoints and all(all_finite(folder) for folder in checkpoints)


def test_a_non_finite_loss_stops_before_the_optimizer_applies_it(tiny_sd3_path, tmp_path):
    trainer = fault_trainer(tiny_sd3_path, tmp_path, save_steps=100)
    diffusion_loss = trainer.adapter.diffusion_loss

    def nan_from_step_2(*args, **kwargs):
        loss = diffusion_loss(*args, **kwargs)
        return loss * float("nan") if trainer.state.global_step == 1 else loss

    trainer.adapter.diffusion_loss = nan_from_step_2
    with pytest.raises(TrainingDiverged, match=r"optimizer step 2: the loss is nan .*loss/data.*gradients of"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert all(bool(value.isfinite().all()) for value in trainer.pipeline.transformer.state_dict().values())
    assert all_finite(tmp_path / "checkpoint-1")  # the failure save of the last finished step


def test_non_finite_weights_are_never_saved(tiny_sd3_path, tmp_path):
    trainer = fault_trainer(tiny_sd3_path, tmp_path, max_steps=1, use_ema=False)  # save_model writes the raw weights
    trainer.train()
    with torch.no_grad():
        next(trainer.pipeline.transformer.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="Not saving the weights .* hold NaN or inf"):
        trainer.save_model(str(tmp_path / "final"))
    assert not list((tmp_path / "final").rglob("*.safetensors"))


def test_the_command_line_checks_yaml_values_and_reads_a_scalar_reward(tmp_path, capsys):
    from trl_ddrl.scripts.ddrl import make_parser

    config = tmp_path / "config.yaml"
    config.write_text("reward_funcs: brightness\noutput_dir: out\n")
    script_args, training_args, _ = make_parser().parse_args_and_config(["--config", str(config)])
    assert script_args.reward_funcs == ["brightness"]  # not ['b', 'r', 'i', ...]
    assert training_args.gradient_accumulation_steps == training_args.steps_per_generation

    config.write_text("reward_funcs: brightness\noutput_dir: out\nmax_steps: 1.7\n")
    with pytest.raises(SystemExit) as exit_info:
        make_parser().parse_args_and_config(["--config", str(config)])
    assert exit_info.value.code == 2
    assert "max_steps=1.7 must be a whole number" in capsys.readouterr().err


def test_a_missing_local_prompt_file_is_not_looked_up_on_the_hub(tmp_path):
    from trl_ddrl.scripts.ddrl import UsageError, load_dataset_argument

    with pytest.raises(UsageError, match="'missing.txt': file not found"):
        load_dataset_argument("missing.txt", None, "train", "dataset_name")


def test_a_prompt_file_that_is_not_utf8_names_the_line_and_the_encoding(tmp_path):
    from trl_ddrl.scripts.ddrl import UsageError, load_dataset_argument

    path = tmp_path / "prompts.txt"
    path.write_bytes("a cat\na dog\nun caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"byte 0xe9 at line 3, byte 7, which is not UTF-8.*iconv -f latin-1"):
        load_dataset_argument(str(path), None, "train", "dataset_name")
    path.write_text("a cat\n", encoding="utf-16")
    with pytest.raises(UsageError, match="starts with a UTF-16 byte-order mark.*iconv -f utf-16"):
        load_dataset_argument(str(path), None, "train", "dataset_name")


@pytest.mark.parametrize(
    "value, message",
    [
        (np.full((8, 8, 3), 200.0, np.float32), r"values in \[200, 200\].*looks like \[0, 255\] data: pass x / 255"),
        (np.full((8, 8, 3), -0.5, np.float32), r"looks like \[-1, 1\] data: pass \(x \+ 1\) / 2"),
        (torch.full((3, 8, 8), 2.0), r"float images must be in \[0, 1\]"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN or infinite"),
        (np.full((8, 8, 3), 700, np.int64), "neither 8-bit nor 16-bit"),
    ],
)
def test_float_images_outside_0_1_are_refused_instead_of_clamped(value, message):
    with pytest.raises(ValueError, match=message):
        to_pixel_tensor(value, 8, 8, 3)


def test_16_bit_and_rgba_images_keep_their_values(tmp_path):
    gray = np.full((8, 8), 32768, np.uint16)
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    expected = 32768 / 65535 * 2 - 1
    for value in (gray, Image.open(tmp_path / "gray16.png"), str(tmp_path / "gray16.png")):
        torch.testing.assert_close(to_pixel_tensor(value, 8, 8, 1), torch.full((1, 8, 8), expected))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent black: shown as the white background
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    for value in (rgba, Image.open(tmp_path / "clear.png"), torch.from_numpy(rgba).permute(2, 0, 1)):
        assert torch.equal(to_pixel_tensor(value, 8, 8, 3), torch.ones(3, 8, 8))


def test_a_truncated_image_file_is_named(tmp_path):
    path = tmp_path / "broken.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    collator = DiffusionDataCollator.__new__(DiffusionDataCollator)
    collator.image_column = "image"
    with pytest.raises(ValueError, match=f"Row 1 of the batch: .*cannot read the image file '{path}'"):
        collator.adapter = type(
            "Adapter", (), {"resolution": (8, 8), "pixel_channels": 3, "num_frames": None, "pipeline": None}
        )()
        collator.pixels([{"image": np.zeros((8, 8, 3), np.uint8)}, {"image": str(path)}])


def test_dataset_inputs_are_converted_or_refused_clearly(tiny_sd3_path, tmp_path):
    rows = [{"prompt": prompt} for prompt in ("a cat", "a dog", "a red car", "a tree")]
    trainer = DDRLTrainer(tiny_sd3_path, brightness, args=make_args(tmp_path), train_dataset=rows)
    assert trainer.train_dataset.column_names == ["prompt"] and len(trainer.train_dataset) == 4
    empty = Dataset.from_dict({"image": [], "prompt": []})
    with pytest.raises(ValueError, match="data_dataset is empty"):
        DDRLTrainer(
            tiny_sd3_path, brightness, args=make_args(tmp_path, data_beta=0.1), train_dataset=rows, data_dataset=empty
        )
    with pytest.raises(TypeError, match="train_dataset must be a datasets.Dataset, a list of row dicts"):
        DDRLTrainer(tiny_sd3_path, brightness, args=make_args(tmp_path), train_dataset=["a cat", "a dog"])


def test_a_lora_target_module_typo_names_the_module(tiny_sd3_path, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_kk", "add_q_proj"])
    with pytest.raises(ValueError, match=r"target_modules 'to_kk' \(did you mean 'to_k'"):
        DDRLTrainer(
            tiny_sd3_path, brightness, args=make_args(tmp_path), train_dataset=prompt_dataset(), peft_config=config
        )


def test_a_lora_target_modules_string_that_matches_nothing_is_named(tiny_sd3_path, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules="to_q")  # a regular expression over whole names
    with pytest.raises(ValueError, match=r"target_modules='to_q' matches no module .* did you mean the list \['to_q'"):
        DDRLTrainer(
            tiny_sd3_path, brightness, args=make_args(tmp_path), train_dataset=prompt_dataset(), peft_config=config
        )


def test_ctrl_c_while_rewards_are_queued_cancels_them(tiny_sd3_path, tmp_path, capture_warnings):
    calls, started = [], []

    def slow_brightness(prompts, images, **kwargs):
        calls.append(len(prompts))
        time.sleep(2.0)
        return brightness(prompts, images)

    # 8 samples in rollout chunks of 2: four reward calls, queued behind each other on the reward thread.
    args = make_args(tmp_path, rollout_batch_size=2)
    trainer = DDRLTrainer(tiny_sd3_path, slow_brightness, args=args, train_dataset=prompt_dataset())

    def press_ctrl_c():  # once all four calls are submitted: one running, the others waiting behind it
        while not calls or trainer.rollout.reward_executor._work_queue.qsize() + len(calls) < 4:
            time.sleep(0.01)
        started.append(len(calls))
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.rollout.reward_executor.shutdown(wait=True)  # what the interpreter does at exit
    assert started and started[0] < 4 and len(calls) == started[0]  # no queued call ran after Ctrl-C
    cancelled = f"cancelled {4 - started[0]} queued reward call(s); abandoned the running call of 'slow_brightness'"
    assert cancelled in capture_warnings.text


def test_a_failed_run_gives_sigterm_back_to_the_previous_handler(tiny_sd3_path, tmp_path):
    def failing(prompts, **kwargs):
        raise RuntimeError("reward service down")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Exception, match="reward service down"):
        fault_trainer(tiny_sd3_path, tmp_path, reward=failing).train()
    # Left installed, the handler would swallow the next SIGTERM of a process that is no longer training.
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("where", ["rollout", "replay"])
def test_out_of_memory_names_the_phase_and_the_estimator(where, tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(tiny_sd3_path, brightness, args=make_args(tmp_path), train_dataset=prompt_dataset())

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    if where == "rollout":
        trainer.rollout.adapter.decode = out_of_memory
    else:
        trainer.adapter.transition_log_prob = out_of_memory
    with pytest.raises(torch.OutOfMemoryError) as raised:
        trainer.train()
    note = "\n".join(getattr(raised.value, "__notes__", []))
    assert f"out of memory in the {where}" in note
    assert "trl-ddrl estimate-memory" in note and "--fit" in note
    assert "--per_device_train_batch_size 1" in note or "--rollout_batch_size 1" in note
