# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The memory estimator's table (docs/memory.md) and its validation against measured memory.

    python benchmarks/memory_estimates.py                 # table + validation -> results/memory_estimates.json
    python benchmarks/memory_estimates.py --validate-only # validation only

Validation: a small SD3.5-architecture pipeline (the real layout: MMDiT blocks with dual attention, CLIP-L, CLIP-G,
T5, the 16-channel VAE, at reduced widths), float32 on the CPU. The estimate (fake tensors) is compared with the
measured peak of the same iteration run for real in a fresh process, by two measures independent of the estimator's
counter: PyTorch's CPU allocator (the allocation and free events of `torch.profiler` with `profile_memory=True`), and
the growth of the peak resident memory (VmHWM, reset before the iteration; glibc returns every block above 64 KiB to
the system when freed, so resident memory follows the allocations), each plus the weights.
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


def allocator_peak(function) -> int:
    """
    Peak bytes allocated by `function()` through PyTorch's CPU allocator above what was allocated before, from the
    allocation and free events of `torch.profiler` (`profile_memory=True`): independent of the estimator's own counter,
    and it also sees the buffers that operators allocate and free inside one call.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def measure_in_process(pipeline, args, resident: bool = False) -> dict:
    """
    Run one iteration of `args` (a [`DDRLConfig`]) on `pipeline` (real weights, CPU) for real; return its peaks
    (bytes): `allocator_bytes` (the profiler's allocator peak plus the weights), `counted_bytes` (the estimator's
    counter on the real tensors) and, with `resident`, `resident_bytes` (the growth of the peak resident memory, VmHWM,
    plus the weights; meaningful in a fresh process with glibc returning freed blocks, see `measure_cpu_peak`).
    """
    import gc

    import torch

    from trl_ddrl.memory import LiveBytes, Parallelism, _for_processes, run_iteration

    args = _for_processes(args, Parallelism(), torch.float32)
    weights = sum(
        tensor.numel() * tensor.element_size()
        for module in pipeline.components.values()
        if isinstance(module, torch.nn.Module)
        for tensor in [*module.parameters(), *module.buffers()]
    )
    counter = LiveBytes(fake=False)
    windows: dict = {}
    gc.collect()
    if resident:
        start = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak resident size (VmHWM) to the current one

    def iteration():
        with counter:
            run_iteration(pipeline, args, counter, windows=windows)

    allocated = allocator_peak(iteration)
    measured = {
        "allocator_bytes": allocated + weights,
        "counted_bytes": int(max(window.peak for window in windows.values())),
        "weights_bytes": weights,
    }
    if resident:
        measured["resident_bytes"] = _status("VmHWM") - start + weights
    return measured


def _measure_here(overrides: dict) -> dict:
    """In the measuring process (one thread, see `measure_cpu_peak`): measure the real iteration."""
    import torch

    from trl_ddrl.model_configs import build_pipeline_from_spec

    torch.set_num_threads(1)
    pipeline = build_pipeline_from_spec(validation_spec(), torch.float32, device="cpu")
    return measure_in_process(pipeline, validation_config(**overrides), resident=True)


def estimate_validation(overrides: dict | None = None):
    """The estimate (fake tensors) of the validation iteration."""
    import torch

    from trl_ddrl.memory import estimate_memory
    from trl_ddrl.model_configs import build_pipeline_from_spec

    spec = validation_spec()

    def build():
        return build_pipeline_from_spec(spec, torch.float32, "meta")

    build.__name__ = "sd3.5-medium (reduced)"
    return estimate_memory(build, validation_config(**(overrides or {})), torch_dtype=torch.float32)


def validate(overrides: dict | None = None) -> dict:
    """Estimate (fake tensors) vs measured (real run in a fresh process) peak of the validation iteration."""
    estimate = estimate_validation(overrides)
    measured = measure_cpu_peak(overrides)
    return {
        "model": estimate.model,
        "settings": {**VALIDATION_ARGS, **(overrides or {}), "dtype": "float32", "device": "cpu"},
        "estimate_bytes": estimate.peak_bytes,
        **measured,
        "relative_error": (estimate.peak_bytes - measured["allocator_bytes"]) / measured["allocator_bytes"],
        "relative_error_vs_resident": (estimate.peak_bytes - measured["resident_bytes"]) / measured["resident_bytes"],
    }


# The table: each shipped architecture at the settings of its recipe (recipes/*.yaml; an architecture without one
# borrows its family's: Qwen-Image the FLUX.1-dev recipe, Wan 2.1 14B, Wan 2.2 A14B and HunyuanVideo 1.5 the Wan 2.1
# recipe), LoRA (the recipe's adapter, else r=32 on the attention projections) and full fine-tuning, on 1 GPU and on
# 8 GPUs with FSDP2; then each recipe as written (its accelerate config's processes and sharding).
RECIPES = {
    "sd3.5-medium": "sd3.5-medium-pickscore-ddrl.yaml",
    "flux.1-dev": "flux1-dev-pickscore-ddrl.yaml",
    "qwen-image": "flux1-dev-pickscore-ddrl.yaml",
    "wan2.1-t2v-1.3b": "wan2.1-t2v-1.3b-ddrl.yaml",
    "wan2.1-t2v-14b": "wan2.1-t2v-1.3b-ddrl.yaml",
    "wan2.2-t2v-a14b": "wan2.1-t2v-1.3b-ddrl.yaml",
    "hunyuanvideo-1.5": "wan2.1-t2v-1.3b-ddrl.yaml",
    "cosmos-predict2.5-2b": "cosmos-predict2.5-2b-ddrl.yaml",
    "cosmos-predict2.5-14b": "cosmos-predict2.5-14b-ddrl.yaml",
}
TABLE = [
    (model, setting, gpus)
    for model in RECIPES
    for setting, gpus in (("lora", 1), ("full", 8), ("full", 1), ("lora", 8))
]
# The architectures whose recipe is their own (the others borrow one): each recipe as written is a row too.
OWN_RECIPE = ("sd3.5-medium", "flux.1-dev", "wan2.1-t2v-1.3b", "cosmos-predict2.5-2b", "cosmos-predict2.5-14b")


def recipe_config(recipe: str, overrides: dict | None = None):
    """`(DDRLConfig, ModelConfig)` of `recipes/<recipe>` (as `trl-ddrl --config` parses it) with `overrides`."""
    from trl_ddrl.scripts.ddrl import make_parser

    argv = [
        "--config",
        str(ROOT / "recipes" / recipe),
        "--output_dir",
        "/tmp/ddrl-memory-table",
        "--report_to",
        "none",
    ]
    for key, value in (overrides or {}).items():
        argv += [f"--{key}", str(value)]
    _, args, model_args, _ = make_parser().parse_args_and_config(argv, return_remaining_strings=True)
    return args, model_args


def estimate_row(
    model: str, setting: str, gpus: int, sharding: str | None = None, overrides: dict | None = None, recipe=None
) -> dict:
    """One row: `model` at `recipe`'s settings (default: RECIPES[model]) plus `overrides`, LoRA or full fine-tuning."""
    from peft import LoraConfig

    from trl_ddrl.memory import estimate_memory
    from trl_ddrl.scripts.ddrl import DEFAULT_LORA_TARGET_MODULES, get_lora_config

    recipe = recipe or RECIPES[model]
    args, model_args = recipe_config(recipe, overrides)
    lora = None
    if setting == "lora":
        lora = get_lora_config(model_args) if model_args.use_peft else None
        lora = lora or LoraConfig(r=32, lora_alpha=32, target_modules=DEFAULT_LORA_TARGET_MODULES)
    sharding = sharding or ("fsdp2" if gpus > 1 else "none")
    # A recipe's context-parallel group (Cosmos 14B: 8) where the GPUs allow it, else none (1 GPU).
    context_parallel = args.context_parallel_size if gpus % args.context_parallel_size == 0 else 1
    estimate = estimate_memory(
        model, args, num_processes=gpus, sharding=sharding, peft_config=lora, context_parallel_size=context_parallel
    )
    return {
        "model": model,
        "setting": setting,
        "gpus": gpus,
        "sharding": sharding,
        "recipe": recipe,
        "overrides": overrides or {},
        "peak_gib_per_gpu": round(estimate.peak_gib, 1),
        "fits_80gb": estimate.fits(80.0),
        "peak_phase": estimate.peak_phase,
        "largest": estimate.largest,
        "largest_gib": round(estimate.breakdown[estimate.largest] / 2**30, 1),
        "breakdown_gib": {name: round(size / 2**30, 2) for name, size in estimate.breakdown.items()},
        "phases_gib": {name: round(size / 2**30, 2) for name, size in estimate.phases.items()},
        "settings": estimate.settings,
    }


def fitting_overrides(row: dict) -> list[tuple[str, int, dict]]:
    """
    The changes to try, one after the other, for a row that does not fit 80 GB: `(setting, gpus, overrides)`, each
    adding to the previous. Activations first (micro-batch 1, one sample per rollout chunk), then the memory options
    that keep the method (`trl-ddrl estimate-memory --fit`'s: text encoders offloaded, EMA and trajectories on the
    host), then fewer samples per process (the rollout's trajectories and decoded samples), then LoRA, then 8 GPUs
    with FSDP2.
    """
    settings = row["settings"]
    setting, gpus = row["setting"], row["gpus"]
    overrides = dict(row["overrides"])
    steps = []
    if settings["per_device_train_batch_size"] > 1 or (settings["rollout_batch_size"] or 2) > 1:
        overrides.update(per_device_train_batch_size=1, rollout_batch_size=1)
        steps.append((setting, gpus, dict(overrides)))
    overrides.update(offload_text_encoders=True, ema_device="cpu", offload_trajectories=True)
    steps.append((setting, gpus, dict(overrides)))
    if settings["samples_per_process"] > 8:
        prompts = max(1, 8 * gpus // settings["num_generations"])
        overrides.update(prompts_per_step=prompts)
        steps.append((setting, gpus, dict(overrides)))
    if setting == "full":
        setting = "lora"
        steps.append((setting, gpus, dict(overrides)))
    if gpus == 1:
        steps.append((setting, 8, dict(overrides)))
    return steps


def _write(results: dict, path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


NAMES = {
    "sd3.5-medium": "SD3.5-Medium",
    "flux.1-dev": "FLUX.1-dev",
    "qwen-image": "Qwen-Image",
    "wan2.1-t2v-1.3b": "Wan 2.1 1.3B",
    "wan2.1-t2v-14b": "Wan 2.1 14B",
    "wan2.2-t2v-a14b": "Wan 2.2 A14B",
    "hunyuanvideo-1.5": "HunyuanVideo 1.5",
    "cosmos-predict2.5-2b": "Cosmos-Predict2.5 2B",
    "cosmos-predict2.5-14b": "Cosmos-Predict2.5 14B",
}


def markdown_table(rows: list[dict]) -> str:
    """docs/memory.md's table of `rows` (the JSON's), in the table's order, each fitting row after its row."""
    lines = [
        "| model | setting | GPUs (sharding) | changes | peak GiB / GPU | fits 80 GB | largest term (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {model: index for index, model in enumerate(RECIPES)}
    kinds = {"recipe": 0, "table": 1, "fits": 1}
    rows = sorted(
        rows,
        key=lambda row: (
            order[row["model"]],
            kinds[row["kind"]],
            tuple(row.get("instead_of") or (row["setting"], row["gpus"])),
            row["kind"] == "fits",
        ),
    )
    for row in rows:
        setting = "LoRA" if row["setting"] == "lora" else "full"
        if row["kind"] == "recipe":
            setting = f"recipe ({setting})"
        changes = ", ".join(f"{key}={value}" for key, value in row["overrides"].items())
        if row["kind"] == "fits":
            changes = f"for {row['instead_of'][0]}/{row['instead_of'][1]} GPU: {changes}"
        lines.append(
            f"| {NAMES[row['model']]} | {setting} | {row['gpus']} ({row['sharding']}) | {changes or '-'} | "
            f"{row['peak_gib_per_gpu']} | {'yes' if row['fits_80gb'] else '**no**'} | "
            f"{row['largest']} {row['largest_gib']} |"
        )
    return "\n".join(lines)


def _key(row: dict) -> tuple:
    return (row["model"], row["setting"], row["gpus"], row["sharding"], row["recipe"], json.dumps(row["overrides"]))


def _record(results: dict, row: dict, kind: str, path: Path) -> None:
    row = {"kind": kind, **row}
    print(json.dumps(row), flush=True)
    results["rows"] = [old for old in results["rows"] if _key(old) != _key(row)] + [row]
    _write(results, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--validate-only", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--rows", help="Comma-separated architectures of the table to (re)compute (default: all).")
    parser.add_argument("--no-fitting", action="store_true", help="Skip the search for settings that fit 80 GB.")
    parser.add_argument("--no-recipes", action="store_true", help="Skip the rows of the recipes as written.")
    parser.add_argument("--recipes-only", action="store_true", help="Only the rows of the recipes as written.")
    parser.add_argument("--markdown", action="store_true", help="Print docs/memory.md's table from the results.")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="The JSON file to update (default: %(default)s)."
    )
    options = parser.parse_args()
    if options.measure is not None:
        print(json.dumps(_measure_here(json.loads(options.measure))))
        return
    models = options.rows.split(",") if options.rows else list(RECIPES)
    path = options.results
    results = json.loads(path.read_text()) if path.is_file() else {"rows": [], "validation": []}
    if options.markdown:
        print(markdown_table(results["rows"]))
        return
    if not options.table_only:
        results["validation"] = [validate(VALIDATION_OVERRIDES)]
        print(json.dumps(results["validation"]), flush=True)
        _write(results, path)
    if options.validate_only:
        return
    for model in models:
        if (
            model in OWN_RECIPE and not options.no_recipes
        ):  # the recipe as written: its accelerate config's processes and sharding
            import yaml

            from trl_ddrl.memory import parallelism_from_accelerate_config

            recipe = yaml.safe_load((ROOT / "recipes" / RECIPES[model]).read_text())
            gpus, sharding = parallelism_from_accelerate_config(str(ROOT / recipe["accelerate_config"]))
            row = estimate_row(model, "lora" if recipe.get("use_peft") else "full", gpus, sharding)
            _record(results, row, "recipe", path)
    for model, setting, gpus in TABLE:
        if model not in models or options.recipes_only:
            continue
        row = estimate_row(model, setting, gpus)
        _record(results, row, "table", path)
        if row["fits_80gb"] or options.no_fitting:
            continue
        for fit_setting, fit_gpus, overrides in fitting_overrides(row):
            fitted = estimate_row(model, fit_setting, fit_gpus, overrides=overrides)
            _record(results, {**fitted, "instead_of": [setting, gpus]}, "fits", path)
            if fitted["fits_80gb"]:
                break


if __name__ == "__main__":
    main()
