# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The default job (`trl-ddrl` with no model) and its reward-only contrast, for docs/default_job.md.

Runs `run_default_job` twice with the same seed and settings: DDRL with the job's `data_beta=0.3`, then reward-only
RL (`data_beta=0`). Plots the trainer's evaluation of both on the same axes (eval reward, held-out judge,
`eval/data_loss_drift`, `eval/diversity_drop`) and writes the before/after figures of each run. About 25 minutes on
2 CPU cores from a cold cache (the base model's pretraining, then two DDRL runs); `--reuse` only re-plots runs
already in `--work_dir`. Outputs: `docs/default_job/contrast.png`, `benchmarks/results/default_job_contrast.json`.

    python benchmarks/default_job_contrast.py [--work_dir /tmp/default_job_contrast] [--reuse]
"""

import argparse
import json
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trl_ddrl.digits import run_default_job  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
RUNS = (("DDRL, data_beta=0.3 (the default job)", 0.3, "tab:blue"), ("reward only, data_beta=0", 0.0, "tab:red"))
PANELS = (
    ("eval reward (trained classifier)", "eval_reward"),
    ("held-out judge", "eval_rewards/held_out_classifier/mean"),
    ("eval/data_loss_drift", "eval_data_loss_drift"),
    ("eval/diversity_drop", "eval_diversity_drop"),
)
SUMMARY = ("reward_before", "reward_after", "eval_accuracy_before", "eval_accuracy_after", "runtime_s")


def run_dir(work_dir: Path, data_beta: float) -> Path:
    return work_dir / f"data_beta_{data_beta:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/default_job_contrast", help="Where the two runs are written.")
    parser.add_argument("--reuse", action="store_true", help="Plot the runs already in --work_dir; train nothing.")
    parser.add_argument("--figure", default=str(ROOT / "docs" / "default_job" / "contrast.png"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "default_job_contrast.json"))
    opts = parser.parse_args()
    work_dir = Path(opts.work_dir)

    results = {}
    for label, data_beta, _ in RUNS:
        output = run_dir(work_dir, data_beta)
        if not opts.reuse:
            run_default_job(str(output), data_beta=data_beta)
        metrics = json.loads((output / "metrics.json").read_text())
        curves = json.loads((output / "curves.json").read_text())
        results[label] = {
            "data_beta": data_beta,
            **{key: metrics[key] for key in SUMMARY},
            "eval": {key: curves[key] for _, key in PANELS},
        }

    figure, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for axis, (title, key) in zip(axes, PANELS, strict=True):
        for label, _, color in RUNS:
            steps, values = zip(*results[label]["eval"][key], strict=True)
            axis.plot(steps, values, marker="o", color=color, label=label)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    Path(opts.figure).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(opts.figure, dpi=80)
    Path(opts.results).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({label: {key: results[label][key] for key in SUMMARY} for label in results}, indent=1))


if __name__ == "__main__":
    main()
