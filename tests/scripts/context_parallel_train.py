# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Trains a tiny Wan pipeline for one DDRL step, with or without context parallelism, and writes per rank what the
comparisons of tests/test_parallel.py need: the logged losses, the advantages, how often the reward function ran in
training, the final denoiser weights and the metrics of an evaluation after training. Run it in one process, or
under `accelerate launch` with any number of processes:

    python context_parallel_train.py <output dir> <context_parallel_size> [prompts_per_step] [wan | cosmos2_5]
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tiny_models import tiny_cosmos2_5_pipeline, tiny_wan_pipeline  # noqa: E402

from trl_ddrl import DDRLConfig, DDRLTrainer  # noqa: E402


PIPELINES = {"wan": tiny_wan_pipeline, "cosmos2_5": tiny_cosmos2_5_pipeline}
PROMPTS = ["a red fox", "a blue whale", "a green frog", "a white owl"]


class CountingBrightness:
    """The mean pixel, counting the samples it scored."""

    __name__ = "brightness"

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, images, **kwargs):
        self.calls += len(prompts)
        return images.mean(dim=tuple(range(1, images.ndim))).tolist()


class Recorder(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.iterations = []

    def on_step_end(self, args, state, control, **kwargs):
        buffer = self.trainer._buffer
        # Under context parallelism each rank holds its share of the transitions: the whole, gathered, is compared.
        noise = buffer.initial_noise if buffer.shard is None else buffer.shard.gather(buffer.initial_noise)
        self.iterations.append({"advantages": buffer.advantages.tolist(), "noise": noise.sum().item()})
        samples, steps = buffer.states.shape[:2]
        self.held_states = buffer.states.numel()
        self.whole_states = self.held_states if buffer.shard is None else samples * steps * buffer.shard.numel


def train(
    output_dir: str, context_parallel_size: int = 1, prompts_per_step: int = 2, pipeline: str = "wan"
) -> DDRLTrainer:
    """One DDRL step (rollout, rewards, 4 micro-batches of policy, data and KL terms) with SGD, of `PIPELINES[pipeline]`."""
    args = DDRLConfig(
        output_dir=output_dir,
        num_generations=4,
        prompts_per_step=prompts_per_step,
        num_inference_steps=4,
        per_device_train_batch_size=2,
        height=32,
        width=32,
        num_frames=5,
        max_sequence_length=16,
        optim="sgd",  # the update is proportional to the gradient: a wrong gradient scale shows in the weights
        learning_rate=0.05,
        warmup_steps=0,  # the authors' 50 warm-up steps would leave this one-step run at a learning rate of 0
        eta=1.0,
        data_beta=0.5,
        data_source="base_model",  # the reference model runs (context-parallel) too
        kl_beta=0.1,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        eval_num_generations=2,
        context_parallel_size=context_parallel_size,
    )
    recorder, reward = Recorder(), CountingBrightness()
    trainer = DDRLTrainer(
        PIPELINES[pipeline](),
        reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        callbacks=[recorder],
    )
    recorder.trainer = trainer
    trainer.train()
    rank = trainer.accelerator.process_index
    denoiser = trainer.accelerator.unwrap_model(trainer.model)
    torch.save({key: value.detach().cpu() for key, value in denoiser.state_dict().items()}, f"{output_dir}/{rank}.pt")
    reward_calls = reward.calls
    # Three eval prompts: padded shards over the data-parallel ranks, sampled and scored with fixed noise.
    eval_metrics = trainer.evaluate(Dataset.from_dict({"prompt": PROMPTS[:3]}))
    record = {
        "world_size": trainer.accelerator.num_processes,
        "data_parallel_rank": trainer.mesh.data_parallel_rank,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "iterations": recorder.iterations,
        "held_states": recorder.held_states,
        "whole_states": recorder.whole_states,
        "reward_calls": reward_calls,
        "eval": {key: value for key, value in eval_metrics.items() if not key.endswith("runtime")},
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(record, file)
    return trainer


if __name__ == "__main__":
    train(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2, *sys.argv[4:5])
