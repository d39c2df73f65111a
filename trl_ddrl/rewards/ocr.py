# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Text-rendering reward: OCR the image and compare with the text quoted in the prompt."""

import re
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from .frames import to_uint8_frames
from .video import score_per_frame


QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def quoted_text(prompt: str) -> str | None:
    """The first text between double quotes (straight or curly) in `prompt`, or None."""
    match = QUOTED.search(prompt)
    return None if match is None else match.group(1) or match.group(2)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions needed to turn `a` into `b`."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def tesseract_recognize(images: torch.Tensor) -> list[str]:
    """Read the text of each `[N, C, H, W]` image with pytesseract (needs the `tesseract` binary)."""
    import pytesseract

    return [pytesseract.image_to_string(Image.fromarray(frame.squeeze(-1))) for frame in to_uint8_frames(images)]


class OCRReward:
    """
    Text-rendering accuracy: `1 - min(d, n) / n`, with `d` the edit distance between the recognised text and the target
    text and `n` the target's length, in `[0, 1]`. The target is the first text in double quotes in the prompt
    (`'a neon sign that says "OPEN 24/7"'`), or a dataset column. Comparison ignores case and whitespace unless told
    otherwise. Samples without a target get None (no reward). Videos are scored per frame and averaged.

    Args:
        recognize (`Callable[[torch.Tensor], list[str]]`, *optional*):
            OCR function taking images `[N, C, H, W]` in `[0, 1]` and returning one string per image. Defaults to
            pytesseract (`pip install pytesseract` plus the `tesseract` binary).
        target_column (`str`, *optional*):
            Read the target text from this dataset column instead of the prompt's quotes.
        ignore_case_and_spaces (`bool`, *optional*, defaults to `True`):
            Lowercase both texts and remove whitespace before comparing.
    """

    name = "ocr"

    def __init__(
        self,
        recognize: Callable[[torch.Tensor], list[str]] | None = None,
        target_column: str | None = None,
        ignore_case_and_spaces: bool = True,
    ):
        if recognize is None:
            try:
                import pytesseract  # noqa: F401
            except ImportError as error:
                raise ImportError(
                    "OCRReward needs an OCR engine: pass recognize=<function (images) -> list[str]>, or install "
                    "pytesseract (pip install pytesseract, plus the tesseract binary)."
                ) from error
            recognize = tesseract_recognize
        self.recognize = recognize
        self.target_column = target_column
        self.ignore_case_and_spaces = ignore_case_and_spaces

    def _normalize(self, text: str) -> str:
        return "".join(text.split()).lower() if self.ignore_case_and_spaces else text.strip()

    def __call__(self, prompts: list[str], images: torch.Tensor, **kwargs: Any) -> list[float | None]:
        """One reward in `[0, 1]` (or None) per sample for `images` `[B, C, H, W]` or videos `[B, F, C, H, W]`."""
        if images.ndim == 5:
            return score_per_frame(self, prompts, images, **kwargs)
        if self.target_column is not None:
            if self.target_column not in kwargs:
                raise KeyError(
                    f"OCRReward(target_column={self.target_column!r}): the dataset has no such column; columns "
                    f"passed: {sorted(kwargs)}."
                )
            targets = list(kwargs[self.target_column])
        else:
            targets = [quoted_text(prompt) for prompt in prompts]
        texts = self.recognize(images)
        if len(texts) != len(prompts):
            raise ValueError(f"OCRReward: recognize returned {len(texts)} strings for {len(prompts)} images.")
        rewards: list[float | None] = []
        for text, target in zip(texts, targets, strict=True):
            target = None if target is None else self._normalize(str(target))
            if not target:
                rewards.append(None)
                continue
            distance = edit_distance(self._normalize(text), target)
            rewards.append(1.0 - min(distance, len(target)) / len(target))
        return rewards
