# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The model card as users see it: base model only when it is a Hub id, a quick start that runs on a training prompt."""

import yaml

from trl_ddrl import DDRLConfig, DDRLTrainer
from trl_ddrl.digits import digits_dataset, ink_reward, random_digits_pipeline
from trl_ddrl.model_card import hub_base_model


def card_of(pipeline, tmp_path) -> tuple[dict, str]:
    args = DDRLConfig(
        output_dir=str(tmp_path), num_generations=2, prompts_per_step=2, num_inference_steps=4, report_to="none"
    )
    trainer = DDRLTrainer(pipeline, ink_reward, args=args, train_dataset=digits_dataset("eval").select(range(4)))
    trainer.create_model_card()
    text = (tmp_path / "README.md").read_text()
    return yaml.safe_load(text.split("---")[1]), text


def test_base_model_is_only_a_hub_id(tmp_path):
    assert hub_base_model("stabilityai/stable-diffusion-3.5-medium") == "stabilityai/stable-diffusion-3.5-medium"
    for not_hub in ("DigitsFlowPipeline", "/models/sd3", "./sd3", "~/sd3", "C:\\models\\sd3", "", None, "a/b/c"):
        assert hub_base_model(not_hub) is None, not_hub
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert hub_base_model(str(tmp_path / "org" / "local")) is None


def test_card_of_an_in_memory_pipeline_names_no_base_model_and_quick_starts_on_a_training_prompt(tmp_path):
    metadata, text = card_of(random_digits_pipeline(seed=0), tmp_path)
    assert "base_model" not in metadata
    assert "DigitsFlowPipeline](" not in text and "huggingface.co/DigitsFlowPipeline" not in text
    assert "a photo of a cat" not in text
    assert 'pipe("a handwritten digit' in text
    assert "from trl_ddrl.digits.pipeline import DigitsFlowPipeline" in text
    assert "github.com/trl-ddrl" not in text
