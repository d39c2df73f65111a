# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Context parallelism: the processes form a (data-parallel x context-parallel) grid, and each context-parallel group
runs diffusers' own sequence-parallel attention (`ModelMixin.enable_parallelism`, Ulysses or ring) on the same
samples.

What the trainer needs from the grid is small and lives here: which samples a process holds and which seed stream it
draws from (its data-parallel rank, shared by its whole context-parallel group), a sampler that hands every rank of a
group the same prompts, the rewards of each sample once (from the group's first rank), and the gradient scale that
turns the data-parallel mean over all processes into the mean over data-parallel groups.
"""

import contextlib
import itertools
import math
from collections.abc import Iterator
from unittest import mock

import torch
from torch import nn


CONTEXT_PARALLEL_METHODS = ("ulysses", "ring")
# Context-parallel backends of diffusers whose kernels cannot return the log-sum-exp that ring attention merges with.
NO_RING_ATTENTION_BACKENDS = ("native", "_native_npu")


class ProcessMesh:
    """
    Where one process sits in the (data-parallel x context-parallel) grid of `world_size` processes.

    Rank `r` is at position `r % context_parallel_size` of data-parallel group `r // context_parallel_size`: the
    consecutive ranks of one context-parallel group hold the same samples and split each sample's token sequence, so
    their all-to-all traffic stays within a node. With `context_parallel_size=1` this is plain data parallelism and
    every method here is the identity.

    Args:
        world_size (`int`): Number of processes.
        rank (`int`): This process's global rank.
        context_parallel_size (`int`): Processes per context-parallel group; divides `world_size`.
    """

    def __init__(self, world_size: int, rank: int, context_parallel_size: int = 1):
        if context_parallel_size < 1 or world_size % context_parallel_size:
            raise ValueError(
                f"context_parallel_size={context_parallel_size} must be >= 1 and divide the {world_size} processes. "
                f"Launch a multiple of {context_parallel_size} processes, or change context_parallel_size."
            )
        self.world_size = world_size
        self.rank = rank
        self.context_parallel_size = context_parallel_size
        self._device_mesh = None

    @property
    def enabled(self) -> bool:
        return self.context_parallel_size > 1

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.context_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.context_parallel_size

    @property
    def context_parallel_rank(self) -> int:
        return self.rank % self.context_parallel_size

    @property
    def is_context_parallel_leader(self) -> bool:
        """Whether this process is the first of its context-parallel group (the one that scores the samples)."""
        return self.context_parallel_rank == 0

    def shard_sampler(self, sampler: torch.utils.data.Sampler, samples_per_process: int) -> torch.utils.data.Sampler:
        """The train sampler, re-emitted so that every rank of a context-parallel group gets its group's samples."""
        if not self.enabled:
            return sampler
        return ContextParallelSampler(sampler, self, samples_per_process)

    def unique_rows(self, gathered: torch.Tensor) -> torch.Tensor:
        """
        Keep one copy of each sample from a tensor gathered over all processes.

        Args:
            gathered (`torch.Tensor` of shape `[world_size * S, ...]`): Process `r`'s `S` rows at `r * S`.

        Returns:
            `torch.Tensor` of shape `[data_parallel_size * S, ...]`: the rows of each group's first rank, in
            data-parallel rank order (so data-parallel rank `d`'s rows are at `d * S`).
        """
        if not self.enabled:
            return gathered
        per_rank = gathered.reshape(self.world_size, -1, *gathered.shape[1:])
        return per_rank[:: self.context_parallel_size].flatten(0, 1)

    def scale_gradients(self, loss: torch.Tensor) -> torch.Tensor:
        """
        `loss` with its value unchanged and its gradient multiplied by `context_parallel_size`.

        Each rank of a context-parallel group back-propagates the whole sample's loss through its own part of the
        sequence, so its gradient is a partial sum and the true gradient is the sum over the group. Data-parallel
        reduction (DDP, FSDP) averages over all `world_size` processes, giving `sum / world_size`; the mean over
        data-parallel groups is `sum / data_parallel_size`, `context_parallel_size` times more.
        """
        if not self.enabled:
            return loss
        return loss + (self.context_parallel_size - 1) * (loss - loss.detach())

    def device_mesh(self, device_type: str, method: str):
        """
        The `("dp", "ring", "ulysses")` `DeviceMesh` that diffusers' `ContextParallelConfig` reads, with the
        context-parallel group on the `method` dimension. Built once: a collective that every process calls together.
        """
        if self._device_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            group = (self.context_parallel_size, 1) if method == "ring" else (1, self.context_parallel_size)
            self._device_mesh = init_device_mesh(
                device_type, (self.data_parallel_size, *group), mesh_dim_names=("dp", "ring", "ulysses")
            )
        return self._device_mesh

    def context_parallel_group(self):
        """The process group of this rank's context-parallel group (from the device mesh, built by then)."""
        if self._device_mesh is None:
            raise RuntimeError("The context-parallel device mesh is built by prepare_parallelism before any rollout.")
        dimension = "ring" if self._device_mesh["ring"].size() > 1 else "ulysses"
        return self._device_mesh[dimension].get_group()


class TrajectoryShard:
    """
    The rollout's trained transitions split across a context-parallel group, as cosmos-rl stores them: every rank of
    the group samples the same trajectories, so each keeps `1 / N` of each latent (flattened, padded to a multiple of
    `N`) and a micro-batch's rows are all-gathered over the group when the replay takes them.

    Args:
        mesh ([`ProcessMesh`]): This process's place; `mesh.context_parallel_size` is `N`.
        latent_shape (`tuple[int, ...]`): The shape of one latent, the trailing dimensions of every tensor split.
    """

    def __init__(self, mesh: ProcessMesh, latent_shape: tuple[int, ...]):
        self.size, self.rank = mesh.context_parallel_size, mesh.context_parallel_rank
        self.group = mesh.context_parallel_group()
        self.latent_shape = tuple(latent_shape)
        self.numel = math.prod(self.latent_shape)
        self.chunk = -(-self.numel // self.size)

    def split(self, tensor: torch.Tensor) -> torch.Tensor:
        """`[..., *latent_shape]` -> this rank's `[..., ceil(numel / N)]` (a copy: the whole tensor can be freed)."""
        flat = tensor.flatten(start_dim=tensor.dim() - len(self.latent_shape))
        flat = torch.nn.functional.pad(flat, (0, self.chunk * self.size - self.numel))
        return flat[..., self.rank * self.chunk : (self.rank + 1) * self.chunk].clone()

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's `[..., chunk]` -> the group's whole `[..., *latent_shape]` (a collective of the group)."""
        parts = [torch.empty_like(rows) for _ in range(self.size)]
        torch.distributed.all_gather(parts, rows.contiguous(), group=self.group)
        whole = torch.cat(parts, dim=-1)[..., : self.numel]
        return whole.reshape(*rows.shape[:-1], *self.latent_shape)


class ContextParallelSampler(torch.utils.data.Sampler):
    """
    A train sampler whose indices reach every rank of a context-parallel group unchanged.

    The dataloader hands process `r` every `world_size`-th batch of `samples_per_process` indices. The wrapped sampler
    yields, per iteration, `data_parallel_size * samples_per_process` indices meant for the data-parallel ranks in
    order; this sampler re-emits each such block as `world_size` batches, batch `r` being the slice of data-parallel
    rank `r // context_parallel_size`. So prompts are sharded by data-parallel rank, not by global rank.
    """

    def __init__(self, sampler: torch.utils.data.Sampler, mesh: ProcessMesh, samples_per_process: int):
        self.sampler = sampler
        self.mesh = mesh
        self.samples_per_process = samples_per_process

    def __len__(self) -> int:
        return len(self.sampler) * self.mesh.context_parallel_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        size, block = self.samples_per_process, self.samples_per_process * self.mesh.data_parallel_size
        indices = iter(self.sampler)
        while chunk := list(itertools.islice(indices, block)):
            for rank in range(self.mesh.world_size):
                data_rank = rank // self.mesh.context_parallel_size
                yield from chunk[data_rank * size : (data_rank + 1) * size]


def _sequence_length(denoiser: nn.Module, latent_shape: tuple[int, ...]) -> int | None:
    """Tokens per sample of a patchifying video transformer (`patch_size` a 3-tuple, latents `[C, F, H, W]`)."""
    patch = getattr(denoiser.config, "patch_size", None)
    if isinstance(patch, (list, tuple)) and len(patch) == 3 and len(latent_shape) == 4:
        return math.prod(size // step for size, step in zip(latent_shape[1:], patch))
    if len(latent_shape) == 2:  # packed latents `[sequence, channels]` (FLUX)
        return latent_shape[0]
    return None


def check_context_parallel_support(
    denoiser: nn.Module, pipeline_name: str, latent_shape: tuple[int, ...], size: int, method: str
) -> None:
    """
    Raise a clear error, before any collective runs, when diffusers cannot split this denoiser's sequence `size`
    ways with `method`.
    """
    name = type(denoiser).__name__
    if getattr(denoiser, "_cp_plan", None) is None:
        raise ValueError(
            f"context_parallel_size={size}, but diffusers has no context-parallel plan (`_cp_plan`) for {name}, the "
            f"denoiser of {pipeline_name}, so its sequence cannot be split across processes. Use "
            "context_parallel_size=1 (with FSDP2 or DeepSpeed for memory), or a pipeline whose transformer diffusers "
            "can parallelise (Wan, FLUX, ...: the `diffusers.models` transformers that define `_cp_plan`; Cosmos "
            "Predict2 / Predict2.5 with trl_ddrl's own plan)."
        )
    heads = getattr(denoiser.config, "num_attention_heads", None)
    if method == "ulysses" and heads is not None and heads % size:
        raise ValueError(
            f"context_parallel_method='ulysses' splits the {heads} attention heads of {name} over "
            f"context_parallel_size={size} processes, which does not divide them. Pick a divisor of {heads}, or "
            "context_parallel_method='ring'."
        )
    tokens = _sequence_length(denoiser, tuple(latent_shape))
    if tokens is not None and tokens % size:
        raise ValueError(
            f"Each sample of {name} is {tokens} tokens long (latents {tuple(latent_shape)}), which "
            f"context_parallel_size={size} does not divide. Change height, width or num_frames, or "
            "context_parallel_size."
        )
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend = _attention_backend(denoiser)
    supported = sorted(_AttentionBackendRegistry._supports_context_parallel)
    ring = sorted(set(supported) - set(NO_RING_ATTENTION_BACKENDS))
    if backend not in supported or (method == "ring" and backend in NO_RING_ATTENTION_BACKENDS):
        choices = ring if method == "ring" else supported
        raise ValueError(
            f"context_parallel_method={method!r} cannot run on the attention backend {backend!r} of {name}. Set "
            f"attention_backend to one of {', '.join(choices)}"
            + (
                ", or use context_parallel_method='ulysses', which also runs on 'native' (CPU included)."
                if method == "ring"
                else "."
            )
        )


def _attention_backend(denoiser: nn.Module) -> str:
    """The name of the attention backend the denoiser's attention processors dispatch to."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in denoiser.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if backend is not None:
            return str(getattr(backend, "value", backend))
    return _AttentionBackendRegistry.get_active_backend()[0].value


@contextlib.contextmanager
def _one_device_per_process_on_cpu():
    """
    diffusers 0.42.1's `ModelMixin._resolve_parallel_config` picks the device `rank % torch.accelerator.device_count()`,
    which divides by zero on a CPU-only machine; the device it records is not used for context parallelism. Count one
    device there, so that gloo runs (tests, CPU debugging) work.
    """
    if torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        yield


def install_context_parallel_plans(models: list[nn.Module]) -> None:
    """
    Give the denoisers that diffusers 0.42.1 cannot split themselves the plan and attention processor that trl_ddrl
    writes for them (`CosmosTransformer3DModel`: `trl_ddrl/pipelines/cosmos_parallel.py`), on these instances only.
    Called only with `context_parallel_size > 1`; other models are left as they are.
    """
    from .pipelines.cosmos_parallel import enable_cosmos_context_parallel

    for model in models:
        enable_cosmos_context_parallel(model)


def enable_context_parallel(models: list[nn.Module], mesh: ProcessMesh, method: str, device_type: str) -> None:
    """
    Turn on diffusers' context parallelism in each model (the policy and, when it is a separate copy, the reference
    model), on this mesh's context-parallel groups.

    Each model needs its own call: diffusers' hooks wrap `forward` in place, and a deep copy taken afterwards would
    still call the original's. Call it on every process at the same time (it builds process groups).
    """
    from diffusers import ContextParallelConfig

    install_context_parallel_plans(models)
    device_mesh = mesh.device_mesh(device_type, method)
    for model in models:
        config = ContextParallelConfig(**{f"{method}_degree": mesh.context_parallel_size}, mesh=device_mesh)
        with _one_device_per_process_on_cpu():
            model.enable_parallelism(config=config)


def prepare_parallelism(trainer) -> ProcessMesh:
    """
    Set up a `DDRLTrainer`'s process grid once its models exist (after the reference copy, before training wraps the
    policy): apply `attention_backend`, check that context parallelism is possible, and turn it on.

    Returns:
        The trainer's `ProcessMesh`.
    """
    args, accelerator = trainer.args, trainer.accelerator
    mesh = ProcessMesh(accelerator.num_processes, accelerator.process_index, args.context_parallel_size)
    models = [trainer.adapter.denoiser] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    if args.attention_backend is not None:
        for model in models:
            model.set_attention_backend(args.attention_backend)
    if not mesh.enabled:
        return mesh
    if trainer.is_deepspeed_enabled:
        raise ValueError(
            f"context_parallel_size={mesh.context_parallel_size} is not supported with DeepSpeed. Use FSDP2 or DDP "
            "(see docs/context_parallel.md), or set context_parallel_size=1."
        )
    install_context_parallel_plans(models)
    check_context_parallel_support(
        trainer.adapter.denoiser,
        type(trainer.pipeline).__name__,
        trainer.adapter.latent_shape(),
        mesh.context_parallel_size,
        args.context_parallel_method,
    )
    enable_context_parallel(models, mesh, args.context_parallel_method, accelerator.device.type)
    return mesh
