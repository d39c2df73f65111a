# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Measurement helpers shared by the benchmarks (also imported by `ddpo_peer.py` in the DDPO venv)."""

import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable

import psutil
import torch
from transformers import TrainerCallback


class PeakRSS:
    """
    Peak resident set size of this process while the `with` block runs, sampled every `interval` seconds by a daemon
    thread (`ru_maxrss` cannot be reset, so it cannot isolate one phase of a run).

    Attributes after the block: `peak_mib` (float).
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, current_rss_mib())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, current_rss_mib())


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB."""
    return psutil.Process().memory_info().rss / 2**20


def process_peak_rss_mib() -> float:
    """Peak RSS of this process over its whole life (`ru_maxrss`, KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def summary(values: list[float]) -> dict:
    """Median, min and all values of a list of timings (seconds)."""
    return {"median": statistics.median(values), "min": min(values), "values": values}


def time_calls(obj: object, name: str) -> list[float]:
    """Wrap the method `name` of the instance `obj` so that each call's wall time (seconds) lands in the returned list."""
    method = getattr(obj, name)
    durations: list[float] = []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            durations.append(time.perf_counter() - start)

    setattr(obj, name, timed)
    return durations


class StepTimer(TrainerCallback):
    """
    Wall time between consecutive optimizer steps' ends (the first from the start of training). With DDRL's default
    gradient accumulation one optimizer step is one iteration. End to end on purpose: the Trainer fetches a step's
    micro-batches before `on_step_begin` and logs after `on_step_end`, and both belong to the iteration's cost.

    Args:
        between (`Callable[[], None]`, *optional*): Run after each step, outside the timing (the raw-floor pairing
            of `throughput.py`).
    """

    def __init__(self, between: Callable[[], None] | None = None):
        self.between = between
        self.durations: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._last)
        if self.between is not None:
            self.between()
        self._last = time.perf_counter()


class RawFloor:
    """
    The bare compute of one RL iteration with no trainer around it, on a copy of the trained denoiser: `rollout_steps`
    no-grad forwards of the whole rollout batch, then `micro_batches` times `forwards_per_micro_batch` forwards of one
    micro-batch with a single backward, then one AdamW step with gradient-norm clipping at 1 (the Trainer's default).

    Args:
        forward (`Callable[[bool], torch.Tensor]`): Runs the denoiser on the prepared inputs, the whole rollout batch
            when given `True`, one micro-batch when given `False` (with CFG, both branches in one batch).
        parameters (`list[torch.nn.Parameter]`): The trained parameters.
        rollout_steps, micro_batches, forwards_per_micro_batch (`int`): The iteration's shape.

    Attributes: `rollout_s` and `train_s`, the seconds of each call's two phases.
    """

    def __init__(
        self,
        forward: Callable[[bool], torch.Tensor],
        parameters: list[torch.nn.Parameter],
        rollout_steps: int,
        micro_batches: int,
        forwards_per_micro_batch: int = 1,
    ):
        self.forward = forward
        self.parameters = parameters
        self.rollout_steps = rollout_steps
        self.micro_batches = micro_batches
        self.forwards_per_micro_batch = forwards_per_micro_batch
        self.optimizer = torch.optim.AdamW(parameters, lr=1e-5)
        self.rollout_s: list[float] = []
        self.train_s: list[float] = []

    def iteration(self) -> None:
        """Run one iteration and record its rollout and training seconds."""
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(self.rollout_steps):
                self.forward(True)
        middle = time.perf_counter()
        for _ in range(self.micro_batches):
            loss = sum(self.forward(False).float().square().mean() for _ in range(self.forwards_per_micro_batch))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.rollout_s.append(middle - start)
        self.train_s.append(time.perf_counter() - middle)


def unet_raw_floor(
    unet: torch.nn.Module,
    samples: int,
    latent_size: int,
    sequence_length: int,
    rollout_steps: int,
    trained_steps: int,
    batch_size: int,
    guidance: bool,
) -> RawFloor:
    """
    The raw floor of one iteration of a UNet family (`UNet2DConditionModel`, text conditioning by cross-attention) on
    `unet` itself (pass a copy): `samples` rollouts, `samples * trained_steps / batch_size` micro-batches; with
    `guidance`, every forward runs the negative and positive branches in one doubled batch. Embeddings are random
    (`[samples, sequence_length, cross_attention_dim]`): values do not change the compute.
    """
    unet.train()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(samples, unet.config.in_channels, latent_size, latent_size, generator=generator)
    embeds = torch.randn(samples, sequence_length, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.full((samples,), 500)
    copies = 2 if guidance else 1

    def forward(whole_batch: bool) -> torch.Tensor:
        rows = slice(None) if whole_batch else slice(0, batch_size)
        return unet(
            torch.cat([latents[rows]] * copies),
            torch.cat([timesteps[rows]] * copies),
            encoder_hidden_states=torch.cat([embeds[rows]] * copies),
            return_dict=False,
        )[0]

    return RawFloor(
        forward,
        [p for p in unet.parameters() if p.requires_grad],
        rollout_steps=rollout_steps,
        micro_batches=samples * trained_steps // batch_size,
    )
