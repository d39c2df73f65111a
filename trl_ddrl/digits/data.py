# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The embedded digits data: scikit-learn's 8x8 handwritten digits, upsampled to 16x16, in fixed disjoint splits.

The 1,797 images of `sklearn.datasets.load_digits` (values 0..16) are scaled to `[0, 1]`, upsampled bilinearly to
16x16 and split, stratified by label with a fixed seed, into three disjoint parts:

- `"base"` (50%): pretrains the generator and feeds DDRL's data term;
- `"reward"` (25%): trains the classifier behind the default reward;
- `"eval"` (25%): trains the held-out classifier that judges samples, never seen by the generator or the reward.
"""

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, Features, Image, Value
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .prompts import digits_prompt


SPLITS = ("base", "reward", "eval")
SPLIT_SEED = 0
RESOLUTION = 16


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images `[N, 8, 8]` (0..16) and labels `[N]`, as scikit-learn ships them."""
    digits = load_digits()
    return digits.images, digits.target


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    labels = _raw_digits()[1]
    indices = np.arange(len(labels))
    base, rest = train_test_split(indices, test_size=0.5, stratify=labels, random_state=SPLIT_SEED)
    reward, evaluation = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=SPLIT_SEED)
    return {"base": np.sort(base), "reward": np.sort(reward), "eval": np.sort(evaluation)}


def load_digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """
    One split of the digits data.

    Args:
        split (`str`): `"base"`, `"reward"` or `"eval"`.

    Returns:
        `tuple`: images `[N, 1, 16, 16]` float32 in `[0, 1]` and labels `[N]` int64.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a digits split; choose one of {', '.join(map(repr, SPLITS))}.")
    all_images, all_labels = _raw_digits()
    index = _split_indices()[split]
    images = torch.from_numpy(all_images[index]).float().div(16.0)[:, None]
    images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False).clamp(0, 1)
    return images, torch.from_numpy(all_labels[index]).long()


def digits_dataset(split: str = "base") -> Dataset:
    """
    A split as a `datasets.Dataset` with `prompt` (`"a handwritten digit 7"`), `label` (int) and `image` (16x16
    grayscale PIL) columns: prompts for the RL rollouts and (prompt, image) rows for DDRL's data term.
    """
    images, labels = load_digits_split(split)
    pixels = (images[:, 0] * 255).round().to(torch.uint8).numpy()
    features = Features({"prompt": Value("string"), "label": Value("int64"), "image": Image()})
    return Dataset.from_dict(
        {
            "prompt": [digits_prompt(label) for label in labels.tolist()],
            "label": labels.tolist(),
            "image": list(pixels),
        },
        features=features,
    )
