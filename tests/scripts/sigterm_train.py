# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Trains a tiny SD3 pipeline for up to 4 steps and sends itself SIGTERM while the third iteration is being scored, as a
Slurm or Kubernetes preemption would. Used by tests/test_faults.py.

    python sigterm_train.py <pipeline dir> <output dir>
"""

import os
import signal
import sys

import torch

from trl_ddrl import DDRLTrainer


sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from test_faults import fault_args, prompt_dataset  # noqa: E402


def main(pipeline_dir: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    calls = []

    def brightness(prompts, images, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return images.mean(dim=(1, 2, 3)).tolist()

    trainer = DDRLTrainer(pipeline_dir, brightness, args=fault_args(output_dir), train_dataset=prompt_dataset(True))
    trainer.train()
    raise AssertionError("train() returned after SIGTERM")


if __name__ == "__main__":
    main(*sys.argv[1:])
