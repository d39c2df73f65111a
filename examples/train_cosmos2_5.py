# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
DDRL on Cosmos Predict2.5 2B, the model of the DDRL paper's headline results: text-to-world (or image-/video-to-world)
video RL with a per-frame image reward, regularised by the flow-matching loss on caption-video data.

Settings follow the authors' release (cosmos-rl's `cosmos-predict2-5-2b-720-reason-embedding-ddrl.toml`): 93-frame
704x1280 videos, groups of 8, 20 sampling steps training every other one, `data_beta=0.01`, `lr=1e-5`, no reverse KL,
no CFG during training. Rollouts use the Euler-Maruyama SDE on the noise levels of the checkpoint's UniPC scheduler.
Needs `cosmos_guardrail` (the pipeline's safety checker) and `torchvision` (the transformer's padding mask).

```bash
accelerate launch --config_file trl_ddrl/accelerate_configs/zero2.yaml examples/train_cosmos2_5.py \
    --data videos.jsonl --output_dir cosmos-predict2.5-2b-ddrl
```

`--data` is a JSON-lines file with a `video` (path to a video file; `.mp4` needs `pip install imageio[pyav]`,
animated `.gif` works without it) and a `text` caption per line: the captions are the training prompts and the clips
the data term's videos. With `--num_conditioning_frames 1` (image-to-world) or `5` (video-to-world), each rollout
continues the first frames of its row's clip. The release mixes text- and image-to-world samples
(`min/max_num_conditional_frames = 0/1`); here one mode is trained per run.
"""

import argparse

from datasets import load_dataset

from trl_ddrl import DDRLConfig, DDRLTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="nvidia/Cosmos-Predict2.5-2B", help="Hub id or local Cosmos2_5_PredictBasePipeline."
    )
    parser.add_argument("--data", required=True, help="JSON-lines file of video paths and captions.")
    parser.add_argument("--output_dir", default="cosmos-predict2.5-2b-ddrl")
    parser.add_argument("--num_frames", type=int, default=93, help="Frames per video, 4k + 1.")
    parser.add_argument("--num_conditioning_frames", type=int, default=0, help="0 text-, 1 image-, 5 video-to-world.")
    parser.add_argument("--max_steps", type=int, default=2000)
    parser.add_argument(
        "--warmup_steps", type=int, default=50, help="Linear learning-rate warm-up steps (the authors' 50)."
    )
    parser.add_argument(
        "--no_bf16", action="store_true", help="float32 weights and no bf16 autocast (GPUs without bf16, CPUs)."
    )
    parser.add_argument("--reward", default="aesthetic", help="Reward name (see docs/rewards.md).")
    parser.add_argument("--height", type=int, default=704, help="Video height in pixels.")
    parser.add_argument("--width", type=int, default=1280, help="Video width in pixels.")
    args = parser.parse_args()

    data = load_dataset("json", data_files=args.data, split="train").rename_column("text", "prompt")

    config = DDRLConfig(
        output_dir=args.output_dir,
        model_init_kwargs=None if args.no_bf16 else {"torch_dtype": "bfloat16"},
        num_generations=8,
        prompts_per_step=4,
        rollout_batch_size=8,
        num_inference_steps=20,
        train_timestep_fraction=0.5,
        guidance_scale=1.0,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        num_conditioning_frames=args.num_conditioning_frames,
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
