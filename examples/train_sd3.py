# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
DDRL on Stable Diffusion 3.5 Medium: reward a prompt set, regularised by the flow-matching loss on image-caption data.

Settings follow the DDRL paper (groups of 8, 20 sampling steps, every other step trained, `data_beta=0.01`, lr 1e-5
with 50 warm-up steps, no reverse KL), except `--guidance_scale 4.5`: SD3.5 samples poorly without classifier-free
guidance (Flow-GRPO trains SD3.5-M with 4.5); `--guidance_scale 1` is the paper's no-CFG setting at half the cost.
The weights load in bfloat16 (`--no_bf16` for float32). SD3.5 is a gated model: accept its licence on its Hub page and
log in first (`hf auth login`, or `HF_TOKEN`). The 2.5B transformer trains fully on one 80 GB GPU with activation
checkpointing; `--lora` trains a rank-64 LoRA instead.

```bash
python examples/train_sd3.py --prompts prompts.txt --data_dataset ./images --output_dir sd35m-ddrl
accelerate launch --config_file trl_ddrl/accelerate_configs/multi_gpu.yaml examples/train_sd3.py \
    --prompts prompts.txt --data_dataset my/image-caption-dataset --output_dir sd35m-ddrl
```

`--data_dataset` is a Hub dataset id or a local folder (`datasets.load_dataset`, e.g. an `imagefolder` with a
`metadata.jsonl`) with an `image` column and a `prompt` caption column (`--caption_column` names another, as in the
CLI). The run writes a diffusers pipeline (or a LoRA) to `--output_dir`.
"""

import argparse

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig

from trl_ddrl import DDRLConfig, DDRLTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="stabilityai/stable-diffusion-3.5-medium", help="Hub id or local StableDiffusion3Pipeline."
    )
    parser.add_argument("--prompts", required=True, help="Text file with one training prompt per line.")
    parser.add_argument("--data_dataset", required=True, help="Image-caption data for the data term.")
    parser.add_argument(
        "--caption_column", default="prompt", help="Caption column of --data_dataset (DDRLConfig's default)."
    )
    parser.add_argument("--output_dir", default="sd35m-ddrl")
    parser.add_argument("--resolution", type=int, default=512, help="Training height and width in pixels.")
    parser.add_argument("--guidance_scale", type=float, default=4.5, help="CFG scale of the rollouts; 1 = no CFG.")
    parser.add_argument("--data_beta", type=float, default=0.01, help="Weight of the data term (see ddrl_trainer.md).")
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument(
        "--warmup_steps", type=int, default=50, help="Linear learning-rate warm-up steps (the authors' 50)."
    )
    parser.add_argument(
        "--no_bf16", action="store_true", help="float32 weights and no bf16 autocast (GPUs without bf16, CPUs)."
    )
    parser.add_argument("--reward", default="pickscore", help="Reward name (see docs/rewards.md).")
    parser.add_argument("--lora", action="store_true", help="Train a rank-64 LoRA instead of the full transformer.")
    args = parser.parse_args()

    with open(args.prompts) as file:
        prompts = Dataset.from_dict({"prompt": [line.strip() for line in file if line.strip()]})
    data = load_dataset(args.data_dataset, split="train")

    config = DDRLConfig(
        output_dir=args.output_dir,
        model_init_kwargs=None if args.no_bf16 else {"dtype": "bfloat16"},
        # Rollouts: groups of 8 samples per prompt, 20 SDE steps.
        num_generations=8,
        prompts_per_step=4,
        num_inference_steps=20,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        # DDRL: forward-KL data term, no reverse KL.
        data_beta=args.data_beta,
        kl_beta=0.0,
        caption_column=args.caption_column,
        learning_rate=1e-5,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        activation_checkpointing=True,
        bf16=not args.no_bf16,
        logging_steps=1,
        save_steps=100,
    )
    trainer = DDRLTrainer(
        model=args.model,
        reward_funcs=args.reward,
        args=config,
        train_dataset=prompts,
        data_dataset=data,
        peft_config=LoraConfig(
            r=64,
            lora_alpha=64,
            target_modules=[
                "to_q",
                "to_k",
                "to_v",
                "to_out.0",
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
                "to_add_out",
            ],
        )
        if args.lora
        else None,
    )
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    main()
