# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""What reaches the experiment trackers: scalars, sample grids, tables and eval metrics, read back from their files."""

import glob
import json
import os
import struct
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_evaluation import contrast, eval_dataset
from test_trainer import brightness, make_args, prompt_dataset
from torch.utils.tensorboard import SummaryWriter
from transformers.integrations import TensorBoardCallback

from trl_ddrl import DDRLTrainer
from trl_ddrl.tracking import SampleLoggingCallback, Samples, captioned_grid


def tensorboard_events(output_dir) -> EventAccumulator:
    (events,) = glob.glob(os.path.join(str(output_dir), "**", "events.out.tfevents.*"), recursive=True)
    accumulator = EventAccumulator(events, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def wandb_records(path: str):
    """
    The protobuf records of a wandb run file: LevelDB log format (a 7-byte `:W&B` header, then 32 KiB blocks of
    chunks with a `<crc32, length, type>` header; type 1 is a whole record, 2/3/4 its first/middle/last part).
    """
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
            if kind == 4:
                yield pending


def wandb_history_keys(path: str, timeout: float = 60.0) -> set[str]:
    """The keys of every history record of a finished wandb run file (wandb-core writes it after `finish()`)."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        keys, finished = set(), False
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            finished |= kind == "exit"
            if kind == "history":
                keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
        if finished or time.monotonic() > deadline:
            return keys
        time.sleep(0.5)


def logging_trainer(tiny_sd3_path, tmp_path, report_to: str) -> DDRLTrainer:
    args = make_args(
        tmp_path,
        report_to=report_to,
        eval_strategy="steps",
        eval_steps=2,
        eval_num_generations=2,
        log_samples_steps=1,
        num_samples_to_log=4,
    )
    return DDRLTrainer(
        tiny_sd3_path,
        brightness,
        args=args,
        train_dataset=prompt_dataset(),
        eval_dataset=eval_dataset(),
        eval_reward_funcs=contrast,
    )


def test_tensorboard_gets_scalars_model_config_samples_tables_and_eval_metrics(tiny_sd3_path, tmp_path):
    # transformers' TensorBoardCallback calls `model.config.to_json_string()`, which diffusers' FrozenDict lacked.
    trainer = logging_trainer(tiny_sd3_path, tmp_path, "tensorboard")
    trainer.train()
    events = tensorboard_events(tmp_path)
    tags = events.Tags()
    assert "train/rewards/brightness/mean" in tags["scalars"]
    for name in ("rewards/brightness/mean", "rewards/contrast/mean", "data_loss", "diversity", "reward_gap"):
        assert f"eval/{name}" in tags["scalars"], name
    assert [event.step for event in events.Scalars("eval/data_loss")] == [2]

    config = next(tag for tag in tags["tensors"] if tag.startswith("model_config"))
    assert '"in_channels"' in events.Tensors(config)[0].tensor_proto.string_val[0].decode()

    assert [event.step for event in events.Images("train/samples")] == [1, 2]
    assert [event.step for event in events.Images("eval/samples")] == [2]
    grid = events.Images("train/samples")[0].encoded_image_string
    assert grid.startswith(b"\x89PNG")
    table = next(tag for tag in tags["tensors"] if tag.startswith("train/completions"))
    text = events.Tensors(table)[0].tensor_proto.string_val[0].decode()
    assert "| index | prompt | brightness |" in text and ("a cat" in text or "a dog" in text)


def test_wandb_offline_run_holds_samples_tables_and_eval_metrics(tiny_sd3_path, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = logging_trainer(tiny_sd3_path, tmp_path, "wandb")
    trainer.train()
    import wandb

    wandb.finish()
    (run,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    media = os.path.join(run, "files", "media")
    assert glob.glob(os.path.join(media, "images", "train", "samples_*.png"))
    assert glob.glob(os.path.join(media, "images", "eval", "samples_*.png"))
    (table_file, *_) = sorted(glob.glob(os.path.join(media, "table", "eval", "completions_*.table.json")))
    table = json.loads(open(table_file).read())
    assert table["columns"] == ["index", "prompt", "brightness", "contrast", "image"]
    assert {row[1] for row in table["data"]} <= {"a blue bird", "a house"}

    (records,) = glob.glob(os.path.join(run, "*.wandb"))
    keys = wandb_history_keys(records)
    for key in (
        "train/rewards/brightness/mean",
        "eval/data_loss",
        "eval/rewards/contrast/mean",
        "eval/samples/captions",
    ):
        assert key in keys, sorted(keys)


def test_videos_reach_tensorboard_as_animated_gifs(tmp_path):
    samples = Samples(images=torch.rand(2, 3, 3, 8, 8), prompts=["a", "b"], rewards={"r": [0.5, float("nan")]})
    callback = TensorBoardCallback(SummaryWriter(str(tmp_path)))

    class Handler:
        callbacks = [callback]

    class Trainer:
        callback_handler = Handler()

    class State:
        is_world_process_zero = True
        global_step = 3

    SampleLoggingCallback(Trainer()).log_samples("eval", samples, State())
    callback.tb_writer.close()
    events = tensorboard_events(tmp_path)
    (video,) = events.Images("eval/videos")
    assert video.step == 3 and video.encoded_image_string.startswith(b"GIF8")
    assert events.Images("eval/samples")  # the first frames, captioned


def test_captioned_grid_puts_a_caption_strip_under_every_sample():
    samples = Samples(images=torch.zeros(3, 1, 16, 16), prompts=["x", "y", "z"], rewards={"r": [1.0, 2.0, 3.0]})
    grid = captioned_grid(samples)
    assert grid.width == 2 * 128 and grid.height > 2 * 128
    assert samples.captions()[1] == "y\nr=2"
