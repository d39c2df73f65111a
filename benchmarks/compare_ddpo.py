# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
trl_ddrl against TRL 0.23's DDPOTrainer on the same SD 1.5-style pipeline, measured in one run.

Both trainers fully fine-tune the same random UNet (`benchmarks/tiny_pipelines.py`, saved to a temporary directory and
loaded by both with `from_pretrained`) with the same settings: DDIM with `eta=1` and CFG (scale 5, DDPO's default;
rollouts and replays both run the negative and positive branches in one batch), the same prompts and group
size (`prompts x num_generations` samples per iteration, per-prompt reward normalisation), the same number of trained
steps per sample, the same micro-batch size, one optimizer step per iteration, the JPEG-compressibility reward, fp32,
no checkpoints. trl_ddrl runs its DDIM path with `data_beta=0` (no data term: DDPO has none). Each side runs in its
own process (DDPO in `benchmarks/.ddpo-venv`, made by `setup_ddpo_venv.sh`), so that each process's peak RSS is its
own; the sides alternate for `--rounds` rounds to spread drifts in machine load over both. The first iteration of
every process is a warm-up and is not timed.

Usage (from the repository root, after `bash benchmarks/setup_ddpo_venv.sh`):
    python benchmarks/compare_ddpo.py        # writes benchmarks/results/compare_ddpo.json
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch
import trl
from common import (
    PeakRSS,
    StepTimer,
    current_rss_mib,
    machine,
    process_peak_rss_mib,
    summary,
    time_calls,
    unet_raw_floor,
)
from datasets import Dataset
from safetensors.torch import load_file, save_file
from tiny_pipelines import bench_sd15_pipeline

import trl_ddrl
from trl_ddrl import DDRLConfig, DDRLTrainer


# What the trainer's imports cost before anything is built (DeepSpeed, when imported, comes later).
RSS_AFTER_IMPORTS_MIB = current_rss_mib()


HERE = os.path.dirname(os.path.abspath(__file__))
DDPO_PYTHON = os.path.join(HERE, ".ddpo-venv", "bin", "python")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent-size", type=int, default=16, help="Latent height and width.")
    parser.add_argument("--prompts", nargs="+", default=["a red square", "a blue circle"], help="One group each.")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--num-inference-steps", type=int, default=10)
    parser.add_argument("--num-trained-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="Transitions per micro-batch.")
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=5.0,
        help="CFG scale of rollouts and replays (DDPO's default). Must be > 1: DDPO 0.23 cannot sample without CFG "
        "on current diffusers (its pipeline concatenates negative and positive embeddings unconditionally).",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--iterations", type=int, default=4, help="Measured iterations per process.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating (trl_ddrl, DDPO) process pairs.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides.")
    parser.add_argument(
        "--output", default=os.path.join(HERE, "results", "compare_ddpo.json"), help="Where to write the JSON."
    )
    parser.add_argument("--side", choices=["ddrl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    return parser.parse_args()


def common_flags(args: argparse.Namespace, model_dir: str) -> list[str]:
    """The settings both sides get on their command line."""
    return [
        "--model-dir", model_dir,
        "--prompts", *args.prompts,
        "--num-generations", str(args.num_generations),
        "--num-inference-steps", str(args.num_inference_steps),
        "--num-trained-steps", str(args.num_trained_steps),
        "--batch-size", str(args.batch_size),
        "--eta", str(args.eta),
        "--guidance-scale", str(args.guidance_scale),
        "--learning-rate", str(args.learning_rate),
        "--iterations", str(args.iterations),
        "--threads", str(args.threads),
    ]  # fmt: skip


def ddrl_side(args: argparse.Namespace) -> dict:
    """The trl_ddrl side, in its own process: train, time, and return the measurements."""
    torch.set_num_threads(args.threads)
    samples = len(args.prompts) * args.num_generations
    with tempfile.TemporaryDirectory(prefix="ddrl-peer-") as output_dir:
        config = DDRLConfig(
            output_dir=output_dir,
            prompts_per_step=len(args.prompts),
            num_generations=args.num_generations,
            num_inference_steps=args.num_inference_steps,
            # DDPO trains a random `num_trained_steps` of all steps; the same count, evenly spread, here.
            train_timestep_fraction=args.num_trained_steps / (args.num_inference_steps - 1),
            per_device_train_batch_size=args.batch_size,
            eta=args.eta,
            guidance_scale=args.guidance_scale,
            data_beta=0.0,
            learning_rate=args.learning_rate,
            max_steps=1 + args.iterations,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        if len(config.train_timesteps) != args.num_trained_steps:
            raise RuntimeError(f"trl_ddrl trains {config.train_timesteps}, not {args.num_trained_steps} steps.")
        trainer = DDRLTrainer(
            args.model_dir,
            "jpeg_compressibility",
            args=config,
            train_dataset=Dataset.from_dict({"prompt": args.prompts}),
        )
        unet = trainer.adapter.denoiser
        raw = unet_raw_floor(
            copy.deepcopy(unet),
            samples,
            latent_size=unet.config.sample_size,
            sequence_length=trainer.pipeline.tokenizer.model_max_length,
            rollout_steps=args.num_inference_steps,
            trained_steps=args.num_trained_steps,
            batch_size=args.batch_size,
            guidance=args.guidance_scale > 1.0,
        )
        raw.iteration()  # warm-up, paired with the trainer's warm-up iteration
        timer = StepTimer(between=raw.iteration)
        trainer.add_callback(timer)
        generate_s = time_calls(trainer.rollout, "generate")
        rss_before = current_rss_mib()
        with PeakRSS() as rss:
            trainer.train()

    logs = [entry for entry in trainer.state.log_history if "time/rollout" in entry][1:]
    rollout = [entry["time/rollout"] for entry in logs]
    reward = [entry["time/reward"] for entry in logs]
    iteration = timer.durations[1:]
    train = [total - roll - rew for total, roll, rew in zip(iteration, rollout, reward, strict=True)]
    raw_iteration = [roll + tr for roll, tr in zip(raw.rollout_s[2:], raw.train_s[2:], strict=True)]
    return {
        "trainer": f"trl_ddrl {trl_ddrl.__version__} DDRLTrainer (trl {trl.__version__}, data_beta=0, full fine-tune)",
        "machine": machine(),
        "iteration_s": summary(iteration),
        "rollout_s": summary(rollout),
        "reward_s": summary(reward),
        "train_s": summary(train),
        "generate_and_score_s": summary(generate_s[1:]),
        "raw_iteration_s": summary(raw_iteration),
        "over_raw": [total / floor for total, floor in zip(iteration, raw_iteration, strict=True)],
        "samples_per_s": samples / statistics.median(iteration),
        "rss_before_training_mib": rss_before,
        "peak_rss_training_mib": rss.peak_mib,
        "process_peak_rss_mib": process_peak_rss_mib(),
        "rss_after_imports_mib": RSS_AFTER_IMPORTS_MIB,
        "deepspeed_imported": "deepspeed" in sys.modules,
        "trained_parameters": sum(p.numel() for p in trainer.adapter.denoiser.parameters() if p.requires_grad),
    }


def make_transformers4_compatible(model_dir: str) -> None:
    """
    Make a pipeline saved with transformers 5 load identically in transformers 4 (the DDPO venv): add the slow
    `CLIPTokenizer`'s `vocab.json` and `merges.txt` next to `tokenizer.json`, and give the text encoder's weights the
    `text_model.` prefix transformers 4 expects (transformers 5 loads both namings).
    """
    tokenizer_dir = os.path.join(model_dir, "tokenizer")
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as file:
        model = json.load(file)["model"]
    with open(os.path.join(tokenizer_dir, "vocab.json"), "w") as file:
        json.dump(model["vocab"], file)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    with open(os.path.join(tokenizer_dir, "merges.txt"), "w") as file:
        file.write("\n".join(["#version: 0.2", *merges]) + "\n")
    weights = os.path.join(model_dir, "text_encoder", "model.safetensors")
    state = load_file(weights)
    save_file(
        {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()},
        weights,
        metadata={"format": "pt"},
    )


def run_side(command: list[str]) -> dict:
    """Run one side's process and parse the JSON line it prints last."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, cwd=HERE, env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def pooled(runs: list[dict]) -> dict:
    """
    One side's measurements over all its processes: timings pooled; memory the largest over the processes, both the
    whole process's peak RSS and the growth of RSS during training (peak while training minus RSS just before).
    """
    result = {key: runs[0][key] for key in ("trainer", "trained_parameters", "deepspeed_imported")}
    for key in ("iteration_s", "rollout_s", "reward_s", "train_s", "raw_iteration_s"):
        result[key] = summary([value for run in runs for value in run[key]["values"]])
    result["over_raw"] = summary([value for run in runs for value in run["over_raw"]])
    for key in ("rss_after_imports_mib", "rss_before_training_mib", "peak_rss_training_mib", "process_peak_rss_mib"):
        result[key] = max(run[key] for run in runs)
    result["training_rss_growth_mib"] = max(
        run["peak_rss_training_mib"] - run["rss_before_training_mib"] for run in runs
    )
    return result


def main() -> None:
    args = parse_args()
    if args.side == "ddrl":
        print(json.dumps(ddrl_side(args)))
        return
    if not os.path.isfile(DDPO_PYTHON):
        raise SystemExit(f"{DDPO_PYTHON} not found: run `bash benchmarks/setup_ddpo_venv.sh` first.")
    if args.guidance_scale <= 1.0:
        raise SystemExit(f"--guidance-scale={args.guidance_scale} must be > 1 (see --help).")
    if args.num_trained_steps > args.num_inference_steps - 1:
        raise SystemExit(
            f"--num-trained-steps={args.num_trained_steps} must be at most --num-inference-steps - 1 = "
            f"{args.num_inference_steps - 1} (trl_ddrl never trains the deterministic last step)."
        )

    info = machine()
    samples = len(args.prompts) * args.num_generations
    with tempfile.TemporaryDirectory(prefix="compare-ddpo-") as model_dir:
        bench_sd15_pipeline(latent_size=args.latent_size).save_pretrained(model_dir)
        make_transformers4_compatible(model_dir)
        flags = common_flags(args, model_dir)
        runs: dict[str, list[dict]] = {"trl_ddrl": [], "ddpo": []}
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}: trl_ddrl ...", flush=True)
            runs["trl_ddrl"].append(run_side([sys.executable, __file__, "--side", "ddrl", *flags]))
            print(f"round {round_index + 1}/{args.rounds}: DDPO ...", flush=True)
            runs["ddpo"].append(run_side([DDPO_PYTHON, os.path.join(HERE, "ddpo_peer.py"), *flags]))

    ddrl, ddpo = pooled(runs["trl_ddrl"]), pooled(runs["ddpo"])
    for side in (ddrl, ddpo):
        side["samples_per_s"] = samples / side["iteration_s"]["median"]
    speedup = ddrl["samples_per_s"] / ddpo["samples_per_s"]
    # Each side's time over its own paired raw floor cancels the load of the moment it ran in.
    normalised_speedup = ddpo["over_raw"]["median"] / ddrl["over_raw"]["median"]
    memory_ratio = ddrl["process_peak_rss_mib"] / ddpo["process_peak_rss_mib"]
    growth_ratio = ddrl["training_rss_growth_mib"] / ddpo["training_rss_growth_mib"]
    beyond_imports_ratio = (ddrl["process_peak_rss_mib"] - ddrl["rss_after_imports_mib"]) / (
        ddpo["process_peak_rss_mib"] - ddpo["rss_after_imports_mib"]
    )
    result = {
        "benchmark": "trl_ddrl DDRLTrainer (data_beta=0) vs TRL 0.23 DDPOTrainer, tiny SD 1.5-style UNet, CPU",
        "machine": info,
        "settings": {key: value for key, value in vars(args).items() if key not in ("output", "side", "model_dir")},
        "samples_per_iteration": samples,
        "trl_ddrl": ddrl,
        "ddpo": ddpo,
        "runs": runs,
        "speedup_samples_per_s": speedup,
        "speedup_over_raw_normalised": normalised_speedup,
        "goal_speedup_at_least": 1.5,
        "peak_rss_ratio_ddrl_over_ddpo": memory_ratio,
        "training_rss_growth_ratio_ddrl_over_ddpo": growth_ratio,
        "peak_rss_beyond_imports_ratio_ddrl_over_ddpo": beyond_imports_ratio,
        "goal_peak_rss_ratio_below": 1.0,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as file:
        json.dump(result, file, indent=2)

    print(f"machine: {info['cpu_count']} CPU cores, {args.threads} torch thread(s) per side")
    for name, side in (("trl_ddrl", ddrl), ("DDPO", ddpo)):
        print(
            f"{name:8s}: {side['iteration_s']['median']:.2f} s/iteration (rollout {side['rollout_s']['median']:.2f}, "
            f"reward {side['reward_s']['median']:.3f}, train {side['train_s']['median']:.2f}; "
            f"{side['over_raw']['median']:.2f}x its raw floor); "
            f"{side['samples_per_s']:.2f} samples/s; process peak RSS {side['process_peak_rss_mib']:.0f} MiB "
            f"({side['rss_after_imports_mib']:.0f} after imports; DeepSpeed imported: {side['deepspeed_imported']}), "
            f"growth during training {side['training_rss_growth_mib']:.0f} MiB"
        )
    print(
        f"trl_ddrl / DDPO: samples/s {speedup:.2f}x, normalised by each side's raw floor {normalised_speedup:.2f}x "
        f"(goal >= 1.5); process peak RSS {memory_ratio:.2f}x, peak beyond the imports {beyond_imports_ratio:.2f}x, "
        f"RSS growth during training {growth_ratio:.2f}x (goal < 1)"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
