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
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "reward": "jpeg_compressibility"}
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
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    server_module.main(["--reward", "jpeg_compressibility", "--port", "8123", "--device", "cpu"])
    assert started["host"] == "127.0.0.1" and started["port"] == 8123
    health = TestClient(started["app"]).get("/health")
    assert health.json() == {"status": "ok", "reward": "jpeg_compressibility"}

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
