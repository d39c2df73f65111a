# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Small helpers shared by the trainer, the data collator, the CLI and the examples."""

import contextlib
import math
import operator
import os
import textwrap
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from huggingface_hub import save_torch_state_dict
from PIL import Image, ImageDraw, ImageFont
from torch import nn


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """
    Images or videos in `[0, 1]` (any shape, any device) -> uint8 in `[0, 255]` on the CPU, the values an image file
    of them holds: a quarter of float32's bytes, for copies kept for logging.
    """
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def image_grid(images: torch.Tensor, columns: int | None = None) -> Image.Image:
    """
    Tile images into one PIL image.

    Args:
        images (`torch.Tensor`): `[N, C, H, W]` in `[0, 1]` (C = 1 or 3), or uint8 in `[0, 255]` ([`to_uint8`]),
            or videos `[N, F, C, H, W]` (the first frame of each is shown).
        columns (`int`, *optional*): Images per row; defaults to about `sqrt(N)`.

    Returns:
        `PIL.Image.Image`: An RGB grid.
    """
    if images.ndim == 5:
        images = images[:, 0]
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"image_grid takes [N, C, H, W] or [N, F, C, H, W] images; got shape {tuple(images.shape)}.")
    images = images.detach().cpu()
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    count, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = torch.zeros(3, rows * height, columns * width)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[:, row * height : (row + 1) * height, column * width : (column + 1) * width] = image[:3]
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def labelled_grid(
    images: torch.Tensor, captions: list[str], columns: int | None = None, min_tile_width: int = 160
) -> Image.Image:
    """
    [`image_grid`] with each image's caption (its prompt, then its rewards: `Samples.captions`) printed under it.

    Args:
        images (`torch.Tensor`): `[N, C, H, W]` in `[0, 1]`, or videos `[N, F, C, H, W]` (first frames).
        captions (`list[str]`): One caption per image; lines split on newlines and wrapped to the tile width.
        columns (`int`, *optional*): Images per row; defaults to about `sqrt(N)`.
        min_tile_width (`int`, *optional*, defaults to `160`): Small images are upscaled (nearest) to at least this
            width, so that the captions fit.
    """
    tiles = [image_grid(images[index : index + 1]) for index in range(len(images))]
    scale = max(1, math.ceil(min_tile_width / tiles[0].width))
    tiles = [tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST) for tile in tiles]
    width, height = tiles[0].size
    font = ImageFont.load_default()
    characters = max(8, width // 7)
    lines = [
        [part for line in caption.split("\n") for part in (textwrap.wrap(line, characters) or [""])][:4]
        for caption in captions
    ]
    line_height = 12
    cell_height = height + 4 + line_height * max(len(caption_lines) for caption_lines in lines)
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new("RGB", (columns * width, rows * cell_height), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (tile, caption_lines) in enumerate(zip(tiles, lines)):
        row, column = divmod(index, columns)
        x, y = column * width, row * cell_height
        canvas.paste(tile, (x, y))
        for number, line in enumerate(caption_lines):
            draw.text((x + 2, y + height + 2 + number * line_height), line, fill="black", font=font)
    return canvas


def save_video_grid_gif(videos: torch.Tensor, path: str, fps: int = 8, columns: int | None = None) -> None:
    """
    Write videos as one animated GIF, tiled like [`image_grid`] (frame `f` of the GIF shows frame `f` of every video).

    Args:
        videos (`torch.Tensor`): `[N, F, C, H, W]` in `[0, 1]` (C = 1 or 3).
        path (`str`): Output file, usually ending in `.gif`.
        fps (`int`): Frames per second of the GIF.
        columns (`int`, *optional*): Videos per row; defaults to about `sqrt(N)`.
    """
    if videos.ndim != 5 or videos.shape[0] == 0 or videos.shape[1] == 0:
        raise ValueError(f"save_video_grid_gif takes [N, F, C, H, W] videos; got shape {tuple(videos.shape)}.")
    frames = [image_grid(videos[:, index], columns) for index in range(videos.shape[1])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)


def save_denoiser(denoiser: nn.Module, state_dict: dict[str, torch.Tensor], folder: str) -> None:
    """
    Write a diffusers model folder (`config.json` and `diffusion_pytorch_model*.safetensors`, sharded with an index
    when large) from an explicit state dict, such as the one gathered from DeepSpeed ZeRO-3 or FSDP shards. Loads with
    `ModelClass.from_pretrained(folder)`.
    """
    os.makedirs(folder, exist_ok=True)
    denoiser.save_config(folder)
    for stale in os.listdir(folder):
        if stale.startswith("diffusion_pytorch_model"):
            os.remove(os.path.join(folder, stale))
    # Clone: gathered tensors may be views into one flat buffer, which safetensors refuses to write.
    tensors = {key: value.detach().cpu().clone() for key, value in state_dict.items()}
    save_torch_state_dict(
        tensors, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB"
    )


def _skip_save(*args, **kwargs) -> None:
    """Stands in for a component's `save_pretrained` inside [`saved_separately`]."""


@contextlib.contextmanager
def saved_separately(pipeline, components: Iterable[str]) -> Iterator[None]:
    """
    Within the block, `pipeline.save_pretrained` keeps `components` in `model_index.json` but does not write their
    folders: the caller writes those itself (from a possibly gathered state dict, with [`save_denoiser`]), so that
    their weights are written once instead of twice.
    """
    modules = []
    for name in components:
        module = getattr(pipeline, name)
        module = getattr(module, "_orig_mod", module)  # diffusers saves a torch.compile'd module through the original
        module.save_pretrained = _skip_save  # an instance attribute shadows the class's method
        modules.append(module)
    try:
        yield
    finally:
        for module in modules:
            del module.save_pretrained


def unique_with_index(items: list, same: Callable[[Any, Any], bool] = operator.eq) -> tuple[list, list[int]]:
    """The distinct items in first-seen order, and for each item the position of its distinct twin among them."""
    unique, index = [], []
    for item in items:
        match = next((i for i, seen in enumerate(unique) if same(seen, item)), None)
        if match is None:
            unique.append(item)
            match = len(unique) - 1
        index.append(match)
    return unique, index
