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


def test_card_states_steps_dataset_rewards_with_weights_and_the_final_evaluation(tmp_path):
    args = DDRLConfig(
        output_dir=str(tmp_path),
        num_generations=2,
        prompts_per_step=2,
        num_inference_steps=4,
        report_to="none",
        reward_weights=[1.0, 0.5],
    )
    trainer = DDRLTrainer(
        random_digits_pipeline(seed=0),
        [ink_reward, ink_reward],
        args=args,
        train_dataset=digits_dataset("eval").select(range(4)),
    )
    trainer.state.global_step = 7
    trainer.state.log_history = [
        {"eval_reward": 0.25, "eval_runtime": 3.0, "step": 0},
        {"reward": 0.4, "step": 7},
        {"eval_reward": 0.5, "eval_data_loss_drift": 0.0123, "eval_runtime": 3.0, "step": 7},
    ]
    trainer.create_model_card(dataset_name="my/prompts")
    text = (tmp_path / "README.md").read_text()
    name = trainer.reward_func_names[0]
    assert "- Training: 7 optimizer steps of 4 samples each, on 4 prompts from `my/prompts`" in text
    assert (
        f"- Reward functions: {name} (weight 1), {name} (weight 0.5), combined with `normalize_then_average`" in text
    )
    assert "### Final evaluation (step 7)" in text
    assert "| `eval_reward` | 0.5 |" in text and "| `eval_data_loss_drift` | 0.0123 |" in text
    assert "eval_runtime" not in text


def test_lora_card_from_a_local_base_loads_that_folder(tmp_path):
    from peft import LoraConfig

    base = tmp_path / "base"
    random_digits_pipeline(seed=0).save_pretrained(base)
    args = DDRLConfig(
        output_dir=str(tmp_path / "out"),
        num_generations=2,
        prompts_per_step=2,
        num_inference_steps=4,
        report_to="none",
    )
    trainer = DDRLTrainer(
        str(base),
        ink_reward,
        args=args,
        train_dataset=digits_dataset("eval").select(range(4)),
        peft_config=LoraConfig(r=2, target_modules=["time_emb_proj"]),
    )
    trainer.create_model_card()
    text = (tmp_path / "out" / "README.md").read_text()
    assert f'.from_pretrained("{base}")' in text and "BASE_MODEL" not in text
    assert "a local pipeline here" in text


def test_samples_grid_has_a_label_under_each_sample():
    import torch

    from trl_ddrl.utils import image_grid, labelled_grid

    images = torch.ones(4, 3, 16, 16)  # white samples: any dark pixel is caption text
    grid = labelled_grid(images, [f"a digit {index}\nink=0.{index}" for index in range(4)])
    plain = image_grid(images)
    assert grid.width == 2 * 160 and grid.height > 2 * 160  # tiles upscaled to 160 px, caption strips below
    pixels = torch.tensor(list(grid.convert("L").getdata())).reshape(grid.height, grid.width)
    for row in range(2):
        caption_strip = pixels[row * (grid.height // 2) + 160 : (row + 1) * (grid.height // 2)]
        assert (caption_strip[:, :160] < 128).any() and (caption_strip[:, 160:] < 128).any()
    assert plain.size == (32, 32)
