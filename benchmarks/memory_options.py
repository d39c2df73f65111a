# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
What the memory options of issue #24 save: the bytes each frees per GPU at the shipped architectures (counted on the
meta device), and CPU measurements of the live tensor bytes (`trl_ddrl.memory.LiveBytes`) of an EMA swap and update
and of a rollout, on whichever `trl_ddrl` is importable (run it once on this tree and once on an export of the code
before the change, `--label before`, to compare).

    PYTHONPATH=$PWD python benchmarks/memory_options.py --label after
    git archive <old commit> | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python benchmarks/memory_options.py --label before

Writes `benchmarks/results/memory_options.json` (one entry per label).
"""

import argparse
import gc
import json
import os
import sys
import tempfile


RESULTS = os.path.join(os.path.dirname(__file__), "results", "memory_options.json")
MIB = 2**20


def architecture_bytes() -> dict:
    """Per shipped architecture: bf16 bytes of its text encoders and float32 bytes of an EMA of its denoiser."""
    from trl_ddrl.model_configs import list_models, load_model_config, parameter_count

    table = {}
    for name in list_models():
        components = load_model_config(name)["components"]
        encoders = [key for key, spec in components.items() if "text_encoder" in key and "tokenizer" not in spec]
        denoiser = "transformer" if "transformer" in components else "unet"
        table[name] = {
            "text_encoders_bf16_gib": sum(parameter_count(name, key) for key in encoders) * 2 / 2**30,
            "ema_fp32_gib": parameter_count(name, denoiser) * 4 / 2**30,
        }
    return table


def _peak(run, existing) -> int:
    """Peak bytes of tensors allocated by `run()` alive at once, beyond the `existing` tensors."""
    from trl_ddrl.memory import LiveBytes

    counter = LiveBytes(fake=False)
    for tensor in existing:
        counter.register(tensor)
    with counter.window() as window, counter:
        run()
    return int(window.peak - counter.weighted(window.start))


def ema_peaks(layers: int = 128, width: int = 1024) -> dict:
    """Extra bytes at the peak of an EMA update and of a swap in and out, on `layers` float32 `width^2` layers."""
    import torch

    from trl_ddrl.ema import ParameterEMA

    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    ema = ParameterEMA(model, decay=0.9)
    existing = [*ema.parameters, *ema.shadow]

    def swap():
        with ema.swapped_in():
            pass

    result = {
        "model_mib": sum(p.numel() * 4 for p in ema.parameters) / MIB,
        "swap_peak_mib": _peak(swap, existing) / MIB,
        "fp32_step_peak_mib": _peak(ema.step, existing) / MIB,
    }
    low = ParameterEMA(model.to(torch.bfloat16), decay=0.9)  # a ZeRO-3 partition in bfloat16
    result["bf16_step_peak_mib"] = _peak(low.step, [*low.parameters, *low.shadow]) / MIB
    return result


def rollout_bytes() -> dict:
    """Peak and remaining live bytes of one rollout of 16 samples x 10 steps, 128 px (a 1-block SD3, CPU)."""
    from transformers import TrainerState

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_trainer import brightness, make_args, prompt_dataset
    from tiny_models import tiny_sd3_pipeline

    from trl_ddrl import DDRLTrainer
    from trl_ddrl.memory import LiveBytes
    from trl_ddrl.rollout import read_prompt_rows

    pipeline = tiny_sd3_pipeline(latent_size=64)
    args = make_args(tempfile.mkdtemp(), num_inference_steps=10, num_generations=8, per_device_train_batch_size=8)
    trainer = DDRLTrainer(pipeline, brightness, args=args, train_dataset=prompt_dataset())
    rows = read_prompt_rows(trainer.train_dataset, [0] * 8 + [1] * 8)
    state = TrainerState(global_step=0, max_steps=100)  # serves step 1: no sample logging
    trainer.rollout.generate(rows, 0, state)  # warm-up
    gc.collect()
    counter = LiveBytes(fake=False)
    with counter.window() as window, counter:
        buffer = trainer.rollout.generate(rows, 0, state)
        gc.collect()
    remaining = sum(counter.totals.values())
    return {
        "samples": 16,
        "steps": 10,
        "trained_steps": int(buffer.states.shape[1]),
        "latent_kib": buffer.states[0, 0].numel() * 4 / 1024,
        "image_hw": list(trainer.adapter.resolution),
        "rollout_peak_mib": window.peak / MIB,
        "after_rollout_mib": remaining / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="after", help="Name of this measurement in the JSON (before / after).")
    label = parser.parse_args().label
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = {"ema": ema_peaks(), "rollout": rollout_bytes()}
    if label == "after":
        result["architectures"] = architecture_bytes()
    print(json.dumps(result, indent=2))
    results = json.load(open(RESULTS)) if os.path.isfile(RESULTS) else {}
    results[label] = result
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as file:
        json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
