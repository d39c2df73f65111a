# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Reward server and client: a real uvicorn server on 127.0.0.1, scored through `RemoteReward`."""

import contextlib
import socket
import sys
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from trl_ddrl.rewards import RemoteReward, RewardFunctionError, create_app, get_reward_function
from trl_ddrl.rewards import server as server_module
from trl_ddrl.rewards.remote import decode_images, encode_images


def random_images(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=generator).float() / 255


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(app, port: int | None = None, delay: float = 0.0):
    """Run `app` with uvicorn in a thread on 127.0.0.1 (after `delay` seconds); yields its URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

    def run():
        time.sleep(delay)
        server.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not delay:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the reward server did not start"
            time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_png_encoding_round_trips_8_bit_images_and_videos():
    for shape in [(2, 3, 8, 6), (2, 1, 8, 8), (2, 3, 3, 4, 4)]:
        images = random_images(*shape)
        assert torch.equal(decode_images(encode_images(images)), images)
    assert len(encode_images(random_images(2, 3, 3, 4, 4))[0]) == 3
    with pytest.raises(ValueError, match="C in \\(1, 3, 4\\)"):
        encode_images(torch.zeros(2, 5, 4, 4))


def test_remote_reward_equals_the_function_called_directly():
    calls = []

    def recorded(prompts, images, **columns):
        calls.append((len(prompts), images.shape, columns))
        return get_reward_function("jpeg_compressibility")(prompts, images)

    recorded.name = "jpeg_compressibility"
    images, videos = random_images(5, 3, 16, 16), random_images(2, 3, 3, 16, 16, seed=1)
    prompts = [f"prompt {i}" for i in range(5)]
    direct = get_reward_function("jpeg_compressibility")
    with serve(create_app(recorded)) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["reward"] == "jpeg_compressibility" and health["refused"] == 0
        remote = get_reward_function(url)
        assert isinstance(remote, RemoteReward) and remote.name == url
        assert remote(prompts, images) == pytest.approx(direct(prompts, images), rel=1e-6)
        batched = RemoteReward(url, batch_size=2)
        rewards = batched(prompts, images, trainer_state=object(), label=list(range(5)), pil=[object()] * 5)
        assert rewards == pytest.approx(direct(prompts, images), rel=1e-6)
        assert remote(prompts[:2], videos) == pytest.approx(direct(prompts[:2], videos), rel=1e-6)
    assert [call[0] for call in calls] == [5, 2, 2, 1, 2]
    assert calls[1][2] == {"label": [0, 1]} and calls[3][2] == {"label": [4]}  # JSON columns only, split per batch
    assert calls[4][1] == (2, 3, 3, 16, 16)


def test_none_rewards_and_selected_columns_pass_through():
    def by_label(prompts, images, label, **kwargs):
        return [None if value is None else float(value) for value in label]

    with serve(create_app(by_label)) as url:
        rewards = RemoteReward(url, columns=["label"])(["a", "b"], random_images(2, 3, 4, 4), label=[None, 2])
        assert rewards == [None, 2.0]
        with pytest.raises(ValueError, match="column 'label' must be passed"):
            RemoteReward(url, columns=["label"])(["a"], random_images(1, 3, 4, 4))


def test_server_rejects_malformed_requests_without_retrying():
    with serve(create_app(get_reward_function("brightness"))) as url:
        response = httpx.post(
            f"{url}/score", json={"prompts": ["a", "b"], "images": encode_images(torch.zeros(1, 3, 4, 4))}
        )
        assert response.status_code == 422 and "2 prompts but 1 images" in response.text
        response = httpx.post(f"{url}/score", json={"prompts": ["a"], "images": ["not base64!"]})
        assert response.status_code == 422 and "Could not decode" in response.text
        assert httpx.post(f"{url}/score", json={"prompts": [], "images": []}).json() == {"rewards": []}


def test_retries_a_failing_server_then_succeeds():
    attempts = []

    def flaky(prompts, images, **kwargs):
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return [1.0] * len(prompts)

    with serve(create_app(flaky)) as url:
        assert RemoteReward(url, max_retries=2, backoff=0.05)(["a"], random_images(1, 3, 4, 4)) == [1.0]
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 0.05


def test_retries_until_a_late_server_comes_up():
    port = free_port()
    with serve(create_app(get_reward_function("brightness")), port=port, delay=0.5) as url:
        reward = RemoteReward(url, max_retries=8, backoff=0.05)  # waits up to 12.75 s in all
        assert reward(["a"], torch.ones(1, 3, 4, 4)) == [1.0]


def test_gives_up_after_retries_naming_the_url_and_the_error():
    attempts = []

    def broken(prompts, images, **kwargs):
        attempts.append(1)
        return [float("nan")] * len(prompts)

    with serve(create_app(broken)) as url:
        with pytest.raises(RewardFunctionError, match=f"Reward server {url}/score failed 3 times") as error:
            RemoteReward(url, max_retries=2, backoff=0.01)(["a cat"], random_images(1, 3, 4, 4))
    assert "HTTP 500" in str(error.value) and "'broken' returned nan for the prompt 'a cat'" in str(error.value)
    assert len(attempts) == 3
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RewardFunctionError, match=f"{closed}/score failed 2 times.*ConnectError"):
        RemoteReward(closed, max_retries=1, backoff=0.01)(["a"], random_images(1, 3, 4, 4))


def test_timeout_raises_reward_function_error():
    release = threading.Event()

    def slow(prompts, images, **kwargs):
        release.wait(timeout=10)
        return [0.0] * len(prompts)

    with serve(create_app(slow)) as url:
        start = time.monotonic()
        try:
            with pytest.raises(RewardFunctionError, match=f"{url}/score failed 2 times.*timed out after 0.2s"):
                RemoteReward(url, timeout=0.2, max_retries=1, backoff=0.01)(["a"], random_images(1, 3, 4, 4))
        finally:
            release.set()
        assert time.monotonic() - start < 5


def test_cli_loads_registered_and_module_rewards(monkeypatch, tmp_path):
    started = {}
    monkeypatch.setattr(server_module, "run_server", lambda app, **kwargs: started.update(app=app, **kwargs))
    server_module.main(["--reward", "jpeg_compressibility", "--port", "8123", "--device", "cpu"])
    assert started["host"] == "127.0.0.1" and started["port"] == 8123
    health = TestClient(started["app"]).get("/health")
    assert health.json()["reward"] == "jpeg_compressibility"

    # `module:function` is imported from the working directory, as with the console script
    (tmp_path / "my_server_rewards.py").write_text(
        "def constant(prompts, images, **kwargs):\n    return [3.0] * len(prompts)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [path for path in sys.path if path not in ("", ".", str(tmp_path))])
    server_module.main(["--reward", "my_server_rewards:constant"])
    request = {"prompts": ["a"], "images": encode_images(torch.zeros(1, 3, 2, 2))}
    assert TestClient(started["app"]).post("/score", json=request).json() == {"rewards": [3.0]}
    with pytest.raises(ValueError, match="cannot import 'missing' from 'my_server_rewards'"):
        server_module.load_reward("my_server_rewards:missing")
    with pytest.raises(ValueError, match="neither a registered reward .*jpeg_compressibility"):
        server_module.load_reward("no_such_reward")


def png_base64(array) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_a_body_over_the_limit_gets_413_without_being_read_in_full():
    client = TestClient(create_app(get_reward_function("brightness"), max_body_bytes=1000))
    request = {"prompts": ["a"], "images": encode_images(random_images(1, 3, 32, 32))}
    response = client.post("/score", json=request)
    assert response.status_code == 413 and "exceeds the server's limit of 1000 bytes" in response.json()["detail"]
    chunks = iter([b'{"prompts": ["a"], "images": ["' + b"A" * 800, b"A" * 800 + b'"]}'])  # no Content-Length
    response = client.post("/score", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "more than 1000 bytes" in response.json()["detail"]
    small = {"prompts": ["a"], "images": encode_images(random_images(1, 3, 4, 4))}
    assert client.post("/score", json=small).status_code == 200


def test_an_image_over_the_pixel_limit_or_a_decompression_bomb_gets_413(monkeypatch):
    import numpy as np
    from PIL import Image

    request = {"prompts": ["a"], "images": [png_base64(np.zeros((64, 64, 3), np.uint8))]}
    response = TestClient(create_app(get_reward_function("brightness"), max_pixels=1000)).post("/score", json=request)
    assert response.status_code == 413 and "64x64 = 4096 pixels exceeds the limit of 1000" in response.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL raises DecompressionBombError above twice this
    response = TestClient(create_app(get_reward_function("brightness"), max_pixels=None)).post("/score", json=request)
    assert response.status_code == 413 and "decompression bomb" in response.text


def test_the_client_does_not_retry_a_413():
    with serve(create_app(get_reward_function("brightness"), max_pixels=10)) as url:
        start = time.monotonic()
        with pytest.raises(RewardFunctionError, match="HTTP 413.*exceeds the limit of 10 pixels"):
            RemoteReward(url, max_retries=3, backoff=1.0)(["a"], random_images(1, 3, 4, 4))
        assert time.monotonic() - start < 1.0


def test_16_bit_pngs_are_scaled_by_65535():
    import numpy as np

    decoded = decode_images([png_base64(np.full((4, 4), 32768, np.uint16))])
    torch.testing.assert_close(decoded, torch.full((1, 1, 4, 4), 32768 / 65535))


@contextlib.contextmanager
def serve_in_subprocess(folder, source: str, *options: str):
    """Run `trl-ddrl-reward-server --reward served:reward` (`served.py` = `source`) on 127.0.0.1; yields (url, process)."""
    import os
    import subprocess

    (folder / "served.py").write_text(source)
    port = free_port()
    command = [sys.executable, "-m", "trl_ddrl.rewards.server", "--reward", "served:reward", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--log-level", "warning", *options],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, "the reward server did not start"
                time.sleep(0.1)
        yield url, server
    finally:
        server.kill()
        server.wait()


def post_quietly(url: str, request: dict) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, json=request, timeout=60)


SLOW_BRIGHTNESS = """
import time

def reward(prompts, images, **kwargs):
    time.sleep(60 if "stuck" in prompts else 0.2)
    return images.mean(dim=(1, 2, 3)).tolist()
"""


def test_concurrent_requests_are_batched_shed_with_503_and_health_stays_fast():
    """40 concurrent requests (one asyncio client) against a queue of 8, in this process: 503s, batches, fast /health."""
    import asyncio

    def slow_brightness(prompts, images, **kwargs):
        time.sleep(0.2)
        return images.mean(dim=(1, 2, 3)).tolist()

    app = create_app(slow_brightness, max_queue=8)

    async def load(url: str) -> tuple[list[httpx.Response], list[float]]:
        async with httpx.AsyncClient(timeout=30) as client:

            async def post(index: int) -> httpx.Response:
                images = encode_images(torch.full((1, 3, 4, 4), index / 40))
                return await client.post(f"{url}/score", json={"prompts": [str(index)], "images": images})

            async def probe() -> list[float]:
                seconds = []
                for _ in range(5):
                    before = time.monotonic()
                    assert (await client.get(f"{url}/health")).json()["status"] == "ok"
                    seconds.append(time.monotonic() - before)
                    await asyncio.sleep(0.1)
                return seconds

            *responses, health_seconds = await asyncio.gather(*(post(index) for index in range(40)), probe())
        return responses, health_seconds

    with serve(app) as url:
        responses, health_seconds = asyncio.run(load(url))
    answered = [response for response in responses if response.status_code == 200]
    refused = [response for response in responses if response.status_code == 503]
    assert len(answered) + len(refused) == 40 and len(answered) >= 8 and refused
    assert all(int(response.headers["retry-after"]) >= 1 for response in refused)
    assert app.state.scoring.reward_calls < len(answered)  # concurrent requests shared reward calls
    assert max(health_seconds) < 1.0, f"/health took up to {max(health_seconds):.2f} s"


@pytest.mark.slow
def test_under_load_the_server_sheds_batches_keeps_health_answering_and_stops_on_sigterm(tmp_path):
    """
    24 concurrent clients against a queue of 8 on 127.0.0.1: all answered, in batched calls, /health fast; then a
    SIGTERM while a call is stuck and two requests wait stops the server within seconds.
    """
    import signal

    results, health_seconds = {}, []
    with serve_in_subprocess(tmp_path, SLOW_BRIGHTNESS, "--max-queue", "8") as (url, server):
        reward = RemoteReward(url, timeout=30, max_retries=0)

        def client(index: int) -> None:
            results[index] = reward([f"p{index}"], torch.full((1, 3, 8, 8), index / 24))

        threads = [threading.Thread(target=client, args=(index,)) for index in range(24)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        with httpx.Client(timeout=5) as probe:
            while any(thread.is_alive() for thread in threads) and time.monotonic() - start < 60:
                before = time.monotonic()
                health = probe.get(f"{url}/health").json()
                health_seconds.append(time.monotonic() - before)
                time.sleep(0.05)
        for thread in threads:
            thread.join(timeout=60)
        elapsed = time.monotonic() - start

        for prompt in ("stuck", "queued", "queued"):
            request = {"prompts": [prompt], "images": encode_images(torch.ones(1, 3, 4, 4))}
            threading.Thread(target=post_quietly, args=(f"{url}/score", request), daemon=True).start()
            time.sleep(0.2)
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        stop_seconds = time.monotonic() - start
    assert sorted(results) == list(range(24))
    assert all(results[index] == pytest.approx([round(index / 24 * 255) / 255]) for index in range(24))
    assert health["refused"] > 0  # 503 + Retry-After, retried by the client
    assert health["reward_calls"] < 24  # concurrent requests shared reward calls
    assert len(health_seconds) > 3 and max(health_seconds) < 1.0, f"/health took up to {max(health_seconds):.2f} s"
    assert elapsed < 30, f"24 requests took {elapsed:.1f} s"
    assert stop_seconds < 8, f"the server took {stop_seconds:.1f} s to stop after SIGTERM"


def test_the_client_waits_as_a_busy_server_asks():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app, answers = FastAPI(), []

    @app.post("/score")
    def score():
        answers.append(time.monotonic())
        if len(answers) < 3:
            return JSONResponse({"detail": "busy"}, 503, headers={"Retry-After": "0.2"})
        return {"rewards": [1.0]}

    with serve(app) as url:
        assert RemoteReward(url, max_retries=0)(["a"], torch.ones(1, 3, 4, 4)) == [1.0]
    assert len(answers) == 3 and all(later - earlier >= 0.2 for earlier, later in zip(answers, answers[1:]))


def test_work_of_a_client_that_went_away_is_dropped():
    release, calls = threading.Event(), []

    def blocking(prompts, images, **kwargs):
        calls.append(list(prompts))
        release.wait(timeout=10)
        return [0.0] * len(prompts)

    with serve(create_app(blocking)) as url:
        first = threading.Thread(target=RemoteReward(url, max_retries=0), args=(["first"], torch.ones(1, 3, 4, 4)))
        first.start()
        while not calls:
            time.sleep(0.01)
        with pytest.raises(RewardFunctionError, match="timed out"):
            RemoteReward(url, timeout=0.3, max_retries=0)(["gone"], torch.ones(1, 3, 4, 4))
        time.sleep(0.8)  # the server notices the disconnection while "gone" waits in the queue
        release.set()
        first.join(timeout=10)
        time.sleep(0.3)
    assert calls == [["first"]]


def test_alpha_is_composited_on_white_and_mixed_images_are_named():
    import numpy as np

    client = TestClient(create_app(get_reward_function("brightness")))
    opaque_black = np.zeros((4, 4, 4), np.uint8)
    opaque_black[..., 3] = 255
    half_black = opaque_black.copy()
    half_black[..., 3] = 128
    gray = np.zeros((4, 4), np.uint8)
    request = {
        "prompts": ["a", "b", "c"],
        "images": [png_base64(opaque_black), png_base64(half_black), png_base64(gray)],
    }
    rewards = client.post("/score", json=request).json()["rewards"]
    assert rewards == pytest.approx([0.0, 127 / 255, 0.0], abs=1e-6)  # as RGB black, and half-way to white

    request = {"prompts": ["a", "b"], "images": [png_base64(gray), png_base64(np.zeros((8, 4), np.uint8))]}
    response = client.post("/score", json=request)
    assert response.status_code == 422
    assert "image 0 has the shape (3, 4, 4) but image 1 has (3, 8, 4)" in response.json()["detail"] or (
        "image 0 has the shape (1, 4, 4) but image 1 has (1, 8, 4)" in response.json()["detail"]
    )
    frames = [png_base64(gray), png_base64(np.zeros((8, 4), np.uint8))]
    response = client.post("/score", json={"prompts": ["a"], "images": [frames]})
    assert response.status_code == 422 and "frame 0 of video 0 has the shape (1, 4, 4) but frame 1" in response.text


def test_a_body_that_is_not_json_names_the_content_type():
    client = TestClient(create_app(get_reward_function("brightness")))
    response = client.post("/score", content="prompts=a", headers={"content-type": "text/plain"})
    assert response.status_code == 415 and "Content-Type: text/plain" in response.json()["detail"]
    assert "application/json" in response.json()["detail"]
    request = {"prompts": ["a"], "images": encode_images(torch.ones(1, 3, 2, 2))}
    import json

    response = client.post("/score", content=json.dumps(request), headers={"content-type": "text/plain"})
    assert response.json() == {"rewards": [1.0]}  # JSON under another Content-Type is read
    response = client.post("/score", json={"prompts": "a", "images": []})
    assert response.status_code == 422 and "prompts: Input should be a valid list" in response.json()["detail"]
