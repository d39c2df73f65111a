# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Throughput of `DDRLTrainer` against the raw compute floor, measured in one run.

On a random SD3 pipeline (an MMDiT of a few blocks on 32x32 latents, `benchmarks/tiny_pipelines.py`) this trains a few
DDRL iterations and times, per iteration: the rollout (prompt encoding, sampling, decoding: the trainer's
`time/rollout` metric), the reward (`time/reward`), the rest of the rollout phase (advantages and the data term's VAE
and text encoding) and the training (micro-batch fetching, replay, losses, backward, optimizer step, logging).

The **raw compute floor** is the same iteration's bare compute on a copy of the same denoiser with no trainer around
it: the no-grad forward passes of every rollout step, then for every micro-batch of trained transitions one forward of
the replayed states and (with a data term) one of the noised data, one backward, then one clipped AdamW step. One raw
iteration runs right after each trainer iteration (outside its timing), so that each pair sees the same machine load;
`trainer / raw` is the median of the per-iteration ratios (goal: at most 1.10, also with `--sde-window-size` and
`--sampler cps`).

Usage (from the repository root):
    python benchmarks/throughput.py                 # writes benchmarks/results/throughput.json
    python benchmarks/throughput.py --iterations 6 --num-layers 4
"""

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from common import PeakRSS, RawFloor, StepTimer, machine, process_peak_rss_mib, summary, time_calls
from datasets import Dataset
from tiny_pipelines import bench_sd3_pipeline

from trl_ddrl import DDRLConfig, DDRLTrainer


PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow car"]
MAX_SEQUENCE_LENGTH = 16  # T5 tokens of the prompt embeddings (zeros: the pipeline has no T5), as in the tests


GOAL_RATIO = 1.10  # for the default settings and with the SDE window and CPS on


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=2, help="MMDiT blocks of the denoiser.")
    parser.add_argument("--latent-size", type=int, default=32, help="Latent height and width.")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--num-inference-steps", type=int, default=10)
    parser.add_argument("--train-timestep-fraction", type=float, default=0.5)
    parser.add_argument(
        "--sde-window-size", type=int, default=None, help="Train an SDE window of this many steps instead."
    )
    parser.add_argument("--sampler", default="flow_sde", help="DDRLConfig.sampler: 'flow_sde' or 'cps'.")
    parser.add_argument("--batch-size", type=int, default=8, help="per_device_train_batch_size (transitions).")
    parser.add_argument("--data-beta", type=float, default=0.01, help="0 drops the data term (Flow-GRPO-like).")
    parser.add_argument("--iterations", type=int, default=4, help="Measured iterations (after one warm-up).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU).")
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument(
        "--reward-seconds-per-sample",
        type=float,
        default=0.0,
        help="Add this much wall time per scored sample to the reward, without using the CPU (time.sleep): a reward "
        "model on its own device or a reward server, to measure how much reward time the rollout hides.",
    )
    parser.add_argument(
        "--rollout-batch-size", type=int, default=None, help="DDRLConfig.rollout_batch_size (default: its default)."
    )
    parser.add_argument("--no-async-rewards", action="store_true", help="Score each chunk on the main thread.")
    parser.add_argument(
        "--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "throughput.json")
    )
    return parser.parse_args()


def sd3_raw_floor(args: argparse.Namespace, pipeline, num_trained_steps: int) -> RawFloor:
    """The raw floor of a DDRL iteration on a copy of `pipeline`'s MMDiT, with the trainer's shapes."""
    denoiser = copy.deepcopy(pipeline.transformer).train()
    samples = args.prompts_per_step * args.num_generations
    shape = (denoiser.config.in_channels, args.latent_size, args.latent_size)
    latents = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=[PROMPTS[i % len(PROMPTS)] for i in range(samples)],
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
    timestep = torch.full((samples,), 500.0)

    def forward(whole_batch: bool) -> torch.Tensor:
        rows = slice(None) if whole_batch else slice(0, args.batch_size)
        return denoiser(
            hidden_states=latents[rows],
            timestep=timestep[rows],
            encoder_hidden_states=embeds[rows],
            pooled_projections=pooled[rows],
            return_dict=False,
        )[0]

    return RawFloor(
        forward,
        list(denoiser.parameters()),
        rollout_steps=args.num_inference_steps,
        micro_batches=samples * num_trained_steps // args.batch_size,
        forwards_per_micro_batch=2 if args.data_beta > 0 else 1,
    )


class DelayedReward(torch.nn.Module):
    """
    `reward` plus `seconds_per_sample` of wall time per sample that leaves the CPU free (a sleep): a reward model on
    its own device. An `nn.Module`, as reward models are, so the default rollout scores it beside the sampling.
    """

    def __init__(self, reward, seconds_per_sample: float):
        super().__init__()
        self.reward, self.seconds_per_sample = reward, seconds_per_sample
        self.name = getattr(reward, "name", None) or getattr(reward, "__name__", "reward")

    def forward(self, prompts, images, **kwargs):
        values = self.reward(prompts=prompts, images=images, **kwargs)
        time.sleep(self.seconds_per_sample * len(prompts))
        return values


def overlap(rollout: list[float], reward: list[float], wait: list[float], asynchronous: bool) -> dict:
    """
    How much reward time the rollout hides (medians over iterations). `time/rollout` is the sampling loop (with the
    reward calls inside it when they run on the main thread), `time/reward` the reward calls' total, `time/reward_wait`
    the wait for rewards after the loop. Serial is sampling + reward, the floor max(sampling, reward), the phase
    rollout + wait, and `hidden_fraction` the share of the reward time that did not add to the phase.
    """
    sampling = [r - (0.0 if asynchronous else w) for r, w in zip(rollout, reward, strict=True)]
    phase = [r + w for r, w in zip(rollout, wait, strict=True)]
    serial = [s + w for s, w in zip(sampling, reward, strict=True)]
    floor = [max(s, w) for s, w in zip(sampling, reward, strict=True)]
    hidden = [(se - ph) / w if w > 0 else 0.0 for se, ph, w in zip(serial, phase, reward, strict=True)]
    return {
        "sampling_s": statistics.median(sampling),
        "reward_s": statistics.median(reward),
        "phase_s": statistics.median(phase),
        "serial_s": statistics.median(serial),
        "max_s": statistics.median(floor),
        "hidden_fraction": statistics.median(hidden),
    }


def make_dataset(size: int, resolution: int) -> Dataset:
    """Prompts and random data images (uint8 `[H, W, 3]`) for the data term."""
    generator = np.random.default_rng(0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size)]
    images = [generator.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8) for _ in range(size)]
    return Dataset.from_dict({"prompt": prompts, "image": images})


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="ddrl-throughput-") as output_dir:
        run(args, output_dir)


def run(args: argparse.Namespace, output_dir: str) -> None:
    torch.set_num_threads(args.threads)
    info = machine()
    pipeline = bench_sd3_pipeline(num_layers=args.num_layers, latent_size=args.latent_size)
    num_parameters = sum(p.numel() for p in pipeline.transformer.parameters())
    samples = args.prompts_per_step * args.num_generations
    config = DDRLConfig(
        output_dir=output_dir,
        prompts_per_step=args.prompts_per_step,
        num_generations=args.num_generations,
        num_inference_steps=args.num_inference_steps,
        train_timestep_fraction=args.train_timestep_fraction,
        sde_window_size=args.sde_window_size,
        sampler=args.sampler,
        eta=0.8 if args.sampler == "cps" else 0.7,
        per_device_train_batch_size=args.batch_size,
        data_beta=args.data_beta,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        max_steps=1 + args.iterations,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        rollout_batch_size=args.rollout_batch_size,
        async_rewards=not args.no_async_rewards,
    )
    raw = sd3_raw_floor(args, pipeline, config.num_trained_steps)
    raw.iteration()  # warm-up, paired with the trainer's warm-up iteration
    timer = StepTimer(between=raw.iteration)
    resolution = args.latent_size * pipeline.vae_scale_factor
    reward = args.reward
    if args.reward_seconds_per_sample:
        from trl_ddrl.rewards import get_reward_function

        reward = DelayedReward(get_reward_function(args.reward), args.reward_seconds_per_sample)
    trainer = DDRLTrainer(pipeline, reward, args=config, train_dataset=make_dataset(8, resolution), callbacks=[timer])
    generate_s = time_calls(trainer.rollout, "generate")
    with PeakRSS() as rss:
        trainer.train()

    # Drop the warm-up iteration (index 0) everywhere.
    logs = [entry for entry in trainer.state.log_history if "time/rollout" in entry][1:]
    rollout = [entry["time/rollout"] for entry in logs]
    reward = [entry["time/reward"] for entry in logs]
    reward_wait = [entry["time/reward_wait"] for entry in logs]
    iteration = timer.durations[1:]
    generate = generate_s[1:]
    train = [total - gen for total, gen in zip(iteration, generate, strict=True)]
    other = [gen - roll - rew for gen, roll, rew in zip(generate, rollout, reward, strict=True)]
    raw_rollout, raw_train = raw.rollout_s[2:], raw.train_s[2:]
    raw_iteration = [r + t for r, t in zip(raw_rollout, raw_train, strict=True)]
    ratios = [total / floor for total, floor in zip(iteration, raw_iteration, strict=True)]
    ratio = statistics.median(ratios)

    result = {
        "benchmark": "DDRLTrainer iteration time vs raw denoiser compute (tiny SD3, CPU)",
        "machine": info,
        "model": {
            "family": "StableDiffusion3Pipeline",
            "denoiser_parameters": num_parameters,
            "num_layers": args.num_layers,
            "latent_shape": [4, args.latent_size, args.latent_size],
        },
        "settings": {key: value for key, value in vars(args).items() if key != "output"},
        "train_timesteps": config.train_timesteps,
        "num_trained_steps": config.num_trained_steps,
        "micro_batches_per_iteration": config.steps_per_generation,
        "trainer": {
            "iteration_s": summary(iteration),
            "rollout_s": summary(rollout),
            "reward_s": summary(reward),
            "advantages_and_data_batch_s": summary(other),
            "train_s": summary(train),
            "samples_per_s": samples / statistics.median(iteration),
            "peak_rss_mib": rss.peak_mib,
        },
        "raw": {
            "iteration_s": summary(raw_iteration),
            "rollout_s": summary(raw_rollout),
            "train_s": summary(raw_train),
            "samples_per_s": samples / statistics.median(raw_iteration),
        },
        "reward_overlap": overlap(rollout, reward, reward_wait, config.async_rewards),
        "ratio_trainer_over_raw": {"median": ratio, "per_iteration": ratios},
        "goal_ratio_at_most": GOAL_RATIO,
        "process_peak_rss_mib": process_peak_rss_mib(),
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(result, file, indent=2)

    trainer_result, raw_result = result["trainer"], result["raw"]

    def median(key: str) -> float:
        return trainer_result[key]["median"]

    print(
        f"machine: {info['cpu_count']} CPU cores, {info['torch_threads']} torch thread(s), load average "
        f"{info['load_average_1m_at_start']:.1f} at start"
    )
    print(
        f"denoiser: SD3 MMDiT, {args.num_layers} blocks, {num_parameters / 1e6:.2f}M parameters, latents "
        f"{result['model']['latent_shape']}; {samples} samples x {args.num_inference_steps} steps, "
        f"{config.num_trained_steps} trained steps, {config.steps_per_generation} micro-batches per iteration"
    )
    print(
        f"trainer, median of {args.iterations} iterations: {median('iteration_s'):.2f} s = rollout "
        f"{median('rollout_s'):.2f} + reward {median('reward_s'):.3f} + advantages/data batch "
        f"{median('advantages_and_data_batch_s'):.3f} + train {median('train_s'):.2f}; "
        f"{trainer_result['samples_per_s']:.2f} samples/s, peak RSS {trainer_result['peak_rss_mib']:.0f} MiB"
    )
    print(
        f"raw floor: {raw_result['iteration_s']['median']:.2f} s = rollout {raw_result['rollout_s']['median']:.2f} + "
        f"train {raw_result['train_s']['median']:.2f}; {raw_result['samples_per_s']:.2f} samples/s"
    )
    print(
        f"trainer / raw = {ratio:.3f} (median of per-iteration ratios {[round(r, 3) for r in ratios]}; goal <= {GOAL_RATIO})"
    )
    hidden = result["reward_overlap"]
    print(
        f"reward overlap: sampling {hidden['sampling_s']:.2f} s, reward {hidden['reward_s']:.2f} s -> rollout phase "
        f"{hidden['phase_s']:.2f} s (serial {hidden['serial_s']:.2f}, max {hidden['max_s']:.2f}); "
        f"{100 * hidden['hidden_fraction']:.0f}% of the reward time hidden"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
