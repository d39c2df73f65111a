# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Checks of a run's inputs that need no model, run before the pipeline loads (minutes for SD3.5 or FLUX).

`DDRLTrainer.__init__` checks `args`, the model path, the datasets and the reward functions before it calls
`from_pretrained`; the `trl-ddrl` script also checks the output folder and the Hub token first. Each error names the
argument and the fix.
"""

import difflib
import importlib.util
import os
from typing import Any

from .config import DDRLConfig


# How `model` values that are not Hub ids start; a Hub id is `name` or `owner/name`.
_LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


def check_trainer_args(args: Any, model_id: str) -> DDRLConfig:
    """
    `args` as the trainer's [`DDRLConfig`]: `None` becomes `DDRLConfig("<model name>-DDRL")`; any other type (a
    `GRPOConfig`, a `TrainingArguments`, a dict) raises a `TypeError` saying how to build a `DDRLConfig` instead.
    """
    if args is None:
        return DDRLConfig(f"{str(model_id).rstrip('/').split('/')[-1]}-DDRL")
    if isinstance(args, DDRLConfig):
        return args
    if isinstance(args, dict):
        raise TypeError(
            "args is a dict; DDRLTrainer needs a DDRLConfig. Pass args=DDRLConfig(**your_dict) (unknown keys are then "
            "named), or DDRLConfig(output_dir=..., data_beta=..., ...)."
        )
    name = type(args).__name__
    raise TypeError(
        f"args is a {name}; DDRLTrainer needs a DDRLConfig, which has DDRL's fields (data_beta, prompts_per_step, "
        f"num_inference_steps, ...) on top of TrainingArguments. Build one with "
        "DDRLConfig(output_dir=..., learning_rate=..., num_generations=..., ...) instead of "
        f"{name}(...); GRPO-only fields such as max_completion_length do not apply to diffusion models."
    )


def needs_bitsandbytes(optim: str) -> bool:
    """Whether transformers builds the optimizer `optim` (a `TrainingArguments.optim` name) from bitsandbytes."""
    if optim.startswith(("adamw_torch", "galore")):  # torchao's 8-bit AdamW; GaLore (galore-torch)
        return False
    return "bnb" in optim or "8bit" in optim or "32bit" in optim or optim.startswith(("paged_", "lion", "ademamix"))


def check_optimizer(args: DDRLConfig) -> None:
    """
    An 8-bit / paged optimizer (`optim="adamw_bnb_8bit"`, ...) needs bitsandbytes: say so before the pipeline loads,
    not after (transformers builds the optimizer when training starts).
    """
    optim = str(getattr(args.optim, "value", args.optim))
    if needs_bitsandbytes(optim) and importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"optim={optim!r} needs bitsandbytes, which is not installed: pip install bitsandbytes. Or use "
            "optim='adamw_torch_fused' (the default AdamW, fused) or train a LoRA adapter to shrink the optimizer state."
        )


def looks_like_local_path(model: str) -> bool:
    """Whether `model` is meant as a local path: it starts with `./`, `../`, `/` or `~`, or has more than one `/`."""
    return model.startswith(_LOCAL_PREFIXES) or model.count("/") > 1 or os.path.exists(model)


def check_model_path(model: str, option: str = "model") -> None:
    """
    A `model` meant as a local folder exists and holds a diffusers pipeline (`model_index.json`); otherwise a
    `ValueError` naming `option` and the fix, instead of the Hub client's "internet connection" message.
    """
    if not looks_like_local_path(model):
        return
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        parent, name = os.path.split(os.path.abspath(path))
        close = difflib.get_close_matches(name, os.listdir(parent), n=1) if os.path.isdir(parent) else []
        raise ValueError(
            f"{option}={model!r}: no such folder (relative paths are read from {os.getcwd()!r})"
            + (f"; did you mean {os.path.join(os.path.dirname(model), close[0])!r}?" if close else ".")
            + " Fix the path to a folder saved with pipeline.save_pretrained, or give a Hub id such as "
            "'stabilityai/stable-diffusion-3.5-medium'."
        )
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        what = "a file" if os.path.isfile(path) else "a folder without model_index.json"
        raise ValueError(
            f"{option}={model!r} is {what}, not a diffusers pipeline. Pass the folder written by "
            "pipeline.save_pretrained (it holds model_index.json and one subfolder per component)."
        )


def check_hub_token(args: DDRLConfig) -> None:
    """With `push_to_hub`, a Hugging Face token is there (`hub_token`, `HF_TOKEN` or `hf auth login`)."""
    if not args.push_to_hub or args.hub_token:
        return
    from huggingface_hub import get_token

    if get_token() is None:
        raise ValueError(
            "push_to_hub=True, but no Hugging Face token was found, so the upload at the end would fail with 401 "
            "Unauthorized. Run `hf auth login`, set the HF_TOKEN environment variable, or pass hub_token=... "
            "(--hub_token on the command line); or set push_to_hub=False."
        )
