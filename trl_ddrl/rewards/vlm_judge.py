# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
VLM-as-judge rewards: a vision-language model reads the image (or a few frames of the video) and the prompt, answers
with point scores in the UnifiedReward style, and the answer is parsed into one number.

Two judges share the prompt template and the parser:

- [`VLMJudge`]: a local transformers model (`AutoModelForImageTextToText`: Qwen2.5-VL, Qwen3-VL, UnifiedReward's
  Qwen checkpoints, ...), greedy generation, batched;
- [`OpenAIJudge`]: any OpenAI-compatible chat-completions server (vLLM, SGLang serving a large judge), images sent as
  base64 PNG data URLs, with a timeout, retries and a bounded number of concurrent requests.

An answer the parser cannot read, or a request that fails, gets the `on_error` policy per sample: `"none"` (the
default: the sample is unscored, which the trainer treats like any `None` reward), `"raise"`, or a number used as
the reward. Nothing deep in a regular expression raises.
"""

import base64
import io
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .base import RewardFunctionError
from .qwen_vision import sample_video_frames
from .registry import register_reward, split_spec_argument


logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "You are judging an AI-generated {medium} against the text prompt it was generated from.\n"
    'Text prompt: "{prompt}"\n'
    "Rate each aspect with an integer from 1 (very poor) to 5 (excellent):\n"
    "- Alignment: how completely and accurately the {medium} shows what the prompt asks for (objects, counts, "
    "attributes, text, actions).\n"
    "- Coherence: absence of distortions, artifacts and physically or logically impossible content.\n"
    "- Style: overall aesthetic quality (composition, lighting, colour, detail).\n"
    "Answer in exactly this format and nothing else:\n"
    "Alignment Score: <1-5>\n"
    "Coherence Score: <1-5>\n"
    "Style Score: <1-5>\n"
    "Final Score: <1-5>"
)
"""
The default judge prompt: three point scores on a 1-5 scale and a final score, as UnifiedReward's point-score
prompts ask. `{prompt}` is the generation prompt, `{medium}` "image" or "video". The parser reads `Final Score`, or
the mean of the other `... Score` lines when the final one is missing.
"""

_NUMBER = r"[-+]?\d+(?:\.\d+)?(?!\w)"  # "1e9" or "4th" are not scores
_RANGE = r"(?:\s*[(\[][^)\]\n]*[)\]])?"  # an optional "(1-5)" after the label
_VALUE = rf"[\s*]*({_NUMBER})(?:\s*/\s*({_NUMBER}))?"  # "4", "**4**", "4/5", "4.5 / 10"
_FINAL = re.compile(rf"final\s+score{_RANGE}[^:=\n\d]*[:=]?{_VALUE}", re.IGNORECASE)
_ANY_SCORE = re.compile(rf"\bscore{_RANGE}[^:=\n\d]*[:=]{_VALUE}", re.IGNORECASE)
_BARE = re.compile(rf"{_VALUE}[\s*]*\.?\s*")


@dataclass(frozen=True)
class ParsedScore:
    """A judge answer read: `score` (None when unreadable) and, if so, `error` saying why."""

    score: float | None
    error: str | None = None


def parse_judge_score(text: Any, low: float = 1.0, high: float = 5.0) -> ParsedScore:
    """
    Read a point score in `[low, high]` out of a judge's answer.

    In order: the `Final Score: X` line (the last one if repeated); else the mean of every `<aspect> Score: X`
    line; else an answer that is only a number. `X/N` is read as `X` when `N` equals `high` (the scale stated again)
    and rescaled to the scale otherwise. Markdown bold around the number is ignored. A score outside `[low, high]`,
    an empty or non-text answer, or one without a score gives `ParsedScore(None, error)`; nothing raises.
    """
    if not isinstance(text, str) or not text.strip():
        return ParsedScore(None, f"empty or non-text answer {text!r}")

    def value(match: re.Match) -> float:
        number = float(match.group(1))
        if match.group(2) is not None:
            scale = float(match.group(2))
            if scale > 0 and scale != high:
                number = low + (high - low) * number / scale
        return number

    finals = list(_FINAL.finditer(text))
    if finals:
        scores = [value(finals[-1])]
    else:
        scores = [value(match) for match in _ANY_SCORE.finditer(text)]
        bare = _BARE.fullmatch(text)
        if not scores and bare:
            scores = [value(bare)]
    if not scores:
        return ParsedScore(None, f"no score found in the answer {_excerpt(text)}")
    score = sum(scores) / len(scores)
    if not math.isfinite(score) or not low <= score <= high:
        return ParsedScore(None, f"score {score:g} outside [{low:g}, {high:g}] in the answer {_excerpt(text)}")
    return ParsedScore(score)


def _excerpt(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def apply_error_policy(parsed: list[ParsedScore], on_error: str | float, name: str, prompts: list[str]) -> list:
    """Scores, with each unreadable one replaced by None (`"none"`), a number, or an error (`"raise"`)."""
    rewards = []
    for result, prompt in zip(parsed, prompts, strict=True):
        if result.score is not None:
            rewards.append(result.score)
        elif on_error == "raise":
            raise RewardFunctionError(
                f"Judge '{name}' gave no usable score for the prompt {prompt!r}: {result.error}. Set on_error='none' "
                "to leave such samples unscored, or a number to use as their reward."
            )
        else:
            logger.warning("Judge '%s': no usable score for the prompt %r: %s", name, prompt, result.error)
            rewards.append(None if on_error == "none" else float(on_error))
    return rewards


def check_error_policy(on_error: str | float) -> None:
    if on_error in ("none", "raise") or (isinstance(on_error, (int, float)) and math.isfinite(on_error)):
        return
    raise ValueError(f"on_error={on_error!r}: use 'none' (unscored), 'raise', or a finite number.")


def judge_frames(images: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, str]:
    """
    `[B, C, H, W]` images -> `[B, 1, C, H, W]` and "image"; `[B, F, C, H, W]` videos -> `num_frames` evenly spaced
    frames `[B, num_frames, C, H, W]` (first and last kept) and "video".
    """
    if images.ndim == 4:
        return images.unsqueeze(1), "image"
    if images.ndim != 5:
        raise ValueError(f"A judge scores images [B, C, H, W] or videos [B, F, C, H, W], got {tuple(images.shape)}.")
    if images.shape[1] <= num_frames:
        return images, "video"
    return sample_video_frames(images, 1.0, num_frames=num_frames), "video"


def to_pil(frame: torch.Tensor) -> Image.Image:
    """One `[C, H, W]` frame in `[0, 1]` as an 8-bit RGB PIL image."""
    array = (frame.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().permute(1, 2, 0).numpy()
    return Image.fromarray(np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3])


class VLMJudge(nn.Module):
    """
    A local vision-language model as a reward: it answers [`DEFAULT_TEMPLATE`] (or `template`) greedily for each
    sample and [`parse_judge_score`] turns the answer into the reward (in `[low, high]`, 1-5 by default).

    Videos are shown as `num_frames` evenly spaced frames (images in one user turn), which works with every
    image-text model and needs no video processor.

    Args:
        model_name_or_path (`str`):
            Hub id or local folder of an `AutoModelForImageTextToText` checkpoint with its processor (Qwen2.5-VL,
            Qwen3-VL, `CodeGoat24/UnifiedReward-qwen-7b`, ...).
        template (`str`, *optional*):
            The question, with `{prompt}` and optionally `{medium}` ("image" or "video").
        score_range (`tuple[float, float]`, *optional*, defaults to `(1, 5)`):
            The scale the template asks for; answers outside it are unreadable.
        on_error (`str` or `float`, *optional*, defaults to `"none"`):
            For unreadable answers: `"none"` (unscored), `"raise"`, or a number used as the reward.
        num_frames (`int`, *optional*, defaults to `4`):
            Frames shown per video.
        max_new_tokens (`int`, *optional*, defaults to `64`):
            Longest answer generated.
        batch_size (`int`, *optional*, defaults to `8`):
            Samples per `generate` call.
        model_init_kwargs (`dict`, *optional*):
            Keyword arguments for `from_pretrained` (`dtype` defaults to `torch.bfloat16`).
        processor (`ProcessorMixin`, *optional*):
            A processor to use instead of the checkpoint's own (`AutoProcessor.from_pretrained`); it must turn
            `text` with the chat template's image placeholders and per-sample lists of PIL `images` into model inputs.
    """

    def __init__(
        self,
        model_name_or_path: str,
        template: str = DEFAULT_TEMPLATE,
        *,
        score_range: tuple[float, float] = (1.0, 5.0),
        on_error: str | float = "none",
        num_frames: int = 4,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        model_init_kwargs: dict[str, Any] | None = None,
        processor: Any = None,
    ):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_error_policy(on_error)
        if "{prompt}" not in template:
            raise ValueError("The judge template must contain '{prompt}' (where the generation prompt goes).")
        try:
            self.processor = processor or AutoProcessor.from_pretrained(model_name_or_path)
            init_kwargs = {"dtype": torch.bfloat16} | (model_init_kwargs or {})
            self.model = AutoModelForImageTextToText.from_pretrained(model_name_or_path, **init_kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"VLMJudge could not load an image-text-to-text model and its processor from {model_name_or_path!r}: "
                f"{error}. Pass a Hub id or folder of a Qwen2.5-VL / Qwen3-VL style checkpoint."
            ) from error
        self.model.eval().requires_grad_(False)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row at the same position
        self.template, self.score_range, self.on_error = template, score_range, on_error
        self.num_frames, self.max_new_tokens, self.batch_size = num_frames, max_new_tokens, batch_size
        self.name = f"vlm_judge_{model_name_or_path.rstrip('/').rsplit('/', 1)[-1]}"

    @torch.no_grad()
    def generate(self, prompts: list[str], images: torch.Tensor) -> list[str]:
        """The judge's answer, one string per sample, for `images` `[B, C, H, W]` or videos `[B, F, C, H, W]`."""
        frames, medium = judge_frames(images, self.num_frames)
        answers = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            conversations = [
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"} for _ in video]
                        + [{"type": "text", "text": self.template.format(prompt=prompt, medium=medium)}],
                    }
                ]
                for prompt, video in zip(prompts[chunk], frames[chunk], strict=True)
            ]
            texts = self.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
            pil_images = [[to_pil(frame) for frame in video] for video in frames[chunk]]
            inputs = self.processor(text=texts, images=pil_images, padding=True, return_tensors="pt")
            inputs = inputs.to(self.model.device)
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers.extend(self.processor.batch_decode(new_tokens, skip_special_tokens=True))
        return answers

    def forward(self, prompts: list[str], images: torch.Tensor, **kwargs: Any) -> list[float | None]:
        """One score per sample (None for unreadable answers with `on_error="none"`)."""
        parsed = [parse_judge_score(answer, *self.score_range) for answer in self.generate(prompts, images)]
        return apply_error_policy(parsed, self.on_error, self.name, prompts)


def _png_data_url(frame: torch.Tensor) -> str:
    buffer = io.BytesIO()
    to_pil(frame).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class OpenAIJudge:
    """
    The judge of [`VLMJudge`] behind an OpenAI-compatible chat-completions server (`vllm serve <model>`,
    `python -m sglang.launch_server ...`): one request per sample, `max_concurrency` in flight, temperature 0.

    A request that times out or fails is retried `max_retries` times (after 0.5 s, 1 s, ...); if it still fails, or
    its answer is unreadable, `on_error` applies to that sample alone.

    Args:
        base_url (`str`):
            The server's OpenAI API root, such as `"http://127.0.0.1:8000/v1"` (`/chat/completions` is appended).
        model (`str`):
            The served model's name.
        template, score_range, on_error, num_frames, max_new_tokens:
            As in [`VLMJudge`].
        api_key (`str`, *optional*):
            Sent as a bearer token.
        timeout (`float`, *optional*, defaults to `120.0`):
            Seconds one request may take.
        max_retries (`int`, *optional*, defaults to `2`):
            Retries of a failed or timed-out request.
        max_concurrency (`int`, *optional*, defaults to `16`):
            Requests in flight at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        template: str = DEFAULT_TEMPLATE,
        *,
        score_range: tuple[float, float] = (1.0, 5.0),
        on_error: str | float = "none",
        num_frames: int = 4,
        max_new_tokens: int = 64,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 2,
        max_concurrency: int = 16,
    ):
        import httpx

        check_error_policy(on_error)
        if "{prompt}" not in template:
            raise ValueError("The judge template must contain '{prompt}' (where the generation prompt goes).")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.template, self.score_range, self.on_error = model, template, score_range, on_error
        self.num_frames, self.max_new_tokens, self.max_retries = num_frames, max_new_tokens, max_retries
        self.max_concurrency = max_concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.name = f"judge_{model.rsplit('/', 1)[-1]}"

    def request_body(self, prompt: str, frames: torch.Tensor, medium: str) -> dict[str, Any]:
        """The chat-completions request for one sample (`frames` `[F, C, H, W]`)."""
        content = [{"type": "image_url", "image_url": {"url": _png_data_url(frame)}} for frame in frames]
        content.append({"type": "text", "text": self.template.format(prompt=prompt, medium=medium)})
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0.0,
            "max_tokens": self.max_new_tokens,
        }

    def ask(self, body: dict[str, Any]) -> ParsedScore:
        """Send one request (with retries) and parse its answer; failures become a `ParsedScore` with the error."""
        import httpx

        error = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                response = self.client.post(self.url, json=body)
                response.raise_for_status()
                answer = response.json()["choices"][0]["message"]["content"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as caught:
                error = f"request to {self.url} failed: {type(caught).__name__}: {caught}"
                if isinstance(caught, httpx.HTTPStatusError) and caught.response.status_code < 500:
                    break  # a client error (bad request, unknown model) does not heal by retrying
                continue
            return parse_judge_score(answer, *self.score_range)
        return ParsedScore(None, error)

    def __call__(self, prompts: list[str], images: torch.Tensor, **kwargs: Any) -> list[float | None]:
        """One score per sample, the requests sent concurrently."""
        frames, medium = judge_frames(images, self.num_frames)
        bodies = [self.request_body(prompt, video, medium) for prompt, video in zip(prompts, frames, strict=True)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(bodies)))) as pool:
            parsed = list(pool.map(self.ask, bodies))
        return apply_error_policy(parsed, self.on_error, self.name, prompts)


def _score_range(value: str) -> tuple[float, float]:
    low, _, high = value.partition("-")
    return float(low), float(high)


def _on_error(value: str) -> str | float:
    return value if value in ("none", "raise") else float(value)


JUDGE_OPTIONS = {
    "num_frames": int,
    "max_new_tokens": int,
    "score_range": _score_range,
    "on_error": _on_error,
}


@register_reward("vlm_judge")
def vlm_judge(argument: str = "") -> VLMJudge:
    """
    `vlm_judge:<model>[,<option>=<value>...]`: [`VLMJudge`] on a local Hub id or folder; options `num_frames`,
    `max_new_tokens`, `batch_size`, `score_range` (`1-5`), `on_error` (`none`, `raise` or a number).
    """
    positional, options = split_spec_argument(argument, "vlm_judge", JUDGE_OPTIONS | {"batch_size": int})
    if len(positional) != 1:
        raise ValueError("vlm_judge needs the judge model: vlm_judge:<hub id or folder>[,<option>=<value>...].")
    return VLMJudge(positional[0], **options)


@register_reward("openai_judge")
def openai_judge(argument: str = "") -> OpenAIJudge:
    """
    `openai_judge:<base URL>,<model>[,<option>=<value>...]`: [`OpenAIJudge`] (API key from `OPENAI_API_KEY` if set);
    options `num_frames`, `max_new_tokens`, `score_range`, `on_error`, `timeout`, `max_retries`, `max_concurrency`.
    """
    import os

    extra = {"timeout": float, "max_retries": int, "max_concurrency": int}
    positional, options = split_spec_argument(argument, "openai_judge", JUDGE_OPTIONS | extra)
    if len(positional) != 2:
        raise ValueError(
            "openai_judge needs the server and the model: openai_judge:http://127.0.0.1:8000/v1,<model name>."
        )
    return OpenAIJudge(*positional, api_key=os.environ.get("OPENAI_API_KEY"), **options)
