# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
DDRL on HunyuanVideo 1.5 480p text-to-video: text-to-video RL with a per-frame image reward, regularised by the
flow-matching loss on caption-video data.

Rollouts sample 33-frame 480x848 videos (`num_frames` must be 4k + 1; height and width multiples of 16) with the
Euler-Maruyama SDE on the pipeline's shifted sigmas. Settings follow the DDRL paper: groups of 8, 20 sampling steps,
`data_beta=0.01`, `lr=1e-5`, no reverse KL, no CFG during training (the pipeline's guider uses CFG 6.0 at inference;
`--guidance_scale` turns it on in rollouts, at twice the compute per step). The 8.3B transformer needs DeepSpeed ZeRO
for a full fine-tune. Samples are saved as `samples.gif` next to each checkpoint.

```bash
accelerate launch --config_file trl_ddrl/accelerate_configs/zero2.yaml examples/train_hunyuan_video15.py \
    --prompts prompts.txt --data_videos videos.jsonl --output_dir hunyuanvideo15-ddrl
```

`--data_videos` is a JSON-lines file with a `video` (path to a video file; `.mp4` needs `pip install imageio[pyav]`,
animated `.gif` works without it) and a `text` caption per line. Clips need at least `num_frames` frames; the first
`num_frames` are used, resized to cover `--height` x `--width` and centre-cropped.
"""

import argparse

from datasets import Dataset, load_dataset

from trl_ddrl import DDRLConfig, DDRLTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v",
        help="Hub id or local HunyuanVideo15Pipeline.",
    )
    parser.add_argument("--prompts", required=True, help="Text file with one training prompt per line.")
    parser.add_argument("--data_videos", required=True, help="JSON-lines file of video paths and captions.")
    parser.add_argument("--output_dir", default="hunyuanvideo15-ddrl")
    parser.add_argument("--num_frames", type=int, default=33, help="Frames per video, 4k + 1.")
    parser.add_argument("--height", type=int, default=480, help="Video height in pixels (multiple of 16).")
    parser.add_argument("--width", type=int, default=848, help="Video width in pixels (multiple of 16).")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="Rollout CFG; 1.0: none.")
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument(
        "--warmup_steps", type=int, default=50, help="Linear learning-rate warm-up steps (the authors' 50)."
    )
    parser.add_argument(
        "--no_bf16", action="store_true", help="float32 weights and no bf16 autocast (GPUs without bf16, CPUs)."
    )
    parser.add_argument("--reward", default="aesthetic", help="Reward name (see docs/rewards.md).")
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
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        # Qwen2.5-VL prompt tokens after the cropped system prompt (the pipeline pads to 1000).
        max_sequence_length=256,
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
    )
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
