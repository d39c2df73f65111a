# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Trains a tiny Wan 2.2 A14B-style pipeline (two experts) for 2 steps under `accelerate launch` with micro-batches of
one transition, so that every micro-batch runs one expert only and the other expert's parameters get no gradient in
it; writes each rank's sums of both experts' weights before and after, then saves the whole pipeline into the output
dir. Used by tests/test_distributed.py.

    python wan22_experts_train.py <train_experts> <output dir> [deepspeed json]
"""

import json
import os
import sys

import numpy as np
from datasets import Dataset


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_models import tiny_wan22_pipeline  # noqa: E402

from trl_ddrl import DDRLConfig, DDRLTrainer  # noqa: E402


EXPERTS = ("transformer", "transformer_2")


def brightness(prompts, images, **kwargs):
    return images.float().mean(dim=tuple(range(1, images.ndim))).tolist()


def weight_sums(pipeline) -> dict[str, float]:
    return {name: sum(p.double().sum().item() for p in getattr(pipeline, name).parameters()) for name in EXPERTS}


def main() -> None:
    train_experts, output_dir = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    prompts = ["a cat", "a dog", "a red car", "a tree"]
    videos = [rng.random((5, 32, 32, 3), dtype=np.float32) for _ in prompts]
    pipeline = tiny_wan22_pipeline()
    args = DDRLConfig(
        output_dir=output_dir,
        num_generations=2,
        prompts_per_step=2,
        num_inference_steps=3,
        per_device_train_batch_size=1,
        train_timesteps=[0, 1],  # step 0 is the high-noise expert's, step 1 the low-noise expert's
        train_experts=train_experts,
        eta=1.0,
        data_beta=0.1,
        learning_rate=1e-3,
        warmup_steps=0,
        max_steps=2,
        max_sequence_length=16,
        height=32,
        width=32,
        num_frames=5,
        report_to="none",
        save_strategy="no",
        seed=0,
        deepspeed=sys.argv[3] if len(sys.argv) > 3 else None,
    )
    trainer = DDRLTrainer(
        pipeline, brightness, args=args, train_dataset=Dataset.from_dict({"prompt": prompts, "image": videos})
    )
    before = weight_sums(pipeline)
    trainer.train()
    # Under ZeRO-3 the weights in the pipeline are this rank's shards; the saved pipeline holds the full ones.
    record = {"world_size": trainer.accelerator.num_processes, "before": before, "after": weight_sums(pipeline)}
    trainer.save_model()
    with open(os.path.join(output_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as file:
        json.dump(record, file)


if __name__ == "__main__":
    main()
