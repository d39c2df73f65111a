# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
DDRL on Cosmos Predict2 2B Text2Image, the model family of the DDRL paper, with the OCR (text rendering) reward.

The Cosmos Predict2 pipeline is written in EDM form; the adapter samples it as the rectified flow it is (flow sigma
`s / (1 + s)` of the pipeline's Karras sigmas `s`), so the same SDE and flow-matching data term apply. Settings follow
the paper: groups of 8, 20 sampling steps, `data_beta=0.01`, `lr=1e-5`, no reverse KL, no CFG during training.
Needs `torchvision` (the Cosmos transformer resizes its padding mask with it), `cosmos_guardrail` (the pipeline's
safety checker) and `pytesseract` for the OCR reward.

```bash
accelerate launch --config_file trl_ddrl/accelerate_configs/zero2.yaml examples/train_cosmos.py \
    --prompts ocr_prompts.jsonl --output_dir cosmos-predict2-2b-ddrl
```

`--prompts` is a JSON-lines file with a `prompt` (with the words the image must show in double quotes, which the OCR
reward reads: `a neon sign that says "OPEN 24/7"`) and an `image` (a path to a reference image for the data term)
per line.

For Cosmos Predict2 Video2World (`nvidia/Cosmos-Predict2-2B-Video2World`), pass that model id with `--num_frames 93`
and give every line's `image` the conditioning image or clip: each rollout continues its row's frames (see
docs/model_families.md).
"""

import argparse

from datasets import load_dataset

from trl_ddrl import DDRLConfig, DDRLTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="nvidia/Cosmos-Predict2-2B-Text2Image", help="Hub id or local Cosmos2TextToImagePipeline."
    )
    parser.add_argument("--prompts", required=True, help="JSON-lines file with prompt and image fields.")
    parser.add_argument("--output_dir", default="cosmos-predict2-2b-ddrl")
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument(
        "--warmup_steps", type=int, default=50, help="Linear learning-rate warm-up steps (the authors' 50)."
    )
    parser.add_argument(
        "--no_bf16", action="store_true", help="float32 weights and no bf16 autocast (GPUs without bf16, CPUs)."
    )
    parser.add_argument("--reward", default="ocr", help="Reward name (see docs/rewards.md).")
    parser.add_argument("--height", type=int, default=None, help="Pixels; default 768 (images) or 704 (videos).")
    parser.add_argument("--width", type=int, default=None, help="Pixels; default 1360 (images) or 1280 (videos).")
    parser.add_argument(
        "--num_frames", type=int, default=None, help="Frames per video (93) for a Video2World model; unset for images."
    )
    args = parser.parse_args()

    prompts = load_dataset("json", data_files=args.prompts, split="train")

    config = DDRLConfig(
        output_dir=args.output_dir,
        model_init_kwargs=None if args.no_bf16 else {"torch_dtype": "bfloat16"},
        num_generations=8,
        prompts_per_step=4,
        num_inference_steps=20,
        guidance_scale=1.0,
        height=args.height or (704 if args.num_frames else 768),
        width=args.width or (1280 if args.num_frames else 1360),
        num_frames=args.num_frames,
        data_beta=0.01,
        kl_beta=0.0,
        learning_rate=1e-5,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        activation_checkpointing=True,
        bf16=not args.no_bf16,
        logging_steps=1,
        save_steps=100,
    )
    trainer = DDRLTrainer(model=args.model, reward_funcs=args.reward, args=config, train_dataset=prompts)
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
