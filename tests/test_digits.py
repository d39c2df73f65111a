# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
import json

import pytest
import torch
from PIL import Image
from torch import nn

from trl_ddrl import DDRLConfig, DDRLTrainer
from trl_ddrl.digits import (
    DigitClassifierReward,
    DigitsFlowPipeline,
    digits_dataset,
    digits_prompt,
    ink_reward,
    load_digits_split,
    load_or_pretrain_base,
    parse_digit,
    pretrain_digits_model,
    random_digits_pipeline,
    train_digit_classifier,
)
from trl_ddrl.digits.data import _split_indices
from trl_ddrl.pipelines import DigitsFlowAdapter, SamplingSettings, get_adapter


@pytest.fixture
def pipeline() -> DigitsFlowPipeline:
    pipeline = random_digits_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_splits_are_disjoint_stratified_and_deterministic():
    indices = _split_indices()
    sets = {name: set(index.tolist()) for name, index in indices.items()}
    assert not sets["base"] & sets["reward"] and not sets["base"] & sets["eval"] and not sets["reward"] & sets["eval"]
    assert sum(len(s) for s in sets.values()) == 1797
    _split_indices.cache_clear()
    assert all((_split_indices()[name] == index).all() for name, index in indices.items())

    images, labels = load_digits_split("reward")
    assert images.shape == (len(labels), 1, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert labels.bincount().min() >= 40  # stratified: every digit is present in every split
    with pytest.raises(ValueError, match="split='train'"):
        load_digits_split("train")


def test_dataset_columns_feed_the_collator_shape():
    dataset = digits_dataset("eval")
    row = dataset[0]
    assert set(dataset.column_names) == {"prompt", "label", "image"}
    assert row["prompt"] == digits_prompt(row["label"]) and row["image"].size == (16, 16)


def test_prompts_parse_back_to_digits(pipeline):
    assert [parse_digit(digits_prompt(digit)) for digit in range(10)] == list(range(10))
    assert parse_digit("Seven, please") == 7 and parse_digit("") is None and parse_digit("a 12 cat") is None
    encoder = pipeline.prompt_encoder
    labels = encoder.labels(["a handwritten digit 3", "nine", "a cat"])
    assert labels.tolist() == [3, 9, encoder.unconditional_index]
    embeds = encoder.encode(["a handwritten digit 3", "three"])
    assert embeds.shape == (2, 1, encoder.config.embedding_dim) and torch.equal(embeds[0], embeds[1])
    with pytest.raises(ValueError, match="label=10"):
        digits_prompt(10)


def test_pipeline_round_trip_gives_identical_samples(pipeline, tmp_path):
    prompts = ["a handwritten digit 1", "a handwritten digit 8"]
    kwargs = {"num_inference_steps": 4, "output_type": "pt", "guidance_scale": 2.0}
    images = pipeline(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert images.shape == (2, 1, 16, 16) and images.min() >= 0 and images.max() <= 1
    pipeline.save_pretrained(tmp_path)
    loaded = DigitsFlowPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(images, loaded(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images)
    pil = loaded(prompts[0], num_inference_steps=2).images[0]
    assert pil.mode == "L" and pil.size == (16, 16)


def test_adapter_replays_its_own_transitions_with_ratio_one(pipeline):
    adapter = get_adapter(pipeline, SamplingSettings(num_inference_steps=5, eta=0.7, guidance_scale=1.5))
    assert isinstance(adapter, DigitsFlowAdapter)
    assert adapter.resolution == (16, 16) and adapter.pixel_channels == 1 and adapter.latent_shape() == (1, 16, 16)
    prompts = [digits_prompt(digit) for digit in (0, 4, 7)]
    conditioning = adapter.encode_prompts(prompts, adapter.device)
    assert set(conditioning) == {"prompt_embeds", "negative_prompt_embeds"}
    generator = torch.Generator().manual_seed(0)
    trajectory = adapter.sample(pipeline.unet, conditioning, adapter.sample_noise(3, generator), generator=generator)
    assert trajectory.latents.shape == (3, 6, 1, 16, 16)
    for step in range(4):
        index = torch.full((3,), step)
        replay = adapter.transition_log_prob(
            pipeline.unet, trajectory.latents[:, step], trajectory.latents[:, step + 1], index, conditioning
        )
        torch.testing.assert_close(replay.log_prob, trajectory.log_probs[:, step], rtol=0, atol=1e-5)

    pixels = torch.rand(2, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(adapter.decode(adapter.encode_pixels(pixels)), pixels / 2 + 0.5)


def test_two_trainer_steps_change_the_unet_only(pipeline, tmp_path):
    encoder_before = {key: value.clone() for key, value in pipeline.prompt_encoder.state_dict().items()}
    unet_before = {key: value.clone() for key, value in pipeline.unet.state_dict().items()}
    args = DDRLConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        num_generations=2,
        prompts_per_step=2,
        num_inference_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        data_beta=0.1,
        report_to="none",
        save_strategy="no",
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    trainer = DDRLTrainer(pipeline, ink_reward, args=args, train_dataset=digits_dataset("base").select(range(8)))
    trainer.train()
    assert any(not torch.equal(unet_before[key], value) for key, value in pipeline.unet.state_dict().items())
    assert all(torch.equal(encoder_before[key], value) for key, value in pipeline.prompt_encoder.state_dict().items())
    assert any("loss/data" in log for log in trainer.state.log_history)


def test_trainer_loads_a_saved_digits_pipeline_by_path(pipeline, tmp_path):
    # diffusers' DiffusionPipeline.from_pretrained cannot resolve our pipeline class; the trainer finds it.
    pipeline.save_pretrained(tmp_path / "base")
    args = DDRLConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        num_generations=2,
        prompts_per_step=2,
        num_inference_steps=3,
        per_device_train_batch_size=4,
        data_beta=0.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DDRLTrainer(
        str(tmp_path / "base"), ink_reward, args=args, train_dataset=digits_dataset("base").select(range(4))
    )
    assert type(trainer.pipeline).__name__ == "DigitsFlowPipeline"
    assert isinstance(trainer.adapter, DigitsFlowAdapter)
    for key, value in pipeline.unet.state_dict().items():
        assert torch.equal(trainer.pipeline.unet.state_dict()[key], value)


def test_classifier_reward_reads_the_prompted_digit():
    class Constant(nn.Module):
        """Logits that always favour digit 3."""

        def __init__(self):
            super().__init__()
            self.logits = nn.Parameter(torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))

        def forward(self, images):
            return self.logits.expand(images.shape[0], -1)

    images = torch.rand(3, 1, 16, 16)
    prompts = [digits_prompt(3), digits_prompt(5), "a cat"]
    probs = DigitClassifierReward(Constant())(prompts, images)
    assert probs[0] > 0.9 and probs[1] < 0.01 and probs[2] is None
    log_probs = DigitClassifierReward(Constant(), mode="log_prob")(prompts, images)
    assert log_probs[0] == pytest.approx(torch.tensor(probs[0]).log().item(), abs=1e-5)
    with pytest.raises(ValueError, match="mode='logit'"):
        DigitClassifierReward(Constant(), mode="logit")
    assert ink_reward(prompts, torch.full((3, 1, 16, 16), 0.25)) == [0.25] * 3


def test_classifier_training_is_seeded():
    first, second = train_digit_classifier("eval", seed=3, epochs=1), train_digit_classifier("eval", seed=3, epochs=1)
    images, _ = load_digits_split("reward")
    assert torch.equal(first(images[:8]), second(images[:8]))
    assert first(images[:8]).shape == (8, 10)


def test_pretraining_saves_and_the_cache_is_reused(tmp_path, pipeline):
    trained = pretrain_digits_model(tmp_path / "run", steps=2, batch_size=4, show_progress=False)
    assert (tmp_path / "run" / "model_index.json").is_file()
    assert json.loads((tmp_path / "run" / "pretraining.json").read_text())["steps"] == 2
    assert not torch.equal(trained.unet.conv_in.weight, random_digits_pipeline(seed=0).unet.conv_in.weight)

    # A pipeline already in the cache is loaded as is, not retrained.
    pipeline.save_pretrained(tmp_path / "cache" / "digits-base-v1")
    cached = load_or_pretrain_base(tmp_path / "cache")
    assert torch.equal(cached.unet.conv_in.weight, pipeline.unet.conv_in.weight)


@pytest.mark.slow
def test_default_job_end_to_end(tmp_path, monkeypatch):
    from trl_ddrl.digits import run_default_job

    monkeypatch.setenv("TRL_DDRL_CACHE", str(tmp_path / "cache"))
    metrics = run_default_job(output_dir=str(tmp_path / "job"), max_steps=2)
    assert metrics["steps"] == 2
    assert 0 <= metrics["reward_before"] <= 1 and 0 <= metrics["eval_accuracy_before"] <= 1
    assert metrics["eval_accuracy_before"] > 0.8  # the pretrained base draws recognisable digits
    for name in ("metrics.json", "samples_before_after.png", "model_index.json", "curves.png", "curves.json"):
        assert (tmp_path / "job" / name).is_file()
    assert metrics["eval_first"]["step"] == 0 and metrics["eval_first"]["eval_data_loss_drift"] == 0
    assert (tmp_path / "cache" / "digits-base-v1" / "model_index.json").is_file()
    DigitsFlowPipeline.from_pretrained(tmp_path / "job")


def test_default_job_settings_are_the_documented_ones(tmp_path):
    """docs/default_job.md's figures were measured with these settings; change both together."""
    from trl_ddrl.digits.default_job import default_job_config

    args = default_job_config(str(tmp_path))
    assert args.data_beta == 0.3  # the long-horizon study's front, not the paper's 0.01 (docs/default_job.md)
    assert (args.learning_rate, args.warmup_steps, args.max_steps) == (1e-4, 5, 60)
    assert (args.prompts_per_step, args.num_generations, args.num_inference_steps) == (4, 8, 10)
    assert (args.eval_steps, args.eval_on_start) == (15, True)
    assert default_job_config(str(tmp_path), data_beta=0.0).data_beta == 0.0  # the reward-only contrast


def test_curves_are_read_from_the_log_history_and_plotted(tmp_path):
    from trl_ddrl.digits.curves import write_curves

    history = [
        {"step": 0, "eval_reward": 0.2, "eval_data_loss": 0.1, "epoch": 0},
        {"step": 5, "reward": 0.5, "loss": 0.01, "epoch": 0.1},
        {"step": 5, "eval_reward": 0.4, "eval_data_loss": 0.3, "eval_diversity": 0.2, "epoch": 0.1},
    ]
    series = write_curves(history, tmp_path)
    assert series["eval_data_loss"] == [[0, 0.1], [5, 0.3]] and series["reward"] == [[5, 0.5]]
    assert json.loads((tmp_path / "curves.json").read_text()) == series
    assert Image.open(tmp_path / "curves.png").size == (960, 220)


def test_training_is_bit_identical_for_the_same_seed(tmp_path):
    """Two runs with the same seed give the same losses and the same weights, bit for bit (refactors must keep it)."""

    def train(output_dir):
        pipeline = random_digits_pipeline(seed=0)
        pipeline.set_progress_bar_config(disable=True)
        args = DDRLConfig(
            output_dir=str(output_dir),
            max_steps=2,
            num_generations=2,
            prompts_per_step=2,
            num_inference_steps=3,
            per_device_train_batch_size=4,
            num_iterations=2,
            learning_rate=1e-3,
            warmup_steps=0,
            data_beta=0.1,
            seed=3,
            report_to="none",
            save_strategy="no",
            dataloader_pin_memory=False,
            disable_tqdm=True,
        )
        trainer = DDRLTrainer(pipeline, ink_reward, args=args, train_dataset=digits_dataset("base").select(range(8)))
        trainer.train()
        losses = [(log["loss/policy"], log["loss/data"]) for log in trainer.state.log_history if "loss/data" in log]
        return losses, pipeline.unet.state_dict()

    initial = random_digits_pipeline(seed=0).unet.state_dict()
    losses, weights = train(tmp_path / "first")
    again_losses, again_weights = train(tmp_path / "second")
    assert len(losses) == 2 and losses == again_losses
    assert all(torch.equal(weights[key], again_weights[key]) for key in weights)
    assert any(not torch.equal(initial[key], weights[key]) for key in weights)
