# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
DDRL on Wan 2.1 T2V 1.3B: text-to-video RL with a per-frame image reward, regularised by the flow-matching loss on
caption-video data.

Rollouts sample 33-frame 480x832 videos (`num_frames` must be 4k + 1) with the Euler-Maruyama SDE on the noise levels
of the checkpoint's UniPC scheduler (`flow_shift=3`). Settings follow the DDRL paper: groups of 8, 20 sampling steps,
`data_beta=0.01`, `lr=1e-5`, no reverse KL, no CFG during training. Samples are saved as `samples.gif` next to each
checkpoint and logged to Weights & Biases when it is a tracker.

```bash
accelerate launch --config_file trl_ddrl/accelerate_configs/zero2.yaml examples/train_wan.py \
    --prompts prompts.txt --data_videos videos.jsonl --output_dir wan-1.3b-ddrl
```

Wan 2.2 T2V A14B (two 14B experts: `transformer` for the high-noise steps, `transformer_2` for the low-noise ones)
trains both experts by default, or one with `--train_experts high_noise|low_noise` (the other is frozen and only the
trained expert's sampling steps are trained); `--lora` trains a rank-64 LoRA on each trained expert, saved as
`pytorch_lora_weights.safetensors` (high noise) and `pytorch_lora_weights_transformer_2.safetensors` (low noise, loaded
with `pipe.load_lora_weights(dir, weight_name=..., load_into_transformer_2=True)`):

```bash
accelerate launch --config_file trl_ddrl/accelerate_configs/zero3.yaml examples/train_wan.py \
    --model Wan-AI/Wan2.2-T2V-A14B-Diffusers --lora --train_experts low_noise \
    --prompts prompts.txt --data_videos videos.jsonl --output_dir wan2.2-a14b-ddrl
```

`--data_videos` is a JSON-lines file with a `video` (path to a video file; `.mp4` needs `pip install imageio[pyav]`,
animated `.gif` works without it) and a `text` caption per line. Clips need at least `num_frames` frames; the first
`num_frames` are used, resized to cover `--height` x `--width` (480x832) and centre-cropped.
"""

import argparse

from datasets import Dataset, load_dataset
from peft import LoraConfig

from trl_ddrl import DDRLConfig, DDRLTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", help="Hub id or local WanPipeline.")
    parser.add_argument("--prompts", required=True, help="Text file with one training prompt per line.")
    parser.add_argument("--data_videos", required=True, help="JSON-lines file of video paths and captions.")
    parser.add_argument("--output_dir", default="wan-1.3b-ddrl")
    parser.add_argument("--num_frames", type=int, default=33, help="Frames per video, 4k + 1.")
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument(
        "--warmup_steps", type=int, default=50, help="Linear learning-rate warm-up steps (the authors' 50)."
    )
    parser.add_argument(
        "--no_bf16", action="store_true", help="float32 weights and no bf16 autocast (GPUs without bf16, CPUs)."
    )
    parser.add_argument("--reward", default="aesthetic", help="Reward name (see docs/rewards.md).")
    parser.add_argument("--height", type=int, default=480, help="Video height in pixels.")
    parser.add_argument("--width", type=int, default=832, help="Video width in pixels.")
    parser.add_argument(
        "--train_experts",
        default="all",
        choices=["all", "high_noise", "low_noise"],
        help="Wan 2.2 A14B: train both experts, or only transformer (high noise) or transformer_2 (low noise).",
    )
    parser.add_argument("--lora", action="store_true", help="Train a rank-64 LoRA on each trained expert.")
    args = parser.parse_args()

    with open(args.prompts) as file:
        prompts = Dataset.from_dict({"prompt": [line.strip() for line in file if line.strip()]})
    data = load_dataset("json", data_files=args.data_videos, split="train")

    config = DDRLConfig(
        output_dir=args.output_dir,
        model_init_kwargs=None if args.no_bf16 else {"torch_dtype": "bfloat16"},
        num_generations=8,
        prompts_per_step=4,
        rollout_batch_size=8,
        num_inference_steps=20,
        guidance_scale=1.0,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        max_sequence_length=512,
        train_experts=args.train_experts,
        data_beta=0.01,
        kl_beta=0.0,
        image_column="video",
        caption_column="text",
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
        # Model-based image rewards score every frame of a video and average the scores.
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
    main()
