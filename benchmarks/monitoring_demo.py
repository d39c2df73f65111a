# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
What reward hacking looks like in the trainer's monitoring metrics, on the embedded digits model (a few CPU minutes).

Two short runs from the cached base generator with the easily hacked "ink" reward (mean brightness) at a high
learning rate: reward-only RL (`data_beta=0`) and DDRL (`data_beta>0`). Both evaluate every `--eval-steps` steps
(and at step 0) on held-out digits with the trainer's own evaluation: prompts and images of the `"eval"` split, the
held-out digit classifier as a judge that is never trained on. The plot shows the training and eval reward, the
held-out judge, `eval/data_loss_drift`, `eval/diversity` and `eval/reward_gap`; the last eval samples of each run go
to a captioned grid. Outputs (default `docs/monitoring/`): `hacking_run.png`, `hacking_samples.png`,
`hacking_run.json`.

    python benchmarks/monitoring_demo.py
"""

import argparse
import json
import time
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from trl_ddrl import DDRLConfig, DDRLTrainer  # noqa: E402
from trl_ddrl.digits import DigitClassifierReward, digits_dataset, ink_reward, load_or_pretrain_base  # noqa: E402
from trl_ddrl.digits.classifier import train_digit_classifier  # noqa: E402
from trl_ddrl.digits.curves import curves_from_log_history  # noqa: E402
from trl_ddrl.digits.default_job import held_out_eval_dataset  # noqa: E402
from trl_ddrl.tracking import captioned_grid  # noqa: E402


PANELS = (
    ("reward (ink)", ("reward", "eval_reward"), ("training samples", "eval samples")),
    ("held-out judge: p(prompted digit)", ("eval_rewards/held_out_classifier/mean",), ("eval",)),
    ("eval/data_loss_drift", ("eval_data_loss_drift",), ("eval",)),
    ("eval/diversity", ("eval_diversity",), ("eval",)),
    ("eval/reward_gap", ("eval_reward_gap",), ("train - eval",)),
)
COLORS = {"reward-only": "tab:red", "DDRL": "tab:blue"}


def run(name: str, data_beta: float, opts, judge) -> tuple[dict, DDRLTrainer]:
    args = DDRLConfig(
        output_dir=str(Path(opts.work_dir) / name),
        max_steps=opts.steps,
        seed=0,
        report_to="none",
        learning_rate=opts.learning_rate,
        clip_range=1e-3,
        num_generations=4,
        prompts_per_step=4,
        num_inference_steps=10,
        train_timesteps=[0, 2, 4, 6],
        per_device_train_batch_size=64,
        data_beta=data_beta,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=opts.eval_steps,
        eval_on_start=True,
        eval_num_generations=opts.eval_generations,
        per_device_eval_batch_size=200,
        save_strategy="no",
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    trainer = DDRLTrainer(
        load_or_pretrain_base(show_progress=False),
        ink_reward,
        args=args,
        train_dataset=digits_dataset("base"),
        eval_dataset=held_out_eval_dataset(opts.eval_rows_per_digit),
        eval_reward_funcs=judge,
    )
    start = time.perf_counter()
    trainer.train()
    print(f"{name}: {time.perf_counter() - start:.0f}s", flush=True)
    return curves_from_log_history(trainer.state.log_history), trainer


def plot(curves: dict[str, dict], path: Path) -> None:
    figure, axes = plt.subplots(1, len(PANELS), figsize=(3.6 * len(PANELS), 3.2))
    for axis, (title, keys, labels) in zip(axes, PANELS, strict=True):
        for name, series in curves.items():
            for key, label, style in zip(keys, labels, ("--", "-"), strict=False):
                if key in series:
                    steps, values = zip(*series[key], strict=True)
                    axis.plot(steps, values, style, color=COLORS[name], label=f"{name}, {label}", marker=".")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("optimizer step")
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--eval-steps", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--data-beta", type=float, default=0.3)
    parser.add_argument("--eval-rows-per-digit", type=int, default=5)
    parser.add_argument("--eval-generations", type=int, default=2)
    parser.add_argument("--output-dir", default="docs/monitoring")
    parser.add_argument("--work-dir", default="/tmp/trl_ddrl_monitoring_demo")
    opts = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    output = Path(opts.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    judge = DigitClassifierReward(classifier=train_digit_classifier("eval", seed=0))
    judge.name = "held_out_classifier"

    start = time.perf_counter()
    curves, grids = {}, []
    for name, data_beta in (("reward-only", 0.0), ("DDRL", opts.data_beta)):
        curves[name], trainer = run(name, data_beta, opts, judge)
        grids.append(captioned_grid(trainer.evaluator.last_samples, columns=8))
    plot(curves, output / "hacking_run.png")
    width = max(grid.width for grid in grids)
    canvas = Image.new("RGB", (width, sum(grid.height for grid in grids)), "white")
    top = 0
    for grid in grids:
        canvas.paste(grid, (0, top))
        top += grid.height
    canvas.save(output / "hacking_samples.png")
    keys = sorted({key for series in curves.values() for key in series if key.startswith("eval_") or key == "reward"})
    results = {
        "command": "python benchmarks/monitoring_demo.py",
        "settings": {key: value for key, value in vars(opts).items() if key != "work_dir"},
        "runs": {name: {key: series[key] for key in keys if key in series} for name, series in curves.items()},
        "runtime_s": time.perf_counter() - start,
    }
    (output / "hacking_run.json").write_text(json.dumps(results, indent=1) + "\n")
    for name, series in curves.items():
        last = {key: series[key][-1][1] for key in ("eval_data_loss_drift", "eval_diversity_drop") if key in series}
        print(name, last, flush=True)


if __name__ == "__main__":
    main()
