# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The embedded digits model: a tiny pixel-space rectified-flow generator of 16x16 handwritten digits, pretrained in a
few minutes on a CPU, with a digit-classifier reward. It is what `trl-ddrl` trains when no model is given.

Load a saved pipeline with `DigitsFlowPipeline.from_pretrained(path)`: diffusers' generic
`DiffusionPipeline.from_pretrained` only knows the pipeline classes that diffusers itself defines.
"""

import importlib
from typing import TYPE_CHECKING


# Public names and the submodule defining each, imported on first use so that `trl_ddrl.pipelines` can import the
# pipeline module without pulling in the trainer (which imports `trl_ddrl.pipelines`).
_LAZY_IMPORTS = {
    "DigitClassifier": "classifier",
    "DigitClassifierReward": "rewards",
    "DigitPromptEncoder": "pipeline",
    "DigitsFlowPipeline": "pipeline",
    "digits_dataset": "data",
    "digits_prompt": "prompts",
    "ink_reward": "rewards",
    "load_digits_split": "data",
    "load_or_pretrain_base": "pretrain",
    "parse_digit": "prompts",
    "pretrain_digits_model": "pretrain",
    "random_digits_pipeline": "pipeline",
    "run_default_job": "default_job",
    "train_digit_classifier": "classifier",
}

if TYPE_CHECKING:
    from .classifier import DigitClassifier, train_digit_classifier
    from .data import digits_dataset, load_digits_split
    from .default_job import run_default_job
    from .pipeline import DigitPromptEncoder, DigitsFlowPipeline, random_digits_pipeline
    from .pretrain import load_or_pretrain_base, pretrain_digits_model
    from .prompts import digits_prompt, parse_digit
    from .rewards import DigitClassifierReward, ink_reward


def __getattr__(name: str):
    if name in _LAZY_IMPORTS:
        return getattr(importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY_IMPORTS)
