# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Client for reward servers (`trl-ddrl-reward-server`, or any server speaking the same JSON protocol).

Protocol: `POST <url>/score` with

```json
{"prompts": ["a cat", ...], "images": ["<base64 PNG>", ...], "columns": {"<name>": [...], ...}}
```

where each image is one base64-encoded PNG (8-bit as sent by this client; 16-bit PNGs are read too), or, for
videos, a list of base64 PNG frames. The answer is
`{"rewards": [float | null, ...]}`, one value per prompt. `GET <url>/health` answers `{"status": "ok", ...}`.
"""

import base64
import io
import json
import logging
import random
import time
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from .base import RewardFunctionError
from .frames import to_uint8_frames


logger = logging.getLogger(__name__)


def _png(frame: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_images(images: torch.Tensor) -> list[str] | list[list[str]]:
    """
    Images `[B, C, H, W]` in `[0, 1]` -> `B` base64 PNG strings; videos `[B, F, C, H, W]` -> `B` lists of `F` strings.

    Pixels are rounded to 8 bits, so the server sees exactly `round(images * 255) / 255`.
    """
    if images.ndim not in (4, 5) or images.shape[-3] not in (1, 3, 4):
        raise ValueError(
            f"encode_images expects [B, C, H, W] or [B, F, C, H, W] with C in (1, 3, 4), got {tuple(images.shape)}."
        )
    frames = [_png(frame) for frame in to_uint8_frames(images)]
    if images.ndim == 4:
        return frames
    per_video = images.shape[1]
    return [frames[i : i + per_video] for i in range(0, len(frames), per_video)]


class ImageTooLarge(ValueError):
    """A decoded image would exceed the pixel limit (or PIL's decompression-bomb limit)."""


def _unpng(data: str, max_pixels: int | None = None) -> torch.Tensor:
    """
    One base64 PNG (8- or 16-bit, gray, RGB, RGBA or palette) as float `[C, H, W]` in `[0, 1]`, alpha composited on
    white (`C` is 1 or 3).
    """
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(str(error)) from error
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageTooLarge(
            f"an image of {image.width}x{image.height} = {image.width * image.height} pixels exceeds the limit of "
            f"{max_pixels} pixels"
        )
    if image.mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "La", "RGBa"):
        has_alpha = image.mode in ("PA", "La", "RGBa") or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "L" if image.mode == "1" else "RGB")
    array = np.array(image)
    if image.mode == "F" or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"a PNG of mode {image.mode!r} is not an image of 8- or 16-bit integers")
    scale = 255.0 if array.dtype == np.uint8 else 65535.0  # 16-bit PNGs: mode I;16 (or I)
    if array.ndim == 2:
        array = array[..., None]
    pixels = torch.from_numpy(array.astype(np.float32) / scale).permute(2, 0, 1)
    if image.mode in ("RGBA", "LA"):  # composited on white, as the trainer does with RGBA data images
        color, alpha = pixels[:-1], pixels[-1:]
        pixels = color * alpha + (1.0 - alpha)
    return pixels


def _stack(tensors: list[torch.Tensor], what: str, within: str = "") -> torch.Tensor:
    """Stack decoded images (or videos); gray ones become RGB beside RGB ones; different sizes raise naming two."""
    if len({tensor.shape[-3] for tensor in tensors}) > 1:
        tensors = [tensor.expand(*tensor.shape[:-3], 3, *tensor.shape[-2:]) for tensor in tensors]
    shapes = [tuple(tensor.shape) for tensor in tensors]
    if len(set(shapes)) > 1:
        other = next(index for index, shape in enumerate(shapes) if shape != shapes[0])
        raise ValueError(
            f"{what} 0{within} has the shape {shapes[0]} but {what} {other} has {shapes[other]}; all {what}s of one "
            "request must have the same size (resize them, or send one request per size)."
        )
    return torch.stack(tensors)


def decode_images(encoded: list[str] | list[list[str]], max_pixels: int | None = None) -> torch.Tensor:
    """
    Inverse of [`encode_images`]: float images `[B, C, H, W]` (or videos `[B, F, C, H, W]`) in `[0, 1]`. 16-bit PNGs
    are scaled by 65535; RGBA and gray + alpha images are composited on white; gray images sent beside RGB ones
    become RGB; images (or frames) of different sizes raise a `ValueError` naming two of them. With `max_pixels`, an image or frame with more pixels raises [`ImageTooLarge`] before it is
    decoded.
    """
    if not encoded:
        raise ValueError("No images to decode.")
    if all(isinstance(item, str) for item in encoded):
        return _stack([_unpng(item, max_pixels) for item in encoded], "image")
    if all(isinstance(item, list) and item and all(isinstance(frame, str) for frame in item) for item in encoded):
        videos = []
        for index, video in enumerate(encoded):
            videos.append(_stack([_unpng(frame, max_pixels) for frame in video], "frame", f" of video {index}"))
        return _stack(videos, "video")
    raise ValueError("images must be a list of base64 PNG strings, or a list of non-empty lists of them (videos).")


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds a 503 (server busy) or 429 answer asks to wait (`Retry-After`), or None for other answers."""
    if response.status_code not in (429, 503):
        return None
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _jsonable(values: list) -> bool:
    try:
        json.dumps(values, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


class RemoteReward:
    """
    A reward computed by a server: sends prompts, images (PNG) and per-sample columns to `POST <url>/score`.

    Connection errors, timeouts and 5xx answers are retried `max_retries` times, waiting `backoff * 2**attempt`
    seconds before retry `attempt` (0-based); then, and on any other 4xx answer, a [`RewardFunctionError`] naming the
    URL is raised. A busy server's 503 (or 429) with `Retry-After` is not a failure: the request is sent again after
    that many seconds (plus up to half as much jitter), for up to `timeout` seconds of such waits in all.

    `trainer_state` is not sent. Per-sample columns (lists of length `B`) are sent when they are JSON-serialisable
    (others, such as PIL image columns, are skipped), or exactly those named in `columns`.

    Args:
        url (`str`):
            Base URL of the server, e.g. `"http://127.0.0.1:8000"` (a URL ending in `/score` is used as is).
        timeout (`float`, *optional*, defaults to `300.0`):
            Seconds to wait for each request (connect, send, and the server's scoring).
        max_retries (`int`, *optional*, defaults to `3`):
            Retries after a failed attempt.
        backoff (`float`, *optional*, defaults to `1.0`):
            Seconds before the first retry; doubled at every further retry.
        batch_size (`int`, *optional*):
            Samples per request; all in one request if None.
        columns (`list[str]`, *optional*):
            The dataset columns to send; an error is raised if one is missing or not JSON-serialisable.
        name (`str`, *optional*):
            Name under which the trainer logs this reward; defaults to the URL.

    Example:

    ```python
    >>> from trl_ddrl.rewards import RemoteReward

    >>> reward = RemoteReward("http://127.0.0.1:8000", timeout=60, batch_size=16)
    ```
    """

    def __init__(
        self,
        url: str,
        timeout: float = 300.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        batch_size: int | None = None,
        columns: list[str] | None = None,
        name: str | None = None,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward url={url!r} must start with http:// or https://.")
        if max_retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(
                f"RemoteReward needs timeout > 0, max_retries >= 0 and backoff >= 0; got timeout={timeout}, "
                f"max_retries={max_retries}, backoff={backoff}."
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"RemoteReward batch_size={batch_size} must be at least 1 (or None for one request).")
        base = url.rstrip("/")
        self.url = base if base.endswith("/score") else f"{base}/score"
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.batch_size = batch_size
        self.columns = columns
        self.name = name or url

    def _columns(self, kwargs: dict[str, Any], batch_size: int) -> dict[str, list]:
        if self.columns is None:
            return {
                key: list(value)
                for key, value in kwargs.items()
                if isinstance(value, (list, tuple)) and len(value) == batch_size and _jsonable(list(value))
            }
        selected = {}
        for key in self.columns:
            value = kwargs.get(key)
            if not isinstance(value, (list, tuple)) or len(value) != batch_size or not _jsonable(list(value)):
                raise ValueError(
                    f"RemoteReward({self.url!r}, columns={self.columns}): column {key!r} must be passed as a "
                    f"JSON-serialisable list of {batch_size} values; got {type(value).__name__}. Fix the dataset or "
                    "drop the column from `columns`."
                )
            selected[key] = list(value)
        return selected

    def _post(self, client: httpx.Client, payload: dict[str, Any]) -> list:
        expected = len(payload["prompts"])
        last_error = "no attempt made"
        failures, busy_seconds = 0, 0.0
        while True:
            try:
                response = client.post(self.url, json=payload)
            except httpx.TimeoutException as error:
                last_error = f"timed out after {self.timeout}s ({type(error).__name__})"
            except httpx.TransportError as error:
                last_error = f"{type(error).__name__}: {error}"
            else:
                delay = _retry_after(response)
                if delay is not None and busy_seconds + delay <= self.timeout:
                    # The server sheds load: wait as told (with jitter, so that refused clients do not return
                    # together), within `timeout` seconds in all; this is not a failure.
                    delay *= 1.0 + 0.5 * random.random()
                    logger.info("Reward server %s is busy; retrying in %.1fs.", self.url, delay)
                    time.sleep(delay)
                    busy_seconds += delay
                    continue
                if response.status_code < 400:
                    return self._rewards(response, expected)
                if response.status_code < 500:
                    raise RewardFunctionError(
                        f"Reward server {self.url} rejected the request with HTTP {response.status_code}: "
                        f"{response.text[:500]}"
                    )
                last_error = f"HTTP {response.status_code}: {response.text[:500]}"
            if failures == self.max_retries:
                break
            delay = self.backoff * 2**failures
            failures += 1
            logger.warning("Reward server %s failed (%s); retry %d in %.1fs.", self.url, last_error, failures, delay)
            time.sleep(delay)
        raise RewardFunctionError(
            f"Reward server {self.url} failed {self.max_retries + 1} times; last error: {last_error}. Check that the "
            "server is running and reachable (GET /health), or raise timeout / max_retries."
        )

    def _rewards(self, response: httpx.Response, expected: int) -> list:
        try:
            rewards = response.json()["rewards"]
        except (ValueError, KeyError, TypeError):
            raise RewardFunctionError(
                f'Reward server {self.url} answered {response.text[:200]!r}; expected JSON {{"rewards": [...]}}.'
            ) from None
        if not isinstance(rewards, list) or len(rewards) != expected:
            raise RewardFunctionError(
                f"Reward server {self.url} returned {rewards!r:.200} for {expected} samples; expected a list of "
                f"{expected} rewards."
            )
        return rewards

    def __call__(self, prompts: list[str], images: torch.Tensor, **kwargs: Any) -> list[float | None]:
        """Rewards, one per sample, for `images` `[B, C, H, W]` or videos `[B, F, C, H, W]` in `[0, 1]`."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"RemoteReward got {len(prompts)} prompts for {images.shape[0]} images.")
        columns = self._columns(kwargs, len(prompts))
        step = self.batch_size or max(len(prompts), 1)
        rewards: list[float | None] = []
        with httpx.Client(timeout=self.timeout) as client:
            for start in range(0, len(prompts), step):
                chunk = slice(start, start + step)
                payload = {
                    "prompts": list(prompts[chunk]),
                    "images": encode_images(images[chunk]),
                    "columns": {key: value[chunk] for key, value in columns.items()},
                }
                rewards.extend(self._post(client, payload))
        return rewards
