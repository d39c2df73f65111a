# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Trains a tiny SD3 pipeline for 2 steps under `accelerate launch` and writes, per rank, a fingerprint of the weights
after every step plus the rewards and advantages it saw, and the metrics of a final `evaluate()` on `EVAL_DATASET`
(3 prompts with images: the ranks hold 2 and 1 + padding), and of the EMA (this rank's part of it); then resumes a
second trainer from the step-1 checkpoint and records how far its EMA ends from the first run's. Used by
tests/test_distributed.py.

    python distributed_train.py <pipeline dir> <output dir> [deepspeed json]

With `SIGTERM_RANK=<rank>` set, that rank alone sends itself SIGTERM while the first iteration is scored: every rank
must then save `checkpoint-1` together and exit with status 143.
"""

import json
import os
import signal
import sys

import numpy as np
import torch
from datasets import Dataset
from transformers import TrainerCallback

from trl_ddrl import DDRLConfig, DDRLTrainer
from trl_ddrl.ema import _local_tensor


def brightness(prompts, images, **kwargs):
    if (
        "SIGTERM_RANK" in os.environ
        and os.environ["SIGTERM_RANK"] == os.environ.get("RANK")
        and not brightness.signalled
    ):
        brightness.signalled = True
        os.kill(os.getpid(), signal.SIGTERM)
    return images.mean(dim=(1, 2, 3)).tolist()


brightness.signalled = False


def eval_dataset() -> Dataset:
    rng = np.random.default_rng(3)
    prompts = ["a blue bird", "a house", "a red car"]
    return Dataset.from_dict(
        {"prompt": prompts, "image": [rng.random((16, 16, 3), dtype=np.float32) for _ in prompts]}
    )


EVAL_SETTINGS = {"eval_num_generations": 2, "per_device_eval_batch_size": 2}


class Fingerprint(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.records = []

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        weights = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        buffer = self.trainer._buffer
        self.records.append(
            {
                "step": state.global_step,
                "weight_sum": weights.double().sum().item(),
                "weight_abs_sum": weights.double().abs().sum().item(),
                "advantages": buffer.advantages.tolist(),
            }
        )


def ema_fingerprint(trainer: DDRLTrainer) -> dict:
    ema = trainer.ema
    return {
        "sharded": ema.sharded,
        "numel": sum(tensor.numel() for tensor in ema.shadow),
        # ZeRO-3 leaves empty placeholders in the parameters; `ds_numel` is the full size.
        "trainable_numel": sum(getattr(parameter, "ds_numel", parameter.numel()) for parameter in ema.parameters),
        "sum": sum(tensor.double().sum().item() for tensor in ema.shadow),
        "raw_sum": sum(_local_tensor(parameter).double().sum().item() for parameter in ema.parameters),
        "updates": ema.optimization_step,
        "names": ema.names,
    }


def main(pipeline_dir: str, output_dir: str, deepspeed: str | None = None) -> None:
    settings = dict(
        output_dir=output_dir,
        num_generations=4,
        prompts_per_step=1,  # one group of 4 samples, split over the processes
        num_inference_steps=4,
        per_device_train_batch_size=2,
        max_steps=2,
        max_sequence_length=16,
        learning_rate=1e-3,
        data_beta=0.0,
        report_to="none",
        save_strategy="steps",
        save_steps=100 if "SIGTERM_RANK" in os.environ else 1,  # SIGTERM: only the checkpoint the signal saves
        ema_iteration_shift=10,  # a long EMA memory: the EMA differs clearly from the raw weights
        disable_tqdm=True,
        deepspeed=deepspeed,
        **EVAL_SETTINGS,
    )
    dataset = Dataset.from_dict({"prompt": ["a cat", "a dog"]})
    fingerprint = Fingerprint()
    trainer = DDRLTrainer(
        pipeline_dir,
        brightness,
        args=DDRLConfig(**settings),
        train_dataset=dataset,
        callbacks=[fingerprint],
        eval_dataset=eval_dataset(),
    )
    fingerprint.trainer = trainer
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    ema = ema_fingerprint(trainer)
    first_ema = [tensor.clone() for tensor in trainer.ema.shadow]

    # Resume from the step-1 checkpoint (weights and this rank's EMA shard) and train step 2 again.
    settings["output_dir"] = os.path.join(output_dir, "resumed")
    resumed = DDRLTrainer(
        pipeline_dir, brightness, args=DDRLConfig(**settings), train_dataset=dataset, eval_dataset=eval_dataset()
    )
    resumed.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-1"))
    resumed_max_diff = max(
        (mine - theirs).abs().max().item() for mine, theirs in zip(resumed.ema.shadow, first_ema, strict=True)
    )
    rank = trainer.accelerator.process_index
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(
            {
                "world_size": trainer.accelerator.num_processes,
                "fsdp": trainer.is_fsdp_enabled,
                "records": fingerprint.records,
                "eval": metrics,
                "ema": ema,
                "resumed_ema_max_diff": resumed_max_diff,
                "resumed_ema_updates": resumed.ema.optimization_step,
            },
            file,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
