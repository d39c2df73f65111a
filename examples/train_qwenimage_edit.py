# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
DDRL on Qwen-Image-Edit: image editing RL, each rollout editing its row's source image, regularised by the
flow-matching loss on (source image, edited image, instruction) rows.

Every row of `--edits` holds a `source_image`, an edit `prompt` and the edited `image`. Rollouts edit the source
image (the Qwen2.5-VL prompt encoder sees it, and the transformer attends to its latents); the reward functions get
the source images too, as the `source_image` keyword argument, so an edit reward can compare before and after (pass
an HTTP reward server, `--reward http://host:port`, for a VLM judge). The data term learns the recorded edits from
source to target. Rollouts use the pipeline's true CFG (`--guidance_scale 4`, its default, against " "); otherwise
the settings follow the DDRL paper: groups of 8, 20 sampling steps, `data_beta=0.01`, `lr=1e-5`, no reverse KL.
Pass `--lora` to train a LoRA adapter on the 20B transformer.

```bash
python examples/train_qwenimage_edit.py --edits edits.jsonl --lora --output_dir qwen-image-edit-lora
accelerate launch --config_file trl_ddrl/accelerate_configs/zero3.yaml examples/train_qwenimage_edit.py \
    --edits edits.jsonl --output_dir qwen-image-edit-ddrl
```

`--edits` is a JSON-lines file (or any `datasets.load_dataset("json")` source) with `source_image` and `image`
(image paths) and `prompt` (the instruction) per line. Images are resized to cover `--resolution` and centre-cropped.
"""

import argparse

import torch
from datasets import Image, load_dataset
from peft import LoraConfig

from trl_ddrl import DDRLConfig, DDRLTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Qwen/Qwen-Image-Edit", help="Hub id or local QwenImageEditPipeline.")
    parser.add_argument("--edits", required=True, help="JSON-lines file of source_image, image and prompt.")
    parser.add_argument("--output_dir", default="qwen-image-edit-ddrl")
    parser.add_argument("--resolution", type=int, default=512, help="Training height and width, a multiple of 16.")
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="True CFG in rollouts; 1 disables it.")
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument(
        "--warmup_steps", type=int, default=50, help="Linear learning-rate warm-up steps (the authors' 50)."
    )
    parser.add_argument(
        "--no_bf16", action="store_true", help="float32 weights and no bf16 autocast (GPUs without bf16, CPUs)."
    )
    parser.add_argument("--reward", default="pickscore", help="Reward name or http://host:port (docs/rewards.md).")
    parser.add_argument("--lora", action="store_true", help="Train a rank-64 LoRA instead of the full transformer.")
    args = parser.parse_args()

    edits = load_dataset("json", data_files=args.edits, split="train")
    edits = edits.cast_column("source_image", Image()).cast_column("image", Image())

    config = DDRLConfig(
        output_dir=args.output_dir,
        model_init_kwargs=None if args.no_bf16 else {"torch_dtype": "bfloat16"},
        num_generations=8,
        prompts_per_step=4,
        num_inference_steps=20,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        # DDRL: the data term on each row's (source_image, image, prompt), no reverse KL.
        data_beta=0.01,
        kl_beta=0.0,
        source_image_column="source_image",
        image_column="image",
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
        train_dataset=edits,
        peft_config=LoraConfig(r=64, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        if args.lora
        else None,
    )
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    main()
