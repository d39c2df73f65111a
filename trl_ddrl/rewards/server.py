# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Serve a reward function over HTTP, for reward models that live on another machine or in another environment.

```bash
trl-ddrl-reward-server --reward jpeg_compressibility --port 8000
trl-ddrl-reward-server --reward my_package.rewards:video_align --host 0.0.0.0 --port 8000
```

The protocol is described in [`trl_ddrl.rewards.remote`]; train with `reward_funcs=["http://<host>:8000"]`.
"""

import argparse
import importlib
import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from torch import nn

from .base import RewardFunctionError, check_rewards
from .registry import available_rewards, get_reward_function
from .remote import ImageTooLarge, decode_images
from .video import reward_name


DEFAULT_MAX_BODY_BYTES = 128 * 2**20
"""Largest request body accepted by default (128 MiB: 16 1024x1024 PNGs take about 40 MB)."""
DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest image or video frame accepted by default, in pixels."""


class _BodySizeLimit:
    """ASGI middleware: answer 413 to a body over `max_bytes`, reading no further than the limit."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, scope, receive, send, size: str) -> None:
        detail = (
            f"The request body ({size}) exceeds the server's limit of {self.max_bytes} bytes. Send fewer images per "
            "request (RemoteReward(batch_size=...)) or start the server with a larger --max-body-mb."
        )
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, f"{int(declared)} bytes")
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send, f"more than {self.max_bytes} bytes")
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


class ScoreRequest(BaseModel):
    """Body of `POST /score`."""

    prompts: list[str]
    images: list[str | list[str]] = Field(description="base64 PNG per image, or a list of them per video")
    columns: dict[str, list[Any]] = Field(default_factory=dict)


def create_app(
    reward_func: Callable,
    device: str | torch.device | None = None,
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> FastAPI:
    """
    A FastAPI app serving `reward_func` at `POST /score` (see [`trl_ddrl.rewards.remote`] for the JSON) and
    `GET /health`.

    Requests are scored one at a time. Malformed requests get HTTP 422; a body over `max_body_bytes` or an image
    (or frame) over `max_pixels` gets HTTP 413 before it is decoded (also PIL's decompression-bomb error); a reward
    function that raises or returns invalid values gets HTTP 500 with the error, which [`RemoteReward`] retries and
    then reports. 4xx answers are not retried.

    Args:
        reward_func (`Callable`):
            A reward function or `nn.Module`, `(prompts, images, **columns) -> list[float | None]`.
        device (`str` or `torch.device`, *optional*):
            Where to put the decoded images; defaults to the device of an `nn.Module`'s first parameter, else CPU.
        max_body_bytes (`int`, *optional*, defaults to 128 MiB):
            Largest request body; `None` for no limit.
        max_pixels (`int`, *optional*, defaults to `4096 * 4096`):
            Largest image or video frame, in pixels; `None` for no limit beyond PIL's own.
    """
    name = reward_name(reward_func)
    if device is None and isinstance(reward_func, nn.Module):
        device = next(reward_func.parameters(), torch.empty(0)).device
    device = torch.device(device or "cpu")
    lock = threading.Lock()
    app = FastAPI(title=f"trl_ddrl reward server: {name}")
    if max_body_bytes is not None:
        app.add_middleware(_BodySizeLimit, max_bytes=max_body_bytes)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "reward": name}

    @app.post("/score")
    def score(request: ScoreRequest) -> dict[str, list[float | None]]:
        batch_size = len(request.prompts)
        if len(request.images) != batch_size:
            raise HTTPException(
                422, f"Got {batch_size} prompts but {len(request.images)} images; send one per prompt."
            )
        wrong = {key: len(value) for key, value in request.columns.items() if len(value) != batch_size}
        if wrong:
            raise HTTPException(422, f"Columns {wrong} do not have one value per prompt ({batch_size}).")
        if batch_size == 0:
            return {"rewards": []}
        try:
            images = decode_images(request.images, max_pixels=max_pixels).to(device)
        except ImageTooLarge as error:
            raise HTTPException(
                413, f"Image too large: {error}. Send smaller images, or start the server with a larger --max-pixels."
            ) from error
        except (ValueError, OSError, RuntimeError) as error:
            raise HTTPException(422, f"Could not decode the images: {type(error).__name__}: {error}") from error
        try:
            with lock:
                values = reward_func(prompts=request.prompts, images=images, **request.columns)
            if isinstance(values, torch.Tensor):
                values = values.detach().float().cpu().tolist()
            checked = check_rewards(values, batch_size, name, request.prompts)
        except RewardFunctionError as error:
            raise HTTPException(500, str(error)) from error
        except Exception as error:
            raise HTTPException(
                500, f"Reward function '{name}' failed on {request.prompts[0]!r}: {type(error).__name__}: {error}"
            ) from error
        return {"rewards": [None if math.isnan(value) else value for value in checked]}

    return app


def load_reward(spec: str) -> Callable:
    """
    Build the reward named by `spec`: a registered name with its optional argument (`"clip_score:<path>"`), a URL of
    another reward server, or `"package.module:attribute"` naming a reward function or `nn.Module` instance.
    """
    if spec.startswith(("http://", "https://")) or spec.partition(":")[0] in available_rewards():
        return get_reward_function(spec)
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(
            f"--reward {spec!r} is neither a registered reward ({', '.join(available_rewards())}) nor "
            "'package.module:function'."
        )
    try:
        reward_func = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--reward {spec!r}: cannot import {attribute!r} from {module_name!r}: {error}") from error
    if not callable(reward_func):
        raise ValueError(f"--reward {spec!r} is a {type(reward_func).__name__}, not a callable reward function.")
    return reward_func


def main(argv: list[str] | None = None) -> None:
    """Entry point of `trl-ddrl-reward-server`."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="trl-ddrl-reward-server", description="Serve a trl_ddrl reward function over HTTP (POST /score)."
    )
    parser.add_argument(
        "--reward",
        required=True,
        help="A registered reward name (with ':<argument>' if any), or 'module:function' importable from the working "
        "directory.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind; 0.0.0.0 to accept remote clients.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--device",
        default=None,
        help="Device for nn.Module rewards and images (default: cuda if available, else cpu).",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=DEFAULT_MAX_BODY_BYTES / 2**20,
        help="Largest request body in MiB (413 above it); 0 for no limit.",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="Largest image or video frame in pixels (413 above it); 0 for no limit.",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)

    if os.getcwd() not in sys.path:  # console scripts do not put the working directory on the path
        sys.path.insert(0, os.getcwd())
    reward_func = load_reward(args.reward)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(reward_func, nn.Module):
        reward_func.to(device).eval().requires_grad_(False)
    app = create_app(
        reward_func,
        device=device,
        max_body_bytes=int(args.max_body_mb * 2**20) or None,
        max_pixels=args.max_pixels or None,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
