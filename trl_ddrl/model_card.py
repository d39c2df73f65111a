# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Model cards of DDRL-trained pipelines and LoRA adapters."""

import json
import os
import re
from importlib import resources
from importlib.metadata import version

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .config import DDRLConfig


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_base_model(model_id: str | None) -> str | None:
    """
    `model_id` when it is a Hub repo id (`owner/name`, not an existing local path), else `None`: a local path, or the
    class name that stands for a pipeline passed without a `name_or_path`, is no `base_model` of a model card.
    """
    if not model_id or not _HUB_ID.fullmatch(model_id) or os.path.exists(model_id):
        return None
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return None
    return model_id


# Evaluation metrics that describe the run rather than the model.
_EVAL_BOOKKEEPING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch", "step")


def final_evaluation(log_history: list[dict]) -> dict | None:
    """`{"step": s, "metrics": {name: value}}` of the last evaluation in `log_history`, or None without one."""
    for entry in reversed(log_history):
        metrics = {
            key: value
            for key, value in entry.items()
            if key.startswith("eval_") and key not in _EVAL_BOOKKEEPING and isinstance(value, (int, float))
        }
        if metrics:
            return {"step": entry.get("step"), "metrics": dict(sorted(metrics.items()))}
    return None


def save_model_card(
    output_dir: str,
    base_model: str | None,
    model_name: str,
    hub_model_id: str | None,
    dataset_name: str | None,
    tags: list[str],
    reward_names: list[str],
    config: DDRLConfig,
    is_lora: bool,
    paper: dict[str, str],
    has_samples: bool,
    example_prompt: str,
    pipeline_class: type,
    is_video: bool = False,
    lora_load_arguments: list[str] | None = None,
    base_model_path: str | None = None,
    steps: int | None = None,
    num_prompts: int | None = None,
    log_history: list[dict] | None = None,
) -> ModelCard:
    """
    Write `README.md` in `output_dir`: a diffusers model card citing DDRL, listing the rewards and settings, whose
    quick start loads the model with `pipeline_class` (diffusers' `DiffusionPipeline` for diffusers' own pipelines)
    and samples `example_prompt` (one of the training prompts). Under LoRA the quick start calls `load_lora_weights`
    once per entry of `lora_load_arguments` (extra arguments after the repo id; default: one call without any), on
    `base_model`, or `base_model_path` (the local folder or name it was trained from) when that is no Hub id. The
    card states the optimizer `steps`, the prompt dataset (`dataset_name`, `num_prompts`), each reward function with
    its weight and the last evaluation's metrics in `log_history`.
    """
    weights = config.reward_weights or [1.0] * len(reward_names)
    if pipeline_class.__module__.split(".")[0] == "diffusers":
        pipeline_import, pipeline_name = "diffusers", "DiffusionPipeline"
    else:
        pipeline_import, pipeline_name = pipeline_class.__module__, pipeline_class.__name__
    card_data = ModelCardData(
        base_model=base_model,
        datasets=dataset_name,
        library_name="diffusers",
        license="other",
        model_name=model_name,
        pipeline_tag="text-to-video" if is_video else "text-to-image",
        tags=sorted({"generated_from_trainer", *tags, *(["lora"] if is_lora else [])}),
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(resources.files("trl_ddrl").joinpath("templates/model_card.md")),
        model_name=model_name,
        base_model=base_model,
        hub_model_id=hub_model_id,
        is_lora=is_lora,
        lora_load_arguments=lora_load_arguments or [""],
        has_samples=has_samples,
        example_prompt=json.dumps(example_prompt),  # a valid Python string literal
        pipeline_import=pipeline_import,
        pipeline_name=pipeline_name,
        output_attribute="frames" if is_video else "images",
        config=config,
        reward_names=reward_names,
        rewards_with_weights=[f"{name} (weight {weight:g})" for name, weight in zip(reward_names, weights)],
        base_model_path=base_model_path,
        steps=steps,
        dataset_name=dataset_name,
        num_prompts=num_prompts,
        final_eval=final_evaluation(log_history or []),
        paper_title=paper["title"],
        paper_id=paper["id"],
        paper_citation=paper["citation"],
        trl_ddrl_version=version("trl_ddrl"),
        trl_version=version("trl"),
        diffusers_version=version("diffusers"),
        pytorch_version=version("torch"),
    )
    card.save(os.path.join(output_dir, "README.md"))
    return card
