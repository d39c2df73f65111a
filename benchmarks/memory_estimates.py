# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The memory estimator's table (docs/memory.md) and its validation against measured memory.

    python benchmarks/memory_estimates.py                 # table + validation -> results/memory_estimates.json
    python benchmarks/memory_estimates.py --validate-only # validation only

Validation: a small SD3.5-architecture pipeline (the real layout: MMDiT blocks with dual attention, CLIP-L, CLIP-G,
T5, the 16-channel VAE, at reduced widths), float32 on the CPU. The estimate (fake tensors) is compared with the
measured peak of the same iteration run for real in a fresh process: the growth of its peak resident memory (VmHWM,
reset before the iteration; glibc returns every block above 64 KiB to the system when freed, so resident memory
follows the live tensors) plus the tensors live before it (the weights).
"""

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "memory_estimates.json"


def validation_spec() -> dict:
    """The SD3.5-Medium architecture at reduced widths and depth (a few MB of weights, ~100 MB of activations)."""
    from trl_ddrl.model_configs import load_model_config

    spec = copy.deepcopy(load_model_config("sd3.5-medium"))
    components = spec["components"]
    components["transformer"]["config"].update(
        num_layers=2,
        num_attention_heads=4,
        attention_head_dim=32,
        joint_attention_dim=64,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        pos_embed_max_size=96,
        dual_attention_layers=[0],
    )
    components["vae"]["config"].update(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8)
    for name in ("text_encoder", "text_encoder_2"):
        components[name]["config"].update(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32
        )
    components["text_encoder_3"]["config"].update(d_model=64, d_ff=128, d_kv=32, num_heads=2, num_layers=2)
    components["tokenizer_3"]["max_length"] = 64
    return spec


VALIDATION_ARGS = dict(
    num_generations=4,
    prompts_per_step=2,
    num_inference_steps=4,
    per_device_train_batch_size=8,
    height=384,
    width=384,
    max_sequence_length=64,
    data_beta=0.01,
)


# Decoding two samples at a time, as the recipe settings do (the CPU's convolutions take workspace no tensor shows).
VALIDATION_OVERRIDES = {"rollout_batch_size": 2}


def validation_config(**overrides):
    from trl_ddrl import DDRLConfig

    return DDRLConfig(output_dir="/tmp/ddrl-memory-validation", report_to=[], **{**VALIDATION_ARGS, **overrides})


def measure_cpu_peak(overrides: dict | None = None) -> dict:
    """Run the validation iteration for real in a fresh process; return its measured and counted peaks (bytes)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", json.dumps(overrides or {})]
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if finished.returncode:
        raise RuntimeError(f"the measuring process failed:\n{finished.stderr[-4000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def _status(field: str) -> int:
    """A `/proc/self/status` memory field in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _measure_here(overrides: dict) -> dict:
    """In the measuring process: build the pipeline for real, run the iteration, report the peaks."""
    import gc

    import torch

    from trl_ddrl.memory import LiveBytes, Parallelism, _for_processes, run_iteration
    from trl_ddrl.model_configs import build_pipeline_from_spec

    torch.set_num_threads(1)
    args = _for_processes(validation_config(**overrides), Parallelism(), torch.float32)
    pipeline = build_pipeline_from_spec(validation_spec(), torch.float32, device="cpu")
    weights = sum(
        tensor.numel() * tensor.element_size()
        for module in pipeline.components.values()
        if isinstance(module, torch.nn.Module)
        for tensor in [*module.parameters(), *module.buffers()]
    )
    counter = LiveBytes(fake=False)
    gc.collect()
    resident = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak resident size (VmHWM) to the current one
    windows = {}
    with counter:
        run_iteration(pipeline, args, counter, windows=windows)
    peak = _status("VmHWM")
    counted = max(window.peak for window in windows.values())
    return {"measured_bytes": peak - resident + weights, "counted_bytes": int(counted), "weights_bytes": weights}


def validate(overrides: dict | None = None) -> dict:
    """Estimate (fake tensors) vs measured (real run) peak of the validation iteration."""
    import torch

    from trl_ddrl.memory import estimate_memory
    from trl_ddrl.model_configs import build_pipeline_from_spec

    spec = validation_spec()

    def build():
        return build_pipeline_from_spec(spec, torch.float32, "meta")

    build.__name__ = "sd3.5-medium (reduced)"
    estimate = estimate_memory(build, validation_config(**(overrides or {})), torch_dtype=torch.float32)
    measured = measure_cpu_peak(overrides)
    return {
        "model": build.__name__,
        "settings": {**VALIDATION_ARGS, **(overrides or {}), "dtype": "float32", "device": "cpu"},
        "estimate_bytes": estimate.peak_bytes,
        **measured,
        "relative_error": (estimate.peak_bytes - measured["measured_bytes"]) / measured["measured_bytes"],
    }


# The table: each shipped architecture at the recipe settings (DDRLConfig's defaults: 4 prompts x 8 samples, 20
# steps, every other step trained, micro-batches of 8, data term on, EMA on, activation checkpointing on; the
# architecture's default resolution and frame count), LoRA r=32 on the attention projections and full fine-tuning,
# on 1 GPU and on 8 GPUs with FSDP2. Rows in the order they are computed.
TABLE = [
    (model, setting, gpus)
    for model in ("sd3.5-medium", "flux.1-dev", "wan2.1-t2v-1.3b", "cosmos-predict2.5-2b")
    for setting, gpus in (("lora", 1), ("full", 8), ("full", 1), ("lora", 8))
]


def table_row(model: str, setting: str, gpus: int) -> dict:
    from peft import LoraConfig

    from trl_ddrl import DDRLConfig
    from trl_ddrl.memory import estimate_memory
    from trl_ddrl.scripts.ddrl import DEFAULT_LORA_TARGET_MODULES

    args = DDRLConfig(output_dir="/tmp/ddrl-memory-table", report_to=[])
    lora = LoraConfig(r=32, lora_alpha=32, target_modules=DEFAULT_LORA_TARGET_MODULES) if setting == "lora" else None
    estimate = estimate_memory(
        model, args, num_processes=gpus, sharding="fsdp2" if gpus > 1 else "none", peft_config=lora
    )
    return {
        "model": model,
        "setting": setting,
        "gpus": gpus,
        "peak_gib_per_gpu": round(estimate.peak_gib, 1),
        "fits_80gb": estimate.fits(80.0),
        "peak_phase": estimate.peak_phase,
        "largest": estimate.largest,
        "breakdown_gib": {name: round(size / 2**30, 2) for name, size in estimate.breakdown.items()},
        "phases_gib": {name: round(size / 2**30, 2) for name, size in estimate.phases.items()},
        "settings": estimate.settings,
    }


def _write(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--validate-only", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--rows", help="Comma-separated architectures of the table to (re)compute (default: all).")
    options = parser.parse_args()
    if options.measure is not None:
        print(json.dumps(_measure_here(json.loads(options.measure))))
        return
    parser_rows = options.rows.split(",") if options.rows else None
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": [], "validation": []}
    if not options.table_only:
        results["validation"] = [validate(VALIDATION_OVERRIDES)]
        print(json.dumps(results["validation"]), flush=True)
        _write(results)
    if options.validate_only:
        return
    for model, setting, gpus in TABLE:
        if parser_rows and model not in parser_rows:
            continue
        row = table_row(model, setting, gpus)
        print(json.dumps(row), flush=True)
        results["rows"] = [
            old for old in results["rows"] if (old["model"], old["setting"], old["gpus"]) != (model, setting, gpus)
        ] + [row]
        _write(results)


if __name__ == "__main__":
    main()
