# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Long-horizon reward hacking on the embedded digits model: does DDRL's forward KL to data keep holding when training
runs long, where the reverse KL measured on the policy's own samples stops constraining the policy? (issue #16)

`reward_hacking.py` compares the regularisers over 20-25 steps at a high learning rate. This study trains every run
for `--steps` (default 300) optimizer steps at `--learning-rate` (default 1e-4) under the authors' recipe
(`DDRLConfig`'s defaults: EDM squared-distance log-ratio and KL, EDM data weighting, loss x10, EMA, evaluated under
the EMA), and, as the `flow_grpo` scaling, with Flow-GRPO's forms instead (Gaussian log-density ratio and KL, uniform
data weighting, no loss scaling; optimizer and EMA unchanged, so that only the scale of the objective differs).
Each iteration draws `--prompts-per-step` prompts (so as many distinct real digits of the `"base"` split feed the
data term) with `--num-generations` rollouts each. A run is one point of the plan:

- `reward_only` (`data_beta=0, kl_beta=0`) and `data_only` (a constant reward, so every advantage is 0 and only the
  data term trains) as controls;
- `ddrl` for every `--data-betas` value (`kl_beta=0`) and `reverse_kl` for every `--kl-betas` value (`data_beta=0`),
  the two fronts compared at matched reward;
- `ddrl_base_model`: DDRL at `--base-model-data-beta` with `data_source="base_model"` (the reference model's own
  samples as the data) against real digits.

Every `--eval-every` steps the trainer's evaluation (the machinery of `reward_hacking.py`) samples every digit from
fixed noise and records the training reward, held-out accuracy (a classifier trained on the held-out `"eval"` split),
Fréchet distance to the eval digits, within-prompt diversity and the held-out diffusion loss.

The plan is ordered by priority (the classifier reward under the authors' recipe first, seed by seed) and every run
is saved on its own as `<work-dir>/runs/<key>.json`, so the study resumes run by run and several workers share it:
each claims a run with an exclusive claim file before training it (a claim whose process is gone is taken over).

    python benchmarks/long_horizon.py --worker &            # one worker per core; start as many as cores
    python benchmarks/long_horizon.py --report              # gather the finished runs: JSON, plots, fronts
    python benchmarks/long_horizon.py --worker --quick      # smoke run: 4 runs of 4 steps in /tmp (~30 s)

`--report` writes `docs/reward_hacking/long_horizon.json` (settings, the plan, per-run curves and finals with `steps`
and `seed`, the fronts and their comparison at matched reward with the seed spread, the runs' cost), and plots and
markdown tables (`tables.md`) in `docs/reward_hacking/long_horizon/`.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))
import reward_hacking  # noqa: E402
from digits_metrics import FidelityJudge  # noqa: E402

from trl_ddrl import DDRLTrainer  # noqa: E402
from trl_ddrl.digits import digits_dataset, load_or_pretrain_base  # noqa: E402
from trl_ddrl.digits.default_job import held_out_eval_dataset  # noqa: E402


METRICS = ("reward", "accuracy", "fd", "diversity", "data_loss")
FIDELITY = ("accuracy", "fd", "diversity")  # compared at matched reward
# The settings of `reward_hacking.ddrl_args` that every run shares (its warm-up is a tenth of the steps).
RUN_SETTINGS = (
    "steps",
    "recipe",
    "learning_rate",
    "clip_range",
    "num_generations",
    "prompts_per_step",
    "num_inference_steps",
    "train_timesteps",
    "eval_every",
    "eval_samples_per_digit",
)
REWARDS = ("classifier", "ink", "jpeg")
SCALINGS = ("authors", "flow_grpo")
# Flow-GRPO's scale of the objective; everything else (optimizer, EMA, sampler) stays at DDRLConfig's defaults.
FLOW_GRPO_SCALING = dict(log_ratio_form="gaussian", kl_form="gaussian", data_loss_weighting="uniform", loss_scale=1.0)


def constant_reward(prompts: list[str], images: torch.Tensor, **columns) -> list[float]:
    """The data-only control's reward: the same for every sample, so every group's advantages are 0."""
    return [0.0] * len(prompts)


def run_key(spec: dict) -> str:
    return (
        f"{spec['reward']}-{spec['scaling']}-{spec['method']}-db{spec['data_beta']:g}-kb{spec['kl_beta']:g}"
        f"-{spec['data_source']}-s{spec['seed']}"
    )


def make_spec(reward: str, scaling: str, method: str, seed: int, data_beta=0.0, kl_beta=0.0, data_source="dataset"):
    return dict(
        reward=reward,
        scaling=scaling,
        method=method,
        data_beta=float(data_beta),
        kl_beta=float(kl_beta),
        data_source=data_source,
        seed=seed,
    )


def study_plan(opts) -> list[dict]:
    """
    Every run, in priority order: for each (reward, scaling) tier the controls and both sweeps seed by seed, then the
    synthetic-data run. Tiers: the classifier reward under the authors' recipe, then under Flow-GRPO's scaling, then
    the other rewards under the authors' recipe.
    """
    tiers = [(opts.rewards[0], scaling) for scaling in opts.scalings]
    tiers += [(reward, opts.scalings[0]) for reward in opts.rewards[1:]]
    plan = []
    for reward, scaling in tiers:
        for seed in opts.seeds:
            plan.append(make_spec(reward, scaling, "reward_only", seed))
            plan += [make_spec(reward, scaling, "ddrl", seed, data_beta=beta) for beta in opts.data_betas]
            plan += [make_spec(reward, scaling, "reverse_kl", seed, kl_beta=beta) for beta in opts.kl_betas]
            plan.append(make_spec(reward, scaling, "data_only", seed, data_beta=opts.data_only_beta))
        if scaling == "authors":
            plan += [
                make_spec(
                    reward,
                    scaling,
                    "ddrl_base_model",
                    seed,
                    data_beta=opts.base_model_data_beta,
                    data_source="base_model",
                )
                for seed in opts.seeds
            ]
    return plan


def benchmark_opts(opts) -> argparse.Namespace:
    """The shared run settings, in the form `reward_hacking.ddrl_args` takes."""
    return reward_hacking.parse_args(
        [
            "--recipe", "current",
            "--steps", str(opts.steps),
            "--eval-every", str(opts.eval_every),
            "--eval-samples-per-digit", str(opts.eval_samples_per_digit),
            "--learning-rate", str(opts.learning_rate),
            "--num-generations", str(opts.num_generations),
            "--prompts-per-step", str(opts.prompts_per_step),
        ]
    )  # fmt: skip


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(path: Path) -> bool:
    """Claim a run for this process: an exclusive claim file holding our pid; a dead process's claim is taken over."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            owner = int(path.read_text() or "0")
        except (OSError, ValueError):
            return False
        if owner and process_alive(owner):
            return False
        path.unlink(missing_ok=True)
        return claim(path)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def base_point(spec: dict, bench, held_out, work: Path) -> dict:
    """The base model's evaluation (step 0) for the run's reward and seed, cached in `<work>/base/`."""
    path = work / "base" / f"{spec['reward']}-s{spec['seed']}.json"
    if path.exists():
        return json.loads(path.read_text())
    reward = reward_hacking.make_reward(spec["reward"], spec["seed"])
    pipeline = load_or_pretrain_base(show_progress=False)
    point, _ = reward_hacking.evaluate_base(pipeline, reward, held_out, bench, spec["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(point))
    return point


class TrueRewardJudge:
    """The data-only control's eval judge: the real training reward, which its constant training reward is not."""

    name = "true_reward"

    def __init__(self, reward_function):
        self.reward_function = reward_function

    def __call__(self, prompts: list[str], images: torch.Tensor, **columns) -> list[float]:
        return self.reward_function(prompts, images, **columns)


class TrueRewardCallback(reward_hacking.FidelityCallback):
    """A curve point whose `reward` is the real reward (`TrueRewardJudge`), for the data-only control."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = {**metrics, "eval_reward": metrics[f"eval_rewards/{TrueRewardJudge.name}/mean"]}
        super().on_evaluate(args, state, control, metrics=metrics, **kwargs)


def train_run(spec: dict, bench, held_out, work: Path) -> dict:
    """Train one run of the plan from the base model and return its curve, finals and cost."""
    start_point = base_point(spec, bench, held_out, work)
    pipeline = load_or_pretrain_base(show_progress=False)
    reward_function = reward_hacking.make_reward(spec["reward"], spec["seed"])
    overrides = dict(data_beta=spec["data_beta"], kl_beta=spec["kl_beta"], data_source=spec["data_source"])
    if spec["scaling"] == "flow_grpo":
        overrides.update(FLOW_GRPO_SCALING)
    output_dir = Path(tempfile.gettempdir()) / "trl_ddrl_long_horizon" / run_key(spec)  # nothing is saved there
    args = reward_hacking.ddrl_args(bench, str(output_dir), spec["seed"], **overrides)
    if spec["method"] == "data_only":
        callback = TrueRewardCallback(held_out, start_point)
        train_reward, judges = constant_reward, [held_out, TrueRewardJudge(reward_function)]
    else:
        callback = reward_hacking.FidelityCallback(held_out, start_point)
        train_reward, judges = reward_function, [held_out]
    trainer = DDRLTrainer(
        pipeline,
        train_reward,
        args=args,
        train_dataset=digits_dataset("base"),
        eval_dataset=held_out_eval_dataset(reward_hacking.EVAL_ROWS_PER_DIGIT),
        eval_reward_funcs=judges,
        callbacks=[callback],
    )
    started = time.perf_counter()
    trainer.train()
    if callback.curve[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()
    return {
        **spec,
        "key": run_key(spec),
        "steps": trainer.state.global_step,
        "curve": callback.curve,
        "final": {name: callback.curve[-1][name] for name in METRICS},
        "train_runtime_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }


def worker(opts) -> None:
    """Train the plan's runs that are neither done nor claimed by a live worker, in order, one file per run."""
    work = Path(opts.work_dir)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    bench = benchmark_opts(opts)
    held_out = reward_hacking.HeldOutJudge(FidelityJudge(seed=0))
    for spec in study_plan(opts):
        key = run_key(spec)
        result_path, claim_path = work / "runs" / f"{key}.json", work / "runs" / f"{key}.claim"
        if result_path.exists() or not claim(claim_path):
            continue
        try:
            if result_path.exists():  # finished by another worker between the check and the claim
                continue
            print(f"[{time.strftime('%H:%M:%S')}] pid {os.getpid()}: {key}", flush=True)
            result = train_run(spec, bench, held_out, work)
            partial = result_path.with_suffix(".tmp")
            partial.write_text(json.dumps(result, indent=1) + "\n")
            partial.rename(result_path)
            print(f"[{time.strftime('%H:%M:%S')}] {key} done in {result['train_runtime_s']:.0f}s: {result['final']}")
        finally:
            claim_path.unlink(missing_ok=True)


def interpolate(front: list[tuple[float, float]], reward: float) -> float:
    """
    The metric at `reward` on a front of `(reward, metric)` points ordered along the regulariser weight (strongest
    first, reward-only last): linear on the first segment whose ends bracket `reward`, i.e. where the front first
    reaches that reward on its way from the strongest weight down. Following the weight rather than sorting by reward
    keeps a front whose reward is not monotone in the weight (seed noise near the reward-only end) from being joined
    out of order.
    """
    for (r0, m0), (r1, m1) in zip(front, front[1:]):
        if min(r0, r1) <= reward <= max(r0, r1):
            return m0 if r1 == r0 else m0 + (m1 - m0) * (reward - r0) / (r1 - r0)
    rewards = [point[0] for point in front]
    raise ValueError(f"reward {reward} is outside the front's range [{min(rewards)}, {max(rewards)}].")


def matched_reward_comparison(fronts: dict[int, dict[str, list]], levels: int) -> dict:
    """
    DDRL's and the reverse KL's fidelity at the same final reward. `fronts[seed][weight]` lists each sweep's finals
    `{"reward", *FIDELITY}` for that seed, ordered from the strongest weight to the reward-only run (their common
    `beta = 0` end).
    The comparison is made on each seed's own fronts at `levels` rewards evenly spread over the overlap of the two
    fronts' reward ranges, common to all seeds; it returns the mean and spread over seeds of each metric and of the
    DDRL - reverse-KL difference.
    """
    seeds = sorted(fronts)
    rewards = [[point["reward"] for point in fronts[seed][weight]] for seed in seeds for weight in fronts[seed]]
    low, high = max(min(values) for values in rewards), min(max(values) for values in rewards)
    if not low < high:
        return {
            "seeds": seeds,
            "reward_range": [low, high],
            "levels": [],
            "note": "the fronts' rewards do not overlap",
        }
    rows = []
    for index in range(levels):
        reward = low + (high - low) * index / max(1, levels - 1)
        row = {"reward": reward}
        for metric in FIDELITY:
            ddrl, reverse_kl = (
                [interpolate([(p["reward"], p[metric]) for p in fronts[s][weight]], reward) for s in seeds]
                for weight in ("data_beta", "kl_beta")
            )
            difference = [a - b for a, b in zip(ddrl, reverse_kl)]
            for name, values in (("ddrl", ddrl), ("reverse_kl", reverse_kl), ("ddrl_minus_reverse_kl", difference)):
                row[f"{metric}_{name}"] = mean_std(values)
        rows.append(row)
    return {"seeds": seeds, "reward_range": [low, high], "levels": rows}


def second_half_change(curve: list[dict], metric: str) -> float:
    """How far `metric` moved over the second half of a run: its last value minus its value at half the steps."""
    middle = curve[-1]["step"] / 2
    halfway = min(curve, key=lambda point: abs(point["step"] - middle))
    return curve[-1][metric] - halfway[metric]


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def config_label(run: dict) -> str:
    """One line per configuration in tables and plots."""
    if run["method"] in ("ddrl", "ddrl_base_model", "data_only"):
        return f"{run['method']} (data_beta={run['data_beta']:g})"
    if run["method"] == "reverse_kl":
        return f"reverse_kl (kl_beta={run['kl_beta']:g})"
    return run["method"]


def group_fronts(runs: list[dict], opts) -> dict[int, dict[str, list]]:
    """
    Each seed's two fronts of finals (strongest weight first, reward-only last), for the seeds whose reward-only run
    and sweeps are all done.
    """
    fronts = {}
    for seed in opts.seeds:
        finals = {
            (run["method"], run["data_beta"], run["kl_beta"]): run["final"] for run in runs if run["seed"] == seed
        }
        strongest_first = sorted(opts.data_betas, reverse=True), sorted(opts.kl_betas, reverse=True)
        data_keys = [("ddrl", beta, 0.0) for beta in strongest_first[0]] + [("reward_only", 0.0, 0.0)]
        kl_keys = [("reverse_kl", 0.0, beta) for beta in strongest_first[1]] + [("reward_only", 0.0, 0.0)]
        if all(key in finals for key in data_keys + kl_keys):
            fronts[seed] = {
                weight: [{name: finals[key][name] for name in ("reward", *FIDELITY)} for key in keys]
                for weight, keys in (("data_beta", data_keys), ("kl_beta", kl_keys))
            }
    return fronts


def plot_group(name: str, configs: dict[str, list[dict]], base: dict, plots_dir: Path) -> list[str]:
    """Curves (every metric against the step, mean over seeds with a +-std band) and the fronts of one group."""
    # Eleven configurations: tab20's ten dark shades, then its light ones; reverse KL dashed, the controls dash-dotted.
    palette = plt.get_cmap("tab20")
    line_styles = {"reverse_kl": "--", "reward_only": "-.", "data_only": "-."}
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.0 * len(METRICS), 3.6))
    for axis, metric in zip(axes, METRICS, strict=True):
        for index, (label, runs) in enumerate(configs.items()):
            length = min(len(run["curve"]) for run in runs)
            steps = [point["step"] for point in runs[0]["curve"][:length]]
            values = torch.tensor([[point[metric] for point in run["curve"][:length]] for run in runs])
            mean = values.mean(0)
            std = values.std(0) if len(runs) > 1 else torch.zeros_like(mean)
            color, style = palette((2 * index) % 20 + index // 10), line_styles.get(runs[0]["method"], "-")
            axis.plot(steps, mean, color=color, linestyle=style, label=f"{label} ({len(runs)} seeds)")
            axis.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15)
        axis.axhline(base[metric], color="black", linestyle=":", linewidth=1)
        axis.set_title(metric)
        axis.set_xlabel("optimizer step")
    axes[0].legend(fontsize=6)
    figure.suptitle(f"{name}: evaluation over training (mean +- std over seeds; dotted: base model)")
    figure.tight_layout()
    curves = plots_dir / f"{name}_curves.png"
    figure.savefig(curves, dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("accuracy", "fd"), strict=True):
        for method, color in (("ddrl", "tab:blue"), ("reverse_kl", "tab:orange")):
            sweep = [(label, runs) for label, runs in configs.items() if runs[0]["method"] in (method, "reward_only")]
            # Joined along the weight, strongest first and reward-only last, as the matched-reward comparison reads.
            sweep.sort(key=lambda item: -(item[1][0]["data_beta"] + item[1][0]["kl_beta"]))
            points = []
            for label, runs in sweep:
                reward = [run["final"]["reward"] for run in runs]
                value = [run["final"][metric] for run in runs]
                points.append((statistics.fmean(value), statistics.fmean(reward), label))
                axis.errorbar(
                    statistics.fmean(value),
                    statistics.fmean(reward),
                    xerr=mean_std(value)["std"],
                    yerr=mean_std(reward)["std"],
                    color=color,
                    marker="o",
                    capsize=2,
                )
                axis.annotate(
                    label.split("(")[-1].rstrip(")"),
                    points[-1][:2],
                    xytext=(5, -8 if method == "ddrl" else 4),  # beside the marker; DDRL below, reverse KL above
                    textcoords="offset points",
                    fontsize=6,
                    color=color,
                )
            axis.plot([p[0] for p in points], [p[1] for p in points], color=color, label=f"{method} front")
        axis.scatter([base[metric]], [base["reward"]], color="black", marker="*", s=100, label="base model")
        axis.set_xlabel(metric)
        axis.set_ylabel("final reward")
    axes[0].legend(fontsize=7)
    figure.suptitle(f"{name}: final reward vs fidelity of each regulariser weight (mean +- std over seeds)")
    figure.tight_layout()
    fronts = plots_dir / f"{name}_fronts.png"
    figure.savefig(fronts, dpi=100)
    plt.close(figure)
    return [str(curves), str(fronts)]


def markdown_tables(name: str, group: dict) -> str:
    """A group's finals (mean +- std over seeds, with the second half's FD change) and its matched-reward table."""
    lines = [f"### {name}", "", "| configuration | seeds | " + " | ".join(METRICS) + " | FD change, 2nd half |"]
    lines.append("|" + "---|" * (len(METRICS) + 3))
    base = group["base_model"]
    lines.append("| base model | | " + " | ".join(f"{base[m]:.3f}" for m in METRICS) + " | |")
    for label, row in group["summary"].items():
        cells = " | ".join(f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m in METRICS)
        change = row["fd_second_half_change"]
        lines.append(f"| {label} | {len(row['seeds'])} | {cells} | {change['mean']:+.1f} ± {change['std']:.1f} |")
    comparison = group["matched_reward"]
    if comparison and comparison["levels"]:
        lines += ["", f"At matched final reward (seeds {comparison['seeds']}; DDRL minus reverse KL, mean ± std):", ""]
        lines.append(
            "| reward | " + " | ".join(f"{m} DDRL | {m} reverse KL | {m} difference" for m in FIDELITY) + " |"
        )
        lines.append("|" + "---|" * (3 * len(FIDELITY) + 1))
        for level in comparison["levels"]:
            cells = []
            for metric in FIDELITY:
                for side in ("ddrl", "reverse_kl", "ddrl_minus_reverse_kl"):
                    value = level[f"{metric}_{side}"]
                    sign = "+" if side == "ddrl_minus_reverse_kl" else ""
                    cells.append(f"{value['mean']:{sign}.3f} ± {value['std']:.3f}")
            lines.append(f"| {level['reward']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(opts, argv: list[str]) -> dict:
    """Gather the finished runs into `--output` (and plots in `--plots-dir`); print each group's table."""
    work, plots_dir = Path(opts.work_dir), Path(opts.plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    runs = [json.loads(path.read_text()) for path in sorted((work / "runs").glob("*.json"))]
    plan = study_plan(opts)
    done = {run["key"] for run in runs}
    groups = {}
    for reward, scaling in dict.fromkeys((spec["reward"], spec["scaling"]) for spec in plan):
        group_runs = [run for run in runs if (run["reward"], run["scaling"]) == (reward, scaling)]
        if not group_runs:
            continue
        name = f"{reward}_{scaling}"
        base_points = [json.loads(path.read_text()) for path in sorted((work / "base").glob(f"{reward}-s*.json"))]
        base = {metric: statistics.fmean(point[metric] for point in base_points) for metric in METRICS}
        configs: dict[str, list[dict]] = {}
        for run in sorted(group_runs, key=lambda run: (run["method"], run["data_beta"], run["kl_beta"], run["seed"])):
            configs.setdefault(config_label(run), []).append(run)
        summary = {
            label: {"seeds": [run["seed"] for run in group]}
            | {metric: mean_std([run["final"][metric] for run in group]) for metric in METRICS}
            | {
                f"{metric}_second_half_change": mean_std([second_half_change(run["curve"], metric) for run in group])
                for metric in METRICS
            }
            for label, group in configs.items()
        }
        fronts = group_fronts(group_runs, opts)
        groups[name] = {
            "reward": reward,
            "scaling": scaling,
            "base_model": base,
            "summary": summary,
            "matched_reward": matched_reward_comparison(fronts, opts.matched_levels) if fronts else None,
            "plots": plot_group(name, configs, base, plots_dir),
        }
        print(f"\n## {name}  (base model: " + ", ".join(f"{m}={base[m]:.3f}" for m in METRICS) + ")")
        for label, row in summary.items():
            cells = "  ".join(f"{m}={row[m]['mean']:.3f}+-{row[m]['std']:.3f}" for m in METRICS)
            print(f"  {label:32s} seeds={row['seeds']}  {cells}")
        comparison = groups[name]["matched_reward"]
        for level in (comparison or {}).get("levels", []):
            accuracy, fd = level["accuracy_ddrl_minus_reverse_kl"], level["fd_ddrl_minus_reverse_kl"]
            print(
                f"  at reward {level['reward']:.3f}: accuracy ddrl-reverse_kl = {accuracy['mean']:+.3f} "
                f"+- {accuracy['std']:.3f}, FD ddrl-reverse_kl = {fd['mean']:+.1f} +- {fd['std']:.1f}"
            )
    (plots_dir / "tables.md").write_text("\n".join(markdown_tables(name, group) for name, group in groups.items()))
    cost = sum(run["train_runtime_s"] for run in runs)
    results = {
        "command": "python benchmarks/long_horizon.py " + " ".join(argv),
        "settings": {key: value for key, value in vars(opts).items() if key not in ("worker", "report")},
        "run_settings": {key: vars(benchmark_opts(opts))[key] for key in RUN_SETTINGS},
        "flow_grpo_scaling": FLOW_GRPO_SCALING,
        "plan_size": len(plan),
        "runs_done": len(runs),
        "runs_missing": [run_key(spec) for spec in plan if run_key(spec) not in done],
        "cost": {
            "train_runtime_s": cost,
            "optimizer_steps": sum(run["steps"] for run in runs),
            "mean_run_s": cost / len(runs) if runs else None,
        },
        "groups": groups,
        "runs": runs,
    }
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{len(runs)}/{len(plan)} runs done ({cost / 3600:.2f} h of training); results in {output}")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--worker", action="store_true", help="Train the plan's runs not done yet (resumable).")
    mode.add_argument("--report", action="store_true", help="Gather the finished runs into the JSON and plots.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 1 seed, 4 steps, 2 runs, in /tmp.")
    parser.add_argument("--rewards", nargs="+", choices=REWARDS, default=list(REWARDS), help="First is the main one.")
    parser.add_argument("--scalings", nargs="+", choices=SCALINGS, default=list(SCALINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps per run.")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-samples-per-digit", type=int, default=20)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--prompts-per-step", type=int, default=4, help="Also the distinct real digits per step.")
    parser.add_argument("--data-betas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--kl-betas", type=float, nargs="+", default=[0.01, 0.1, 0.3, 1.0])
    parser.add_argument("--data-only-beta", type=float, default=1.0, help="data_beta of the data-only control.")
    parser.add_argument("--base-model-data-beta", type=float, default=0.1)
    parser.add_argument("--matched-levels", type=int, default=5, help="Rewards at which the fronts are compared.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker.")
    parser.add_argument("--work-dir", default="benchmarks/results/long_horizon_runs")
    parser.add_argument("--output", default="docs/reward_hacking/long_horizon.json")
    parser.add_argument("--plots-dir", default="docs/reward_hacking/long_horizon")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rewards, opts.scalings, opts.seeds, opts.steps, opts.eval_every = ["ink"], ["authors"], [0], 4, 2
        opts.data_betas, opts.kl_betas, opts.eval_samples_per_digit = [0.1], [], 5
        opts.work_dir, opts.output, opts.plots_dir = (
            "/tmp/trl_ddrl_long_horizon_quick/runs",
            "/tmp/trl_ddrl_long_horizon_quick/long_horizon.json",
            "/tmp/trl_ddrl_long_horizon_quick/plots",
        )
    return opts


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(opts.threads)
    if opts.worker:
        worker(opts)
        return None
    return report(opts, argv)


if __name__ == "__main__":
    main()
