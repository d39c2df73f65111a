# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Model cards of DDRL-trained pipelines and LoRA adapters."""

import os
from importlib import resources
from importlib.metadata import version

from huggingface_hub import ModelCard, ModelCardData

from .config import DDRLConfig


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
) -> ModelCard:
    """Write `README.md` in `output_dir`: a diffusers model card citing DDRL, listing the rewards and settings."""
    card_data = ModelCardData(
        base_model=base_model,
        datasets=dataset_name,
        library_name="diffusers",
        license="other",
        model_name=model_name,
        pipeline_tag="text-to-image",
        tags=sorted({"generated_from_trainer", *tags, *(["lora"] if is_lora else [])}),
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(resources.files("trl_ddrl").joinpath("templates/model_card.md")),
        model_name=model_name,
        base_model=base_model,
        hub_model_id=hub_model_id,
        is_lora=is_lora,
        has_samples=has_samples,
        config=config,
        reward_names=reward_names,
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
