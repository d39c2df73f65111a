# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
DDRL on Qwen-Image: reward a prompt set with PickScore, regularised by the flow-matching loss on image-caption data.

Qwen-Image is not guidance-distilled: rollouts use the pipeline's true CFG (`--guidance_scale 4`, its default
`true_cfg_scale`, against the negative prompt " "), which doubles the cost of each step; `--guidance_scale 1` samples
without it. Otherwise the settings follow the DDRL paper: groups of 8, 20 sampling steps, `data_beta=0.01`,
`lr=1e-5`, no reverse KL. The 20B transformer needs DeepSpeed ZeRO-3 for a full fine-tune; pass `--lora` to train a
LoRA adapter instead.

```bash
accelerate launch --config_file trl_ddrl/accelerate_configs/zero3.yaml examples/train_qwenimage.py \
    --prompts prompts.txt --data_dataset my/image-caption-dataset --output_dir qwen-image-ddrl
python examples/train_qwenimage.py --prompts prompts.txt --data_dataset ./images --lora --output_dir qwen-image-lora
```

`--data_dataset` is a Hub dataset id or a local folder (`datasets.load_dataset`, e.g. an `imagefolder` with a
`metadata.jsonl`) with an `image` column and a `prompt` caption column (`--caption_column` names another, as in the CLI). The run writes a diffusers pipeline (or a LoRA
that `QwenImagePipeline.load_lora_weights` loads) to `--output_dir`.
"""

import argparse

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig

from trl_ddrl import DDRLConfig, DDRLTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen-Image", help="Hub id or local QwenImagePipeline.")
    parser.add_argument("--prompts", required=True, help="Text file with one training prompt per line.")
    parser.add_argument("--data_dataset", required=True, help="Image-caption data for the data term.")
    parser.add_argument(
        "--caption_column", default="prompt", help="Caption column of --data_dataset (DDRLConfig's default)."
    )
    parser.add_argument("--output_dir", default="qwen-image-ddrl")
    parser.add_argument("--resolution", type=int, default=512, help="Training height and width, a multiple of 16.")
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="True CFG in rollouts; 1 disables it.")
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
        model_init_kwargs=None if args.no_bf16 else {"torch_dtype": "bfloat16"},
        num_generations=8,
        prompts_per_step=4,
        num_inference_steps=20,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        max_sequence_length=512,
        data_beta=0.01,
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
        peft_config=LoraConfig(r=64, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        if args.lora
        else None,
    )
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    main()
