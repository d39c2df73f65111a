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
import asyncio
import collections
import contextlib
import importlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from torch import nn

from .base import RewardFunctionError, check_rewards
from .registry import available_rewards, get_reward_function
from .remote import ImageTooLarge, decode_images
from .video import reward_name


DEFAULT_MAX_BODY_BYTES = 128 * 2**20
"""Largest request body accepted by default (128 MiB: 16 1024x1024 PNGs take about 40 MB)."""
DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest image or video frame accepted by default, in pixels."""
DEFAULT_MAX_QUEUE = 64
"""Requests admitted at once by default; more get HTTP 503 with `Retry-After`."""
DEFAULT_MAX_BATCH = 64
"""Most samples per reward call by default when concurrent requests are batched."""
DEFAULT_SHUTDOWN_SECONDS = 3.0
"""Seconds the server waits for running requests after SIGTERM before closing their connections."""
_DISCONNECT_POLL_SECONDS = 0.25


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


class _Answer(Exception):
    """An HTTP error answer for one queued request (raised in the scoring thread, sent by its handler)."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


class _Job:
    """One `/score` request waiting for the scoring thread: decoded images, and the future its handler awaits."""

    def __init__(self, request: ScoreRequest, images: torch.Tensor, loop: asyncio.AbstractEventLoop):
        self.prompts, self.columns, self.images = request.prompts, request.columns, images
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.cancelled = False  # the client went away: skip it

    def batch_key(self) -> tuple:
        return tuple(self.images.shape[1:]), tuple(sorted(self.columns))

    def resolve(self, outcome: list | _Answer) -> None:
        def set_outcome() -> None:
            if not self.future.done():
                self.future.set_result(outcome)

        self.loop.call_soon_threadsafe(set_outcome)


class ScoringQueue:
    """
    The server's scoring thread and its bounded queue.

    Requests wait in a queue of at most `max_queue` (more get HTTP 503 with `Retry-After`). One daemon thread takes
    the oldest request and the queued requests that can share its call (same image or video shape and columns), up to
    `max_batch` samples, calls the reward function once on all of them and answers each; if the batched call fails,
    each request is scored alone, so that an error reaches only the request that caused it. Requests whose client
    disconnected are skipped. [`close`] answers every queued request with 503 (the server is stopping).

    Args:
        reward_func (`Callable`): The reward, `(prompts, images, **columns) -> list[float | None]`.
        name (`str`): Its name, for error messages.
        max_queue (`int`): Requests admitted at once (decoding, queued or being scored).
        max_batch (`int`): Samples per reward call; a larger request is scored alone.
    """

    def __init__(self, reward_func: Callable, name: str, max_queue: int, max_batch: int):
        self.reward_func, self.name = reward_func, name
        self.max_queue, self.max_batch = max_queue, max_batch
        self.admitted = 0  # requests between `admit` and `release` (touched on the event loop only)
        self.reward_calls = 0  # calls of the reward function
        self.refused = 0  # requests answered 503 because the queue was full
        self._seconds_per_job = 0.1  # running estimate, for Retry-After
        self._jobs: collections.deque[_Job] = collections.deque()
        self._scoring: list[_Job] = []  # the batch in the reward call now
        self._condition = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def admit(self) -> bool:
        """Count a new request in, or refuse it (False) when `max_queue` are already admitted."""
        if self._closed or self.admitted >= self.max_queue:
            self.refused += 1
            return False
        self.admitted += 1
        return True

    def release(self) -> None:
        self.admitted -= 1

    def retry_after(self) -> int:
        """Seconds after which a refused request may find room: the time to work through the admitted ones."""
        return max(1, min(60, math.ceil(self._seconds_per_job * self.admitted)))

    def submit(self, job: _Job) -> None:
        with self._condition:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="reward-server-scoring", daemon=True)
                self._thread.start()
            self._jobs.append(job)
            self._condition.notify()

    def close(self) -> None:
        """
        Refuse new requests and answer the queued ones and those in the running reward call with 503 at once (the
        call itself is abandoned: its thread is a daemon), so that the server can stop within seconds.
        """
        with self._condition:
            self._closed = True
            jobs, self._jobs = [*self._scoring, *self._jobs], collections.deque()
            self._condition.notify()
        for job in jobs:
            job.resolve(_Answer(503, "The reward server is shutting down; retry against another server."))

    def _take(self) -> list[_Job] | None:
        with self._condition:
            while not self._jobs and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            first = self._jobs.popleft()
            batch, size, key = [first], len(first.prompts), first.batch_key()
            for job in list(self._jobs):
                if job.batch_key() == key and size + len(job.prompts) <= self.max_batch:
                    self._jobs.remove(job)
                    batch.append(job)
                    size += len(job.prompts)
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            batch = [job for job in batch if not job.cancelled]
            if not batch:
                continue
            with self._condition:
                self._scoring = batch
            start = time.monotonic()
            try:
                rewards = self._score(batch)
            except _Answer as answer:
                if len(batch) == 1:
                    batch[0].resolve(answer)
                else:  # find the request that failed: each alone
                    for job in batch:
                        job.resolve(self._score_alone(job))
            else:
                offset = 0
                for job in batch:
                    job.resolve(rewards[offset : offset + len(job.prompts)])
                    offset += len(job.prompts)
            with self._condition:
                self._scoring = []
            seconds = (time.monotonic() - start) / len(batch)
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * seconds

    def _score_alone(self, job: _Job) -> list[float | None] | _Answer:
        try:
            return self._score([job])
        except _Answer as answer:
            return answer

    def _score(self, batch: list[_Job]) -> list[float | None]:
        prompts = [prompt for job in batch for prompt in job.prompts]
        images = torch.cat([job.images for job in batch]) if len(batch) > 1 else batch[0].images
        columns = {key: [value for job in batch for value in job.columns[key]] for key in batch[0].columns}
        self.reward_calls += 1
        try:
            values = self.reward_func(prompts=prompts, images=images, **columns)
            if isinstance(values, torch.Tensor):
                values = values.detach().float().cpu().tolist()
            checked = check_rewards(values, len(prompts), self.name, prompts)
        except RewardFunctionError as error:
            raise _Answer(500, str(error)) from error
        except Exception as error:
            raise _Answer(
                500, f"Reward function '{self.name}' failed on {prompts[0]!r}: {type(error).__name__}: {error}"
            ) from error
        return [None if math.isnan(value) else value for value in checked]


async def _parse_body(request: Request) -> ScoreRequest:
    """The request's JSON body as a [`ScoreRequest`]; 415 / 422 naming the Content-Type or the invalid fields."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip() or "none"
    body = await request.body()
    try:
        data = await run_in_threadpool(json.loads, body)
    except ValueError as error:
        if content_type != "application/json":
            raise HTTPException(
                415,
                f"The body (Content-Type: {content_type}) is not JSON. Send a JSON object with Content-Type: "
                "application/json (httpx: json=..., requests: json=..., curl: -H 'Content-Type: application/json').",
            ) from error
        raise HTTPException(422, f"The body is not valid JSON: {error}.") from error
    try:
        return ScoreRequest.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}" for item in error.errors()
        )
        raise HTTPException(
            422,
            f'Invalid request: {problems}. Expected {{"prompts": [str, ...], "images": [base64 PNG or list of '
            'them, ...], "columns": {name: [one value per prompt]}}.',
        ) from error


def create_app(
    reward_func: Callable,
    device: str | torch.device | None = None,
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> FastAPI:
    """
    A FastAPI app serving `reward_func` at `POST /score` (see [`trl_ddrl.rewards.remote`] for the JSON) and
    `GET /health` (`{"status": "ok", "reward": name}` with the counts of admitted and refused requests and of reward
    calls).

    The reward function is called by one scoring thread ([`ScoringQueue`]): concurrent requests with images of the
    same shape are scored in one call of up to `max_batch` samples; at most `max_queue` requests are admitted at once,
    others get HTTP 503 with a `Retry-After` header (which [`RemoteReward`] honours). `/health` answers at once,
    also under load. A request whose client disconnected is dropped before it is scored.

    Malformed requests get HTTP 422 naming the field (415 for a body that is not JSON); a body over `max_body_bytes`
    or an image (or frame) over `max_pixels` gets HTTP 413 before it is decoded (also PIL's decompression-bomb
    error); a reward function that raises or returns invalid values gets HTTP 500 with the error, which
    [`RemoteReward`] retries and then reports. Other 4xx answers are not retried.

    Args:
        reward_func (`Callable`):
            A reward function or `nn.Module`, `(prompts, images, **columns) -> list[float | None]`.
        device (`str` or `torch.device`, *optional*):
            Where to put the decoded images; defaults to the device of an `nn.Module`'s first parameter, else CPU.
        max_body_bytes (`int`, *optional*, defaults to 128 MiB):
            Largest request body; `None` for no limit.
        max_pixels (`int`, *optional*, defaults to `4096 * 4096`):
            Largest image or video frame, in pixels; `None` for no limit beyond PIL's own.
        max_queue (`int`, *optional*, defaults to `64`):
            Requests admitted at once; more get 503 with `Retry-After`.
        max_batch (`int`, *optional*, defaults to `64`):
            Most samples per reward call when batching concurrent requests; 1 scores each request alone.
    """
    if max_queue < 1 or max_batch < 1:
        raise ValueError(f"max_queue={max_queue} and max_batch={max_batch} must both be at least 1.")
    name = reward_name(reward_func)
    if device is None and isinstance(reward_func, nn.Module):
        device = next(reward_func.parameters(), torch.empty(0)).device
    device = torch.device(device or "cpu")
    queue = ScoringQueue(reward_func, name, max_queue, max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        queue.close()

    app = FastAPI(title=f"trl_ddrl reward server: {name}", lifespan=lifespan)
    app.state.scoring = queue
    if max_body_bytes is not None:
        app.add_middleware(_BodySizeLimit, max_bytes=max_body_bytes)

    @app.get("/health")
    async def health() -> dict[str, str | int]:
        return {
            "status": "ok",
            "reward": name,
            "admitted": queue.admitted,
            "max_queue": queue.max_queue,
            "refused": queue.refused,
            "reward_calls": queue.reward_calls,
        }

    def decode(request: ScoreRequest) -> torch.Tensor:
        try:
            return decode_images(request.images, max_pixels=max_pixels).to(device)
        except ImageTooLarge as error:
            raise HTTPException(
                413, f"Image too large: {error}. Send smaller images, or start the server with a larger --max-pixels."
            ) from error
        except (ValueError, OSError, RuntimeError) as error:
            raise HTTPException(422, f"Could not decode the images: {type(error).__name__}: {error}") from error

    @app.post("/score")
    async def score(http_request: Request) -> dict[str, list[float | None]]:
        if not queue.admit():
            detail = (
                f"The reward server is busy ({queue.max_queue} requests queued, --max-queue); retry after the "
                "Retry-After seconds."
            )
            return JSONResponse({"detail": detail}, 503, headers={"Retry-After": str(queue.retry_after())})
        try:
            request = await _parse_body(http_request)
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
            job = _Job(request, await run_in_threadpool(decode, request), asyncio.get_running_loop())
            queue.submit(job)
            while True:  # wait for the answer, dropping the job if the client goes away
                done, _ = await asyncio.wait({job.future}, timeout=_DISCONNECT_POLL_SECONDS)
                if done:
                    break
                if await http_request.is_disconnected():
                    job.cancelled = True
                    return JSONResponse({"detail": "client disconnected"}, 499)
            outcome = job.future.result()
            if isinstance(outcome, _Answer):
                raise HTTPException(outcome.status_code, outcome.detail)
            return {"rewards": outcome}
        finally:
            queue.release()

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
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="Requests admitted at once; more get HTTP 503 with Retry-After (clients retry).",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help="Most samples per reward call when concurrent requests of one shape are batched; 1 disables batching.",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_SECONDS,
        help="Seconds to let running requests finish after SIGTERM / Ctrl-C before closing their connections.",
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
        max_queue=args.max_queue,
        max_batch=args.max_batch,
    )
    run_server(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=max(1, math.ceil(args.shutdown_timeout)),
    )


def run_server(app: FastAPI, **config: Any) -> None:
    """
    Run an app of [`create_app`] with uvicorn (`config`: `uvicorn.Config`'s arguments). SIGTERM or Ctrl-C first
    answers every waiting request with 503 ([`ScoringQueue.close`]), so that the server stops within seconds even
    while a reward call runs.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, **config))
    handle_exit = server.handle_exit

    def close_then_exit(sig, frame) -> None:
        app.state.scoring.close()
        handle_exit(sig, frame)

    server.handle_exit = close_then_exit
    server.run()


if __name__ == "__main__":
    main()
