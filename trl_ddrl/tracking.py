# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Experiment trackers and diffusers models: sample grids and tables in every tracker, and the model config they log.

- [`expose_config_to_trackers`]: transformers' tracker callbacks log the trained model's config with
  `model.config.to_json_string()` (TensorBoard) or `.to_dict()` (MLflow, Comet, Neptune), methods of transformers'
  `PretrainedConfig` that diffusers' `FrozenDict` config lacks (TensorBoard crashed at the first step). The denoiser's
  config is given both methods; its content and its type for diffusers are unchanged, and transformers models (whose
  config has them already) are left alone.
- [`SampleLoggingCallback`]: every `log_samples_steps` optimizer steps the latest training samples, and after every
  evaluation the evaluation samples, go as a captioned grid (prompt and rewards under each sample; videos as animated
  GIFs where the tracker shows them) plus a table (prompt, one column per reward, image) to every `report_to`
  tracker that takes media: wandb, tensorboard, trackio, mlflow and comet. Trackers not in `report_to` are skipped; a
  tracker call that fails is logged once as a warning and never stops training.
"""

import json
import math
import os
import tempfile
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from transformers import TrainerCallback
from transformers.integrations import (
    CometCallback,
    MLflowCallback,
    TensorBoardCallback,
    TrackioCallback,
    WandbCallback,
)
from transformers.utils import logging

from .utils import image_grid, save_video_grid_gif, to_uint8


logger = logging.get_logger(__name__)

MIN_TILE_WIDTH = 128
CAPTION_LINES = 3
CAPTION_LINE_HEIGHT = 12
GIF_FPS = 8


class TrackerConfig(FrozenDict):
    """A diffusers `FrozenDict` config that also answers transformers' `to_dict()` and `to_json_string()`."""

    def to_dict(self) -> dict:
        return dict(self)

    def to_json_string(self) -> str:
        # `default=str`: diffusers configs may hold values JSON lacks (dtypes, paths).
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


def expose_config_to_trackers(model: nn.Module) -> None:
    """Give a diffusers model's config the `to_dict` / `to_json_string` methods transformers' trackers call."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    config = getattr(model, "_internal_dict", None)
    if isinstance(config, FrozenDict) and not isinstance(config, TrackerConfig):
        model._internal_dict = TrackerConfig(config)


@dataclass
class Samples:
    """
    Samples to log: images `[N, C, H, W]` or videos `[N, F, C, H, W]` (uint8 on the CPU from [`Samples.first`], or
    float in `[0, 1]`), their prompts and rewards.
    """

    images: torch.Tensor
    prompts: list[str]
    rewards: dict[str, list[float]]  # reward name -> one value per sample, NaN where not scored

    @classmethod
    def first(cls, count: int, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor, names: list[str]):
        """
        The first `count` samples of a batch (float in `[0, 1]` or uint8) with rewards `[N, R]` of the reward functions
        `names`, the images copied to the CPU as uint8.
        """
        count = min(count, len(images))
        rewards = rewards[:count].float().cpu()
        return cls(
            images=images[:count].to("cpu", copy=True) if images.dtype == torch.uint8 else to_uint8(images[:count]),
            prompts=list(prompts[:count]),
            rewards={name: rewards[:, index].tolist() for index, name in enumerate(names)},
        )

    def captions(self) -> list[str]:
        """`prompt` and then `name=value` of every reward, one caption per sample."""
        captions = []
        for index, prompt in enumerate(self.prompts):
            scores = " ".join(f"{name}={values[index]:.3g}" for name, values in self.rewards.items())
            captions.append(f"{prompt}\n{scores}")
        return captions

    def table(self) -> tuple[list[str], list[list]]:
        """Column names and rows (`index`, `prompt`, one column per reward) of the completions table."""
        columns = ["index", "prompt", *self.rewards]
        rows = [
            [index, prompt, *(values[index] for values in self.rewards.values())]
            for index, prompt in enumerate(self.prompts)
        ]
        return columns, rows

    def markdown_table(self) -> str:
        columns, rows = self.table()
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            cells = [str(row[0]), row[1].replace("|", "\\|")] + [f"{value:.4g}" for value in row[2:]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def tile(self, index: int) -> Image.Image:
        """Sample `index` (a video's first frame) as an RGB image at least `MIN_TILE_WIDTH` pixels wide."""
        tile = image_grid(self.images[index : index + 1])
        scale = max(1, math.ceil(MIN_TILE_WIDTH / tile.width))
        return tile.resize((tile.width * scale, tile.height * scale), resample=Image.NEAREST)


def captioned_grid(samples: Samples, columns: int | None = None) -> Image.Image:
    """
    The samples tiled in rows of `columns` (about `sqrt(N)`), each with its caption (prompt, rewards) in a strip under
    it; videos show their first frame.
    """
    tiles = [samples.tile(index) for index in range(len(samples.prompts))]
    width, height = tiles[0].size
    strip = CAPTION_LINES * CAPTION_LINE_HEIGHT + 4
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * width, rows * (height + strip)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    characters = max(8, width // 6)
    for index, (tile, caption) in enumerate(zip(tiles, samples.captions(), strict=True)):
        row, column = divmod(index, columns)
        x, y = column * width, row * (height + strip)
        grid.paste(tile, (x, y))
        lines = [line for part in caption.split("\n") for line in textwrap.wrap(part, characters) or [""]]
        for number, line in enumerate(lines[:CAPTION_LINES]):
            draw.text((x + 2, y + height + 2 + number * CAPTION_LINE_HEIGHT), line, fill="black", font=font)
    return grid


def gif_bytes(videos: torch.Tensor, fps: int = GIF_FPS) -> bytes:
    """Videos `[N, F, C, H, W]` in `[0, 1]` tiled into one animated GIF, as the bytes of the file."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "samples.gif")
        save_video_grid_gif(videos, path, fps=fps)
        with open(path, "rb") as file:
            return file.read()


class SampleLoggingCallback(TrainerCallback):
    """
    Send training samples (every `args.log_samples_steps` optimizer steps) and evaluation samples (after every
    evaluation) to the media trackers among `report_to`; see the module docstring.

    Args:
        trainer ([`DDRLTrainer`]): Its latest rollout's samples (`rollout.last_samples`), evaluation samples
            (`evaluator.last_samples`) and tracker callbacks are read.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self._failed: set[str] = set()

    def on_step_end(self, args, state, control, **kwargs):
        samples = self.trainer.rollout.last_samples
        if args.log_samples_steps and state.global_step % args.log_samples_steps == 0 and samples is not None:
            self.log_samples("train", samples, state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        samples = self.trainer.evaluator.last_samples
        if args.log_samples_steps and samples is not None:
            self.log_samples("eval", samples, state)

    def log_samples(self, kind: str, samples: Samples, state) -> None:
        """Log `samples` under `<kind>/samples` (grid) and `<kind>/completions` (table) to every media tracker."""
        if not state.is_world_process_zero or not samples.prompts:
            return
        grid = captioned_grid(samples)
        video = gif_bytes(samples.images) if samples.images.ndim == 5 else None
        backends = {
            TensorBoardCallback: _log_tensorboard,
            WandbCallback: _log_wandb,
            TrackioCallback: _log_trackio,
            MLflowCallback: _log_mlflow,
            CometCallback: _log_comet,
        }
        for callback in self.trainer.callback_handler.callbacks:
            for callback_class, log in backends.items():
                if isinstance(callback, callback_class):
                    try:
                        log(callback, kind, samples, grid, video, state.global_step)
                    except Exception as error:
                        name = callback_class.__name__
                        if name not in self._failed:
                            self._failed.add(name)
                            logger.warning(f"Logging samples to {name} failed, and is skipped from now on: {error!r}")


def _log_tensorboard(callback, kind, samples, grid, video, step) -> None:
    writer = callback.tb_writer
    if writer is None:
        return
    writer.add_image(f"{kind}/samples", np.asarray(grid), step, dataformats="HWC")
    writer.add_text(f"{kind}/completions", samples.markdown_table(), step)
    if video is not None:
        # What `add_video` writes, without its moviepy dependency: an image summary holding an animated GIF.
        from tensorboard.compat.proto.summary_pb2 import Summary

        height, width = samples.images.shape[-2:]
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=video)
        writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=f"{kind}/videos", image=image)]), step)
    writer.flush()


def _log_wandb(callback, kind, samples, grid, video, step) -> None:
    wandb = callback._wandb
    if wandb is None or wandb.run is None:
        return
    captions = samples.captions()
    tiles = [samples.tile(index) for index in range(len(captions))]
    columns, rows = samples.table()
    table = wandb.Table(
        columns=[*columns, "image"],
        data=[[*row, wandb.Image(tile)] for row, tile in zip(rows, tiles, strict=True)],
    )
    record = {
        f"{kind}/samples": [wandb.Image(tile, caption=caption) for tile, caption in zip(tiles, captions, strict=True)],
        f"{kind}/completions": table,
        # Same x-axis as transformers' WandbCallback, which logs `train/global_step` with every record.
        "train/global_step": step,
    }
    with tempfile.TemporaryDirectory() as folder:
        if video is not None:
            path = os.path.join(folder, "samples.gif")
            with open(path, "wb") as file:
                file.write(video)
            record[f"{kind}/videos"] = wandb.Video(path, format="gif", caption=" | ".join(samples.prompts))
        wandb.log(record)


def _log_trackio(callback, kind, samples, grid, video, step) -> None:
    import pandas as pd

    trackio = callback._trackio
    columns, rows = samples.table()
    captions = samples.captions()
    record = {
        f"{kind}/samples": [
            trackio.Image(samples.tile(index), caption=caption) for index, caption in enumerate(captions)
        ],
        f"{kind}/completions": trackio.Table(dataframe=pd.DataFrame(rows, columns=columns)),
    }
    trackio.log(record, step=step)


def _log_mlflow(callback, kind, samples, grid, video, step) -> None:
    mlflow = callback._ml_flow
    if mlflow.active_run() is None:
        return
    mlflow.log_image(grid, key=f"{kind}_samples", step=step)
    columns, rows = samples.table()
    mlflow.log_table(
        {name: [row[i] for row in rows] for i, name in enumerate(columns)}, f"{kind}_completions/{step}.json"
    )
    if video is not None:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, f"{kind}_videos_{step}.gif")
            with open(path, "wb") as file:
                file.write(video)
            mlflow.log_artifact(path, artifact_path=f"{kind}_videos")


def _log_comet(callback, kind, samples, grid, video, step) -> None:
    experiment = callback._experiment
    if experiment is None:
        return
    experiment.log_image(grid, name=f"{kind}_samples", step=step)
    columns, rows = samples.table()
    experiment.log_table(f"{kind}_completions_{step}.csv", tabular_data=rows, headers=columns)
