# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Trains a tiny SD3 pipeline, downloaded from the Hub, for 2 steps with `push_to_hub=True` and
`hub_strategy="every_save"`, then calls `trainer.push_to_hub()`; once as a full fine-tune and once as a LoRA. Run by
tests/test_hub.py with `HF_ENDPOINT` pointing at the in-memory hub of tests/hub_server.py.

    python hub_push.py <base repo id> <output root>
"""

import os
import sys

from datasets import Dataset
from peft import LoraConfig

from trl_ddrl import DDRLConfig, DDRLTrainer


# Gaussian init: the adapter changes the samples from the first step on, so the test can tell it was loaded.
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")


def train_and_push(base_repo: str, output_dir: str, hub_model_id: str, lora: bool) -> None:
    args = DDRLConfig(
        output_dir=output_dir,
        push_to_hub=True,
        hub_model_id=hub_model_id,
        hub_strategy="every_save",
        save_strategy="steps",
        save_steps=1,
        max_steps=2,
        num_generations=4,
        prompts_per_step=2,
        num_inference_steps=4,
        per_device_train_batch_size=8,
        max_sequence_length=16,
        learning_rate=1e-3,
        warmup_steps=0,  # the default 50-step warm-up starts at lr 0: a 2-step run would barely move
        data_beta=0.0,
        ema_iteration_shift=10,  # a long EMA memory, so that the pushed EMA weights differ clearly from the raw ones
        report_to="none",
        disable_tqdm=True,
    )
    trainer = DDRLTrainer(
        model=base_repo,
        reward_funcs="brightness",
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog", "a red car", "a tree"]}),
        peft_config=LORA if lora else None,
    )
    trainer.train()
    commit = trainer.push_to_hub()
    print(f"{hub_model_id}: {commit.commit_url}", flush=True)


def main(base_repo: str, output_root: str) -> None:
    train_and_push(base_repo, os.path.join(output_root, "full"), "tester/ddrl-tiny", lora=False)
    train_and_push(base_repo, os.path.join(output_root, "lora"), "tester/ddrl-tiny-lora", lora=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
