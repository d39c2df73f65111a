# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The DDPO side of `benchmarks/compare_ddpo.py`: TRL 0.23's `DDPOTrainer` on a saved SD 1.5-style pipeline.

Runs inside `benchmarks/.ddpo-venv` (made by `benchmarks/setup_ddpo_venv.sh`; TRL 0.23 needs transformers 4), so it
imports nothing from trl_ddrl. It trains `1 + --iterations` epochs (one epoch = one rollout batch and one optimizer
step, the first a warm-up), times each epoch's rollout, reward and training, and prints one JSON line.

Usage (normally called by compare_ddpo.py):
    benchmarks/.ddpo-venv/bin/python benchmarks/ddpo_peer.py --model-dir DIR [--iterations 4]
"""

import argparse
import copy
import io
import itertools
import json
import statistics
import sys
import tempfile
import warnings

import diffusers
import torch
import trl
from accelerate import PartialState
from common import PeakRSS, current_rss_mib, machine, process_peak_rss_mib, summary, time_calls, unet_raw_floor
from PIL import Image
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline


# What the trainer's imports cost before anything is built (DeepSpeed, when imported, comes later).
RSS_AFTER_IMPORTS_MIB = current_rss_mib()
TIMED_METHODS = {"iteration": "step", "rollout": "_generate_samples", "reward": "compute_rewards"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="A StableDiffusionPipeline saved with save_pretrained.")
    parser.add_argument("--prompts", nargs="+", required=True)
    parser.add_argument("--num-generations", type=int, required=True, help="Consecutive samples per prompt.")
    parser.add_argument("--num-inference-steps", type=int, required=True)
    parser.add_argument("--num-trained-steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="Transitions per micro-batch.")
    parser.add_argument("--eta", type=float, required=True)
    parser.add_argument("--guidance-scale", type=float, required=True, help="CFG scale of rollouts and training.")
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--iterations", type=int, required=True, help="Measured epochs (after one warm-up).")
    parser.add_argument("--threads", type=int, required=True)
    return parser.parse_args()


def jpeg_compressibility(images: torch.Tensor, prompts, metadata) -> tuple[torch.Tensor, dict]:
    """Minus the JPEG size (quality 95) in kB of each `[B, 3, H, W]` image in `[0, 1]`, as trl_ddrl's reward."""
    frames = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    sizes = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
        sizes.append(-buffer.tell() / 1000)
    return torch.tensor(sizes), {}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # "DDPOTrainer is deprecated"

    samples = len(args.prompts) * args.num_generations
    # Each rollout batch holds every prompt `num_generations` times, as a DDRL iteration's groups.
    prompt_cycle = itertools.cycle([prompt for prompt in args.prompts for _ in range(args.num_generations)])
    with tempfile.TemporaryDirectory(prefix="ddpo-peer-") as logdir:
        config = DDPOConfig(
            num_epochs=1 + args.iterations,
            save_freq=10**9,  # no checkpoints, as the trl_ddrl side (save_strategy="no")
            mixed_precision="no",
            logdir=logdir,
            project_kwargs={"project_dir": logdir, "logging_dir": logdir},
            sample_num_steps=args.num_inference_steps,
            sample_eta=args.eta,
            sample_guidance_scale=args.guidance_scale,
            sample_batch_size=samples,
            sample_num_batches_per_epoch=1,
            train_batch_size=args.batch_size,
            train_gradient_accumulation_steps=samples // args.batch_size,
            train_learning_rate=args.learning_rate,
            train_cfg=True,
            train_timestep_fraction=args.num_trained_steps / args.num_inference_steps,
            per_prompt_stat_tracking=True,
            per_prompt_stat_tracking_buffer_size=args.num_generations,
            per_prompt_stat_tracking_min_count=args.num_generations,
            seed=0,
        )
        PartialState()  # DDPOTrainer logs through accelerate before it creates its Accelerator
        pipeline = DefaultDDPOStableDiffusionPipeline(args.model_dir, use_lora=False)
        trainer = DDPOTrainer(config, jpeg_compressibility, lambda: (next(prompt_cycle), {}), pipeline)
        if trainer.num_train_timesteps != args.num_trained_steps:
            raise RuntimeError(f"DDPO trains {trainer.num_train_timesteps} steps, not {args.num_trained_steps}.")

        times = {name: time_calls(trainer, method) for name, method in TIMED_METHODS.items()}
        unet = pipeline.unet
        raw = unet_raw_floor(
            copy.deepcopy(unet),
            samples,
            latent_size=unet.config.sample_size,
            sequence_length=pipeline.tokenizer.model_max_length,
            rollout_steps=args.num_inference_steps,
            trained_steps=args.num_trained_steps,
            batch_size=args.batch_size,
            guidance=args.guidance_scale > 1.0,
        )
        raw.iteration()  # warm-up, paired with the trainer's warm-up epoch
        timed_step = trainer.step

        def step_then_raw(*step_args, **step_kwargs):
            result = timed_step(*step_args, **step_kwargs)
            raw.iteration()  # outside the step's timing: the paired raw floor
            return result

        trainer.step = step_then_raw
        rss_before = current_rss_mib()
        with PeakRSS() as rss:
            trainer.train()

    iteration, rollout, reward = (times[key][1:] for key in ("iteration", "rollout", "reward"))
    train = [total - roll - rew for total, roll, rew in zip(iteration, rollout, reward, strict=True)]
    raw_iteration = [roll + tr for roll, tr in zip(raw.rollout_s[2:], raw.train_s[2:], strict=True)]
    print(
        json.dumps(
            {
                "trainer": f"trl {trl.__version__} DDPOTrainer (full fine-tune, diffusers {diffusers.__version__})",
                "machine": machine(),
                "iteration_s": summary(iteration),
                "rollout_s": summary(rollout),
                "reward_s": summary(reward),
                "train_s": summary(train),
                "raw_iteration_s": summary(raw_iteration),
                "over_raw": [total / floor for total, floor in zip(iteration, raw_iteration, strict=True)],
                "samples_per_s": samples / statistics.median(iteration),
                "rss_before_training_mib": rss_before,
                "peak_rss_training_mib": rss.peak_mib,
                "process_peak_rss_mib": process_peak_rss_mib(),
                "rss_after_imports_mib": RSS_AFTER_IMPORTS_MIB,
                "deepspeed_imported": "deepspeed" in sys.modules,
                "trained_parameters": sum(p.numel() for p in pipeline.unet.parameters() if p.requires_grad),
            }
        )
    )


if __name__ == "__main__":
    main()
