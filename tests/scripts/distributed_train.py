# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Trains a tiny SD3 pipeline for 2 steps under `accelerate launch` and writes, per rank, a fingerprint of the weights
after every step plus the rewards and advantages it saw, and the metrics of a final `evaluate()` on `EVAL_DATASET`
(3 prompts with images: the ranks hold 2 and 1 + padding). Used by tests/test_distributed.py.

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


def main(pipeline_dir: str, output_dir: str, deepspeed: str | None = None) -> None:
    args = DDRLConfig(
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
        save_strategy="steps" if "SIGTERM_RANK" in os.environ else "no",
        save_steps=100,
        disable_tqdm=True,
        deepspeed=deepspeed,
        **EVAL_SETTINGS,
    )
    fingerprint = Fingerprint()
    trainer = DDRLTrainer(
        pipeline_dir,
        brightness,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog"]}),
        callbacks=[fingerprint],
        eval_dataset=eval_dataset(),
    )
    fingerprint.trainer = trainer
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    rank = trainer.accelerator.process_index
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        record = {"world_size": trainer.accelerator.num_processes, "records": fingerprint.records, "eval": metrics}
        json.dump(record, file)


if __name__ == "__main__":
    main(*sys.argv[1:])
