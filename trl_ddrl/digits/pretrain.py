# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Pretraining of the embedded digits generator, and its on-disk cache.

The generator is trained from scratch on the `"base"` split with the rectified-flow loss that DDRL's data term uses
(`flow_matching_noisy_sample` + the adapter's `velocity` + `flow_matching_loss`), at noise levels drawn from a
logit-normal (or uniform) distribution, with 10% of the prompts dropped to the unconditional embedding so that
classifier-free guidance is available. A few minutes on two CPU cores give recognisable digits.
"""

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..losses import flow_matching_loss, flow_matching_noisy_sample
from ..pipelines.base import SamplingSettings
from ..pipelines.digits import DigitsFlowAdapter
from .data import load_digits_split
from .pipeline import DigitsFlowPipeline, random_digits_pipeline


CACHE_VERSION = "digits-base-v1"
SIGMA_SAMPLING_CHOICES = ("logit_normal", "uniform")


def default_cache_root() -> Path:
    """`$TRL_DDRL_CACHE` if set, else `~/.cache/trl_ddrl`."""
    return Path(os.environ.get("TRL_DDRL_CACHE") or Path.home() / ".cache" / "trl_ddrl")


def _sample_sigmas(batch_size: int, sigma_sampling: str, generator: torch.Generator) -> torch.Tensor:
    """Noise levels `[batch_size]` in `(0, 1)`: logit-normal (`sigmoid(N(0, 1))`, as SD3) or uniform."""
    if sigma_sampling == "logit_normal":
        return torch.sigmoid(torch.randn(batch_size, generator=generator))
    return torch.rand(batch_size, generator=generator)


def pretrain_digits_model(
    output_dir: str | os.PathLike | None = None,
    steps: int = 400,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    cfg_dropout: float = 0.1,
    sigma_sampling: str = "logit_normal",
    show_progress: bool = True,
) -> DigitsFlowPipeline:
    """
    Train a [`DigitsFlowPipeline`] from scratch on the `"base"` digits split.

    Each step draws `batch_size` images `x0` (pixels in `[-1, 1]`), noise and noise levels `sigma`, and minimises the
    flow-matching loss `||v(x_sigma, sigma, prompt) - (noise - x0)||^2` with AdamW (linear warm-up, cosine decay).
    The UNet and the prompt encoder's embeddings are trained together.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*): Where to save the pipeline (`save_pretrained`); not saved
            when `None`.
        steps (`int`, *optional*, defaults to `400`): Optimizer steps.
        batch_size (`int`, *optional*, defaults to `64`): Images per step.
        learning_rate (`float`, *optional*, defaults to `2e-3`): Peak learning rate.
        seed (`int`, *optional*, defaults to `0`): Seed of the initialisation, the batches and the noise.
        cfg_dropout (`float`, *optional*, defaults to `0.1`): Fraction of prompts replaced by the unconditional one.
        sigma_sampling (`str`, *optional*, defaults to `"logit_normal"`): `"logit_normal"` or `"uniform"` noise
            levels.
        show_progress (`bool`, *optional*, defaults to `True`): Show a tqdm progress bar with the loss.

    Returns:
        [`DigitsFlowPipeline`]: The trained pipeline, on the CPU, in eval mode.
    """
    if sigma_sampling not in SIGMA_SAMPLING_CHOICES:
        raise ValueError(
            f"sigma_sampling={sigma_sampling!r} is not valid; choose one of "
            f"{', '.join(map(repr, SIGMA_SAMPLING_CHOICES))}."
        )
    if not 0.0 <= cfg_dropout < 1.0:
        raise ValueError(f"cfg_dropout={cfg_dropout} must be in [0, 1).")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must both be >= 1.")

    pipeline = random_digits_pipeline(seed=seed)
    adapter = DigitsFlowAdapter(pipeline, SamplingSettings(num_inference_steps=1, eta=0.0))
    images, labels = load_digits_split("base")
    x0_all = images * 2 - 1
    generator = torch.Generator().manual_seed(seed)
    unet, encoder = pipeline.unet.train(), pipeline.prompt_encoder.train()
    parameters = [*unet.parameters(), *encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    progress = tqdm(range(steps), desc="Pretraining the digits model", disable=not show_progress)
    running_loss = None
    start = time.perf_counter()
    for _ in progress:
        index = torch.randint(0, len(labels), (batch_size,), generator=generator)
        x0 = x0_all[index]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = _sample_sigmas(batch_size, sigma_sampling, generator)
        drop = torch.rand(batch_size, generator=generator) < cfg_dropout
        conditions = torch.where(drop, torch.full_like(labels[index], encoder.unconditional_index), labels[index])
        conditioning = {"prompt_embeds": encoder(conditions)}
        velocity = adapter.velocity(unet, flow_matching_noisy_sample(x0, noise, sigma), sigma, conditioning)
        loss = flow_matching_loss(velocity, x0, noise).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_scheduler.step()
        running_loss = loss.item() if running_loss is None else 0.98 * running_loss + 0.02 * loss.item()
        progress.set_postfix(loss=f"{running_loss:.4f}")
    pipeline.unet.eval()
    pipeline.prompt_encoder.eval()

    if output_dir is not None:
        pipeline.save_pretrained(output_dir)
        info = {
            "steps": steps,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
            "cfg_dropout": cfg_dropout,
            "sigma_sampling": sigma_sampling,
            "final_loss": running_loss,
            "runtime_s": time.perf_counter() - start,
        }
        Path(output_dir, "pretraining.json").write_text(json.dumps(info, indent=2) + "\n")
    return pipeline


def load_or_pretrain_base(
    cache_dir: str | os.PathLike | None = None, show_progress: bool = True
) -> DigitsFlowPipeline:
    """
    The pretrained digits generator: loaded from the cache, or pretrained (a few minutes) and cached on first use.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): Cache root; the pipeline lives in its `digits-base-v1`
            folder. Defaults to `$TRL_DDRL_CACHE`, else `~/.cache/trl_ddrl`.
        show_progress (`bool`, *optional*, defaults to `True`): Show the pretraining progress bar.

    Returns:
        [`DigitsFlowPipeline`]
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_root()
    folder = folder / CACHE_VERSION
    if (folder / "model_index.json").is_file():
        pipeline = DigitsFlowPipeline.from_pretrained(folder)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Write to a sibling temporary folder and rename it, so that an interrupted run leaves no half-written cache.
        staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_VERSION}-", dir=folder.parent))
        try:
            pipeline = pretrain_digits_model(staging, show_progress=show_progress)
            staging.rename(folder)
        except OSError:
            if not (folder / "model_index.json").is_file():
                raise
            # Another process cached the same model meanwhile: keep its copy.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
