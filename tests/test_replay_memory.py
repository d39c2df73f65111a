# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The replay's memory: what one training micro-batch keeps alive beside the persistent state (CPU, real tensors)."""

import numpy as np
import pytest
from datasets import Dataset
from tiny_models import tiny_sd3_pipeline

from trl_ddrl import DDRLConfig, DDRLTrainer
from trl_ddrl.memory import LiveBytes


def brightness(prompts, images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def replay_peaks(tmp_path, **overrides) -> list[int]:
    """
    Train one optimizer step of several micro-batches (full fine-tuning, data term in every micro-batch) and return
    the peak bytes allocated during each micro-batch's training step (the first one's includes the rollout; tensors
    that existed before a step, the weights and the gradients of earlier micro-batches, are not counted).
    """
    rng = np.random.default_rng(0)
    dataset = Dataset.from_dict(
        {"prompt": ["a cat", "a dog"], "image": [rng.random((16, 16, 3), dtype=np.float32) for _ in range(2)]}
    )
    settings = dict(
        output_dir=str(tmp_path),
        num_generations=2,
        prompts_per_step=1,
        num_inference_steps=4,
        per_device_train_batch_size=2,
        max_steps=1,
        max_sequence_length=8,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_beta=0.5,
        warmup_steps=0,
        use_ema=False,
        activation_checkpointing=False,
    )
    settings.update(overrides)
    args = DDRLConfig(**settings)
    pipeline = tiny_sd3_pipeline(num_layers=2, num_heads=8, head_dim=16, with_t5=False)
    trainer = DDRLTrainer(pipeline, brightness, args=args, train_dataset=dataset)
    assert args.gradient_accumulation_steps >= 2, args.gradient_accumulation_steps
    peaks: list[int] = []
    training_step = trainer.training_step

    def counted_training_step(*args, **kwargs):
        counter = LiveBytes(fake=False)
        # What exists before the step (weights, the gradients of earlier micro-batches), so that an operation's output
        # that is one of them (a view of a weight, a gradient accumulated in place) is not counted as allocated.
        for tensor in [*trainer.model.parameters(), *trainer.model.buffers()]:
            counter.register(tensor, "before")
            if tensor.grad is not None:
                counter.register(tensor.grad, "before")
        with counter, counter.window() as window:
            loss = training_step(*args, **kwargs)
        peaks.append(int(window.peak - counter.weighted(window.start)))
        return loss

    trainer.training_step = counted_training_step
    trainer.train()
    return peaks


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_the_data_term_adds_no_memory_to_the_replay(tmp_path, activation_checkpointing):
    # One backward of policy + data term keeps both forwards' activations, and autograd holds the data branch's
    # gradient of every weight until the policy branch's backward reaches it: a second copy once `.grad` exists (the
    # second micro-batch). Backpropagated first and apart, the data term costs no more than the policy term.
    without = replay_peaks(tmp_path / "without", activation_checkpointing=activation_checkpointing, data_beta=0.0)
    separate = replay_peaks(tmp_path / "separate", activation_checkpointing=activation_checkpointing)
    joint = replay_peaks(
        tmp_path / "joint", activation_checkpointing=activation_checkpointing, separate_data_backward=False
    )
    assert len(without) == len(separate) == len(joint) >= 2
    assert separate[1] <= 1.05 * without[1], (separate, without)
    assert joint[1] > 1.1 * without[1], (joint, without)  # the test can see the difference
