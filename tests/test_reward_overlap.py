# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Reward scoring beside the sampling: the default rollout chunks, and which rewards they are for."""

import threading

import pytest
import torch
from test_trainer import make_args, prompt_dataset
from tiny_models import tiny_sd3_pipeline
from torch import nn

from trl_ddrl import DDRLTrainer
from trl_ddrl.rewards import RemoteReward, get_reward_function
from trl_ddrl.rollout_plan import default_rollout_chunk, overlaps_sampling


def test_default_chunk_halves_the_batch_only_for_costly_rewards():
    assert default_rollout_chunk(8, overlap=True) == 4
    assert default_rollout_chunk(7, overlap=True) == 4
    assert default_rollout_chunk(1, overlap=True) == 1
    assert default_rollout_chunk(8, overlap=False) == 8
    assert overlaps_sampling(nn.Linear(1, 1)) and overlaps_sampling(RemoteReward("http://127.0.0.1:1"))
    assert not overlaps_sampling(get_reward_function("brightness"))


class RecordingReward(nn.Module):
    """Brightness, recording each call's batch size and thread."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, prompts, images, **kwargs):
        self.calls.append((len(prompts), threading.current_thread().name))
        return images.float().mean(dim=(1, 2, 3)).tolist()


def test_reward_models_are_scored_per_half_in_the_background(tmp_path):
    reward = RecordingReward()
    args = make_args(tmp_path, max_steps=1, num_inference_steps=2, data_beta=0.0)
    trainer = DDRLTrainer(tiny_sd3_pipeline(with_t5=False), reward, args=args, train_dataset=prompt_dataset())
    trainer.train()
    samples = args.prompts_per_step * args.num_generations
    assert [size for size, _ in reward.calls] == [samples // 2, samples // 2]
    assert all(thread.startswith("ddrl-reward") for _, thread in reward.calls)
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["reward"]))


def test_reward_placement_copies_to_the_reward_device_without_a_stream():
    from trl_ddrl.rollout import images_ready, reward_placement

    images = torch.rand(2, 3, 4, 4)
    assert images_ready(images) is None  # CPU: nothing to wait for
    with reward_placement(images, torch.device("cpu"), None, None) as placed:
        assert placed is images
    with reward_placement(images, torch.device("meta"), None, None) as placed:
        assert placed.device.type == "meta" and placed.shape == images.shape


def test_reward_device_places_reward_models_and_is_checked(tmp_path):
    reward = RecordingReward()
    args = make_args(tmp_path, max_steps=1, num_inference_steps=2, data_beta=0.0, reward_device="cpu")
    trainer = DDRLTrainer(tiny_sd3_pipeline(with_t5=False), reward, args=args, train_dataset=prompt_dataset())
    assert trainer.rollout.reward_device == torch.device("cpu") and trainer.rollout.reward_stream is None
    trainer.train()
    assert len(reward.calls) == 2
    with pytest.raises(ValueError, match="reward_device='gpu1' is not a device"):
        make_args(tmp_path, reward_device="gpu1")
