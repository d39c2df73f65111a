# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The GPU check: short DDRL training runs at the real architectures' sizes, with random bf16 weights (nothing can be
downloaded on the GPU machine), measuring time, memory and the trainer / raw-compute ratio.

Each case builds its pipeline from the shipped configs (`trl_ddrl.model_configs`: SD3.5-Medium, FLUX.1-dev, Wan 2.1
1.3B, Cosmos-Predict2.5 2B) directly on the GPU, trains `1 + iterations` DDRL iterations (the first, the warm-up, is
dropped) with a brightness reward computed on the GPU, and records per measured iteration:

- seconds split into **rollout** (the trainer's `_prepare_inputs`: prompt encoding, sampling, decoding, scoring,
  advantages, the data batch; of which the trainer's own `time/rollout` and `time/reward`), **replay** (forward and
  backward of the trained transitions and the data term) and **optimizer** (clipping, the AdamW step, EMA);
- the **raw compute floor** of the same iteration (the adapter's denoiser calls alone: the rollout's no-grad forwards
  and, per micro-batch, the replay and data forwards with one backward, then one AdamW step) on the trained module
  right after training, and `trainer / raw`;
- replay tokens/s and model FLOP utilisation against the GPU's bf16 peak (useful FLOPs: torch's `FlopCounterMode`
  over one denoiser forward of each batch shape, times the forwards of the iteration, a backward counting twice its
  forward; activation-checkpointing recomputation is not counted as useful);
- peak CUDA memory (`max_memory_allocated` and `max_memory_reserved`), beside the memory estimator's prediction for
  the same settings where `trl_ddrl.memory` is installed;
- the on-policy ratio of every trained transition: max and mean `|log r|` and the clip fraction per trained step;
- whether the trained weights changed.

Each case runs in its own process (one failure does not stop the rest) within a total time budget, most important
first; results are written after every case to `benchmarks/results/gpu_check.json` and a markdown table to
`benchmarks/results/gpu_check.md`.

`--tiny` runs the same code path on the CPU with the tests' tiny pipelines, in-process, in seconds (the test suite runs
it so that this script never rots).

Usage:
    python benchmarks/gpu_check.py                       # on the GPU machine: every case within --budget-s
    python benchmarks/gpu_check.py --cases sd35m-lora    # one case
    python benchmarks/gpu_check.py --tiny --output /tmp/gpu_check.json
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import TrainerCallback


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

RESULTS = os.path.join(HERE, "results")
# Dense bf16 tensor-core peak of the H100/H200 SXM (NVIDIA's datasheet, without sparsity); other GPUs: --peak-tflops.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
PROMPTS = ["a red fox", "a city street", "a bowl of fruit", "a sailing boat"]  # within the tiny tokenizers' 16


@dataclasses.dataclass
class Case:
    """One GPU-check run: an architecture of `trl_ddrl.model_configs` and the DDRL settings it trains with."""

    name: str
    model: str
    lora_rank: int | None  # None: full fine-tune
    height: int
    width: int
    num_frames: int | None = None
    prompts_per_step: int = 1
    num_generations: int = 8
    num_inference_steps: int = 10
    train_timestep_fraction: float = 0.5
    micro_batch: int = 8
    data_beta: float = 0.01
    sampler: str = "auto"
    log_ratio_form: str = "edm_squared_distance"
    max_sequence_length: int | None = None
    iterations: int = 2
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    cudnn_attention: bool = True  # False: torch's cuDNN SDPA backend off (flash / memory-efficient kernels only)


# Most important first: the orchestrator stops starting cases when the budget is spent.
CASES = [
    Case("sd35m-lora", "sd3.5-medium", 32, 512, 512, max_sequence_length=256),
    Case("sd35m-full", "sd3.5-medium", None, 512, 512, max_sequence_length=256),
    Case("flux-lora", "flux.1-dev", 32, 512, 512, micro_batch=4, max_sequence_length=512),
    # The first H200 run of flux-lora died in its first backward with "an illegal memory access": is it cuDNN's SDPA?
    Case(
        "flux-lora-no-cudnn-sdpa",
        "flux.1-dev",
        32,
        512,
        512,
        micro_batch=4,
        max_sequence_length=512,
        cudnn_attention=False,
    ),
    Case("wan13b-lora", "wan2.1-t2v-1.3b", 32, 480, 832, num_frames=33, micro_batch=4, max_sequence_length=512),
    Case(
        "cosmos25-2b-lora",
        "cosmos-predict2.5-2b",
        32,
        480,
        832,
        num_frames=33,
        micro_batch=4,
        sampler="churn",
        max_sequence_length=512,
        lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    ),
    Case(
        "sd35m-lora-gaussian",
        "sd3.5-medium",
        32,
        512,
        512,
        prompts_per_step=2,
        max_sequence_length=256,
        log_ratio_form="gaussian",
        iterations=1,
    ),
]
CASES_BY_NAME = {case.name: case for case in CASES}


def tiny_case(case: Case) -> Case:
    """The case at the tests' tiny size: 32x32 (5 frames for video), 4 rollouts, 4 steps, one measured iteration."""
    return dataclasses.replace(
        case,
        height=32,
        width=32,
        num_frames=5 if case.num_frames else None,
        num_generations=4,
        num_inference_steps=4,
        micro_batch=4,
        max_sequence_length=16,
        iterations=1,
        lora_rank=4 if case.lora_rank else None,
    )


def build_pipeline(case: Case, tiny: bool, device: torch.device):
    """The random pipeline of `case`: the real architecture in bf16 on `device`, or with `tiny` the tests' one."""
    import tiny_models

    if tiny:
        builders = {
            "sd3.5-medium": tiny_models.tiny_sd3_pipeline,
            "flux.1-dev": tiny_models.tiny_flux_pipeline,
            "wan2.1-t2v-1.3b": tiny_models.tiny_wan_pipeline,
            "cosmos-predict2.5-2b": tiny_models.tiny_cosmos2_5_pipeline,
        }
        return builders[case.model]().to(device)
    from trl_ddrl.model_configs import build_random_pipeline

    extra = {"safety_checker": tiny_models.TinyCosmosSafetyChecker()} if case.model.startswith("cosmos") else None
    return build_random_pipeline(case.model, torch_dtype=torch.bfloat16, device=device, extra_components=extra)


def make_dataset(case: Case, size: int) -> Dataset:
    """Prompts and random data images (`[H, W, 3]` uint8) or videos (`[F, H, W, 3]`) for the data term."""
    generator = np.random.default_rng(0)
    shape = (case.height, case.width, 3) if case.num_frames is None else (case.num_frames, case.height, case.width, 3)
    return Dataset.from_dict(
        {
            "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(size)],
            "image": [generator.integers(0, 256, shape, dtype=np.uint8) for _ in range(size)],
        }
    )


def brightness(prompts, images, **kwargs):
    """Mean brightness of each sample, on the samples' device (no host copy of the images)."""
    return images.flatten(1).float().mean(dim=1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer(TrainerCallback):
    """
    Per optimizer step (one iteration): its wall time and the seconds of its optimizer step (clipping, AdamW, EMA),
    synchronising the device at each boundary so that queued kernels are charged to the right phase.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.iteration_s: list[float] = []
        self.optimizer_s: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self._last = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        synchronize(self.device)
        self._optimizer_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        now = time.perf_counter()
        self.optimizer_s.append(now - self._optimizer_start)
        self.iteration_s.append(now - self._last)
        self._last = now


def time_method(obj: Any, name: str, device: torch.device, per_step: list[float], state) -> None:
    """Wrap `obj.name` so that its seconds (device-synchronised) add up per optimizer step in `per_step`."""
    method = getattr(obj, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = method(*args, **kwargs)
        synchronize(device)
        step = state().global_step
        while len(per_step) <= step:
            per_step.append(0.0)
        per_step[step] += time.perf_counter() - start
        return result

    setattr(obj, name, timed)


class RatioRecorder:
    """
    Records, for every trained transition of every micro-batch, `log r` and whether the clipped branch was taken, by
    wrapping the policy loss where the trainer's modules call it and the trainer's `compute_loss` (for the step index).
    """

    def __init__(self, trainer):
        import trl_ddrl

        self.log_ratios: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.clipped: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._step_index = None
        compute_loss = trainer.compute_loss

        def recording_compute_loss(model, inputs, *args, **kwargs):
            self._step_index = inputs["step_index"].detach()
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = recording_compute_loss
        self._originals = {}
        for module in list(sys.modules.values()):
            name = getattr(module, "__name__", "")
            if name.startswith(trl_ddrl.__name__) and hasattr(module, "clipped_policy_loss"):
                self._originals[module] = module.clipped_policy_loss
                module.clipped_policy_loss = self._wrap(module.clipped_policy_loss)
        self.patched = sorted(module.__name__ for module in self._originals)

    def close(self) -> None:
        """Put the trainer modules' policy loss back (cases run one after another in one process with `--tiny`)."""
        for module, original in self._originals.items():
            module.clipped_policy_loss = original

    def _wrap(self, policy_loss):
        def recorded(*args, **kwargs):
            loss, ratio, is_clipped = policy_loss(*args, **kwargs)
            steps = self._step_index.reshape(-1).tolist()
            log_ratio = (args[0] if args else kwargs["log_ratio"]).detach().double().reshape(-1).cpu()
            clipped = is_clipped.detach().reshape(-1).cpu()
            for row, step in enumerate(steps):
                self.log_ratios[step].append(log_ratio[row : row + 1])
                self.clipped[step].append(clipped[row : row + 1])
            return loss, ratio, is_clipped

        return recorded

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for step in sorted(self.log_ratios):
            values = torch.cat(self.log_ratios[step]).abs()
            out[str(step)] = {
                "transitions": int(values.numel()),
                "abs_log_ratio_max": float(values.max()),
                "abs_log_ratio_mean": float(values.mean()),
                "clip_fraction": float(torch.cat(self.clipped[step]).float().mean()),
            }
        return out


def trained_parameters(trainer) -> list[torch.nn.Parameter]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def raw_floor(trainer, case: Case, device: torch.device, count_flops: bool) -> dict[str, float]:
    """
    The bare compute of one iteration of `case` on the trained module, through the adapter's `predict` (the denoiser
    call with CFG): `num_inference_steps` no-grad forwards of the rollout batch, then per micro-batch a forward of the
    replayed states (and with a data term one of the noised data) and one backward, then a clipped AdamW step. Timed
    once each; with `count_flops` the useful FLOPs of each phase, from `FlopCounterMode` over one forward.
    """
    from torch.utils.flop_counter import FlopCounterMode

    adapter = trainer.adapter
    denoiser = trainer.accelerator.unwrap_model(trainer.model)
    denoiser.train()
    parameters = trained_parameters(trainer)
    optimizer = torch.optim.AdamW(parameters, lr=1e-7)
    samples = case.prompts_per_step * case.num_generations
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(samples)]
    conditioning = adapter.encode_prompts(prompts, device)
    micro_conditioning = adapter.encode_prompts(prompts[: case.micro_batch], device)
    latents = adapter.sample_noise(samples, torch.Generator().manual_seed(0))  # a CPU generator, as the trainer's
    micro_latents = latents[: case.micro_batch]
    trained_steps = trainer.args.num_trained_steps
    micro_batches = samples * trained_steps // case.micro_batch
    forwards = 2 if case.data_beta > 0 else 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def rollout() -> None:
        with torch.no_grad(), autocast:
            for step in range(case.num_inference_steps):
                index = torch.full((samples,), step, device=device)
                adapter.predict(denoiser, latents, index, conditioning)

    def train() -> None:
        index = torch.full((case.micro_batch,), 1, device=device)
        for _ in range(micro_batches):
            with autocast:
                loss = sum(
                    adapter.predict(denoiser, micro_latents, index, micro_conditioning).float().square().mean()
                    for _ in range(forwards)
                )
            loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    # The trainer's iterations warmed the kernels up: one timed run of each phase.
    result = {"rollout_s": timed(rollout), "train_s": timed(train)}
    result["iteration_s"] = result["rollout_s"] + result["train_s"]
    if count_flops:  # one forward of each batch shape; a backward counts twice its forward (the 6ND convention)
        index = torch.zeros(samples, dtype=torch.long, device=device)
        with torch.no_grad(), autocast:
            with FlopCounterMode(display=False) as counter:
                adapter.predict(denoiser, latents, index, conditioning)
            rollout_forward = counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                adapter.predict(denoiser, micro_latents, index[: case.micro_batch], micro_conditioning)
            micro_forward = counter.get_total_flops()
        result["rollout_flops"] = float(rollout_forward * case.num_inference_steps)
        result["train_flops"] = float(3 * micro_forward * forwards * micro_batches)
    result["replay_rows"] = micro_batches * case.micro_batch * forwards
    return result


def lora_config(case: Case):
    """The case's `LoraConfig` (rank = alpha), or `None` for a full fine-tune."""
    from peft import LoraConfig

    if not case.lora_rank:
        return None
    return LoraConfig(r=case.lora_rank, lora_alpha=case.lora_rank, target_modules=list(case.lora_targets))


def memory_estimate(case: Case, config) -> dict[str, Any]:
    """The memory estimator's prediction for the same settings, where it is installed."""
    try:
        from trl_ddrl.memory import estimate_memory
    except ImportError as error:
        return {"available": False, "reason": str(error)}
    try:
        estimate = estimate_memory(case.model, config, peft_config=lora_config(case))
    except Exception as error:  # report, never fail the GPU run on the estimator
        return {"available": True, "error": f"{type(error).__name__}: {error}"}
    return {
        "available": True,
        "peak_gib": estimate.peak_bytes / 2**30,
        "phases_gib": {phase: value / 2**30 for phase, value in estimate.phases.items()},
    }


def image_tokens(trainer) -> int:
    """Tokens of one sample's latents seen by the denoiser (latent elements per channel over the patch area)."""
    shape = trainer.adapter.latent_shape()
    patch = getattr(trainer.adapter.denoiser.config, "patch_size", 1) or 1
    patch = math.prod(patch) if isinstance(patch, (list, tuple)) else patch * patch
    if trainer.pipeline.__class__.__name__.startswith("Flux"):  # packed latents: one token per 2x2 patch already
        patch = 1
    return math.prod(shape[1:]) // patch if len(shape) > 1 else shape[0]


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in BF16_PEAK_TFLOPS.items() if key in name), None)


def run_case(case: Case, tiny: bool, peak_override: float | None = None, with_estimate: bool = True) -> dict[str, Any]:
    """Train `case` for `1 + case.iterations` iterations and measure it (see the module docstring)."""
    from trl_ddrl import DDRLTrainer

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    torch.backends.cuda.enable_cudnn_sdp(case.cudnn_attention)
    if tiny:
        case = tiny_case(case)
    torch.manual_seed(0)
    start = time.perf_counter()
    pipeline = build_pipeline(case, tiny, device)
    build_s = time.perf_counter() - start
    samples = case.prompts_per_step * case.num_generations
    with tempfile.TemporaryDirectory(prefix="ddrl-gpu-check-") as output_dir:
        config = config_for(case, output_dir, tiny, device)
        peft_config = lora_config(case)
        timer = PhaseTimer(device)
        trainer = DDRLTrainer(
            pipeline,
            brightness,
            args=config,
            train_dataset=make_dataset(case, 4 * case.prompts_per_step),
            peft_config=peft_config,
            callbacks=[timer],
        )
        prepare_s: list[float] = []
        time_method(trainer, "_prepare_inputs", device, prepare_s, lambda: trainer.state)
        recorder = RatioRecorder(trainer)
        parameters = trained_parameters(trainer)
        before = [parameter.detach().clone() for parameter in parameters[:64]]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            trainer.train()
        finally:
            recorder.close()
        peak = (
            {
                "max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "max_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            }
            if device.type == "cuda"
            else {}
        )
        changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, parameters, strict=False))
        logs = [entry for entry in trainer.state.log_history if "time/rollout" in entry]
        try:
            floor = raw_floor(trainer, case, device, count_flops=True)
        except Exception:  # keep the trainer's figures
            floor = {"error": traceback.format_exc()}

    # Drop the warm-up iteration (index 0).
    iteration = timer.iteration_s[1:]
    optimizer = timer.optimizer_s[1:]
    rollout = prepare_s[1 : 1 + len(iteration)]
    replay = [it - ro - op for it, ro, op in zip(iteration, rollout, optimizer, strict=True)]
    median = statistics.median
    trainer_iteration = median(iteration)
    replay_s = median(replay)
    peak_tf = peak_tflops(device, peak_override)
    tokens = image_tokens(trainer)
    result: dict[str, Any] = {
        "case": dataclasses.asdict(case),
        "device": str(device),
        "build_s": build_s,
        "denoiser_parameters": sum(p.numel() for p in trainer.adapter.denoiser.parameters()),
        "trained_parameters": sum(p.numel() for p in parameters),
        "trained_parameter_dtypes": sorted({str(p.dtype) for p in parameters}),
        "samples_per_iteration": samples,
        "trained_steps": config.num_trained_steps,
        "micro_batches": config.steps_per_generation,
        "image_tokens_per_sample": tokens,
        "trainer": {
            "iteration_s": median(iteration),
            "rollout_s": median(rollout),
            "sampling_s": median(entry["time/rollout"] for entry in logs[1:]),
            "reward_s": median(entry["time/reward"] for entry in logs[1:]),
            "replay_s": replay_s,
            "optimizer_s": median(optimizer),
            "per_iteration_s": iteration,
        },
        "raw": floor,
        "memory": peak,
        "memory_estimate": memory_estimate(case, config) if with_estimate else {"available": False},
        "on_policy_ratio_per_step": recorder.summary(),
        "policy_loss_wrapped_in": recorder.patched,
        "trained_weights_changed": {"checked": len(before), "changed": int(changed)},
    }
    if "error" in floor:
        return result
    result["ratio_trainer_over_raw"] = trainer_iteration / floor["iteration_s"]
    result["replay_tokens_per_s"] = floor["replay_rows"] * tokens / replay_s
    if peak_tf:
        result["bf16_peak_tflops"] = peak_tf
        result["mfu_iteration"] = (
            (floor["rollout_flops"] + floor["train_flops"]) / trainer_iteration / (peak_tf * 1e12)
        )
        result["mfu_replay"] = floor["train_flops"] / replay_s / (peak_tf * 1e12)
        result["mfu_raw_iteration"] = (
            (floor["rollout_flops"] + floor["train_flops"]) / floor["iteration_s"] / (peak_tf * 1e12)
        )
    add_estimate_error(result)
    return result


def add_estimate_error(result: dict[str, Any]) -> None:
    """The estimate's relative error against the measured `max_memory_allocated`, where both exist."""
    estimate, peak = result["memory_estimate"], result["memory"]
    if peak and "peak_gib" in estimate:
        result["memory_estimate_relative_error"] = estimate["peak_gib"] / peak["max_memory_allocated_gib"] - 1


def config_for(case: Case, output_dir: str, tiny: bool, device: torch.device):
    """The `DDRLConfig` a case trains with."""
    from trl_ddrl import DDRLConfig

    return DDRLConfig(
        output_dir=output_dir,
        prompts_per_step=case.prompts_per_step,
        num_generations=case.num_generations,
        num_inference_steps=case.num_inference_steps,
        train_timestep_fraction=case.train_timestep_fraction,
        per_device_train_batch_size=case.micro_batch,
        data_beta=case.data_beta,
        sampler=case.sampler,
        log_ratio_form=case.log_ratio_form,
        height=case.height,
        width=case.width,
        num_frames=case.num_frames,
        max_sequence_length=case.max_sequence_length,
        learning_rate=1e-4 if case.lora_rank else 1e-5,
        warmup_steps=0,
        max_steps=1 + case.iterations,
        gradient_checkpointing=not tiny,
        bf16=device.type == "cuda",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        log_level="error",
        seed=0,
    )


def add_estimates(output: str) -> None:
    """
    Fill in the memory estimator's prediction for every measured case of a results file (the estimator runs on the
    CPU: the GPU run skips it with `--no-estimate`, so that no GPU time goes to it), and redraw the table.
    """
    with open(output) as file:
        results = json.load(file)
    for name, result in results["cases"].items():
        if "error" in result:
            continue
        case = Case(**{**result["case"], "lora_targets": tuple(result["case"]["lora_targets"])})
        with tempfile.TemporaryDirectory() as output_dir:
            config = config_for(case, output_dir, tiny=False, device=torch.device("cpu"))
            config.bf16 = True
            result["memory_estimate"] = memory_estimate(case, config)
        add_estimate_error(result)
        print(f"[gpu_check] {name}: estimate {result['memory_estimate']}", flush=True)
    write(results, output)


def environment() -> dict[str, Any]:
    import diffusers
    import transformers
    import trl

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        info["device_name"] = "cpu"
    return info


def markdown_table(results: dict[str, Any]) -> str:
    """One row per case: time split, ratio, utilisation, memory against the estimate, ratio statistics, weights."""
    lines = [
        f"GPU check on {results['environment']['device_name']} (torch {results['environment']['torch']}, CUDA "
        f"{results['environment']['cuda']}), random bf16 weights at the real configs.",
        "",
        "| case | s/iter | rollout | reward | replay | optimizer | raw floor | trainer/raw | replay MFU | "
        "peak alloc GiB | estimate GiB | max abs log r | clip frac | weights changed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for name, case in results["cases"].items():
        if "error" in case:
            lines.append(f"| {name} | failed: {case['error'].splitlines()[-1][:120]} |" + " |" * 13)
            continue
        t = case["trainer"]
        ratios = case["on_policy_ratio_per_step"].values()
        max_log_r = max((r["abs_log_ratio_max"] for r in ratios), default=float("nan"))
        clip = statistics.mean(r["clip_fraction"] for r in ratios) if ratios else float("nan")
        estimate = case["memory_estimate"].get("peak_gib")
        lines.append(
            f"| {name} | {t['iteration_s']:.2f} | {t['rollout_s']:.2f} | {t['reward_s']:.3f} | {t['replay_s']:.2f} | "
            f"{t['optimizer_s']:.2f} | {case['raw'].get('iteration_s', nan):.2f} | {case.get('ratio_trainer_over_raw', nan):.3f} | "
            f"{case.get('mfu_replay', float('nan')):.1%} | "
            f"{case['memory'].get('max_memory_allocated_gib', float('nan')):.1f} | "
            f"{'n/a' if estimate is None else f'{estimate:.1f}'} | {max_log_r:.2e} | {clip:.3f} | "
            f"{case['trained_weights_changed']['changed']}/{case['trained_weights_changed']['checked']} |"
        )
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], output: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as file:
        json.dump(results, file, indent=2)
    with open(os.path.splitext(output)[0] + ".md", "w") as file:
        file.write(markdown_table(results))


def run_in_subprocess(name: str, timeout_s: float, peak: float | None, estimate: bool) -> dict[str, Any]:
    """Run one case in its own process, so that a crash or an out-of-memory error does not stop the others."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        path = handle.name
    command = [sys.executable, os.path.abspath(__file__), "--case-worker", name, "--worker-output", path]
    if peak:
        command += ["--peak-tflops", str(peak)]
    if not estimate:
        command.append("--no-estimate")
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"error": f"timed out after {timeout_s:.0f} s\n{tail}"}
    wall = time.perf_counter() - start
    if completed.returncode != 0 or not os.path.getsize(path):
        return {"error": f"exit {completed.returncode} after {wall:.0f} s\n{completed.stderr[-4000:]}"}
    with open(path) as file:
        result = json.load(file)
    os.unlink(path)
    result["process_wall_s"] = wall
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=None, help=f"Cases to run (default all): {list(CASES_BY_NAME)}")
    parser.add_argument("--tiny", action="store_true", help="The same code path on the CPU with tiny pipelines.")
    parser.add_argument("--budget-s", type=float, default=480.0, help="Total seconds; no case starts past it.")
    parser.add_argument("--min-case-s", type=float, default=60.0, help="Do not start a case with less time left.")
    parser.add_argument("--case-timeout-s", type=float, default=None, help="At most this many seconds per case.")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the GPU (default: by name).")
    parser.add_argument("--output", default=os.path.join(RESULTS, "gpu_check.json"))
    parser.add_argument("--no-estimate", action="store_true", help="Skip the memory estimator (run it later on CPU).")
    parser.add_argument(
        "--add-estimates", action="store_true", help="Only add the estimator's predictions to --output's cases."
    )
    parser.add_argument("--case-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.case_worker:  # one case, in this process (started by the orchestrator)
        result = run_case(
            CASES_BY_NAME[args.case_worker],
            tiny=False,
            peak_override=args.peak_tflops,
            with_estimate=not args.no_estimate,
        )
        with open(args.worker_output, "w") as file:
            json.dump(result, file)
        return
    if args.add_estimates:
        add_estimates(args.output)
        return
    names = args.cases or list(CASES_BY_NAME)
    unknown = sorted(set(names) - set(CASES_BY_NAME))
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; choose from {list(CASES_BY_NAME)}.")
    results: dict[str, Any] = {"environment": environment(), "tiny": args.tiny, "cases": {}, "not_run": []}
    start = time.perf_counter()
    for name in names:
        left = args.budget_s - (time.perf_counter() - start)
        if not args.tiny and left < args.min_case_s:
            results["not_run"].append(name)
            continue
        print(f"[gpu_check] {name}: starting ({left:.0f} s of the budget left)", flush=True)
        if args.tiny:
            try:
                results["cases"][name] = run_case(CASES_BY_NAME[name], tiny=True, with_estimate=not args.no_estimate)
            except Exception:
                results["cases"][name] = {"error": traceback.format_exc()}
        else:
            timeout = min(left, args.case_timeout_s or left)
            results["cases"][name] = run_in_subprocess(name, timeout, args.peak_tflops, not args.no_estimate)
        case = results["cases"][name]
        if "error" in case:
            print(f"[gpu_check] {name}: FAILED\n{case['error']}", flush=True)
        else:
            print(
                f"[gpu_check] {name}: {case['trainer']['iteration_s']:.2f} s/iteration, trainer/raw "
                f"{case.get('ratio_trainer_over_raw', float('nan')):.3f}, peak {case['memory'].get('max_memory_allocated_gib', 0):.1f} "
                f"GiB",
                flush=True,
            )
        write(results, args.output)
    write(results, args.output)
    print(markdown_table(results))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
