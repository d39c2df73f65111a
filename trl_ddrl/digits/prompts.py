# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Prompts of the embedded digits model: `"a handwritten digit 7"`, and parsing the digit back out of a prompt."""

import re


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_PATTERN = re.compile(r"(?<![0-9])([0-9])(?![0-9])|\b(" + "|".join(DIGIT_WORDS) + r")\b", re.IGNORECASE)


def digits_prompt(label: int) -> str:
    """The prompt of digit `label` (0..9): `"a handwritten digit 7"`."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label={label} is not a digit; use 0..9.")
    return f"a handwritten digit {int(label)}"


def parse_digit(prompt: str) -> int | None:
    """
    The digit a prompt asks for: the last single digit (`"7"`) or digit word (`"seven"`) in it, or `None` when it
    names none (the empty prompt and other unconditional prompts). Numbers of several digits (`"12"`) do not count.
    """
    matches = _DIGIT_PATTERN.findall(prompt)
    if not matches:
        return None
    digit, word = matches[-1]
    return int(digit) if digit else DIGIT_WORDS.index(word.lower())
