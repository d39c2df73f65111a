# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""VLM judges: score parsing on hand-written answers, a tiny local Qwen2.5-VL judge, and a fake OpenAI server."""

import asyncio
import base64
import io
import re
import threading
import time

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from test_rewards_server import serve
from tiny_models import TinyQwen2VLProcessor, tiny_qwen2_5_vl_text_encoder, tiny_qwen2_vl_tokenizer

from trl_ddrl.rewards import RewardFunctionError
from trl_ddrl.rewards.vlm_judge import DEFAULT_TEMPLATE, OpenAIJudge, VLMJudge, judge_frames, parse_judge_score


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Final Score: 4", 4.0),
        ("Alignment Score: 4\nCoherence Score: 3\nStyle Score: 5\nFinal Score: 4.5", 4.5),
        ("Alignment Score (1-5): 4\nCoherence Score (1-5): 3\nStyle Score (1-5): 5", 4.0),  # no final: the mean
        ("**Final Score:** **3**", 3.0),
        ("final score = 2", 2.0),
        ("Final Score (1-5): 5/5", 5.0),
        ("Final Score: 8/10", 4.2),  # another scale: rescaled to 1-5
        ("The final score is 4.", 4.0),
        ("Final Score: 2\nOn reflection... Final Score: 3", 3.0),  # the last final score
        ("4", 4.0),
        (" **4** ", 4.0),
        ("1", 1.0),
    ],
)
def test_parse_judge_score_reads_point_scores(answer, expected):
    parsed = parse_judge_score(answer)
    assert parsed.error is None and parsed.score == pytest.approx(expected)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("", "empty"),
        (None, "empty or non-text"),
        (["Final Score: 4"], "non-text"),
        ("I cannot rate this image.", "no score found"),
        ("Final Score: 7", "outside \\[1, 5\\]"),
        ("Final Score: 0", "outside"),
        ("Final Score: -3", "outside"),
        ("Final Score: 1e309", "no score found"),
        ("Final Score: N/A", "no score found"),
        ("4th place", "no score found"),
        ("Final Score: 4" + "!" * 10_000, None),  # long answers are fine
        ("score" * 20_000, "no score found"),  # and do not make the regex blow up
    ],
    ids=lambda value: repr(value)[:30],
)
def test_parse_judge_score_never_raises_on_malformed_answers(answer, reason):
    start = time.perf_counter()
    parsed = parse_judge_score(answer)
    assert time.perf_counter() - start < 1.0
    if reason is None:
        assert parsed.score == 4.0
    else:
        assert parsed.score is None and re.search(reason, parsed.error)
        assert len(parsed.error) < 300  # the answer is excerpted


def test_parse_judge_score_on_another_scale():
    assert parse_judge_score("Final Score: 9", low=0, high=10).score == 9.0
    assert parse_judge_score("Final Score: 3/5", low=0, high=10).score == 6.0


def test_judge_frames_shows_images_whole_and_samples_video_frames():
    images = torch.rand(2, 3, 8, 8)
    frames, medium = judge_frames(images, 4)
    assert medium == "image" and torch.equal(frames, images.unsqueeze(1))
    video = torch.arange(9.0).view(1, 9, 1, 1, 1).expand(2, -1, 3, 2, 2)
    frames, medium = judge_frames(video, 4)
    assert medium == "video" and frames[0, :, 0, 0, 0].tolist() == [0, 3, 5, 8]
    assert judge_frames(video[:, :3], 4)[0].shape[1] == 3


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def judge_checkpoint(tmp_path_factory):
    """A tiny random Qwen2.5-VL saved to a folder, and a processor for it (no torchvision video processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tiny_qwen2_vl_tokenizer()
    ids = {
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
    }
    path = tmp_path_factory.mktemp("judge")
    tiny_qwen2_5_vl_text_encoder(len(tokenizer), **ids).save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = TinyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return path, processor


def tiny_judge(judge_checkpoint, **kwargs) -> VLMJudge:
    path, processor = judge_checkpoint
    kwargs = {"max_new_tokens": 3, "model_init_kwargs": {"dtype": torch.float32}} | kwargs
    return VLMJudge(str(path), "Rate {prompt} ({medium}). Final Score:", processor=processor, **kwargs)


def test_local_judge_generates_in_batches_deterministically(judge_checkpoint):
    judge = tiny_judge(judge_checkpoint, batch_size=3)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a dog wearing a hat", "x"]  # different lengths: left padding
    together = judge.generate(prompts, images)
    assert len(together) == 3 and all(isinstance(answer, str) for answer in together)
    assert judge.generate(prompts, images) == together
    judge.batch_size = 1
    assert judge.generate(prompts, images) == together
    videos = torch.rand(2, 7, 3, 32, 32)  # four frames shown per video
    assert len(judge.generate(prompts[:2], videos)) == 2


def test_local_judge_parses_what_it_generates(judge_checkpoint):
    judge = tiny_judge(judge_checkpoint, max_new_tokens=1)
    four = judge.processor.tokenizer.convert_tokens_to_ids("4")
    vocab = judge.model.config.get_text_config().vocab_size
    judge.model.generation_config.suppress_tokens = [token for token in range(vocab) if token != four]
    assert judge(prompts=["a cat", "b"], images=torch.rand(2, 3, 32, 32)) == [4.0, 4.0]
    judge.max_new_tokens = 2  # "44": outside the 1-5 scale
    assert judge(prompts=["a cat"], images=torch.rand(1, 3, 32, 32)) == [None]
    judge.on_error = 0.0
    assert judge(prompts=["a cat"], images=torch.rand(1, 3, 32, 32)) == [0.0]
    judge.on_error = "raise"
    with pytest.raises(RewardFunctionError, match="score 44 outside"):
        judge(prompts=["a cat"], images=torch.rand(1, 3, 32, 32))


def test_local_judge_errors_name_the_fix(judge_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="on_error='maybe'"):
        tiny_judge(judge_checkpoint, on_error="maybe")
    with pytest.raises(ValueError, match="must contain '\\{prompt\\}'"):
        VLMJudge(str(judge_checkpoint[0]), "Rate this", processor=judge_checkpoint[1])
    with pytest.raises(ValueError, match="Qwen2.5-VL / Qwen3-VL"):
        VLMJudge(str(tmp_path), processor=judge_checkpoint[1])


def fake_openai_server(requests: list) -> FastAPI:
    """A chat-completions server: answers "Final Score: <images sent>", or misbehaves as the prompt says."""
    app = FastAPI()
    lock = threading.Lock()

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        with lock:
            requests.append(body)
        content = body["messages"][0]["content"]
        text = content[-1]["text"]
        images = [part["image_url"]["url"] for part in content[:-1]]
        if "slow" in text:
            await asyncio.sleep(1.0)
        if "broken" in text:
            return JSONResponse({"error": "overloaded"}, status_code=503)
        if "refuse" in text:
            answer = "I cannot rate this."
        elif "malformed" in text:
            return JSONResponse({"unexpected": True})
        else:
            answer = f"Alignment Score: 5\nFinal Score: {len(images)}"
        return {"choices": [{"message": {"role": "assistant", "content": answer}}]}

    return app


def test_openai_judge_against_a_local_server():
    requests = []
    with serve(fake_openai_server(requests)) as url:
        judge = OpenAIJudge(f"{url}/v1", "Qwen/Qwen2.5-VL-72B-Instruct", api_key="secret", timeout=5)
        videos = torch.rand(2, 9, 3, 8, 8)
        assert judge(prompts=["a cat", "a dog"], images=videos) == [4.0, 4.0]  # four frames per video
        assert judge(prompts=["a cat"], images=torch.rand(1, 3, 8, 8)) == [1.0]
    assert judge.name == "judge_Qwen2.5-VL-72B-Instruct"
    body = requests[0]
    assert body["model"] == "Qwen/Qwen2.5-VL-72B-Instruct" and body["temperature"] == 0.0
    text = body["messages"][0]["content"][-1]["text"]
    assert text == DEFAULT_TEMPLATE.format(prompt=body_prompt(text), medium="video")
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    image = Image.open(io.BytesIO(base64.b64decode(url.removeprefix("data:image/png;base64,"))))
    assert image.size == (8, 8) and image.mode == "RGB"


def body_prompt(text: str) -> str:
    return re.search(r'Text prompt: "(.*)"', text).group(1)


def test_openai_judge_applies_the_policy_per_sample():
    requests = []
    with serve(fake_openai_server(requests)) as url:
        judge = OpenAIJudge(f"{url}/v1", "judge", timeout=0.3, max_retries=1)
        prompts = ["fine", "slow", "broken", "refuse", "malformed"]
        start = time.perf_counter()
        rewards = judge(prompts=prompts, images=torch.rand(5, 3, 8, 8))
        elapsed = time.perf_counter() - start
        assert rewards == [1.0, None, None, None, None]
        # Concurrent: two tries of the slow one (0.3 s timeout each, 0.5 s apart) bound the time, not the sum.
        assert elapsed < 3.0
        assert sum("broken" in body_prompt(r["messages"][0]["content"][-1]["text"]) for r in requests) == 2
        judge.on_error = "raise"
        with pytest.raises(RewardFunctionError, match="'refuse'.*no score found"):
            judge(prompts=["refuse"], images=torch.rand(1, 3, 8, 8))
        with pytest.raises(RewardFunctionError, match="ReadTimeout"):
            judge(prompts=["slow"], images=torch.rand(1, 3, 8, 8))


def test_openai_judge_does_not_retry_client_errors():
    with serve(FastAPI()) as url:  # every path answers 404
        judge = OpenAIJudge(f"{url}/v1", "judge", max_retries=3)
        start = time.perf_counter()
        assert judge(prompts=["a"], images=torch.rand(1, 3, 8, 8)) == [None]
        assert time.perf_counter() - start < 0.5  # no back-off sleeps


def test_registered_judges_load_local_checkpoints_and_servers(tmp_path):
    from tiny_models import save_tiny_llava_judge

    from trl_ddrl.rewards import get_reward_function

    path = save_tiny_llava_judge(tmp_path / "judge", answer_token="4")
    judge = get_reward_function(f"vlm_judge:{path},max_new_tokens=1,batch_size=2,score_range=1-5,on_error=0")
    assert isinstance(judge, VLMJudge) and judge.batch_size == 2 and judge.on_error == 0.0
    assert judge(prompts=["a", "b", "c"], images=torch.rand(3, 5, 3, 32, 32)) == [4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="no option 'frames'"):
        get_reward_function(f"vlm_judge:{path},frames=4")
    with pytest.raises(ValueError, match="needs the judge model"):
        get_reward_function("vlm_judge")
    remote = get_reward_function("openai_judge:http://127.0.0.1:1/v1,big-judge,timeout=0.5,max_retries=0")
    assert isinstance(remote, OpenAIJudge) and remote.url == "http://127.0.0.1:1/v1/chat/completions"
    assert remote(prompts=["a"], images=torch.rand(1, 3, 8, 8)) == [None]  # nothing listens there
    with pytest.raises(ValueError, match="needs the server and the model"):
        get_reward_function("openai_judge:http://127.0.0.1:1/v1")
