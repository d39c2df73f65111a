# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""DDRLTrainer.evaluate(): fixed-noise deterministic samples, held-out rewards, diversity and data loss."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from test_trainer import brightness, make_args, prompt_dataset, state_of

from trl_ddrl import DDRLTrainer
from trl_ddrl.evaluation import shard_positions


EVAL_PROMPTS = ["a blue bird", "a house"]


def eval_dataset(with_images: bool = True) -> Dataset:
    columns = {"prompt": EVAL_PROMPTS}
    if with_images:
        rng = np.random.default_rng(1)
        columns["image"] = [rng.random((16, 16, 3), dtype=np.float32) for _ in EVAL_PROMPTS]
    return Dataset.from_dict(columns)


def contrast(prompts, images, **kwargs):
    return images.std(dim=(1, 2, 3)).tolist()


def make_trainer(tiny_sd3_path, tmp_path, **overrides):
    args = make_args(tmp_path, eval_num_generations=2, per_device_eval_batch_size=4, **overrides)
    return DDRLTrainer(
        tiny_sd3_path,
        brightness,
        args=args,
        train_dataset=prompt_dataset(),
        eval_dataset=eval_dataset(),
        eval_reward_funcs=[contrast],
    )


def test_evaluate_is_deterministic_for_equal_weights_and_moves_with_the_model(tiny_sd3_path, tmp_path):
    trainer = make_trainer(tiny_sd3_path, tmp_path)
    first = trainer.evaluate()
    for key in (
        "eval_rewards/brightness/mean",
        "eval_rewards/contrast/mean",
        "eval_reward",
        "eval_diversity",
        "eval_data_loss",
    ):
        assert np.isfinite(first[key]), key
    assert first["eval_reward"] == pytest.approx(first["eval_rewards/brightness/mean"])
    # The first evaluation is the baseline of the drift indicators.
    assert first["eval_data_loss_drift"] == 0 and first["eval_diversity_drop"] == 0
    assert "eval_reward_gap" not in first  # no training reward logged yet
    assert trainer.state.log_history[-1]["eval_data_loss"] == first["eval_data_loss"]

    denoiser = trainer.accelerator.unwrap_model(trainer.model)
    weights = state_of(denoiser)
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    moved = trainer.evaluate()
    for key in ("eval_rewards/brightness/mean", "eval_diversity", "eval_data_loss"):
        assert moved[key] != first[key], key
    assert moved["eval_data_loss_drift"] == pytest.approx(moved["eval_data_loss"] / first["eval_data_loss"] - 1)

    denoiser.load_state_dict(weights)
    again = trainer.evaluate()
    for key, value in first.items():
        if key not in ("eval_runtime", "eval_data_loss_drift", "eval_diversity_drop"):
            assert again[key] == value, key


def fit_to(trainer, rows: list[dict], steps: int, latent_shift: float = 0.0) -> None:
    """Train the denoiser on the diffusion loss of `rows` alone, their latents shifted by `latent_shift`."""
    denoiser = trainer.accelerator.unwrap_model(trainer.model)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-2)
    batch = trainer.data_collator_for_loss(rows)
    latents = batch["latents"] + latent_shift
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        noise = torch.randn(latents.shape, generator=generator)
        indices = torch.full((len(rows),), step % 3)
        loss = trainer.adapter.diffusion_loss(denoiser, latents, batch["conditioning"], indices, noise)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()


def test_held_out_data_loss_rises_when_the_model_is_pushed_off_the_data(tiny_sd3_path, tmp_path):
    trainer = make_trainer(tiny_sd3_path, tmp_path)
    held_out = eval_dataset()
    rows = [held_out[i] for i in range(len(held_out))]
    fit_to(trainer, rows, steps=30)
    on_data = trainer.evaluate()["eval_data_loss"]
    # Trained on the same data moved away in latent space, the model no longer fits the held-out data.
    fit_to(trainer, rows, steps=30, latent_shift=1.0)
    off_data = trainer.evaluate()
    assert off_data["eval_data_loss"] > 1.5 * on_data
    assert off_data["eval_data_loss_drift"] == pytest.approx(off_data["eval_data_loss"] / on_data - 1)


def test_eval_strategy_steps_evaluates_during_training_and_reports_the_reward_gap(tiny_sd3_path, tmp_path):
    trainer = make_trainer(tiny_sd3_path, tmp_path, eval_strategy="steps", eval_steps=1, eval_on_start=True)
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_reward" in entry]
    assert [entry["step"] for entry in evals] == [0, 1, 2]
    assert evals[0]["eval_data_loss_drift"] == 0
    train_rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert evals[1]["eval_reward_gap"] == pytest.approx(train_rewards[0] - evals[1]["eval_reward"])
    # Evaluation logs carry no training metrics, and training logs no evaluation metrics.
    assert all("reward" not in entry for entry in evals)


def test_a_resumed_run_does_not_evaluate_its_start_again(tiny_sd3_path, tmp_path):
    settings = {
        "eval_strategy": "steps",
        "eval_steps": 1,
        "eval_on_start": True,
        "save_strategy": "steps",
        "save_steps": 1,
    }
    make_trainer(tiny_sd3_path, tmp_path, max_steps=1, **settings).train()
    trainer = make_trainer(tiny_sd3_path, tmp_path, max_steps=2, **settings)
    trainer.train(resume_from_checkpoint=True)
    evals = [entry["step"] for entry in trainer.state.log_history if "eval_reward" in entry]
    assert evals == [0, 1, 2]  # not a second evaluation at the resumed step 1
    assert trainer.args.eval_on_start  # restored after the run


def test_prompts_only_eval_dataset_has_no_data_loss_and_bad_inputs_fail_clearly(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(
        tiny_sd3_path, brightness, args=make_args(tmp_path, eval_num_generations=1), train_dataset=prompt_dataset()
    )
    metrics = trainer.evaluate(eval_dataset(with_images=False))
    assert "eval_data_loss" not in metrics and "eval_diversity" not in metrics  # one sample per prompt: no spread
    assert "eval_rewards/brightness/mean" in metrics
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        trainer.evaluate()
    with pytest.raises(ValueError, match="no 'prompt' column"):
        DDRLTrainer(
            tiny_sd3_path,
            brightness,
            args=make_args(tmp_path),
            train_dataset=prompt_dataset(),
            eval_dataset=Dataset.from_dict({"text": ["a"]}),
        )
    with pytest.raises(ValueError, match="repeat the reward names"):
        DDRLTrainer(
            tiny_sd3_path,
            brightness,
            args=make_args(tmp_path),
            train_dataset=prompt_dataset(),
            eval_reward_funcs=brightness,
        )


def test_shards_cover_every_prompt_once_with_equal_padded_lengths():
    shards = [shard_positions(5, 3, rank) for rank in range(3)]
    assert {len(positions) for positions, _ in shards} == {2}
    real = [p for positions, valid in shards for p, keep in zip(positions, valid) if keep]
    assert real == [0, 1, 2, 3, 4]


def test_eval_use_ema_evaluates_the_ema_weights(tiny_sd3_path, tmp_path):
    # A long EMA memory, so that after training the EMA differs clearly from the raw weights.
    trainer = make_trainer(tiny_sd3_path, tmp_path, ema_iteration_shift=10, eval_use_ema=False)
    trainer.train()
    raw = trainer.evaluate()
    with trainer.ema_weights():
        swapped = trainer.evaluate()
    trainer.args.eval_use_ema = True
    ema = trainer.evaluate()
    with trainer.ema_weights():  # nested: the EMA is already in, evaluate() swaps nothing more
        assert trainer.evaluate()["eval_data_loss"] == ema["eval_data_loss"]
    for key in ("eval_reward", "eval_data_loss", "eval_rewards/contrast/mean"):
        assert ema[key] == swapped[key], key
    assert ema["eval_data_loss"] != raw["eval_data_loss"]
    trainer.args.eval_use_ema = False
    assert trainer.evaluate()["eval_data_loss"] == raw["eval_data_loss"]


def test_eval_guidance_scale_guides_the_evaluation_samples_only(tiny_sd3_path, tmp_path):
    """The authors evaluate with CFG (Cosmos-Predict2.5: 7 / 3 in their convention) and train without."""
    trainer = make_trainer(tiny_sd3_path, tmp_path, eval_guidance_scale=3.0, max_steps=1)
    unguided = make_trainer(tiny_sd3_path, tmp_path / "unguided", max_steps=1).evaluate()
    adapter = trainer.adapter
    scales = []
    guide = adapter.guide

    def recording_guide(uncond, cond, scale=None):
        scales.append(adapter.settings.guidance_scale if scale is None else scale)
        return guide(uncond, cond, scale)

    adapter.guide = recording_guide
    guided = trainer.evaluate()
    assert scales and set(scales) == {3.0}  # every denoiser call of the evaluation is guided with 3
    assert guided["eval_rewards/brightness/mean"] != unguided["eval_rewards/brightness/mean"]
    assert guided["eval_data_loss"] == pytest.approx(unguided["eval_data_loss"])  # the data loss has no CFG
    calls = len(scales)
    trainer.train()
    assert len(scales) == calls and adapter.settings.guidance_scale == 1.0  # rollouts keep guidance_scale = 1


def test_guidance_unconditional_zeros_guides_evaluation_and_rollouts_against_zeroed_text(tmp_path):
    """
    The authors evaluate Cosmos-Predict2.5 with CFG against a zeroed text embedding (`use_negative_prompt = false`);
    `guidance_unconditional="zeros"` gives the transformer that wherever CFG runs, here the evaluation
    (`eval_guidance_scale`) and rollouts with `guidance_scale > 1`.
    """
    from family_checks import mean_pixel
    from tiny_models import tiny_cosmos2_5_pipeline

    from trl_ddrl.rollout import read_prompt_rows

    def cosmos_trainer(name: str, **overrides) -> DDRLTrainer:
        args = make_args(
            tmp_path / name,
            height=32,
            width=32,
            num_frames=5,
            guidance_scale=2.0,
            eval_guidance_scale=3.0,
            eval_num_generations=1,
            per_device_eval_batch_size=2,
            **overrides,
        )
        return DDRLTrainer(
            tiny_cosmos2_5_pipeline(),
            mean_pixel,
            args=args,
            train_dataset=prompt_dataset(),
            eval_dataset=eval_dataset(with_images=False),
        )

    trainer = cosmos_trainer("zeros", guidance_unconditional="zeros")
    seen = []
    trainer.adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].chunk(2)), with_kwargs=True
    )
    zeroed = trainer.evaluate()
    calls = len(seen)
    trainer.rollout.generate(read_prompt_rows(trainer.train_dataset, [0, 0, 0, 0, 1, 1, 1, 1]), 0, trainer.state)
    assert calls and len(seen) > calls  # the evaluation's denoiser calls, then the rollout's
    for uncond, cond in seen:
        assert not uncond.any() and cond.flatten(1).abs().amax(dim=1).gt(0).all()
    negative_prompt = cosmos_trainer("negative_prompt").evaluate()
    key = "eval_rewards/mean_pixel/mean"
    assert np.isfinite(zeroed[key]) and zeroed[key] != negative_prompt[key]


def test_a_failing_eval_judge_is_named_and_a_hanging_one_times_out(tiny_sd3_path, tmp_path, caplog):
    """Issue #29: under drop_group an evaluation reward that raised was left out without a word, and one that hung
    hung the run (no reward_timeout)."""
    import logging
    import threading

    from trl_ddrl.reward_calls import RewardTimeoutError

    def broken_judge(prompts, images, **kwargs):
        raise ConnectionError("judge server down")

    def stuck_judge(prompts, images, **kwargs):
        threading.Event().wait()

    args = make_args(tmp_path, eval_num_generations=2, per_device_eval_batch_size=4, reward_error_policy="drop_group")
    trainer = DDRLTrainer(
        tiny_sd3_path,
        brightness,
        args=args,
        train_dataset=prompt_dataset(),
        eval_dataset=eval_dataset(),
        eval_reward_funcs=[broken_judge],
    )
    logger = logging.getLogger("trl_ddrl")
    propagate, logger.propagate = logger.propagate, True
    try:
        with caplog.at_level(logging.WARNING, logger="trl_ddrl"):
            metrics = trainer.evaluate()
    finally:
        logger.propagate = propagate
    assert np.isfinite(metrics["eval_rewards/brightness/mean"])
    assert metrics.get("eval_rewards/broken_judge/mean") is None
    assert "Evaluation: reward function 'broken_judge' failed on the 4 samples from 'a blue bird'" in caplog.text
    assert "ConnectionError: judge server down" in caplog.text

    trainer = DDRLTrainer(
        tiny_sd3_path,
        brightness,
        args=make_args(tmp_path, eval_num_generations=2, per_device_eval_batch_size=4, reward_timeout=1.0),
        train_dataset=prompt_dataset(),
        eval_dataset=eval_dataset(),
        eval_reward_funcs=[stuck_judge],
    )
    with pytest.raises(RewardTimeoutError, match=r"'stuck_judge' did not return within reward_timeout=1 s"):
        trainer.evaluate()
