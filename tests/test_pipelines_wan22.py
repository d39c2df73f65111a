# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Wan 2.2 A14B's two experts (`transformer` for high noise, `transformer_2` for low noise) on a tiny random pipeline."""

import json
import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import FlowMatchEulerDiscreteScheduler
from family_checks import (
    CPU,
    PROMPTS,
    assert_lora_loads_into_a_fresh_pipeline,
    assert_reloaded_pipeline_has_the_trained_weights,
    changed_components,
    lora_config,
    module_states,
    train_one_step,
)
from test_pipelines_flow import assert_replay_ratio_is_one
from test_pipelines_unet import ddrl_config
from test_pipelines_wan import image_to_video_latents
from tiny_models import tiny_wan22_i2v_pipeline, tiny_wan22_pipeline, tiny_wan_pipeline

from trl_ddrl import DDRLConfig, DDRLTrainer
from trl_ddrl.pipelines import SamplingSettings, get_adapter
from trl_ddrl.pipelines.experts import TimestepExperts


# 32x32 5-frame videos, [4, 2, 4, 4] latents; with 3 steps the timesteps are 1000 (high-noise expert), 857, 600.
SIZE = dict(max_sequence_length=16, height=32, width=32, num_frames=5)


def settings(**overrides) -> SamplingSettings:
    return SamplingSettings(**{"num_inference_steps": 3, "eta": 1.0, **SIZE, **overrides})


def video_rows() -> dict:
    rng = np.random.default_rng(0)
    return {"prompt": PROMPTS, "image": [rng.random((5, 32, 32, 3), dtype=np.float32) for _ in PROMPTS]}


def train(pipeline, tmp_path, **config) -> DDRLTrainer:
    # Both stochastic steps trained (the default fraction 0.5 trains step 0 only): step 0 high-noise, step 1 low.
    return train_one_step(pipeline, tmp_path, video_rows(), **{"train_timesteps": [0, 1], **SIZE, **config})


@pytest.mark.parametrize("guidance_scale, guidance_scale_2", [(1.0, None), (3.0, None), (4.0, 2.0)])
def test_deterministic_sampling_matches_the_pipeline(guidance_scale, guidance_scale_2):
    pipeline = tiny_wan22_pipeline()
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    guidance = dict(guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2)
    adapter = get_adapter(pipeline, settings(eta=0.0, **guidance))
    assert isinstance(adapter.denoiser, TimestepExperts) and adapter.denoiser.boundary_timestep == 900.0
    noise = adapter.sample_noise(2, torch.Generator().manual_seed(0))
    ours = adapter.sample(adapter.denoiser, adapter.encode_prompts(PROMPTS, CPU), noise).latents[:, -1]
    theirs = pipeline(
        PROMPTS,
        num_inference_steps=3,
        latents=noise,
        output_type="latent",
        **guidance,
        **SIZE,
    ).frames
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # Not what the high-noise expert alone gives: the low-noise one computed the later steps.
    high_only = adapter.sample(pipeline.transformer, adapter.encode_prompts(PROMPTS, CPU), noise).latents[:, -1]
    assert not torch.allclose(ours, high_only, atol=1e-3)


def test_image_to_video_deterministic_sampling_matches_the_pipeline():
    """Wan 2.2 I2V A14B's form: both experts take the latents with the first-frame mask and image-video latents."""
    pipeline = tiny_wan22_i2v_pipeline()
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    guidance = dict(guidance_scale=4.0, guidance_scale_2=2.0)
    adapter = get_adapter(pipeline, settings(eta=0.0, **guidance))
    ours, theirs = image_to_video_latents(pipeline, adapter, **guidance)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_mixed_batch_gives_each_row_its_experts_output_and_gradient():
    pipeline = tiny_wan22_pipeline()
    experts = get_adapter(pipeline, settings()).denoiser
    latents = torch.randn(3, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([950.0, 600.0, 900.0])  # high, low, high (the boundary itself is high, as in diffusers)
    output = experts(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds)[0]
    for row, expert in enumerate([pipeline.transformer, pipeline.transformer_2, pipeline.transformer]):
        alone = expert(
            hidden_states=latents[row : row + 1],
            timestep=timestep[row : row + 1],
            encoder_hidden_states=embeds[row : row + 1],
            return_dict=False,
        )[0]
        torch.testing.assert_close(output[row : row + 1], alone, atol=1e-6, rtol=1e-5)
    output[1].sum().backward()  # the low-noise row only
    assert pipeline.transformer_2.proj_out.weight.grad.abs().sum() > 0
    assert pipeline.transformer.proj_out.weight.grad is None or not pipeline.transformer.proj_out.weight.grad.any()


def test_denoiser_parts_split_the_state_dict_by_expert():
    from trl_ddrl.pipelines.experts import denoiser_parts

    pipeline = tiny_wan22_pipeline()
    experts = get_adapter(pipeline, settings(train_experts="low_noise")).denoiser
    state = {key: value + 1 for key, value in experts.state_dict().items()}  # stands for the gathered weights
    trained = denoiser_parts(experts, "transformer", state)
    assert list(trained) == ["transformer_2"] and trained["transformer_2"][0] is pipeline.transformer_2
    every = denoiser_parts(experts, "transformer", state, frozen_too=True)
    assert list(every) == ["transformer_2", "transformer"]
    for name, (module, part) in every.items():
        assert part.keys() == module.state_dict().keys()
        assert all(torch.equal(part[key], state[f"{name}.{key}"]) for key in part)
    single = pipeline.transformer
    assert denoiser_parts(single, "transformer", {"w": torch.ones(1)}, frozen_too=True) == {
        "transformer": (single, {"w": torch.ones(1)})
    }


def test_on_policy_ratio_is_one():
    adapter = get_adapter(tiny_wan22_pipeline(), settings())
    assert_replay_ratio_is_one(adapter, adapter.encode_prompts(PROMPTS, CPU))


def test_training_both_experts_changes_both_and_reloads(tmp_path):
    pipeline = tiny_wan22_pipeline()
    before = module_states(pipeline)
    trainer = train(pipeline, tmp_path)
    assert changed_components(pipeline, before) == {"transformer", "transformer_2"}
    assert sorted({name.split(".")[0] for name in trainer.ema.names}) == ["transformer", "transformer_2"]
    assert_reloaded_pipeline_has_the_trained_weights(trainer, ("transformer", "transformer_2"))
    with open(os.path.join(trainer.args.output_dir, "model_index.json")) as file:
        assert json.load(file)["boundary_ratio"] == 0.9


@pytest.mark.parametrize(
    "choice, trained, frozen, steps",
    [
        ("high_noise", "transformer", "transformer_2", [0]),
        ("low_noise", "transformer_2", "transformer", [1]),
    ],
)
def test_training_one_expert_freezes_the_other_and_its_steps(choice, trained, frozen, steps, tmp_path):
    pipeline = tiny_wan22_pipeline()
    before = module_states(pipeline)
    # kl_beta > 0: a reference model, which copies the trained expert only (the frozen one is shared).
    trainer = train(pipeline, tmp_path, train_experts=choice, kl_beta=0.1, save_strategy="steps", save_steps=1)
    assert changed_components(pipeline, before) == {trained}
    assert trainer.args.train_timesteps == steps and trainer.args.steps_per_generation == 2
    assert getattr(trainer.ref_model, frozen) is getattr(pipeline, frozen)
    assert getattr(trainer.ref_model, trained) is not getattr(pipeline, trained)
    assert {name.split(".")[0] for name in trainer.ema.names} == {trained}
    # Checkpoints hold the trained expert only; the final save the whole pipeline.
    assert sorted(os.listdir(tmp_path / "checkpoint-1")).count(trained) == 1
    assert not os.path.exists(tmp_path / "checkpoint-1" / frozen)
    assert_reloaded_pipeline_has_the_trained_weights(trainer, ("transformer", "transformer_2"))


def test_resume_restores_the_trained_experts(tmp_path):
    first = train(tiny_wan22_pipeline(), tmp_path, save_strategy="steps", save_steps=1, use_ema=False)
    resumed = DDRLTrainer(
        tiny_wan22_pipeline(),
        lambda prompts, images, **kwargs: [0.0] * len(prompts),
        args=ddrl_config(tmp_path, max_steps=1, train_timesteps=[0, 1], use_ema=False, **SIZE),
        train_dataset=Dataset.from_dict(video_rows()),
    )
    resumed._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    for name in ("transformer", "transformer_2"):
        expected = getattr(first.pipeline, name).state_dict()
        for key, value in getattr(resumed.pipeline, name).state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}.{key}"


@pytest.mark.parametrize("choice", ["all", "low_noise"])
def test_lora_loads_with_load_lora_weights_into_the_trained_experts(choice, tmp_path):
    trainer = train(
        tiny_wan22_pipeline(), tmp_path, peft_config=lora_config(), learning_rate=1e-2, train_experts=choice
    )
    expected = {
        "all": ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_transformer_2.safetensors"],
        "low_noise": ["pytorch_lora_weights_transformer_2.safetensors"],
    }[choice]

    def load(pipeline, folder):
        assert sorted(name for name in os.listdir(folder) if name.startswith("pytorch_lora_weights")) == expected
        if choice == "all":
            pipeline.load_lora_weights(folder)
        pipeline.load_lora_weights(
            folder, weight_name="pytorch_lora_weights_transformer_2.safetensors", load_into_transformer_2=True
        )

    def conditioning_for(adapter):
        return adapter.encode_prompts(PROMPTS, CPU)

    assert_lora_loads_into_a_fresh_pipeline(trainer, tiny_wan22_pipeline, conditioning_for, load)
    quick_start = (tmp_path / "README.md").read_text()
    assert quick_start.count("pipe.load_lora_weights(") == len(expected)
    assert 'weight_name="pytorch_lora_weights_transformer_2.safetensors", load_into_transformer_2=True)' in quick_start


def test_expert_choices_are_checked():
    with pytest.raises(ValueError, match="train_experts='middle' is not valid"):
        DDRLConfig(output_dir="unused", train_experts="middle", report_to="none")
    with pytest.raises(ValueError, match="train_experts='low_noise' picks one expert .* has a single denoiser"):
        get_adapter(tiny_wan_pipeline(), settings(train_experts="low_noise"))
    with pytest.raises(ValueError, match="guidance_scale_2=3.0 is the CFG scale of the low-noise expert"):
        get_adapter(tiny_wan_pipeline(), settings(guidance_scale=4.0, guidance_scale_2=3.0))
    pipeline = tiny_wan22_pipeline()
    pipeline.register_to_config(boundary_ratio=None)
    with pytest.raises(ValueError, match="no boundary_ratio"):
        get_adapter(pipeline, settings())


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(train_timesteps=[0]), r"None of train_timesteps=\[0\] is a step that train_experts='low_noise' trains"),
        (dict(train_timestep_selection="random"), "draws from every sampling step"),
        (dict(sde_window_size=1, sde_window_range=[0, 2]), r"sde_window_range=\[0, 2\] reaches outside steps 1 .. 1"),
    ],
)
def test_steps_outside_the_trained_expert_are_refused(config, message, tmp_path):
    args = ddrl_config(tmp_path, train_experts="low_noise", **SIZE, **config)
    with pytest.raises(ValueError, match=message):
        DDRLTrainer(
            tiny_wan22_pipeline(),
            lambda prompts, images, **kwargs: [0.0] * len(prompts),
            args=args,
            train_dataset=Dataset.from_dict(video_rows()),
        )


def test_an_sde_window_defaults_to_the_trained_experts_steps(tmp_path):
    args = ddrl_config(tmp_path, train_experts="high_noise", sde_window_size=1, per_device_train_batch_size=1, **SIZE)
    trainer = DDRLTrainer(
        tiny_wan22_pipeline(),
        lambda prompts, images, **kwargs: [0.0] * len(prompts),
        args=args,
        train_dataset=Dataset.from_dict(video_rows()),
    )
    assert trainer.args.sde_window_range == [0, 1]
