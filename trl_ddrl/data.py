# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The diffusion-loss data collator: rows of (image or video, caption) to latents and text conditioning.

DDRL's regulariser is the ordinary diffusion loss on off-policy data. The collator turns dataset rows into what that
loss needs: clean latents (through the pipeline's VAE) and prompt conditioning (through its text encoders).
"""

import functools
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .pipelines import Conditioning, DiffusionAdapter
from .pipelines.base import drop_text
from .utils import unique_with_index


VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
"""File suffixes read as videos (a single-frame `.gif` is read as an image)."""


def _read_video_file(path: str | Path, column: str) -> list[np.ndarray] | None:
    """
    The frames of a video file as `[H, W, C]` uint8 arrays, or `None` for a single-frame GIF (an image).

    GIFs are read with PIL; other formats need `imageio` with a video plugin (`pip install imageio[pyav]`).
    """
    if Path(path).suffix.lower() == ".gif":
        with Image.open(path) as gif:
            if getattr(gif, "n_frames", 1) == 1:
                return None
            frames = []
            for index in range(gif.n_frames):
                gif.seek(index)
                frames.append(np.asarray(gif.convert("RGB")))
            return frames
    try:
        import imageio.v3 as iio
    except ImportError as error:
        raise ImportError(
            f"Column '{column}': reading the video file {str(path)!r} needs imageio with a video plugin: "
            "`pip install imageio[pyav]`. Or store the videos as frame arrays [F, H, W, C] or lists of frames."
        ) from error
    return list(iio.imread(path, index=None))


# PIL modes of 16-bit images (16-bit grayscale PNGs open as "I;16").
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# One 8-bit level: float images this far outside [0, 1] are not [0, 1] images.
_RANGE_TOLERANCE = 1 / 255


def _open_image(path: str | Path, column: str) -> Image.Image:
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"Column '{column}': cannot read the image file {str(path)!r} ({type(error).__name__}: {error}). It is "
            "truncated or not an image: replace or remove it."
        ) from error


def _pil_to_array(image: Image.Image, column: str) -> np.ndarray:
    """A PIL image as an `[H, W, C]` array: uint8, uint16 for 16-bit images, or float32 for mode `F`."""
    name = f" {image.filename!r}" if getattr(image, "filename", "") else ""
    try:
        if image.mode in _SIXTEEN_BIT_MODES:
            return np.asarray(image).astype(np.uint16)
        if image.mode == "I":
            array = np.asarray(image)
            if array.min() < 0 or array.max() > 65535:
                raise ValueError(
                    f"Column '{column}': a 32-bit integer image{name} with values in [{array.min()}, {array.max()}]; "
                    "store 8-bit or 16-bit images."
                )
            return array.astype(np.uint16)
        if image.mode == "F":
            return np.asarray(image, dtype=np.float32)
        has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
        if has_alpha:
            return np.asarray(image.convert("RGBA"))
        if image.mode not in ("L", "RGB"):
            image = image.convert("L" if image.mode == "1" else "RGB")
        return np.asarray(image)
    except OSError as error:  # a lazily decoded file that turns out truncated
        raise ValueError(
            f"Column '{column}': cannot decode the image{name} ({error}); replace or remove it."
        ) from error


def _to_unit_range(tensor: torch.Tensor, column: str) -> torch.Tensor:
    """
    `[C, H, W]` pixels to float in `[0, 1]`: uint8 / 255, uint16 / 65535, other integers / 255 when within
    `[0, 255]`; float values must already be in `[0, 1]` (a `[0, 255]` or `[-1, 1]` float image is refused, naming
    the conversion). Four channels are RGBA: composited on a white background.
    """
    if tensor.dtype == torch.bool:
        tensor = tensor.float()
    elif tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    elif tensor.dtype == torch.uint16:
        tensor = tensor.float() / 65535.0
    elif not torch.is_floating_point(tensor):
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"Column '{column}': integer pixels in [{low}, {high}] are neither 8-bit nor 16-bit; store uint8 "
                "(0-255) or uint16 (0-65535) images, or floats in [0, 1]."
            )
        tensor = tensor.float() / 255.0
    else:
        tensor = tensor.float()
        if not bool(tensor.isfinite().all()):
            raise ValueError(f"Column '{column}': a float image holds NaN or infinite values.")
        low, high = float(tensor.min()), float(tensor.max())
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            if low < 0 and low >= -1 - _RANGE_TOLERANCE and high <= 1 + _RANGE_TOLERANCE:
                guess = "It looks like [-1, 1] data: pass (x + 1) / 2."
            elif low >= 0 and high <= 255 + _RANGE_TOLERANCE:
                guess = "It looks like [0, 255] data: pass x / 255, or uint8 arrays."
            else:
                guess = "Rescale it to [0, 1]."
            raise ValueError(
                f"Column '{column}': a float image with values in [{low:.3g}, {high:.3g}]; float images must be in "
                f"[0, 1] {guess}"
            )
        tensor = tensor.clamp(0, 1)
    if tensor.shape[0] == 4:  # RGBA: composite on white, as viewers show transparency
        alpha = tensor[3:]
        tensor = tensor[:3] * alpha + (1 - alpha)
    elif tensor.shape[0] == 2:  # grayscale + alpha
        alpha = tensor[1:]
        tensor = tensor[:1] * alpha + (1 - alpha)
    return tensor


def _frame_to_tensor(frame: Any, column: str) -> torch.Tensor:
    """One image as float `[C, H, W]` in `[0, 1]`."""
    if isinstance(frame, (str, Path)):
        frame = _open_image(frame, column)
    if isinstance(frame, Image.Image):
        return _frame_to_tensor(_pil_to_array(frame, column), column)
    if isinstance(frame, np.ndarray):
        array = np.array(frame, copy=True)
        if array.dtype == np.uint16:
            array = array.astype(np.float32) / 65535.0
        tensor = torch.from_numpy(array)
        if tensor.ndim == 2:
            tensor = tensor[:, :, None]
        if tensor.ndim != 3 or tensor.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(
                f"Column '{column}': an image array must be [H, W] or [H, W, C] with C in (1, 3, 4); got shape "
                f"{tuple(frame.shape)}."
            )
        return _to_unit_range(tensor.permute(2, 0, 1), column)
    if isinstance(frame, torch.Tensor):
        if frame.ndim != 3 or frame.shape[0] not in (1, 2, 3, 4):
            raise ValueError(
                f"Column '{column}': an image tensor must be [C, H, W] with C in (1, 3, 4); got shape "
                f"{tuple(frame.shape)}."
            )
        return _to_unit_range(frame, column)
    raise TypeError(
        f"Column '{column}' holds a {type(frame).__name__}; expected a PIL image, a numpy array ([H, W, C], uint8, "
        "uint16 or float in [0, 1]), a torch tensor ([C, H, W]) or a file path."
    )


MAX_UPSCALE = 4.0
"""Data images upscaled by more than this factor to cover the training resolution get a warning (they are blurry)."""


@functools.lru_cache(maxsize=64)
def _warn_upscale(h: int, w: int, height: int, width: int) -> None:
    """Warn once per (image size, resolution) that data images are far smaller than the training resolution."""
    warnings.warn(
        f"A data image of {w}x{h} pixels is upscaled {max(height / h, width / w):.1f}x to the training resolution "
        f"{width}x{height}: the data term then teaches the model blurry images. Use data images of at least "
        f"{width // 2}x{height // 2} pixels, or lower height / width.",
        UserWarning,
        stacklevel=2,
    )


def _resize_center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize `[C, H, W]` so that it covers (height, width), then crop the centre."""
    _, h, w = image.shape
    scale = max(height / h, width / w)
    if scale > MAX_UPSCALE:
        _warn_upscale(h, w, height, width)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[
            0
        ]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return image[:, top : top + height, left : left + width]


def _match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    if image.shape[0] == channels:
        return image
    if channels == 3 and image.shape[0] == 1:
        return image.expand(3, -1, -1)
    if channels == 1 and image.shape[0] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype)
        return (image * weights[:, None, None]).sum(dim=0, keepdim=True)
    raise ValueError(f"Cannot convert a {image.shape[0]}-channel image to {channels} channels.")


def to_pixel_tensor(value: Any, height: int, width: int, channels: int, column: str = "image") -> torch.Tensor:
    """
    One dataset value to model pixels in `[-1, 1]`, resized to cover (height, width) and centre-cropped.

    Args:
        value: A PIL image, a numpy array (`[H, W]`, `[H, W, C]`; uint8 or float in `[0, 1]`) or its nested-list form
            (as `datasets` returns array columns), a tensor (`[C, H, W]`), an image file path, or a video: a list of
            such frames, an array/tensor with a leading frame axis (`[F, H, W, C]` / `[F, C, H, W]`) or a video file
            path (`VIDEO_EXTENSIONS`; an animated GIF, or any format with `imageio` installed).
        height (`int`), width (`int`): Target size in pixels.
        channels (`int`): Channels the model expects (1 or 3); grayscale and RGB are converted.
        column (`str`): Column name, for error messages.

    Returns:
        `torch.Tensor`: `[C, H, W]` for an image, `[F, C, H, W]` for a video, float32 in `[-1, 1]`.
    """
    if isinstance(value, (str, Path)) and not Path(value).is_file():
        raise FileNotFoundError(
            f"Column '{column}' names the file {str(value)!r}, which does not exist (relative paths are read from the "
            f"working directory, {os.getcwd()!r}). Fix the path, or store absolute paths or the images themselves."
        )
    if isinstance(value, (str, Path)) and Path(value).suffix.lower() in VIDEO_EXTENSIONS:
        value = _read_video_file(value, column) or value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        # datasets returns array columns as nested lists: [H][W][C] images or [F][H][W][C] videos.
        value = np.asarray(value)
    is_video = isinstance(value, (list, tuple)) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4)
    frames = list(value) if is_video else [value]
    if not frames:
        raise ValueError(f"Column '{column}' holds an empty video.")
    tensors = [
        _match_channels(_resize_center_crop(_frame_to_tensor(frame, column), height, width), channels)
        for frame in frames
    ]
    pixels = torch.stack(tensors) if is_video else tensors[0]
    return pixels.clamp(0, 1) * 2 - 1  # resizing may overshoot [0, 1] slightly


def _row_pixels(value: Any, height: int, width: int, channels: int, column: str, label: str) -> torch.Tensor:
    """[`to_pixel_tensor`], with the row (`label`, see [`row_label`]) named in its errors."""
    try:
        return to_pixel_tensor(value, height, width, channels, column)
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from error


class DatasetRow(dict):
    """A dataset row that knows where it came from (`source`, e.g. `"data_dataset row 17"`), for error messages."""

    source: str | None = None


def row_label(row: dict[str, Any], index: int, of_the_batch: bool = False) -> str:
    """How errors name a row of a batch: its dataset and row when known (see [`read_row`]), else its batch index."""
    return getattr(row, "source", None) or f"Row {index}{' of the batch' if of_the_batch else ''}"


def read_row(dataset: Any, position: int, name: str) -> DatasetRow:
    """
    `dataset[position]` as a [`DatasetRow`] naming `name` and `position`, with an error naming the dataset and row
    when an image in it cannot be decoded.
    """
    try:
        row = DatasetRow(dataset[position])
        row.source = f"{name} row {position}"
        return row
    except (OSError, SyntaxError) as error:  # PIL decoding a truncated or corrupt image of a datasets Image column
        raise ValueError(
            f"{name} row {position} cannot be read ({type(error).__name__}: {error}): an image in it is truncated or "
            "corrupt. Replace or remove that row."
        ) from error


def as_dataset(value: Any, name: str) -> Any:
    """
    `value` as a `datasets.Dataset`: a list of row dicts or a dict of columns is converted; anything else that is
    not a dataset raises a `TypeError` naming `name`.
    """
    from datasets import Dataset, IterableDataset

    if value is None or isinstance(value, (Dataset, IterableDataset)):
        return value
    if isinstance(value, dict):
        return Dataset.from_dict(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(row, dict) for row in value):
        return Dataset.from_list(list(value))
    raise TypeError(
        f"{name} must be a datasets.Dataset, a list of row dicts or a dict of columns; got "
        f"{type(value).__name__}{' (empty)' if isinstance(value, (list, tuple)) and not value else ''}."
    )


class DiffusionDataCollator:
    """
    Collate rows of a dataset of images/videos and captions into latents and text conditioning.

    Args:
        adapter ([`~trl_ddrl.pipelines.DiffusionAdapter`]): The pipeline adapter (its VAE and text encoders are used).
        image_column (`str`, *optional*, defaults to `"image"`): Column with images or videos.
        caption_column (`str`, *optional*, defaults to `"prompt"`): Column with captions.
        source_image_column (`str`, *optional*, defaults to `"source_image"`): For image-editing adapters
            (`conditioned_on_source_image`), the column with each row's source image; a row is then (source image,
            edited target image in `image_column`, caption), and the conditioning is the caption with the source.
        text_dropout (`float`, *optional*, defaults to `0.0`): Probability that a row's prompt embeddings are zeroed
            ([`drop_text`]; the authors' Cosmos recipe: 0.2).
        posterior_mean (`bool`, *optional*, defaults to `False`): Encode the images/videos to the VAE posterior's
            mean instead of a sample (the authors').
        prompt_encoder (`Callable`, *optional*): Encodes the prompts in place of `adapter.encode_prompts` (same
            signature): the trainer's [`~trl_ddrl.prompt_embeddings.PromptEncoder`], with its cache and offloading.

    Calling it on a list of rows returns a dict with `latents` (`[B, ...]`, float32), `conditioning` (a dict of
    `[B, ...]` tensors) and `captions` (`list[str]`), on the adapter's device.

    Example:
    ```python
    >>> collator = DiffusionDataCollator(trainer.adapter)
    >>> batch = collator([{"image": pil_image, "prompt": "a cat"}])
    >>> batch["latents"].shape
    torch.Size([1, 16, 64, 64])
    ```
    """

    def __init__(
        self,
        adapter: DiffusionAdapter,
        image_column: str = "image",
        caption_column: str = "prompt",
        source_image_column: str = "source_image",
        text_dropout: float = 0.0,
        posterior_mean: bool = False,
        prompt_encoder: Callable[..., Conditioning] | None = None,
    ):
        self.adapter = adapter
        self.prompt_encoder = prompt_encoder
        self.text_dropout = text_dropout
        self.posterior_mean = posterior_mean
        self.image_column = image_column
        self.caption_column = caption_column
        self.source_image_column = source_image_column

    def pixels(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        """
        The rows' images as model pixels `[B, C, H, W]` in `[-1, 1]`, or for video pipelines (adapters with a
        `num_frames`) their videos' first `num_frames` frames, `[B, F, C, H, W]`.
        """
        return torch.stack(self._pixel_list(rows))

    def _pixel_list(self, rows: list[dict[str, Any]]) -> list[torch.Tensor]:
        """[`pixels`] as a list, converting each image object once: rows sharing one object share one tensor."""
        height, width = self.adapter.resolution
        channels = self.adapter.pixel_channels
        num_frames = self.adapter.num_frames
        pipeline = type(self.adapter.pipeline).__name__
        values = []
        converted: dict[int, torch.Tensor] = {}  # by id: a group's rows share their image object
        for index, row in enumerate(rows):
            if id(row.get(self.image_column)) in converted:
                values.append(converted[id(row[self.image_column])])
                continue
            if self.image_column not in row or row[self.image_column] is None:
                raise KeyError(
                    f"{row_label(row, index)} has no '{self.image_column}' value (columns: {sorted(row)}). Set image_column to the "
                    "column holding the data images, or set data_beta=0 to train without the data term."
                )
            pixels = _row_pixels(
                row[self.image_column], height, width, channels, self.image_column, row_label(row, index, True)
            )
            if num_frames is None and pixels.ndim == 4:
                raise ValueError(
                    f"{row_label(row, index)}'s '{self.image_column}' is a video ({pixels.shape[0]} frames) but {pipeline} "
                    "generates images. Give the data term images."
                )
            if num_frames is not None:
                if pixels.ndim == 3:
                    raise ValueError(
                        f"{row_label(row, index)}'s '{self.image_column}' is an image but {pipeline} generates videos of "
                        f"num_frames={num_frames} frames. Give the data term videos (frame arrays [F, H, W, C], "
                        "lists of frames or video files)."
                    )
                if pixels.shape[0] < num_frames:
                    raise ValueError(
                        f"{row_label(row, index)}'s '{self.image_column}' video has {pixels.shape[0]} frames, fewer than "
                        f"num_frames={num_frames}. Use clips of at least num_frames frames or lower num_frames."
                    )
                pixels = pixels[:num_frames]
            converted[id(row[self.image_column])] = pixels
            values.append(pixels)
        return values

    def condition_pixels(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        """
        The rows' conditioning frames for video-to-world pipelines: the first `adapter.num_conditioning_frames` frames
        of each row's video (an image counts as one frame), `[B, F, C, H, W]` in `[-1, 1]`.
        """
        height, width = self.adapter.resolution
        needed = self.adapter.num_conditioning_frames
        values = []
        for index, row in enumerate(rows):
            if row.get(self.image_column) is None:
                raise KeyError(
                    f"{row_label(row, index)} has no '{self.image_column}' value (columns: {sorted(row)}). "
                    f"{type(self.adapter.pipeline).__name__} generates from conditioning frames: put an image or video "
                    "per prompt in that column, or set image_column."
                )
            pixels = _row_pixels(
                row[self.image_column],
                height,
                width,
                self.adapter.pixel_channels,
                self.image_column,
                row_label(row, index, True),
            )
            if pixels.ndim == 3:
                pixels = pixels[None]
            if pixels.shape[0] < needed:
                raise ValueError(
                    f"{row_label(row, index)}'s '{self.image_column}' has {pixels.shape[0]} frames; the model is conditioned on "
                    f"num_conditioning_frames={needed}."
                )
            values.append(pixels[:needed])
        return torch.stack(values)

    def source_pixels(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        """
        The rows' source images (image editing) as model pixels `[B, C, H, W]` in `[-1, 1]`, resized to cover the
        adapter's resolution and centre-cropped.
        """
        height, width = self.adapter.resolution
        column = self.source_image_column
        pipeline = type(self.adapter.pipeline).__name__
        values = []
        for index, row in enumerate(rows):
            if row.get(column) is None:
                raise KeyError(
                    f"{row_label(row, index)} has no '{column}' value (columns: {sorted(row)}). {pipeline} edits a source image: "
                    "put each row's source image in that column, or set source_image_column to the column holding "
                    "them."
                )
            pixels = to_pixel_tensor(row[column], height, width, self.adapter.pixel_channels, column)
            if pixels.ndim != 3:
                raise ValueError(f"{row_label(row, index)}'s '{column}' is a video; {pipeline} edits images.")
            values.append(pixels)
        return torch.stack(values)

    def conditioning(self, captions: list[str], rows: list[dict[str, Any]]) -> Conditioning:
        """
        The conditioning of `captions`: the adapter's prompt encoding of each distinct caption once, or for
        image-editing adapters the encoding of each caption with its row's source image, each distinct (caption,
        source image) pair once.
        """
        device = self.adapter.device
        encode_prompts = self.prompt_encoder or self.adapter.encode_prompts
        if not self.adapter.conditioned_on_source_image:
            unique, index = unique_with_index(captions)  # a group's rows repeat its prompt num_generations times
            encoded = encode_prompts(unique, device)
            return {key: value[torch.tensor(index, device=value.device)] for key, value in encoded.items()}
        sources = self.source_pixels(rows)
        keys = [(caption, source.numpy().tobytes()) for caption, source in zip(captions, sources)]
        # The first row of each distinct pair, and for every row its pair's position among them.
        first, index = unique_with_index(list(range(len(keys))), same=lambda i, j: keys[i] == keys[j])
        encoded = encode_prompts([captions[i] for i in first], device, source_images=sources[first].to(device))
        return {key: value[torch.tensor(index, device=value.device)] for key, value in encoded.items()}

    def captions(self, rows: list[dict[str, Any]]) -> list[str]:
        captions = []
        for index, row in enumerate(rows):
            caption = row.get(self.caption_column)
            if not isinstance(caption, str):
                raise KeyError(
                    f"{row_label(row, index)} has no text in column '{self.caption_column}' (columns: {sorted(row)}). Set "
                    "caption_column to the column holding the captions."
                )
            captions.append(caption)
        return captions

    def __call__(
        self, rows: list[dict[str, Any]], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor | Conditioning | list[str]]:
        captions = self.captions(rows)
        # Without a data_dataset the rows of a group repeat one image: the VAE encodes each distinct image once, and
        # the group's rows share its posterior sample (their data noise still differs).
        unique, index = unique_with_index(self._pixel_list(rows), same=lambda a, b: a is b or torch.equal(a, b))
        pixels = torch.stack(unique).to(self.adapter.device)
        index = torch.tensor(index, device=pixels.device)
        latents = self.adapter.encode_pixels(pixels, generator=generator, mode=self.posterior_mean)[index]
        conditioning = self.conditioning(captions, rows)
        if self.text_dropout > 0:
            keep = torch.rand(len(rows), generator=generator) >= self.text_dropout
            conditioning = drop_text(conditioning, keep)
        data_conditioning = self.adapter.data_conditioning(pixels, generator=generator)
        conditioning.update({key: value[index.to(value.device)] for key, value in data_conditioning.items()})
        return {"latents": latents, "conditioning": conditioning, "captions": captions}


def check_prompts(prompts: Iterable[Any], dataset_name: str, column: str = "prompt") -> None:
    """
    Every prompt is a `str` of valid Unicode; else a `ValueError` naming the dataset, the row and the column (instead
    of the tokenizer's error many frames deep, or pyarrow's `UnicodeEncodeError`).
    """
    for index, value in enumerate(prompts):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
                continue
            except UnicodeEncodeError as error:
                problem = (
                    f"a string that is not valid Unicode ({error.reason} at character {error.start}: {value!r:.80})"
                )
        else:
            problem = f"{type(value).__name__} {value!r:.80}"
        raise ValueError(
            f"{dataset_name} row {index}, column {column!r}: {problem} is not a text prompt. Every prompt must be a "
            "str: decode bytes (value.decode('utf-8')), convert numbers with str(), drop rows without a prompt, and "
            "replace lone surrogates (value.encode('utf-8', 'replace').decode())."
        )


def check_prompt_column(dataset: Any, dataset_name: str, column: str = "prompt") -> None:
    """A `datasets.Dataset`'s prompt column holds strings and no nulls; else a `ValueError` naming the row."""
    from datasets import Value

    feature = dataset.features.get(column)
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        first = dataset[0][column] if len(dataset) else None
        raise ValueError(
            f"{dataset_name} column {column!r} holds {feature} values (row 0: {first!r:.80}), not text prompts. Convert "
            f"it, e.g. dataset.map(lambda row: {{{column!r}: str(row[{column!r}])}})."
        )
    if dataset.data.column(column).null_count:  # a None somewhere: find its row (through any index mapping)
        check_prompts(dataset[column], dataset_name, column)


def check_prompt_datasets(train_dataset: Any, data_dataset: Any, prompts_per_step: int) -> tuple[Any, Any]:
    """
    `train_dataset` and `data_dataset` as `datasets.Dataset`s (see [`as_dataset`]), checked: a map-style prompt
    dataset with a `prompt` column and at least `prompts_per_step` rows, and a data dataset that is not empty.

    Raises:
        `ValueError`: naming the dataset, what it lacks and the fix.
    """
    from datasets import IterableDataset

    if train_dataset is None:
        raise ValueError("train_dataset is required: a datasets.Dataset with a 'prompt' column.")
    if isinstance(train_dataset, dict) and "prompt" in train_dataset:  # checked before Arrow sees (and garbles) them
        check_prompts(train_dataset["prompt"], "train_dataset")
    elif isinstance(train_dataset, (list, tuple)) and all(isinstance(row, dict) for row in train_dataset):
        check_prompts((row.get("prompt", "") for row in train_dataset), "train_dataset")
    train_dataset, data_dataset = as_dataset(train_dataset, "train_dataset"), as_dataset(data_dataset, "data_dataset")
    if data_dataset is not None and not isinstance(data_dataset, IterableDataset) and len(data_dataset) == 0:
        raise ValueError("data_dataset is empty: give it rows of images and captions, or leave it out.")
    if isinstance(train_dataset, IterableDataset):
        raise ValueError("train_dataset must be a map-style datasets.Dataset (IterableDataset is not supported).")
    if "prompt" not in train_dataset.column_names:
        raise ValueError(
            f"train_dataset has no 'prompt' column (columns: {train_dataset.column_names}). Rename the prompt "
            "column with dataset.rename_column(<name>, 'prompt')."
        )
    if len(train_dataset) < prompts_per_step:
        raise ValueError(
            f"train_dataset has {len(train_dataset)} rows, but prompts_per_step={prompts_per_step} draws that "
            "many distinct prompts per iteration: add prompts, or lower prompts_per_step."
        )
    check_prompt_column(train_dataset, "train_dataset")
    return train_dataset, data_dataset


def check_data_term_columns(args, train_dataset, data_dataset=None) -> None:
    """
    The data term's images and captions are there (from `data_dataset`, or `train_dataset` without one), and
    `data_source="base_model"` is not given a `data_dataset` it would ignore. Needs no model: the trainer runs it
    before loading the pipeline.

    Raises:
        `ValueError`: naming the dataset, the column or field, and the fix.
    """
    if args.data_source == "base_model" and data_dataset is not None:
        raise ValueError(
            "data_dataset is given but data_source='base_model' draws the data term from the base model. Drop "
            "data_dataset, or set data_source='dataset' to train on it."
        )
    if args.data_beta > 0 and args.data_source == "dataset":
        source = data_dataset if data_dataset is not None else train_dataset
        if args.image_column not in source.column_names:
            which = "data_dataset" if data_dataset is not None else "train_dataset"
            raise ValueError(
                f"data_beta={args.data_beta} needs data images, but {which} has no '{args.image_column}' column "
                f"(columns: {source.column_names}). Pass a data_dataset with image and caption columns, add an "
                "image column to train_dataset, set image_column, set data_source='base_model' to regularise "
                "towards the base model's own samples, or set data_beta=0."
            )
        if data_dataset is not None and args.caption_column not in data_dataset.column_names:
            raise ValueError(
                f"data_dataset has no '{args.caption_column}' caption column (columns: {data_dataset.column_names}). "
                "Set caption_column."
            )


def check_data_columns(adapter: DiffusionAdapter, args, train_dataset, data_dataset=None) -> None:
    """
    The columns the run reads are there: the conditioning frames of frame-conditioned families, the data term's
    columns ([`check_data_term_columns`]), and the source images of image-editing families.

    Raises:
        `ValueError`: naming the dataset, the column or field, and the fix.
    """
    pipeline = type(adapter.pipeline).__name__
    if adapter.num_conditioning_frames and args.image_column not in train_dataset.column_names:
        raise ValueError(
            f"{pipeline} generates from conditioning frames, but train_dataset has no '{args.image_column}' column "
            f"(columns: {train_dataset.column_names}). Add an image or video per prompt in that column, or set "
            "image_column."
        )
    check_data_term_columns(args, train_dataset, data_dataset)
    if adapter.conditioned_on_source_image:
        check_source_image_column(adapter, args, train_dataset, data_dataset)


def check_source_image_column(adapter: DiffusionAdapter, args, train_dataset, data_dataset=None) -> None:
    """
    For image-editing adapters: `train_dataset` (and the data rows) must hold `args.source_image_column`.

    Raises:
        `ValueError`: naming the column, the dataset and the fix.
    """
    column = args.source_image_column
    pipeline = type(adapter.pipeline).__name__
    if column not in train_dataset.column_names:
        raise ValueError(
            f"{pipeline} edits a source image, but train_dataset has no '{column}' column (columns: "
            f"{train_dataset.column_names}). Put each prompt's source image in that column, or set source_image_column."
        )
    if args.data_beta > 0 and args.data_source == "base_model":
        raise ValueError(
            f"data_source='base_model' caches one base-model sample per prompt, which does not know {pipeline}'s source "
            "images. Use data_source='dataset' with (source image, edited image, caption) rows, or set data_beta=0."
        )
    if args.data_beta > 0 and data_dataset is not None and column not in data_dataset.column_names:
        raise ValueError(
            f"data_dataset has no '{column}' column (columns: {data_dataset.column_names}). {pipeline}'s data rows are "
            f"(source image in '{column}', edited image in '{args.image_column}', caption): add the source images, or "
            "set source_image_column."
        )
