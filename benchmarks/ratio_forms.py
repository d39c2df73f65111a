# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
What the policy log-ratio form does on the digits testbed (issue #11, docs/fidelity.md).

`log_ratio_form="edm_squared_distance"` (the authors': squared distance in EDM coordinates, i.e. divided by
`(1 - t_next)^2`) against `"gaussian"` (Flow-GRPO's: divided by `2 std^2`), at the default learning rate and at a
larger one, for reward-only RL and for DDRL. With one optimizer step per rollout the ratio is 1 and the clip never
acts, so the form only rescales each step's policy gradient: the EDM form weighs the high-noise steps most, the
Gaussian form the low-noise ones. Everything else is `DDRLConfig`'s default (the authors' recipe) except the
testbed's sizes (as in `reward_hacking.py`) and `warmup_steps` (the recipe's 50 would exceed these runs).

    python benchmarks/ratio_forms.py                 # 8 runs of 30 steps, ~15 minutes on 2 CPU cores
    python benchmarks/ratio_forms.py --steps 6       # smoke run

Writes `--output` (default `benchmarks/results/ratio_forms.json`) and prints a markdown table.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging


sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_metrics import FidelityJudge  # noqa: E402
from reward_hacking import METRICS, Evaluator, FidelityCallback, make_reward  # noqa: E402

from trl_ddrl import DDRLConfig, DDRLTrainer  # noqa: E402
from trl_ddrl.digits import digits_dataset, load_or_pretrain_base  # noqa: E402


FORMS = ("edm_squared_distance", "gaussian")


def run(form: str, learning_rate: float, data_beta: float, opts, evaluator, base_metrics) -> dict:
    pipeline = load_or_pretrain_base(show_progress=False)
    reward = make_reward(opts.reward, opts.seed)
    callback = FidelityCallback(pipeline, reward, evaluator, opts.eval_every, base_metrics)
    args = DDRLConfig(
        output_dir=f"/tmp/trl_ddrl_ratio_forms/{form}-{learning_rate}-{data_beta}",
        max_steps=opts.steps,
        seed=opts.seed,
        report_to="none",
        learning_rate=learning_rate,
        warmup_steps=opts.warmup_steps,
        log_ratio_form=form,
        clip_range=opts.clip_range,
        num_generations=4,
        prompts_per_step=4,
        num_inference_steps=10,
        train_timesteps=[0, 2, 4, 6],
        per_device_train_batch_size=4 * 4 * 4,
        data_beta=data_beta,
        logging_steps=opts.eval_every,
        save_strategy="no",
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    trainer = DDRLTrainer(pipeline, reward, args=args, train_dataset=digits_dataset("base"), callbacks=[callback])
    start = time.perf_counter()
    trainer.train()
    grad_norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    return {
        "log_ratio_form": form,
        "learning_rate": learning_rate,
        "data_beta": data_beta,
        "final": callback.curve[-1],
        "curve": callback.curve,
        "mean_grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None,
        "train_runtime_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-5, 3e-4])
    parser.add_argument("--data-betas", type=float, nargs="+", default=[0.0, 0.01])
    parser.add_argument("--forms", nargs="+", default=list(FORMS))
    parser.add_argument("--reward", default="ink")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--clip-range", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-samples-per-digit", type=int, default=20)
    parser.add_argument("--output", default="benchmarks/results/ratio_forms.json")
    opts = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)

    judge = FidelityJudge(seed=0)
    evaluator = Evaluator(judge, opts.eval_samples_per_digit, 10)
    base_metrics, _ = evaluator(load_or_pretrain_base(show_progress=False), make_reward(opts.reward, opts.seed))
    print(f"base model: {base_metrics}", flush=True)
    runs = []
    for data_beta in opts.data_betas:
        for learning_rate in opts.learning_rates:
            for form in opts.forms:
                print(f"{form} lr={learning_rate:g} data_beta={data_beta:g}", flush=True)
                runs.append(run(form, learning_rate, data_beta, opts, evaluator, base_metrics))
                Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
                Path(opts.output).write_text(
                    json.dumps(
                        {
                            "command": "python benchmarks/ratio_forms.py " + " ".join(argv or sys.argv[1:]),
                            "settings": vars(opts),
                            "real_eval_digits": judge(judge.real_images, judge.real_labels),
                            "base_model": base_metrics,
                            "runs": runs,
                            "torch_threads": torch.get_num_threads(),
                        },
                        indent=2,
                    )
                    + "\n"
                )
    header = "| log_ratio_form | learning_rate | data_beta | " + " | ".join(METRICS) + " | mean grad norm |"
    lines = [header, "|" + "---|" * (len(METRICS) + 4)]
    lines.append("| base model | | | " + " | ".join(f"{base_metrics[m]:.3f}" for m in METRICS) + " | |")
    for entry in runs:
        values = " | ".join(f"{entry['final'][m]:.3f}" for m in METRICS)
        lines.append(
            f"| {entry['log_ratio_form']} | {entry['learning_rate']:g} | {entry['data_beta']:g} | {values} | "
            f"{entry['mean_grad_norm']:.3g} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
