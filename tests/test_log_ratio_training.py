# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The trainer's clip decisions at high noise equal those of a float64 log-ratio, off-policy as well as on-policy."""

from dataclasses import replace

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from test_trainer import brightness, make_args, prompt_dataset

import trl_ddrl.trainer as trainer_module
from trl_ddrl import DDRLTrainer
from trl_ddrl.sampling import edm_squared_distance_log_prob, log_ratio_weight


def float64_log_ratio(step, old_mean, form) -> torch.Tensor:
    x, mean, old = step.prev_sample.double(), step.mean.detach().double(), old_mean.double()
    distance = ((x - mean) ** 2 - (x - old) ** 2).flatten(1).mean(dim=1)
    return -log_ratio_weight(step, form).double() * distance


def clipped(ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    advantages = advantages.to(ratio.dtype)
    return -advantages * ratio.clamp(1 - clip_range, 1 + clip_range) > -advantages * ratio


def record_clip_decisions(trainer, monkeypatch, perturbation: float = 0.0) -> list[dict]:
    """Record, for every micro-batch, the trainer's clip flags and the float64 reference's (and the old way's)."""
    calls = []
    exact_log_ratio, policy_loss = trainer_module.transition_log_ratio, trainer_module.clipped_policy_loss

    def recording_log_ratio(step, old_mean, form):
        calls.append(
            {
                "reference": float64_log_ratio(step, old_mean, form),
                "old_way": (
                    edm_squared_distance_log_prob(step.prev_sample, step.mean.detach(), step.edm_scale)
                    - edm_squared_distance_log_prob(step.prev_sample, old_mean, step.edm_scale)
                ),
            }
        )
        return exact_log_ratio(step, old_mean, form)

    def recording_policy_loss(log_ratio, advantages, clip_range):
        loss, ratio, is_clipped = policy_loss(log_ratio, advantages, clip_range)
        call = calls[-1]
        call["trainer"] = is_clipped
        call["float64"] = clipped(call.pop("reference").exp(), advantages, clip_range)
        call["old"] = clipped(call.pop("old_way").exp(), advantages, clip_range)
        return loss, ratio, is_clipped

    monkeypatch.setattr(trainer_module, "transition_log_ratio", recording_log_ratio)
    monkeypatch.setattr(trainer_module, "clipped_policy_loss", recording_policy_loss)
    if perturbation:
        # A GPU replay is not bit-identical to its rollout (other batch composition, bf16 kernels).
        replay = trainer.adapter.transition_log_prob

        def perturbed(*args, **kwargs):
            step = replay(*args, **kwargs)
            return replace(step, mean=step.mean * (1 + perturbation))

        monkeypatch.setattr(trainer.adapter, "transition_log_prob", perturbed)
    return calls


def high_noise_pipeline(path):
    """The tiny SD3 with a schedule shifted towards high noise: EDM sigmas of 100-300 on the first steps."""
    pipeline = DiffusionPipeline.from_pretrained(path)
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config, shift=100.0)
    return pipeline


@pytest.mark.parametrize(
    "case",
    [
        dict(perturbation=1e-6, clip_range=2e-3),
        dict(num_iterations=2, learning_rate=1e-6, max_steps=2),
    ],
)
def test_clip_fraction_equals_the_float64_references(tiny_sd3_path, tmp_path, monkeypatch, case):
    case = dict(case)
    perturbation = case.pop("perturbation", 0.0)
    args = make_args(tmp_path, per_device_train_batch_size=4, **{"max_steps": 1, **case})
    trainer = DDRLTrainer(high_noise_pipeline(tiny_sd3_path), brightness, args=args, train_dataset=prompt_dataset())
    calls = record_clip_decisions(trainer, monkeypatch, perturbation)
    trainer.train()
    trainer_flags = torch.cat([call["trainer"] for call in calls])
    reference = torch.cat([call["float64"] for call in calls])
    old = torch.cat([call["old"] for call in calls])
    assert torch.equal(trainer_flags, reference)
    assert 0 < reference.float().mean() < 1
    assert not torch.equal(old, reference)  # subtracting two float32 scores clips others
