# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Where the rollout's big tensors live after it (trl_ddrl/rollout.py): decoded samples, logged copies."""

import gc

import numpy as np
import pytest
import torch
from test_trainer import brightness, make_args, prompt_dataset
from transformers import TrainerState

from trl_ddrl import DDRLTrainer
from trl_ddrl.rollout import LAST_IMAGES, read_prompt_rows
from trl_ddrl.utils import image_grid, to_uint8


def decoded_floats(shape: tuple[int, ...], before: frozenset[int] = frozenset()) -> list[torch.Tensor]:
    """
    Every live floating-point tensor whose trailing dimensions are a decoded sample's `shape`, except those whose ids
    are in `before` (alive before the rollout: other tests of the same process may hold such tensors).
    """
    gc.collect()
    return [
        value
        for value in gc.get_objects()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and tuple(value.shape[-3:]) == shape
        and id(value) not in before
    ]


@pytest.fixture
def trainer(tiny_sd3_path, tmp_path):
    args = make_args(tmp_path, log_samples_steps=50, max_steps=100, num_samples_to_log=4)
    return DDRLTrainer(tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset())


def test_no_decoded_sample_outlives_the_rollout_and_logged_copies_are_uint8_on_logging_steps(trainer):
    rows = read_prompt_rows(trainer.train_dataset, [0] * 4 + [1] * 4)
    sample_shape = (3, 16, 16)
    alive = frozenset(map(id, decoded_floats(sample_shape)))
    assert trainer.rollout.samples_to_keep(TrainerState(global_step=0, max_steps=100)) == 0  # serves step 1
    buffer = trainer.rollout.generate(rows, 0, TrainerState(global_step=0, max_steps=100))
    assert decoded_floats(sample_shape, alive) == []  # scored, then dropped
    assert trainer.rollout.last_images is None and trainer.rollout.last_samples is None

    buffer = trainer.rollout.generate(rows, 1, TrainerState(global_step=49, max_steps=100))  # serves step 50: logs
    assert decoded_floats(sample_shape, alive) == []
    images, samples = trainer.rollout.last_images, trainer.rollout.last_samples
    assert images.dtype == samples.images.dtype == torch.uint8 and images.device.type == "cpu"
    assert images.shape == (8, *sample_shape) and samples.images.shape == (4, *sample_shape)
    # Copies of their own: no view keeps a larger (full-batch) storage alive.
    assert images.untyped_storage().nbytes() == images.nbytes
    assert samples.images.untyped_storage().nbytes() == samples.images.nbytes
    assert buffer.states.shape[0] == 8


def test_samples_are_kept_for_logging_saving_and_the_last_step(trainer):
    keep = trainer.rollout.samples_to_keep
    assert keep(TrainerState(global_step=3, max_steps=100)) == 0
    assert keep(TrainerState(global_step=99, max_steps=100)) == max(LAST_IMAGES, 4)  # the last step: final save
    trainer.args.save_strategy = "steps"
    assert keep(TrainerState(global_step=6, max_steps=100, save_steps=7)) == LAST_IMAGES
    trainer.args.log_samples_steps = 0
    trainer.args.save_strategy = "no"
    assert keep(TrainerState(global_step=49, max_steps=100)) == 0


def test_grids_of_uint8_copies_are_the_grids_of_the_floats():
    images = torch.rand(5, 3, 7, 9)
    assert np.array_equal(np.asarray(image_grid(to_uint8(images))), np.asarray(image_grid(images)))


def test_the_buffer_keeps_the_trained_transitions_only_and_offloading_changes_no_value(trainer):
    rows = read_prompt_rows(trainer.train_dataset, [0] * 4 + [1] * 4)
    buffer = trainer.rollout.generate(rows, 0, TrainerState(global_step=0, max_steps=100))
    transitions = {name: getattr(buffer, name) for name in ("states", "next_states", "old_means", "initial_noise")}
    for name, tensor in transitions.items():
        # Each its own storage: no view keeps the whole trajectory [S, T + 1, ...] alive.
        assert tensor.untyped_storage().nbytes() == tensor.nbytes, name
    assert buffer.states.shape[:2] == (8, len(buffer.step_indices)) and buffer.device is None

    trainer.args.offload_trajectories = True
    offloaded = trainer.rollout.generate(rows, 0, TrainerState(global_step=0, max_steps=100))
    assert offloaded.device == trainer.accelerator.device
    assert all(getattr(offloaded, name).device.type == "cpu" for name in transitions)
    assert not offloaded.states.is_pinned()  # pinned only when CUDA is available
    size = trainer.args.per_device_train_batch_size
    for index in range(len(buffer.order) // size):
        expected, got = buffer.micro_batch(index, size), offloaded.micro_batch(index, size)
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value) and got[key].device == value.device, key
