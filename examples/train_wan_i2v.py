# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
DDRL on Wan 2.1 I2V 14B 480P: image-to-video RL with a per-frame image reward, regularised by the flow-matching loss
on the same clips.

Each training row is a clip and its caption: rollouts continue the clip's first frame (encoded as the pipeline does:
the image's VAE latents with a first-frame mask, and its CLIP image embedding), and the data term trains on the clip
itself, conditioned on that frame. Rollouts sample 33-frame 480x832 videos with the Euler-Maruyama SDE on the noise
levels of the checkpoint's UniPC scheduler. Settings follow the DDRL paper: groups of 8, 20 sampling steps,
`data_beta=0.01`, `lr=1e-5`, no reverse KL, no CFG during training. Also serves Wan 2.2 TI2V 5B
(`--model Wan-AI/Wan2.2-TI2V-5B-Diffusers --height 704 --width 1280`). Needs `ftfy` (the pipeline's prompt cleaning).

```bash
accelerate launch --config_file trl_ddrl/accelerate_configs/zero3.yaml examples/train_wan_i2v.py \
    --data videos.jsonl --output_dir wan-i2v-14b-ddrl
```

`--data` is a JSON-lines file with a `video` (path to a video file; `.mp4` needs `pip install imageio[pyav]`,
animated `.gif` works without it) and a `text` caption per line. Clips need at least `num_frames` frames; the first
`num_frames` are used, resized to cover `--height` x `--width` and centre-cropped.
"""

import argparse

from datasets import load_dataset

from trl_ddrl import DDRLConfig, DDRLTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", help="Hub id or local WanImageToVideoPipeline."
    )
    parser.add_argument("--data", required=True, help="JSON-lines file of video paths and captions.")
    parser.add_argument("--output_dir", default="wan-i2v-14b-ddrl")
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
    args = parser.parse_args()

    data = load_dataset("json", data_files=args.data, split="train").rename_column("text", "prompt")

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
        data_beta=0.01,
        kl_beta=0.0,
        image_column="video",
        learning_rate=1e-5,
        max_steps=args.max_steps,
        warmup_steps=args.warmup_steps,
        activation_checkpointing=True,
        bf16=not args.no_bf16,
        logging_steps=1,
        save_steps=100,
    )
    trainer = DDRLTrainer(model=args.model, reward_funcs=args.reward, args=config, train_dataset=data)
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
