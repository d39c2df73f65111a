# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Reward hacking on the embedded digits model: does DDRL raise a hackable reward without the loss of fidelity that
reward-only RL and reverse-KL RL show? (arXiv 2512.04332's central claim, offline, on two CPU cores.)

Every method starts from the same cached base generator and trains with the same budget, seeds and hyper-parameters;
only the regulariser changes:

- `reward_only`: `data_beta=0, kl_beta=0`;
- `reverse_kl`: `data_beta=0, kl_beta>0` (the Flow-GRPO / DanceGRPO baseline);
- `ddrl`: `data_beta>0`, the data term fed with real `"base"`-split digits of each group's prompted class.

Every `--eval-every` steps the trainer's own evaluation (`eval_dataset`, `DDRLTrainer.evaluate`) samples every digit
from fixed noise with the deterministic sampler and scores the samples with the training reward and with a held-out
judge (`eval_reward_funcs`): a classifier trained on the held-out `"eval"` split, whose samples also give the
Fréchet distance and diversity of `digits_metrics.py`; the eval rows carry held-out digits, so each point also has the
held-out diffusion loss (`data_loss`). A `data_beta`
sweep and a `kl_beta` sweep trace the reward-vs-fidelity trade-off of each regulariser. Results go to `--output-dir` (default `docs/reward_hacking/`):
`results.json`, `results.csv`, `curves.png`, `trajectories.png`, `pareto.png` and `samples.png`.

    python benchmarks/reward_hacking.py --quick        # smoke run, ~2 minutes
    python benchmarks/reward_hacking.py                # the full benchmark (~30 minutes on 2 CPU cores)
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_metrics import FidelityJudge, frechet_distance, gaussian_stats, within_prompt_diversity  # noqa: E402

from trl_ddrl import DDRLConfig, DDRLTrainer  # noqa: E402
from trl_ddrl.digits import (  # noqa: E402
    DigitClassifierReward,
    digits_dataset,
    ink_reward,
    load_or_pretrain_base,
    parse_digit,
)
from trl_ddrl.digits.default_job import held_out_eval_dataset  # noqa: E402
from trl_ddrl.digits.evaluation import sample_digits  # noqa: E402
from trl_ddrl.rewards import get_reward_function  # noqa: E402


REWARDS = ("classifier", "ink", "jpeg")
# The forms and optimizer settings `DDRLConfig` had before it followed the authors' recipe (issue #11), with which
# docs/reward_hacking.md's table was made; `--recipe current` uses today's defaults instead (docs/fidelity.md).
PRE_ISSUE_11 = dict(
    log_ratio_form="gaussian",
    kl_form="gaussian",
    data_loss_weighting="uniform",
    loss_scale=1.0,
    weight_decay=0.0,
    adam_beta2=0.999,
    lr_scheduler_type="linear",
    warmup_steps=0,
    multi_objective_aggregation="sum_then_normalize",
)
METRICS = ("reward", "accuracy", "fd", "diversity")
METHOD_COLORS = {"base": "black", "reward_only": "tab:red", "reverse_kl": "tab:orange", "ddrl": "tab:blue"}
EVAL_NOISE_SEED = 1234
GRID_SAMPLES_PER_DIGIT = 8


_REWARD_CLASSIFIERS: dict[int, torch.nn.Module] = {}


def make_reward(name: str, seed: int):
    """
    The training reward `(prompts, images) -> list[float]`. The classifier reward is trained on the `"reward"` split
    with `seed`, once per seed (all methods of a seed share it).
    """
    if name == "classifier":
        if seed not in _REWARD_CLASSIFIERS:
            _REWARD_CLASSIFIERS[seed] = DigitClassifierReward(seed=seed).classifier
        return DigitClassifierReward(classifier=_REWARD_CLASSIFIERS[seed])
    if name == "ink":
        return ink_reward
    return get_reward_function("jpeg_incompressibility")


EVAL_ROWS_PER_DIGIT = 5


class HeldOutJudge:
    """
    The held-out judge as an eval-only reward function of the trainer: 1 when the `"eval"`-split classifier reads the
    prompted digit, else 0. It keeps the samples of the running evaluation, from which `fidelity` adds the Fréchet
    distance and the within-prompt diversity.
    """

    name = "held_out_accuracy"

    def __init__(self, judge: FidelityJudge):
        self.judge = judge
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, prompts: list[str], images: torch.Tensor, **columns) -> list[float]:
        labels = torch.tensor([parse_digit(prompt) for prompt in prompts])
        self.images.append(images.float().cpu())
        self.labels.append(labels)
        return (self.judge.classifier(images.float().cpu()).argmax(dim=1) == labels).float().tolist()

    def fidelity(self, metrics: dict[str, float]) -> tuple[dict[str, float], torch.Tensor]:
        """The curve point of one evaluation (its `metrics`) and its samples `[N, 1, 16, 16]`, digit-major."""
        images, labels = torch.cat(self.images), torch.cat(self.labels)
        self.images, self.labels = [], []
        point = {
            "reward": metrics["eval_reward"],
            "accuracy": metrics["eval_rewards/held_out_accuracy/mean"],
            "fd": frechet_distance(*gaussian_stats(self.judge.features(images)), *self.judge.real_stats),
            "diversity": within_prompt_diversity(images, labels),
            "data_loss": metrics["eval_data_loss"],
        }
        return point, images


def ddrl_args(opts, output_dir: str, seed: int, **overrides) -> DDRLConfig:
    """The settings every run shares, including the evaluation: `eval_samples_per_digit` samples of every digit."""
    if opts.eval_samples_per_digit % EVAL_ROWS_PER_DIGIT:
        raise ValueError(
            f"--eval-samples-per-digit={opts.eval_samples_per_digit} must be a multiple of {EVAL_ROWS_PER_DIGIT} (the "
            "held-out images per digit, each sampled the same number of times)."
        )
    settings = dict(
        output_dir=output_dir,
        max_steps=opts.steps,
        seed=seed,
        report_to="none",
        learning_rate=opts.learning_rate,
        clip_range=opts.clip_range,
        num_generations=opts.num_generations,
        prompts_per_step=opts.prompts_per_step,
        num_inference_steps=opts.num_inference_steps,
        train_timesteps=opts.train_timesteps,
        per_device_train_batch_size=opts.num_generations * opts.prompts_per_step * len(opts.train_timesteps),
        logging_steps=opts.eval_every,
        eval_strategy="steps",
        eval_steps=opts.eval_every,
        eval_num_generations=opts.eval_samples_per_digit // EVAL_ROWS_PER_DIGIT,
        eval_seed=EVAL_NOISE_SEED,
        per_device_eval_batch_size=10 * opts.eval_samples_per_digit,
        log_samples_steps=0,
        save_strategy="no",
        dataloader_pin_memory=False,
        disable_tqdm=True,
        **(PRE_ISSUE_11 if opts.recipe == "pre-issue-11" else {"warmup_steps": max(1, opts.steps // 10)}),
    )
    settings.update(overrides)
    return DDRLConfig(**settings)


def make_trainer(pipeline, reward, args: DDRLConfig, held_out: HeldOutJudge, callbacks=None) -> DDRLTrainer:
    return DDRLTrainer(
        pipeline,
        reward,
        args=args,
        train_dataset=digits_dataset("base"),
        eval_dataset=held_out_eval_dataset(EVAL_ROWS_PER_DIGIT),
        eval_reward_funcs=held_out,
        callbacks=callbacks,
    )


def evaluate_base(pipeline, reward, held_out: HeldOutJudge, opts, seed: int) -> tuple[dict[str, float], torch.Tensor]:
    """The base model's curve point (step 0), from the trainer's evaluation."""
    args = ddrl_args(opts, str(Path(opts.work_dir) / f"base-{seed}"), seed, eval_strategy="no")
    return held_out.fidelity(make_trainer(pipeline, reward, args, held_out).evaluate())


class FidelityCallback(TrainerCallback):
    """Turn each of the trainer's evaluations into a curve point `{"step", *METRICS, "data_loss"}`."""

    def __init__(self, held_out: HeldOutJudge, start: dict[str, float]):
        self.held_out = held_out
        self.curve = [{"step": 0, **start}]
        self.images = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        point, self.images = self.held_out.fidelity(metrics)
        self.curve.append({"step": state.global_step, **point})
        print(f"    step {state.global_step:3d}  " + "  ".join(f"{k}={v:.4f}" for k, v in point.items()), flush=True)


def run_one(
    method: str, data_beta: float, kl_beta: float, seed: int, reward_name: str, opts, held_out, base_eval
) -> dict:
    """Train one method from the base model and return its curve, final metrics, final samples and runtime."""
    pipeline = load_or_pretrain_base(show_progress=False)
    reward = make_reward(reward_name, seed)
    callback = FidelityCallback(held_out, base_eval[seed])
    output_dir = str(Path(opts.work_dir) / f"{method}-{data_beta}-{kl_beta}-{seed}")
    args = ddrl_args(opts, output_dir, seed, data_beta=data_beta, kl_beta=kl_beta)
    trainer = make_trainer(pipeline, reward, args, held_out, callbacks=[callback])
    start = time.perf_counter()
    trainer.train()
    if callback.curve[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()  # the final point, when max_steps is not a multiple of eval_every
    return {
        "method": method,
        "data_beta": data_beta,
        "kl_beta": kl_beta,
        "seed": seed,
        "curve": callback.curve,
        "final": {name: callback.curve[-1][name] for name in METRICS},
        "train_runtime_s": time.perf_counter() - start,
        "images": callback.images,
    }


def summarize(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and (sample) standard deviation over seeds of each final metric."""
    summary = {}
    for name in METRICS:
        values = [run["final"][name] for run in runs]
        summary[name] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return summary


def markdown_table(rows: list[tuple[str, dict]], seeds: int) -> str:
    """The main table in markdown: one row per method, mean ± std over seeds of every metric."""
    arrows = {"reward": "↑", "accuracy": "↑", "fd": "↓", "diversity": "≈ base"}
    header = "| method | " + " | ".join(f"{name} {arrows[name]}" for name in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for label, summary in rows:
        cells = [f"{summary[name]['mean']:.3f} ± {summary[name]['std']:.3f}" for name in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n(mean ± std over {seeds} seeds)"


def plot_curves(runs_by_method: dict[str, list[dict]], base_eval: dict, path: Path, reward_name: str) -> None:
    """Every metric against the optimizer step, mean over seeds with a ±std band, one line per method."""
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    titles = {
        "reward": f"reward ({reward_name})",
        "accuracy": "held-out accuracy",
        "fd": "Fréchet distance to eval digits",
        "diversity": "within-prompt diversity",
    }
    for axis, name in zip(axes, METRICS, strict=True):
        for method, runs in runs_by_method.items():
            steps = [point["step"] for point in runs[0]["curve"]]
            values = torch.tensor([[point[name] for point in run["curve"]] for run in runs])
            mean, std = values.mean(0), values.std(0) if len(runs) > 1 else torch.zeros(len(steps))
            axis.plot(steps, mean, label=method, color=METHOD_COLORS.get(method))
            axis.fill_between(steps, mean - std, mean + std, alpha=0.2, color=METHOD_COLORS.get(method))
        base = statistics.fmean(point[name] for point in base_eval.values())
        axis.axhline(base, color="black", linestyle=":", linewidth=1, label="base")
        axis.set_title(titles[name])
        axis.set_xlabel("optimizer step")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_trajectories(runs_by_method: dict[str, list[dict]], path: Path, reward_name: str) -> None:
    """Reward against fidelity (FD, held-out accuracy) over training: each seed is a path from the base model."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, name, label in (
        (axes[0], "fd", "Fréchet distance (lower is better)"),
        (axes[1], "accuracy", "held-out accuracy"),
    ):
        for method, runs in runs_by_method.items():
            for index, run in enumerate(runs):
                xs = [point[name] for point in run["curve"]]
                ys = [point["reward"] for point in run["curve"]]
                axis.plot(
                    xs,
                    ys,
                    marker=".",
                    color=METHOD_COLORS.get(method),
                    alpha=0.7,
                    label=method if index == 0 else None,
                )
                axis.scatter(xs[-1:], ys[-1:], marker="x", color=METHOD_COLORS.get(method))
        axis.set_xlabel(label)
        axis.set_ylabel(f"reward ({reward_name})")
    axes[0].legend()
    figure.suptitle("Reward vs fidelity over training (each path: one seed, from the base model; x = final)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_pareto(sweeps: dict[str, list[dict]], base: dict, path: Path, reward_name: str) -> None:
    """
    Final reward against FD and held-out accuracy for each regulariser weight of the sweeps (mean ± std over seeds):
    one curve for `data_beta` (DDRL, kl_beta=0), one for `kl_beta` (reverse KL, data_beta=0); both start at the
    reward-only run (weight 0).
    """
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"data_beta": METHOD_COLORS["ddrl"], "kl_beta": METHOD_COLORS["reverse_kl"]}
    for axis, name, label in (
        (axes[0], "fd", "Fréchet distance (lower is better)"),
        (axes[1], "accuracy", "held-out accuracy"),
    ):
        for weight, sweep in sweeps.items():
            if not sweep:
                continue
            xs = [point["summary"][name]["mean"] for point in sweep]
            ys = [point["summary"]["reward"]["mean"] for point in sweep]
            axis.errorbar(
                xs,
                ys,
                xerr=[point["summary"][name]["std"] for point in sweep],
                yerr=[point["summary"]["reward"]["std"] for point in sweep],
                marker="o",
                color=colors[weight],
                label=f"{weight} sweep",
                capsize=2,
            )
            for x, y, point in zip(xs, ys, sweep, strict=True):
                axis.annotate(
                    f"{point[weight]:g}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=colors[weight],
                )
        axis.scatter([base[name]], [base["reward"]], color="black", marker="*", s=120, label="base model", zorder=3)
        axis.set_xlabel(label)
        axis.set_ylabel(f"final reward ({reward_name})")
    axes[0].set_xscale("log")
    axes[0].legend()
    figure.suptitle("Regulariser sweeps: reward vs fidelity after training (labels: the weight; 0 = reward-only)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_samples(panels: list[tuple[str, torch.Tensor]], samples_per_digit: int, path: Path) -> None:
    """One panel per method: `GRID_SAMPLES_PER_DIGIT` fixed-noise samples (columns) of every digit (rows)."""
    figure, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.6))
    for axis, (title, images) in zip(axes, panels, strict=True):
        rows = []
        for digit in range(10):
            picked = images[digit * samples_per_digit : digit * samples_per_digit + GRID_SAMPLES_PER_DIGIT, 0]
            picked = torch.nn.functional.pad(picked, [1, 1, 1, 1], value=0.35)
            rows.append(torch.cat(list(picked), dim=1))
        axis.imshow(torch.cat(rows, dim=0).clamp(0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Smoke run: 1 seed, 6 steps, tiny sweep.")
    parser.add_argument("--reward", choices=REWARDS, default="ink", help="Training reward.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=25, help="Optimizer steps (= RL iterations) per run.")
    parser.add_argument(
        "--recipe",
        choices=("pre-issue-11", "current"),
        default="pre-issue-11",
        help="'pre-issue-11': the Flow-GRPO forms and HF optimizer defaults the committed table was made with; "
        "'current': DDRLConfig's defaults (the authors' recipe), with warm-up shortened to a tenth of the run.",
    )
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-samples-per-digit", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--clip-range", type=float, default=1e-3)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-inference-steps", type=int, default=10)
    parser.add_argument(
        "--train-timesteps",
        type=int,
        nargs="+",
        default=[0, 2, 4, 6],
        help="Sampling-step indices trained on (of num_inference_steps - 1 stochastic ones).",
    )
    parser.add_argument("--kl-beta", type=float, default=0.1, help="kl_beta of the reverse-KL baseline.")
    parser.add_argument("--data-beta", type=float, default=0.03, help="data_beta of the main DDRL runs.")
    parser.add_argument(
        "--sweep-betas",
        type=float,
        nargs="*",
        default=[0.01, 0.1, 0.3],
        help="Extra data_beta values of the sweep (the main run's data_beta and 0 are added).",
    )
    parser.add_argument(
        "--kl-sweep-betas",
        type=float,
        nargs="*",
        default=[0.03, 0.3, 1.0],
        help="Extra kl_beta values of the reverse-KL sweep (the main run's kl_beta and 0 are added).",
    )
    parser.add_argument("--sweep-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="*", default=["reward_only", "reverse_kl", "ddrl"])
    parser.add_argument("--output-dir", default="docs/reward_hacking")
    parser.add_argument("--work-dir", default="/tmp/trl_ddrl_reward_hacking")
    parser.add_argument(
        "--resume",
        help="runs.pt of an earlier invocation with the same settings: its runs are kept and not trained again.",
    )
    parser.add_argument(
        "--report-only",
        metavar="RESULTS_JSON",
        help="With --resume: train nothing, take the base-model and real-digit metrics from this results.json and "
        "rewrite the table, plots and results from the resumed runs.",
    )
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.seeds, opts.steps, opts.eval_every = opts.seeds[:1], 6, 3
        opts.sweep_betas, opts.kl_sweep_betas, opts.sweep_seeds = opts.sweep_betas[-1:], [], opts.seeds
        if opts.output_dir == parser.get_default("output_dir"):
            opts.output_dir = "/tmp/trl_ddrl_reward_hacking_quick"
    return opts


LABELS = {
    "base": "base model (no training)",
    "reward_only": "reward-only RL (data_beta=0, kl_beta=0)",
    "reverse_kl": "reverse-KL RL (kl_beta={kl_beta:g})",
    "ddrl": "DDRL (data_beta={data_beta:g})",
}


def write_outputs(opts, runs, base_eval, base_images, real_metrics, settings, runtime) -> str:
    """Summaries, table, plots, JSON and CSV of the runs so far (called after every run, so a cut run keeps them)."""
    output = Path(opts.output_dir)
    labels = {name: label.format(kl_beta=opts.kl_beta, data_beta=opts.data_beta) for name, label in LABELS.items()}

    def find(data_beta: float, kl_beta: float, seed: int) -> dict | None:
        return next((r for r in runs if (r["data_beta"], r["kl_beta"], r["seed"]) == (data_beta, kl_beta, seed)), None)

    runs_by_method = {m: [r for r in runs if r["method"] == m] for m in opts.methods}
    runs_by_method = {m: group for m, group in runs_by_method.items() if group}
    done_seeds = sorted({r["seed"] for group in runs_by_method.values() for r in group}) or opts.seeds[:1]
    summaries = {"base": summarize([{"final": base_eval[seed]} for seed in done_seeds])}
    summaries.update({m: summarize(group) for m, group in runs_by_method.items()})
    seeds_per_method = {m: [r["seed"] for r in group] for m, group in runs_by_method.items()}
    sweeps = {"data_beta": [], "kl_beta": []}
    for weight, values in (
        ("data_beta", opts.sweep_betas + [opts.data_beta]),
        ("kl_beta", opts.kl_sweep_betas + [opts.kl_beta]),
    ):
        for value in sorted({0.0, *values}):
            key = (value, 0.0) if weight == "data_beta" else (0.0, value)
            picked = [run for seed in opts.sweep_seeds if (run := find(*key, seed)) is not None]
            if picked:
                sweeps[weight].append(
                    {weight: value, "seeds": [r["seed"] for r in picked], "summary": summarize(picked)}
                )

    table = markdown_table([(labels[name], summary) for name, summary in summaries.items()], len(done_seeds))
    if runs_by_method:
        plot_curves(runs_by_method, {s: base_eval[s] for s in done_seeds}, output / "curves.png", opts.reward)
        plot_trajectories(runs_by_method, output / "trajectories.png", opts.reward)
        first = opts.seeds[0]
        panels = [("base", base_images)] + [
            (labels[m], find(*settings[m], first)["images"]) for m in runs_by_method if find(*settings[m], first)
        ]
        plot_samples(panels, opts.eval_samples_per_digit, output / "samples.png")
    if any(sweeps.values()):
        base_mean = {name: statistics.fmean(base_eval[s][name] for s in opts.sweep_seeds) for name in METRICS}
        plot_pareto(sweeps, base_mean, output / "pareto.png", opts.reward)

    results = {
        "command": "python benchmarks/reward_hacking.py " + " ".join(opts.argv),
        "settings": {key: value for key, value in vars(opts).items() if key not in ("work_dir", "argv")},
        "real_eval_digits": real_metrics,
        "summary": summaries,
        "seeds_per_method": seeds_per_method,
        "sweeps": sweeps,
        "runs": [{key: value for key, value in run.items() if key != "images"} for run in runs],
        "base_eval": {str(seed): metrics for seed, metrics in base_eval.items()},
        "runtime_s": runtime,
        "torch_threads": torch.get_num_threads(),
    }
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output / "table.md").write_text(table + "\n")
    with open(output / "results.csv", "w") as handle:
        handle.write("method,data_beta,kl_beta,seed," + ",".join(METRICS) + ",train_runtime_s\n")
        for seed in done_seeds:
            handle.write(f"base,0,0,{seed}," + ",".join(f"{base_eval[seed][n]:.6f}" for n in METRICS) + ",0\n")
        for run in runs:
            handle.write(
                f"{run['method']},{run['data_beta']},{run['kl_beta']},{run['seed']},"
                + ",".join(f"{run['final'][n]:.6f}" for n in METRICS)
                + f",{run['train_runtime_s']:.1f}\n"
            )
    return table


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    opts.argv = argv
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    Path(opts.output_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    base_pipeline = load_or_pretrain_base(show_progress=False)
    if opts.report_only:
        if not opts.resume:
            raise ValueError("--report-only rewrites the outputs of resumed runs; give --resume runs.pt too.")
        earlier = json.loads(Path(opts.report_only).read_text())
        real_metrics = earlier["real_eval_digits"]
        base_eval = {int(seed): metrics for seed, metrics in earlier["base_eval"].items()}
        base_images = sample_digits(
            base_pipeline,
            opts.eval_samples_per_digit,
            seed=EVAL_NOISE_SEED,
            num_inference_steps=opts.num_inference_steps,
        )[0]
        runs = torch.load(opts.resume, weights_only=False)
        settings = {"reward_only": (0.0, 0.0), "reverse_kl": (0.0, opts.kl_beta), "ddrl": (opts.data_beta, 0.0)}
        print(write_outputs(opts, runs, base_eval, base_images, real_metrics, settings, 0.0), flush=True)
        return json.loads((Path(opts.output_dir) / "results.json").read_text())
    judge = FidelityJudge(seed=0)
    held_out = HeldOutJudge(judge)
    real_metrics = judge(judge.real_images, judge.real_labels)
    print(f"real eval digits: {real_metrics}", flush=True)

    base_eval, base_images = {}, None
    for seed in sorted(set(opts.seeds) | set(opts.sweep_seeds)):
        metrics, images = evaluate_base(base_pipeline, make_reward(opts.reward, seed), held_out, opts, seed)
        base_eval[seed], base_images = metrics, base_images if base_images is not None else images
        print(f"base model, seed {seed}: {metrics}", flush=True)

    settings = {"reward_only": (0.0, 0.0), "reverse_kl": (0.0, opts.kl_beta), "ddrl": (opts.data_beta, 0.0)}
    # Order: every seed of the main methods, then the sweeps, so that a run cut short still has the main table.
    plan = [(m, *settings[m], seed) for seed in opts.seeds for m in opts.methods]
    plan += [("sweep", beta, 0.0, seed) for seed in opts.sweep_seeds for beta in opts.sweep_betas]
    plan += [("kl_sweep", 0.0, beta, seed) for seed in opts.sweep_seeds for beta in opts.kl_sweep_betas]
    runs: list[dict] = torch.load(opts.resume, weights_only=False) if opts.resume else []
    table = ""
    for method, data_beta, kl_beta, seed in plan:
        if any((r["data_beta"], r["kl_beta"], r["seed"]) == (data_beta, kl_beta, seed) for r in runs):
            continue
        print(
            f"[{time.perf_counter() - start:6.0f}s] {method} seed={seed} data_beta={data_beta} kl_beta={kl_beta}",
            flush=True,
        )
        runs.append(run_one(method, data_beta, kl_beta, seed, opts.reward, opts, held_out, base_eval))
        Path(opts.work_dir).mkdir(parents=True, exist_ok=True)
        torch.save(runs, Path(opts.work_dir) / "runs.pt")
        table = write_outputs(opts, runs, base_eval, base_images, real_metrics, settings, time.perf_counter() - start)

    print("\n" + table + "\n", flush=True)
    print(f"real eval digits (reference): {real_metrics}")
    print(f"done in {time.perf_counter() - start:.0f}s; results in {opts.output_dir}", flush=True)
    return json.loads((Path(opts.output_dir) / "results.json").read_text())


if __name__ == "__main__":
    main()
