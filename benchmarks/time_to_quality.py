# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Time to quality on the embedded digits model: how much wall-clock and denoiser work full-SDE DDRL (the default) and
its SDE-window / CPS variants need until the evaluation reward first reaches a target, and the held-out fidelity of
the model at that point.

Every run starts from the same cached base generator with the same seed, reward, prompts and hyper-parameters: the
`DDRLConfig` defaults (the authors' recipe: EDM squared-distance log-ratio, EDM data weighting, `loss_scale=10`,
clipping at 1, AdamW wd 1e-4 / beta2 0.99, constant learning rate after a linear warm-up, EMA on) with a learning
rate (1e-4) at which the evaluation reward rises over tens of steps, a warm-up short against the run (3 steps, from
lr 0), `clip_range=1e-3` and `data_beta=0.03`; only the sampler / window settings change. The default reward is `ink`
(mean pixel value), the hackable reward of `reward_hacking.py`: it has head-room above the base model (the classifier
reward starts at about 0.95 of 1), and raising it trades against fidelity, so "fidelity no worse at the same reward"
is a real test. `--reward classifier` uses the digit classifier's confidence in the prompted digit instead.

- `full_sde`: every step but the last stochastic (`eta=0.7`), every other step trained (today's default);
- `cps`: every step stochastic with the coefficients-preserving sampler (`sampler="cps"`, `eta=0.8`);
- `window`: `sde_window_size` consecutive steps stochastic and trained, drawn per iteration in the first half of
  the schedule (Flow-GRPO-Fast), the rest deterministic;
- `window_cps`: the same window with the coefficients-preserving sampler (`sampler="cps"`, `eta=0.8`);
- `window_cps_shared`: and every group shares its initial noise, so the steps before the window run once per prompt.

Every `--eval-every` optimizer steps a callback samples fixed noise for every digit with the deterministic sampler and
scores it with the training reward (outside the timed training). It evaluates the **raw trained weights**, not the
EMA the trainer keeps (and updates, so its cost is in the timings): the power-function EMA averages about the last
10% of the steps taken, so it lags each run by a share of its own length and would blur the one thing measured here,
how fast the optimizer's weights get there; the raw weights are what every variant's gradient steps produce. The
**target** of a seed is the base model's eval reward plus `--target-gain` (0.1: full-SDE gets there in 15-20 steps,
well past the warm-up; or give an absolute `--target`). Each run's time to target is the training wall-clock
until its first evaluation at or above the target; runs stop there (or at `--max-steps`). The fidelity at that
point (held-out `"eval"`-split classifier accuracy and Fréchet distance in its feature space, see
`digits_metrics.py`) is measured on a larger fixed-noise sample. Work is counted as denoiser rows: each sample a
forward pass sees counts one, split into no-grad forwards (rollouts) and forwards with grad (each one also
backpropagated; `work_speedup` weighs them 1 and 3).

`speedup` = the full-SDE mean time to target / the fastest variant's mean time among those that reached the target
on every seed with fidelity no worse than full-SDE's at its hit (mean accuracy at most `--accuracy-tolerance` lower,
mean FD at most `--fd-tolerance` relatively higher); null when none qualifies. The per-seed ratios (same seed, same
run) give its spread. Variants run interleaved per seed so that they see about the same machine load; one torch
thread per process.

    python benchmarks/time_to_quality.py                  # 3 seeds x 5 variants, ~8 minutes on 2 busy cores
    python benchmarks/time_to_quality.py --quick          # smoke run: 1 seed, 2 variants, 6 steps, target +0.005
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging


sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_metrics import FidelityJudge  # noqa: E402

from trl_ddrl import DDRLConfig, DDRLTrainer  # noqa: E402
from trl_ddrl.config import resolve_train_timesteps  # noqa: E402
from trl_ddrl.digits import (  # noqa: E402
    DigitClassifierReward,
    digits_dataset,
    digits_prompt,
    ink_reward,
    load_or_pretrain_base,
)
from trl_ddrl.digits.evaluation import sample_digits  # noqa: E402


EVAL_NOISE_SEED = 1234
FIDELITY_NOISE_SEED = 4321


def variants(opts) -> dict[str, dict]:
    """The DDRLConfig overrides of each variant."""
    window = dict(sde_window_size=opts.window_size, sde_window_range=[0, opts.num_inference_steps // 2])
    return {
        "full_sde": {},
        "cps": {"sampler": "cps", "eta": opts.cps_eta},
        "window": window,
        "window_cps": {**window, "sampler": "cps", "eta": opts.cps_eta},
        "window_cps_shared": {**window, "sampler": "cps", "eta": opts.cps_eta, "sde_window_share_prefix": True},
    }


class RowCounter:
    """Count the rows the denoiser sees, with and without grad; paused while evaluating."""

    def __init__(self, denoiser: torch.nn.Module):
        self.no_grad = self.grad = 0
        self.paused = False
        self.handle = denoiser.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if self.paused:
            return
        rows = (args[0] if args else kwargs["sample"]).shape[0]
        if torch.is_grad_enabled():
            self.grad += rows
        else:
            self.no_grad += rows


class TimeToTarget(TrainerCallback):
    """
    Evaluate the raw trained weights every `opts.eval_every` optimizer steps (outside the timed training); the first
    evaluation at or above `target` is the hit, and the run stops there.
    """

    def __init__(self, pipeline, reward, counter: RowCounter, opts, start_reward: float, target: float):
        self.pipeline, self.reward, self.counter, self.opts, self.target = pipeline, reward, counter, opts, target
        self.curve = [{"step": 0, "reward": start_reward, "train_time_s": 0.0, "rows_no_grad": 0, "rows_grad": 0}]
        self.eval_time = 0.0
        self.start = None
        self.hit = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.opts.eval_every:
            return
        now = time.perf_counter()
        train_time = now - self.start - self.eval_time
        self.counter.paused = True
        reward = evaluate_reward(self.pipeline, self.reward, self.opts)
        point = {
            "step": state.global_step,
            "reward": reward,
            "train_time_s": train_time,
            "rows_no_grad": self.counter.no_grad,
            "rows_grad": self.counter.grad,
        }
        self.curve.append(point)
        if reward >= self.target and self.hit is None:
            self.hit = point
            control.should_training_stop = True
        self.counter.paused = False
        self.eval_time += time.perf_counter() - now


@torch.no_grad()
def evaluate_reward(pipeline, reward, opts) -> float:
    images, labels = sample_digits(
        pipeline, opts.eval_samples_per_digit, seed=EVAL_NOISE_SEED, num_inference_steps=opts.num_inference_steps
    )
    values = reward([digits_prompt(label) for label in labels.tolist()], images)
    return sum(values) / len(values)


@torch.no_grad()
def evaluate_fidelity(pipeline, reward, judge: FidelityJudge, opts) -> dict[str, float]:
    images, labels = sample_digits(
        pipeline,
        opts.fidelity_samples_per_digit,
        seed=FIDELITY_NOISE_SEED,
        num_inference_steps=opts.num_inference_steps,
    )
    values = reward([digits_prompt(label) for label in labels.tolist()], images)
    metrics = judge(images, labels)
    return {"reward": sum(values) / len(values), "accuracy": metrics["accuracy"], "fd": metrics["fd"]}


def run_one(variant: str, overrides: dict, seed: int, reward, judge, opts, start_reward: float, target: float) -> dict:
    """Train one variant from the base model until its first evaluation at or above `target` (or `max_steps`)."""
    pipeline = load_or_pretrain_base(show_progress=False)
    pipeline.set_progress_bar_config(disable=True)
    counter = RowCounter(pipeline.unet)
    callback = TimeToTarget(pipeline, reward, counter, opts, start_reward, target)
    samples = opts.num_generations * opts.prompts_per_step
    trained_steps = overrides.get("sde_window_size") or len(
        resolve_train_timesteps(opts.num_inference_steps, 0.5, None)
    )
    args = DDRLConfig(
        output_dir=str(Path(opts.work_dir) / f"{variant}-{seed}"),
        max_steps=opts.max_steps,
        seed=seed,
        report_to="none",
        learning_rate=opts.learning_rate,
        warmup_steps=opts.warmup_steps,
        clip_range=opts.clip_range,
        num_generations=opts.num_generations,
        prompts_per_step=opts.prompts_per_step,
        num_inference_steps=opts.num_inference_steps,
        data_beta=opts.data_beta,
        logging_steps=opts.eval_every,
        save_strategy="no",
        dataloader_pin_memory=False,
        disable_tqdm=True,
        # One micro-batch (and one optimizer step) per iteration, whatever the number of trained steps.
        per_device_train_batch_size=samples * trained_steps,
        **overrides,
    )
    trainer = DDRLTrainer(pipeline, reward, args=args, train_dataset=digits_dataset("base"), callbacks=[callback])
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start - callback.eval_time
    counter.handle.remove()
    result = {
        "variant": variant,
        "seed": seed,
        "target": target,
        "final_eval_reward": callback.curve[-1]["reward"],
        "overrides": overrides,
        "trained_steps_per_sample": args.num_trained_steps,
        "reached_target": callback.hit is not None,
        "curve": callback.curve,
        "train_time_s_total": total,
        "steps_run": trainer.state.global_step,
    }
    if callback.hit is not None:
        result.update(
            step_to_target=callback.hit["step"],
            time_to_target_s=callback.hit["train_time_s"],
            rows_no_grad_to_target=callback.hit["rows_no_grad"],
            rows_grad_to_target=callback.hit["rows_grad"],
        )
    result["fidelity"] = evaluate_fidelity(pipeline, reward, judge, opts)
    hit = f"step {callback.hit['step']:3d}  {callback.hit['train_time_s']:6.1f} s" if callback.hit else "not reached"
    print(
        f"  {variant:18s} seed {seed}: {hit}  rows {counter.no_grad}+{counter.grad} (no grad + grad)  "
        f"accuracy {result['fidelity']['accuracy']:.3f}  fd {result['fidelity']['fd']:.1f}",
        flush=True,
    )
    return result


def work(run_or_entry: dict, prefix: str = "") -> float:
    """Denoiser work to target in forward-row units: a row with grad costs a forward and a backward (1 + 2)."""
    return run_or_entry[f"{prefix}rows_no_grad_to_target"] + 3 * run_or_entry[f"{prefix}rows_grad_to_target"]


def per_seed_ratios(baseline: list[dict], group: list[dict]) -> dict[str, dict[str, float]]:
    """Full-SDE time (and work) to target / this variant's, seed by seed, where both reached it."""
    full = {run["seed"]: run for run in baseline if run["reached_target"]}
    return {
        str(run["seed"]): {
            "time": full[run["seed"]]["time_to_target_s"] / run["time_to_target_s"],
            "work": work(full[run["seed"]]) / work(run),
        }
        for run in group
        if run["reached_target"] and run["seed"] in full
    }


def summarize(runs: list[dict], opts) -> dict:
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run)

    def mean(values):
        return statistics.fmean(values) if values else None

    summary = {}
    for variant, group in by_variant.items():
        reached = [run for run in group if run["reached_target"]]
        summary[variant] = {
            "seeds": [run["seed"] for run in group],
            "reached_on_every_seed": len(reached) == len(group),
            "mean_time_to_target_s": mean([run["time_to_target_s"] for run in reached]),
            "time_to_target_s_per_seed": {str(run["seed"]): run["time_to_target_s"] for run in reached},
            "mean_step_to_target": mean([run["step_to_target"] for run in reached]),
            "steps_to_target_per_seed": {str(run["seed"]): run["step_to_target"] for run in reached},
            "mean_rows_no_grad_to_target": mean([run["rows_no_grad_to_target"] for run in reached]),
            "mean_rows_grad_to_target": mean([run["rows_grad_to_target"] for run in reached]),
            "mean_accuracy": mean([run["fidelity"]["accuracy"] for run in group]),
            "mean_fd": mean([run["fidelity"]["fd"] for run in group]),
            "mean_fidelity_reward": mean([run["fidelity"]["reward"] for run in group]),
        }
    baseline = summary.get("full_sde")
    best, speedup = None, None
    if baseline and baseline["reached_on_every_seed"]:
        for variant, entry in summary.items():
            if variant == "full_sde":
                continue
            entry["time_speedup"] = (
                baseline["mean_time_to_target_s"] / entry["mean_time_to_target_s"]
                if entry["reached_on_every_seed"]
                else None
            )
            entry["work_speedup"] = (
                work(baseline, "mean_") / work(entry, "mean_") if entry["reached_on_every_seed"] else None
            )
            ratios = per_seed_ratios(by_variant["full_sde"], by_variant[variant])
            entry["speedup_per_seed"] = ratios
            entry["time_speedup_seed_range"] = (
                [min(r["time"] for r in ratios.values()), max(r["time"] for r in ratios.values())] if ratios else None
            )
            entry["fidelity_no_worse"] = entry["mean_accuracy"] >= baseline[
                "mean_accuracy"
            ] - opts.accuracy_tolerance and entry["mean_fd"] <= baseline["mean_fd"] * (1 + opts.fd_tolerance)
            if entry["time_speedup"] is not None and entry["fidelity_no_worse"]:
                if speedup is None or entry["time_speedup"] > speedup:
                    best, speedup = variant, entry["time_speedup"]
    return {"summary": summary, "best_variant": best, "speedup": speedup}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Smoke run: 1 seed, full_sde and window, low target.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reward", choices=("ink", "classifier"), default="ink", help="Training and target reward.")
    parser.add_argument("--variants", nargs="+", default=None, help="Subset of the variants (default: all).")
    parser.add_argument(
        "--target-gain",
        type=float,
        default=0.1,
        help="Target: the base model's eval reward (per seed under --reward classifier: each seed trains its own "
        "reward classifier) plus this.",
    )
    parser.add_argument("--target", type=float, default=None, help="An absolute target eval reward instead.")
    parser.add_argument("--max-steps", type=int, default=60, help="Optimizer steps (= RL iterations) at most.")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--eval-samples-per-digit", type=int, default=6)
    parser.add_argument("--fidelity-samples-per-digit", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=3, help="Linear warm-up optimizer steps (from lr 0).")
    parser.add_argument("--clip-range", type=float, default=1e-3)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-inference-steps", type=int, default=10)
    parser.add_argument("--data-beta", type=float, default=0.03)
    parser.add_argument("--window-size", type=int, default=2)
    parser.add_argument("--cps-eta", type=float, default=0.8)
    parser.add_argument("--accuracy-tolerance", type=float, default=0.02)
    parser.add_argument("--fd-tolerance", type=float, default=0.10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--output",
        default=str(Path(__file__).resolve().parent / "results" / "time_to_quality.json"),
    )
    parser.add_argument("--work-dir", default="/tmp/trl_ddrl_time_to_quality")
    opts = parser.parse_args(argv)
    opts.argv = list(argv if argv is not None else sys.argv[1:])
    if opts.quick:
        opts.seeds, opts.max_steps = opts.seeds[:1], 6
        if opts.target_gain == parser.get_default("target_gain"):
            opts.target_gain = 0.005
        opts.variants = opts.variants or ["full_sde", "window"]
        if opts.output == parser.get_default("output"):
            opts.output = "/tmp/trl_ddrl_time_to_quality_quick.json"
    return opts


def main(argv=None) -> dict:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    load_start = os.getloadavg()
    start = time.perf_counter()
    chosen = variants(opts)
    if opts.variants:
        chosen = {name: chosen[name] for name in opts.variants}
    judge = FidelityJudge(seed=0)
    base = load_or_pretrain_base(show_progress=False)
    base.set_progress_bar_config(disable=True)
    runs, base_fidelity = [], {}
    for seed in opts.seeds:
        reward = DigitClassifierReward(seed=seed) if opts.reward == "classifier" else ink_reward
        start_reward = evaluate_reward(base, reward, opts)
        base_fidelity[str(seed)] = evaluate_fidelity(base, reward, judge, opts)
        target = opts.target if opts.target is not None else start_reward + opts.target_gain
        print(f"seed {seed}: base model eval reward {start_reward:.3f}, target {target:.3f}", flush=True)
        for variant, overrides in chosen.items():
            runs.append(run_one(variant, overrides, seed, reward, judge, opts, start_reward, target))
            results = {
                "command": "python benchmarks/time_to_quality.py " + " ".join(opts.argv),
                "settings": {key: value for key, value in vars(opts).items() if key not in ("argv", "work_dir")},
                **summarize(runs, opts),
                "base_fidelity": base_fidelity,
                "runs": runs,
                "runtime_s": time.perf_counter() - start,
                "load_average_at_start": load_start,
                "load_average_at_end": os.getloadavg(),
                "torch_threads": torch.get_num_threads(),
                "evaluated_weights": "raw (the trainer keeps and updates its EMA, use_ema=True; see the docstring)",
            }
            Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.output).write_text(json.dumps(results, indent=2) + "\n")
    for variant, entry in results["summary"].items():
        print(
            f"{variant:18s} time to target {entry['mean_time_to_target_s']}  speedup {entry.get('time_speedup')} "
            f"(per seed {entry.get('time_speedup_seed_range')})  "
            f"accuracy {entry['mean_accuracy']:.3f}  fd {entry['mean_fd']:.1f}"
        )
    print(f"speedup (full-SDE time / best variant's time at no worse fidelity): {results['speedup']}")
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {results['load_average_at_end']}")
    return results


if __name__ == "__main__":
    main()
