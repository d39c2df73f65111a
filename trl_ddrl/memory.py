# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Will it fit? The peak GPU memory of one DDRL iteration, estimated before launch without any weights.

[`estimate_memory`] builds the pipeline's real architecture with fake tensors (`FakeTensorMode`: shapes and dtypes,
no storage) and runs the trainer's own code path for one iteration on it: the adapter's prompt encoding, `sample`
(the rollout, chunk by chunk), `decode`, the data term's VAE encoding, the transitions' buffer, then for micro-batches
`transition_log_prob`, `clipped_policy_loss`, `diffusion_loss` (and the reference model's step with `kl_beta > 0`),
backward, the optimizer step and the EMA update. A small `TorchDispatchMode` ([`LiveBytes`]) counts the bytes of the
live tensor storages after every operation, labelled by what is running (the phase) and by what they belong to
(weights, gradients, optimizer state, EMA, ...). The peak per GPU is the largest weighted sum over time, where the
weights model the parallelism:

- FSDP2 / ZeRO-3 divide the denoiser's weights, its gradients, the optimizer state and the EMA by the process count and
  add the gathered blocks (two of the largest block, the one computing and the one prefetched) while the denoiser
  runs. The trained weights are float32 master weights (`trl_ddrl.precision`), so are their gradients and the
  optimizer state; the forwards autocast to the load dtype. ZeRO-2 divides gradients and optimizer state, ZeRO-1 the optimizer state; DDP keeps a
  second copy of the gradients (its buckets).
- Context parallelism divides the activations computed inside the denoiser by the group size (each rank holds its
  share of the tokens) and the stored trajectories; decoded samples and text encoders are whole on every rank.
- What a memory option of `DDRLConfig` keeps in host memory (`ema_device="cpu"`, `offload_text_encoders`,
  `precompute_prompt_embeddings`, `offload_trajectories`, `offload_reference_model`) is labelled `host`, weighted 0,
  and relabelled to its GPU category while the trainer has it on the GPU; `precompute_reference_means` adds the
  `reference_means` phase; 8-bit AdamW (`optim="adamw_bnb_8bit"`) holds uint8 moments.

Boolean masks have no values under fake tensors: where an output's size depends on one (`x[mask]`, `nonzero`), every
element counts as true (every token valid, the prompts at their padded length: an upper bound), and a negated mask
as all false (Qwen-Image's prompt encoding and HunyuanVideo 1.5's token reordering index with their masks).

Attention runs on the CPU's fused (flash) kernel under fake tensors, so its memory is that of flash attention on a GPU
(no `seq x seq` matrix). The count is of live tensors (what `torch.cuda.max_memory_allocated` reports); the caching
allocator's fragmentation and the CUDA context come on top (see `MemoryEstimate.fits`).

Speed: a denoiser call without gradients (every rollout step after the first) replays the memory profile recorded on
its first call with the same input shapes, and the shipped architectures run at two reduced depths (two and four
"units" of their repeated blocks, one and two below four), from which every term is extrapolated linearly to the real
depth (the blocks are identical, so weights and activations grow linearly with their number). Both are exact up to
rounding (checked against `depth="full"`, which runs the real depth); at one unit the outer layers weigh as much as
the blocks and the replay's peak can fall at another moment (Wan 2.1 1.3B: +3% replay, Wan 2.1 14B LoRA at micro-batch
1: twice the replay activations), so one unit is not used.
"""

import contextlib
import copy
import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


GIB = 1024**3

SHARDING_CHOICES = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp2")

# What the bytes belong to. Persistent: weights of the denoiser (frozen and trained apart), of the VAE and other frozen
# models, of the text encoders, of the reference model; gradients; optimizer state; EMA; and what a memory option of
# the trainer keeps in host memory (`HOST`, not counted: the EMA with `ema_device="cpu"`, offloaded text encoders,
# reference model and trajectories, precomputed prompt embeddings). Transient, by the phase that allocated them: the
# rest.
HOST = "host"
# The buffer's trained transitions under context parallelism: split across the group (`parallel.TrajectoryShard`).
TRAJECTORIES = "trajectories"
PERSISTENT = ("weights", "trained_weights", "vae", "text_encoders", "reference", "gradients", "optimizer", "ema", HOST)
PHASES = ("text_encoders", "rollout", "vae_decode", "data", "reference_means", "replay", "optimizer", "ema")
GATHERED = "gathered_blocks"


# ---- counting live bytes ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Window:
    """The peak of the weighted live bytes over a stretch of the run, and what was live then."""

    start: dict
    peak: float = -1.0
    snapshot: dict = field(default_factory=dict)


class LiveBytes(TorchDispatchMode):
    """
    Count the bytes of live tensor storages, labelled `(category, inside_denoiser)`, and track the peak of their
    weighted sum (`weight(label)`, see the module docstring).

    Every output of every operation is registered once per storage (views and in-place results share their input's)
    and unregistered when its storage is freed. Tensors that exist before the mode is entered (weights) are added with
    [`LiveBytes.register`]. Under a fake-tensor mode, reading a value back (`.item()`, `bool(tensor)`) gives a
    placeholder (1, or `True`), which only the host-side bookkeeping of the code path sees, and a boolean mask counts
    as all true (its negation `~mask` as all false) where the output's size depends on it (`x[mask]`, `nonzero`,
    `masked_select`): the upper bound, every token valid.
    """

    def __init__(self, weight: Callable[[tuple[str, bool]], float] = lambda label: 1.0, fake: bool = True):
        super().__init__()
        self.weight = weight
        self.fake = fake
        self.live: dict[int, tuple[tuple[str, bool], int, weakref.ref]] = {}
        self.totals: dict[tuple[str, bool], int] = defaultdict(int)
        self.category = "other"
        self.inside_denoiser = 0
        self.gathered = 0  # bytes of gathered (sharded) parameters while the denoiser runs
        self.windows: list[_Window] = []
        self.negated: dict[int, weakref.ref] = {}  # masks that count as all false, by id

    # -- labels ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def labelled(self, category: str) -> Iterator[None]:
        previous, self.category = self.category, category
        try:
            yield
        finally:
            self.category = previous

    @contextlib.contextmanager
    def window(self) -> Iterator[_Window]:
        """Track the peak from here to the end of the block."""
        window = _Window(start=self.current())
        window.peak, window.snapshot = self.weighted(window.start), dict(window.start)
        self.windows.append(window)
        try:
            yield window
        finally:
            self.windows.remove(window)

    def current(self) -> dict:
        totals = {label: size for label, size in self.totals.items() if size}
        if self.inside_denoiser and self.gathered:
            totals[(GATHERED, False)] = self.gathered
        return totals

    def weighted(self, totals: dict) -> float:
        return sum(size * self.weight(label) for label, size in totals.items())

    def check(self, extra: dict | None = None) -> None:
        """Update the open windows' peaks with the current totals (plus `extra`, a replayed spike)."""
        totals = self.current()
        if extra:
            totals = dict(totals)
            for label, size in extra.items():
                totals[label] = totals.get(label, 0) + size
        value = self.weighted(totals)
        for window in self.windows:
            if value > window.peak:
                window.peak, window.snapshot = value, totals

    # -- registration ---------------------------------------------------------------------------------------------

    def register(self, tensor: torch.Tensor, category: str | None = None) -> None:
        """Count `tensor`'s storage (once) under `category` (default: the current one)."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        label = (category or self.category, bool(self.inside_denoiser))
        size = storage.nbytes()
        self.live[key] = (label, size, weakref.ref(storage, lambda _, key=key: self._free(key)))
        self.totals[label] += size
        self.check()

    def relabel(self, tensor: torch.Tensor, category: str) -> None:
        """Move `tensor`'s storage to `category` (a gradient once accumulated, an optimizer state once created)."""
        key = tensor.untyped_storage()._cdata
        if key not in self.live:
            return self.register(tensor, category)
        label, size, ref = self.live[key]
        new_label = (category, False)
        self.totals[label] -= size
        self.totals[new_label] += size
        self.live[key] = (new_label, size, ref)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            label, size, _ = entry
            self.totals[label] -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fake and func is torch.ops.aten.equal.default:
            return True
        if self.fake and func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            return True if args[0].dtype == torch.bool else 1
        if self.fake and func in _MASK_OPS:
            output = _MASK_OPS[func](self, *args, **kwargs)
        else:
            output = func(*args, **kwargs)
        if self.fake and func in _NEGATIONS and output.dtype == torch.bool and not self.all_false(args[0]):
            self.mark_all_false(output)
        for value in tree_flatten(output)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self.register(value)
        return output

    # -- boolean masks on fake tensors --------------------------------------------------------------------------------

    def all_false(self, mask: torch.Tensor) -> bool:
        """Whether `mask` counts as all false: a negated mask (every other mask counts as all true)."""
        ref = self.negated.get(id(mask))
        return ref is not None and ref() is mask

    def mark_all_false(self, mask: torch.Tensor) -> None:
        key = id(mask)
        self.negated[key] = weakref.ref(mask, lambda _: self.negated.pop(key, None))

    def mask_indices(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """
        The long indices (one per dimension of `mask`) that `mask` selects when all true, or none when all false:
        what `mask.nonzero().unbind(1)` gives.
        """
        if self.all_false(mask):
            return [torch.zeros(0, dtype=torch.long, device=mask.device) for _ in range(mask.dim())]
        indices = []
        for dim, size in enumerate(mask.shape):
            shape = [1] * mask.dim()
            shape[dim] = size
            index = torch.arange(size, device=mask.device).view(shape).expand(mask.shape)
            indices.append(index.reshape(-1))
        return indices

    def long_indices(self, indices: list) -> list:
        """`indices` of `aten.index` / `aten.index_put` with each boolean mask replaced by its long indices."""
        replaced = []
        for index in indices:
            if index is not None and _is_mask(index):
                replaced.extend(self.mask_indices(index))
            else:
                replaced.append(index)
        return replaced


def _is_mask(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.bool, torch.uint8)


def _nonzero(counter: LiveBytes, mask: torch.Tensor) -> torch.Tensor:
    if not mask.dim():
        return mask.new_zeros((0 if counter.all_false(mask) else 1, 0), dtype=torch.long)
    return torch.stack(counter.mask_indices(mask), dim=1)


def _masked_select(counter: LiveBytes, tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    tensor, mask = torch.broadcast_tensors(tensor, mask)
    return tensor[tuple(counter.mask_indices(mask))]


# On fake tensors, the operations whose output size depends on a boolean mask's values answer as if every element of
# the mask were true (the upper bound: every token valid), and a negated mask (`~mask`) all false, so that `x[mask]` and
# `x[~mask]` still add up to `x` (HunyuanVideo 1.5 reorders its text tokens so: valid first, then padding).
_MASK_OPS: dict[Any, Callable] = {
    torch.ops.aten.nonzero.default: _nonzero,
    torch.ops.aten.masked_select.default: _masked_select,
    torch.ops.aten.index.Tensor: lambda counter, tensor, indices: torch.ops.aten.index.Tensor(
        tensor, counter.long_indices(indices)
    ),
}
for _index_put in (
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
):
    _MASK_OPS[_index_put] = lambda counter, tensor, indices, *args, _op=_index_put, **kwargs: _op(
        tensor, counter.long_indices(indices), *args, **kwargs
    )
_NEGATIONS = (torch.ops.aten.bitwise_not.default, torch.ops.aten.logical_not.default)


# ---- the result -------------------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """
    The estimated memory of one DDRL iteration on each GPU.

    Attributes:
        model (`str`): The architecture.
        peak_bytes (`int`): Peak bytes of live tensors per GPU (compare with `torch.cuda.max_memory_allocated`).
        phases (`dict[str, int]`): Peak of each phase (`text_encoders`, `rollout`, `vae_decode`, `data`,
            `reference_means`, `replay`, `optimizer`, `ema`), each including everything live then.
        breakdown (`dict[str, int]`): What is live at the peak, by category: persistent (`weights` of the frozen
            denoiser, `trained_weights`, `vae`, `text_encoders`, `reference`, `gradients`, `optimizer`, `ema`),
            `gathered_blocks` (FSDP2 / ZeRO-3), and the transient tensors of each phase (`<phase>` for its
            trajectories, samples and buffers, `<phase>/activations` for what the denoiser computes).
        peak_phase (`str`): The phase where the peak happens.
        settings (`dict`): What was estimated (processes, sharding, context parallelism, sizes, dtypes).
    """

    model: str
    peak_bytes: int
    phases: dict[str, int]
    breakdown: dict[str, int]
    peak_phase: str
    settings: dict = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def largest(self) -> str:
        """The largest term at the peak."""
        return max(self.breakdown, key=self.breakdown.get)

    def fits(self, gpu_memory_gib: float = 80.0, overhead_gib: float = 2.0, fragmentation: float = 0.05) -> bool:
        """Whether the peak, plus `fragmentation` of it and `overhead_gib` (CUDA context, workspaces), fits the GPU."""
        return self.peak_gib * (1 + fragmentation) + overhead_gib <= gpu_memory_gib

    def advice(self) -> list[str]:
        """What to change to lower the peak, for its largest terms."""
        settings = self.settings
        tips = []
        terms = sorted(self.breakdown.items(), key=lambda item: -item[1])[:3]
        for name, size in terms:
            tip = _ADVICE.get(name.split("/")[0] if not name.endswith("/activations") else "activations")
            if name == "replay/activations" and not settings.get("activation_checkpointing"):
                tip = "turn activation_checkpointing on (the default), or lower per_device_train_batch_size"
            elif name in ("weights", "trained_weights", "gradients", "optimizer", "ema", "reference") and settings.get(
                "sharding"
            ) not in ("fsdp2", "zero3"):
                tip = f"{_ADVICE.get(name, '')}; shard it with FSDP2 or ZeRO-3 (--accelerate_config fsdp)".lstrip("; ")
            if tip:
                tips.append(f"{name} ({size / GIB:.1f} GiB): {tip}")
        return tips

    def table(self) -> str:
        """A readable report: the peak, each phase's peak, the terms at the peak and what to change."""
        s = self.settings
        lines = [
            f"{self.model}: peak {self.peak_gib:.1f} GiB per GPU (live tensors) in phase '{self.peak_phase}'; "
            f"{s.get('num_processes')} process(es), sharding {s.get('sharding')}, context parallel "
            f"{s.get('context_parallel_size')}, {'LoRA' if s.get('lora') else 'full fine-tuning'}",
            "",
            "phase peaks (GiB per GPU):",
        ]
        lines += [f"  {name:<14} {size / GIB:8.2f}" for name, size in self.phases.items()]
        lines += ["", f"live at the peak ({self.peak_phase}):"]
        for name, size in sorted(self.breakdown.items(), key=lambda item: -item[1]):
            if size >= 1024**2:
                lines.append(f"  {name:<24} {size / GIB:8.2f}")
        lines += ["", f"largest term: {self.largest}"]
        lines += [f"  - {tip}" for tip in self.advice()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "peak_gib_per_gpu": round(self.peak_gib, 2),
            "peak_phase": self.peak_phase,
            "phases_gib": {name: round(size / GIB, 2) for name, size in self.phases.items()},
            "breakdown_gib": {name: round(size / GIB, 2) for name, size in self.breakdown.items()},
            "largest": self.largest,
            "settings": self.settings,
        }


_ADVICE = {
    "weights": "the frozen denoiser weights",
    "trained_weights": "train a LoRA adapter (--use_peft) instead of every weight",
    "gradients": "train a LoRA adapter (--use_peft)",
    "optimizer": "train a LoRA adapter, or an 8-bit AdamW (--optim adamw_bnb_8bit)",
    "ema": "ema_device='cpu' (host memory), use_ema=False, or an EMA of a LoRA adapter",
    "reference": "offload_reference_model=True (with precompute_reference_means=True it visits the GPU once per "
    "rollout), train a LoRA adapter (the reference is the adapter-disabled denoiser), or kl_beta=0",
    "text_encoders": "offload_text_encoders=True or precompute_prompt_embeddings=True (the encoders stay on the host)",
    "vae": "the VAE stays on every GPU",
    "gathered_blocks": "blocks gathered by FSDP2 / ZeRO-3 while they compute",
    "rollout": "offload_trajectories=True, lower rollout_batch_size (a chunk's trajectory: chunk x (steps + 1) x "
    "latent, float32), or prompts_per_step",
    "vae_decode": "lower rollout_batch_size (decoded samples are float32)",
    "data": "lower prompts_per_step (the data batch is encoded at once)",
    "replay": "lower per_device_train_batch_size",
    "activations": "lower per_device_train_batch_size or rollout_batch_size, or use context parallelism",
}


# ---- parallelism ------------------------------------------------------------------------------------------------------


@dataclass
class Parallelism:
    """How the processes share the work (see the module docstring for what each choice divides)."""

    num_processes: int = 1
    sharding: str = "none"
    context_parallel_size: int = 1

    def __post_init__(self):
        if self.sharding not in SHARDING_CHOICES:
            raise ValueError(f"sharding={self.sharding!r} is not one of {', '.join(SHARDING_CHOICES)}.")
        if self.num_processes < 1 or self.num_processes % self.context_parallel_size:
            raise ValueError(
                f"num_processes={self.num_processes} must be a positive multiple of context_parallel_size="
                f"{self.context_parallel_size}."
            )

    @property
    def data_parallel_size(self) -> int:
        return self.num_processes // self.context_parallel_size

    def weight(self, label: tuple[str, bool]) -> float:
        category, inside_denoiser = label
        if category == HOST:
            return 0.0  # host memory
        world, sharding = self.num_processes, self.sharding
        full_shard = sharding in ("fsdp2", "zero3") and world > 1
        factor = 1.0
        if category in ("weights", "reference") and full_shard:
            factor = 1 / world
        elif category == "trained_weights" and full_shard:
            factor = 1 / world
        elif category == "gradients":
            if sharding in ("zero2", "zero3", "fsdp2") and world > 1:
                factor = 1 / world
            elif sharding == "ddp" and world > 1:
                factor = 2.0
        elif category == "optimizer" and sharding not in ("none", "ddp") and world > 1:
            factor = 1 / world
        elif category == "ema" and full_shard:
            factor = 1 / world
        elif category == TRAJECTORIES:
            factor = 1 / self.context_parallel_size  # each rank of a group keeps its share (`TrajectoryShard`)
        if inside_denoiser and category not in PERSISTENT and category != GATHERED:
            factor /= self.context_parallel_size
        return factor


# ---- building the model with fake tensors ---------------------------------------------------------------------------


def _fake_parameters(module: nn.Module, fake_mode) -> None:
    """
    Replace every parameter and buffer of `module` (meta or real) by a fake CPU tensor of its shape and dtype. Tied
    tensors (T5's shared embedding and `encoder.embed_tokens`) stay one tensor, counted once.
    """
    fakes: dict[int, torch.Tensor] = {}
    with fake_mode:
        for submodule in module.modules():
            for name, parameter in list(submodule._parameters.items()):
                if parameter is not None:
                    if id(parameter) not in fakes:
                        fake = torch.empty(parameter.shape, dtype=parameter.dtype, device="cpu")
                        fakes[id(parameter)] = nn.Parameter(fake, requires_grad=parameter.requires_grad)
                    submodule._parameters[name] = fakes[id(parameter)]
            for name, buffer in list(submodule._buffers.items()):
                if buffer is not None:
                    if id(buffer) not in fakes:
                        fakes[id(buffer)] = torch.zeros(buffer.shape, dtype=buffer.dtype, device="cpu")
                    submodule._buffers[name] = fakes[id(buffer)]


DEPTH_KEYS = ("num_layers", "num_single_layers")


def _depth_units(spec: dict) -> int:
    """The number of 'units' of repeated blocks: the greatest common divisor of the denoisers' block counts."""
    counts = [
        component["config"][key]
        for name, component in spec["components"].items()
        if name.startswith("transformer")
        for key in DEPTH_KEYS
        if isinstance(component.get("config", {}).get(key), int) and component["config"][key] > 0
    ]
    return math.gcd(*counts) if counts else 0


def _scaled_spec(spec: dict, units: int, total_units: int) -> dict:
    """`spec` with every denoiser's block counts scaled to `units / total_units` (block index lists too)."""
    spec = copy.deepcopy(spec)
    for name, component in spec["components"].items():
        if not name.startswith("transformer"):
            continue
        config = component["config"]
        for key in DEPTH_KEYS:
            if isinstance(config.get(key), int) and config[key] > 0:
                original = config[key]
                config[key] = original * units // total_units
                if key == "num_layers" and isinstance(config.get("dual_attention_layers"), list):
                    share = len(config["dual_attention_layers"]) / original
                    config["dual_attention_layers"] = list(range(round(share * config[key])))
    return spec


# ---- the iteration --------------------------------------------------------------------------------------------------


def _denoisers(adapter) -> list[nn.Module]:
    """The networks that compute: the denoiser, or both experts of a two-expert one."""
    denoiser = adapter.denoiser
    if adapter.has_experts:
        return [denoiser.transformer, denoiser.transformer_2]
    return [denoiser]


def _largest_block_bytes(module: nn.Module, dtype_size: int) -> int:
    """Bytes (at `dtype_size` per element) of the largest repeated block: what FSDP2 gathers at once."""
    largest = 0
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and len(child) > 1:
            for block in child:
                largest = max(largest, sum(p.numel() for p in block.parameters()) * dtype_size)
    return largest


@dataclass(frozen=True, init=False)
class _Shape:
    """The shape and dtype of a recorded output tensor."""

    shape: torch.Size
    dtype: torch.dtype

    def __init__(self, tensor: torch.Tensor):
        object.__setattr__(self, "shape", tensor.shape)
        object.__setattr__(self, "dtype", tensor.dtype)


class _Memoized:
    """
    Replay a module's calls without gradients: the first call per input signature runs and its memory profile (the
    peak over the call relative to its start) is recorded; later calls add that spike and return fresh outputs of the
    recorded shapes. Calls with gradients always run.
    """

    def __init__(self, counter: LiveBytes, module: nn.Module, method: str = "forward"):
        self.counter, self.module = counter, module
        self.original = getattr(module, method)
        self.records: dict[Any, tuple[dict, Any]] = {}

    def signature(self, args, kwargs) -> Any:
        def describe(value):
            if isinstance(value, torch.Tensor):
                return ("tensor", tuple(value.shape), value.dtype)
            return value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__

        leaves, spec = tree_flatten((args, kwargs))
        return (str(spec), tuple(describe(leaf) for leaf in leaves), torch.is_autocast_enabled("cpu"))

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        key = self.signature(args, kwargs)
        if key in self.records:
            spike, output = self.records[key]
            self.counter.check(extra=spike)
            return tree_map(
                lambda value: torch.empty(value.shape, dtype=value.dtype) if isinstance(value, _Shape) else value,
                output,
            )
        with self.counter.window() as window:
            output = self.original(*args, **kwargs)
        spike = {label: size - window.start.get(label, 0) for label, size in window.snapshot.items()}
        # Only the outputs' shapes and dtypes: keeping the outputs would keep the first call's tensors alive.
        self.records[key] = (
            spike,
            tree_map(lambda value: _Shape(value) if isinstance(value, torch.Tensor) else value, output),
        )
        return output


@contextlib.contextmanager
def _inside(counter: LiveBytes, modules: list[nn.Module]) -> Iterator[None]:
    """Mark the tensors allocated while any of `modules` runs forward as activations (backward: see the caller)."""

    def enter(*_):
        counter.inside_denoiser += 1

    def leave(*_):
        counter.inside_denoiser -= 1

    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _adapters_stay_in_place(fake: bool) -> Iterator[None]:
    """
    PEFT moves each new LoRA layer to its base layer's device with `.to()`, which cannot swap fake parameters; on fake
    tensors everything is on one device already, so device-only moves are skipped while the adapter is added.
    """
    if not fake:
        yield
        return
    original = nn.Module.to

    def to(self, *args, **kwargs):
        _, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        return self if dtype is None else original(self, *args, **kwargs)

    from peft.tuners.tuners_utils import BaseTunerLayer

    move = BaseTunerLayer._move_adapter_to_device_of_base_layer
    nn.Module.to = to
    BaseTunerLayer._move_adapter_to_device_of_base_layer = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        nn.Module.to = original
        BaseTunerLayer._move_adapter_to_device_of_base_layer = move


@contextlib.contextmanager
def _autocast_each_call(modules: list[nn.Module], mixed: Callable) -> Iterator[None]:
    """Run every forward call of `modules` under the autocast context `mixed()` (what `accelerator.prepare` does)."""
    originals = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        forward = module.forward

        def call(*args, forward=forward, **kwargs):
            with mixed():
                return forward(*args, **kwargs)

        module.forward = call
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            if original is None:
                del module.forward
            else:
                module.forward = original


@contextlib.contextmanager
def _experts_take_whole_batches(fake: bool) -> Iterator[None]:
    """
    A two-expert denoiser splits a batch by each row's noise level, read back on the host; fake tensors have no
    values, so on them every call goes whole to the first trained expert (the one whose activations and gradients
    the training holds). Both experts' weights are counted either way.
    """
    from .pipelines.experts import TimestepExperts

    if not fake:
        yield
        return
    original = TimestepExperts.forward

    def forward(self, timestep: torch.Tensor, return_dict: bool = False, **kwargs) -> tuple[torch.Tensor]:
        return getattr(self, self.trained[0])(timestep=timestep, return_dict=False, **kwargs)

    TimestepExperts.forward = forward
    try:
        yield
    finally:
        TimestepExperts.forward = original


@contextlib.contextmanager
def _prompts_fill_their_padding(pipeline, fake: bool) -> Iterator[None]:
    """
    Qwen-Image's prompt encoding (`_extract_masked_hidden`) keeps each prompt's valid tokens (`hidden_states[mask]`)
    and splits them by the mask's row sums, read back on the host; fake tensors have no values (the sums read 1). On
    them every token counts as valid, as the boolean index does (see `_MASK_OPS`): each prompt keeps the padded length
    of the batch, an upper bound of the memory (prompts padded to the longest one).
    """
    if not fake or not hasattr(pipeline, "_extract_masked_hidden"):
        yield
        return

    def extract_masked_hidden(hidden_states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        selected = hidden_states[mask.bool()]
        return torch.split(selected, [mask.shape[1]] * mask.shape[0], dim=0)

    pipeline._extract_masked_hidden = extract_masked_hidden
    try:
        yield
    finally:
        del pipeline._extract_masked_hidden


@contextlib.contextmanager
def _resize_without_torchvision() -> Iterator[None]:
    """
    The Cosmos transformer resizes its padding mask (`[B, 1, H, W]`, a few KB) with torchvision, an optional
    dependency: without it, the estimate resizes with `torch.nn.functional.interpolate` (nearest), the same memory.
    """
    import importlib.util
    from types import SimpleNamespace

    from diffusers.models.transformers import transformer_cosmos

    if importlib.util.find_spec("torchvision") is not None or hasattr(transformer_cosmos, "transforms"):
        yield
        return

    def resize(image: torch.Tensor, size: list[int], interpolation=None) -> torch.Tensor:
        return torch.nn.functional.interpolate(image, size=tuple(size), mode="nearest")

    transformer_cosmos.transforms = SimpleNamespace(
        functional=SimpleNamespace(resize=resize), InterpolationMode=SimpleNamespace(NEAREST="nearest")
    )
    try:
        yield
    finally:
        del transformer_cosmos.transforms


def _module_tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [tensor for module in modules for tensor in [*module.parameters(), *module.buffers()]]


def _counted_prompt_encoder():
    from .prompt_embeddings import PromptEncoder, text_encoders

    class CountedPromptEncoder(PromptEncoder):
        """
        The trainer's [`PromptEncoder`] under the counter: offloaded text encoders are host memory (`HOST`) but while
        they encode, and the rows it keeps (the precomputed embeddings) are host memory.
        """

        def __init__(self, counter: LiveBytes, adapter, offload_text_encoders: bool):
            super().__init__(adapter, cache_size=0, offload_text_encoders=offload_text_encoders)
            self.counter = counter
            if offload_text_encoders:
                for tensor in _module_tensors(text_encoders(adapter)):
                    counter.relabel(tensor, HOST)

        @contextlib.contextmanager
        def encoders_on(self, device: torch.device) -> Iterator[None]:
            if not self.offload_text_encoders:
                yield
                return
            tensors = _module_tensors(text_encoders(self.adapter))
            for tensor in tensors:
                self.counter.relabel(tensor, "text_encoders")
            try:
                yield
            finally:
                for tensor in tensors:
                    self.counter.relabel(tensor, HOST)

    return CountedPromptEncoder


def _synthetic_prompts(count: int) -> list[str]:
    return [f"a detailed photograph number {index} of a cat sitting on a wooden table" for index in range(count)]


def run_iteration(
    pipeline,
    args,
    counter: LiveBytes,
    peft_config: Any | None = None,
    parallelism: Parallelism | None = None,
    windows: dict[str, _Window] | None = None,
) -> None:
    """
    Run one DDRL iteration of `args` on `pipeline` the way the trainer does, under `counter`, recording each phase's
    peak window in `windows`. Works on fake and on real tensors (the CPU validation runs it for real).
    """
    from .data import DiffusionDataCollator
    from .ema import ParameterEMA
    from .losses import clipped_policy_loss, reverse_kl
    from .pipelines import SamplingSettings, get_adapter
    from .pipelines.latents import enable_vae_slicing
    from .precision import upcast_trained_parameters
    from .rollout import RolloutBuffer, data_term_loss, order_micro_batches, trained_transitions, transition_step
    from .rollout_plan import default_rollout_chunk
    from .sampling import transition_log_ratio
    from .sde_window import initial_states, join_prefix, rollout_steps

    parallelism = parallelism or Parallelism()
    windows = {} if windows is None else windows
    adapter = get_adapter(pipeline, SamplingSettings.from_config(args))
    # As DDRLTrainer.__init__: frozen parts, LoRA or full training, activation checkpointing.
    for module in adapter.frozen_modules():
        module.requires_grad_(False).eval()
    enable_vae_slicing(pipeline)
    denoiser = adapter.denoiser
    if peft_config is not None:
        denoiser.requires_grad_(False)
        with _adapters_stay_in_place(counter.fake):
            denoiser.add_adapter(peft_config)
    else:
        denoiser.requires_grad_(True)
    if args.activation_checkpointing or args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    needs_reference = args.kl_beta > 0 or (args.data_beta > 0 and args.data_source == "base_model")
    reference = None
    if needs_reference and peft_config is None:
        sharded = parallelism.sharding not in ("none", "ddp") and parallelism.num_processes > 1
        if args.offload_reference_model and sharded:
            raise ValueError(
                "offload_reference_model=True keeps a whole reference model on the CPU, but DeepSpeed / FSDP "
                "shard it across the processes instead (the trainer refuses it). Set offload_reference_model=False."
            )
        # As the trainer: a frozen copy in the load dtype (copied here before the trained weights become float32
        # masters), on the host with `offload_reference_model` except while it runs (`_reference`).
        with counter.labelled(HOST if args.offload_reference_model else "reference"):
            reference = copy.deepcopy(denoiser).requires_grad_(False).eval()
    # float32 master weights of what trains; the forwards autocast to the load dtype (trl_ddrl/precision.py).
    load_dtype = upcast_trained_parameters(denoiser)
    trainable = [parameter for parameter in denoiser.parameters() if parameter.requires_grad]
    for name, module in pipeline.components.items():
        if not isinstance(module, nn.Module):
            continue
        category = "weights" if name.startswith(adapter.denoiser_name) else "vae"
        if "text_encoder" in name:
            category = "text_encoders"
        for tensor in [*module.parameters(), *module.buffers()]:
            # relabel: the float32 master weights were allocated (as "other") by the upcast above.
            counter.relabel(tensor, "trained_weights" if tensor.requires_grad else category)
    # The sampler's noise-level table holds host-side values: built outside the counted run, as on the first step.
    adapter._sigma_table()
    if hasattr(adapter, "model_sigmas"):
        adapter.model_sigmas()

    # Autocast keeps the low-precision casts of the float32 trained weights for the length of its block (the whole
    # rollout chunk under the rollout's autocast, one call in the replay). FSDP2 / ZeRO-3 gather the weights in the
    # low precision instead (counted as gathered blocks), so there is no such cache.
    full_shard = parallelism.sharding in ("fsdp2", "zero3") and parallelism.num_processes > 1

    def mixed():
        low = load_dtype if load_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        enabled = bool(args.bf16) or load_dtype != torch.float32
        return torch.autocast("cpu", dtype=low, enabled=enabled, cache_enabled=not full_shard)

    denoisers = _denoisers(adapter)
    device = adapter.device
    generator = torch.Generator().manual_seed(0)

    @contextlib.contextmanager
    def phase(name: str):
        with counter.labelled(name), counter.window() as window:
            yield
        previous = windows.get(name)
        if previous is None or window.peak > previous.peak:
            windows[name] = window

    # On fake tensors, every call without gradients but the first of each shape (rollout steps, the data term's second
    # prompt encoding, the VAE's per-sample decodes and encodes) replays the first one's memory profile; a real run (the
    # validation) computes every call.
    memoized = [
        (module, "forward")
        for module in [
            *denoisers,
            *([reference] if reference is not None else []),
            *[m for n, m in pipeline.components.items() if "text_encoder" in n and m is not None],
        ]
    ]
    vae = getattr(pipeline, "vae", None)
    memoized += [(vae, method) for method in ("_decode", "_encode") if vae is not None and hasattr(vae, method)]
    memoized = memoized if counter.fake else []
    for module, method in memoized:
        setattr(module, method, _Memoized(counter, module, method))

    eight_bit = _optim_name(args) in ADAMW_8BIT
    with counter.labelled("optimizer"):
        # The configured AdamW: "adamw_torch_fused" (the default) steps in one kernel, "adamw_torch" in foreach
        # kernels whose temporaries are as large as a moment.
        fused = _optim_name(args) == "adamw_torch_fused"
        optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, fused=fused or None, foreach=not fused)
        # Steady state: the optimizer state exists before the iteration (created at the first step).
        for parameter in trainable:
            state = optimizer.state[parameter]
            state["step"] = torch.tensor(1.0)
            if eight_bit and parameter.numel() >= BNB_MIN_8BIT_SIZE:
                # bitsandbytes' blockwise 8-bit moments (its step is a fused in-place kernel, not run here).
                blocks = math.ceil(parameter.numel() / BNB_BLOCK_SIZE)
                state["state1"] = torch.zeros(parameter.shape, dtype=torch.uint8)
                state["state2"] = torch.zeros(parameter.shape, dtype=torch.uint8)
                state["absmax1"] = torch.zeros(blocks, dtype=torch.float32)
                state["absmax2"] = torch.zeros(blocks, dtype=torch.float32)
            else:
                state["exp_avg"] = torch.zeros_like(parameter)
                state["exp_avg_sq"] = torch.zeros_like(parameter)
    ema = None
    ema_on_host = args.ema_device is not None and torch.device(args.ema_device).type == "cpu"
    if args.use_ema:
        with counter.labelled(HOST if ema_on_host else "ema"):
            ema = ParameterEMA(denoiser, args.ema_sigma_rel, args.ema_iteration_shift, args.ema_decay)

    samples = (args.prompts_per_step * args.num_generations) // parallelism.data_parallel_size
    prompts = _synthetic_prompts(max(1, samples // args.num_generations))
    prompts = [prompts[index * len(prompts) // samples] for index in range(samples)]
    rows = [{"prompt": prompt} for prompt in prompts]
    # The trainer's PromptEncoder: with `offload_text_encoders` (or `precompute_prompt_embeddings`) the encoders are on
    # the GPU only while they encode; precomputed embeddings are encoded before training, kept on the host.
    offload_encoders = args.offload_text_encoders or args.precompute_prompt_embeddings
    prompt_encoder = _counted_prompt_encoder()(counter, adapter, offload_text_encoders=offload_encoders)
    collator = DiffusionDataCollator(
        adapter, args.image_column, args.caption_column, args.source_image_column, prompt_encoder=prompt_encoder
    )
    if args.precompute_prompt_embeddings:
        with counter.labelled(HOST), torch.no_grad():
            # Under the rollout's autocast, where the estimate also encodes the data term's captions (the synthetic
            # prompts): every encoding of the iteration is then a hit.
            distinct = list(dict.fromkeys(prompts))
            with mixed():
                prompt_encoder.precompute(distinct, device, args.per_device_eval_batch_size)
    # The trainer's chunk; without rewards to overlap with, an unset rollout_batch_size samples everything at once.
    chunk = args.rollout_batch_size or default_rollout_chunk(samples, overlap=False)
    data_from_samples = args.data_beta > 0 and args.data_source == "base_model"
    final_latents: list[torch.Tensor] = []

    with torch.no_grad():
        with phase("text_encoders"), mixed():
            conditioning = collator.conditioning(prompts, rows)
        modes: dict[str, torch.Tensor] = {}
        if adapter.num_conditioning_frames:
            with phase("data"), mixed():
                frames = torch.zeros(
                    len(set(prompts)), adapter.num_conditioning_frames, adapter.pixel_channels, *adapter.resolution
                )
                encoded = adapter.encode_condition_frames(frames)
                index = torch.tensor([sorted(set(prompts)).index(prompt) for prompt in prompts])
                conditioning.update({key: value[index] for key, value in encoded.items()})
                if args.num_conditioning_frames_choices:
                    # Modes mixed per group: every sample in the largest (the memory does not depend on the mode).
                    modes = adapter.frame_mode_conditioning(
                        torch.full((len(prompts),), adapter.num_conditioning_frames)
                    )
                    conditioning.update(modes)

        # As RolloutEngine.generate: per chunk, sample, decode (scored, then dropped), keep the trained transitions
        # (`trained_transitions`, on the host with `offload_trajectories`, split across the group under context
        # parallelism); the buffer concatenates them.
        split = parallelism.context_parallel_size > 1
        schedule = rollout_steps(args, 0)
        with phase("rollout"):
            steps = torch.tensor(schedule.trained, device=device)
        with phase("rollout"), mixed(), _inside(counter, denoisers):
            noise, prefix = initial_states(
                adapter, denoiser, conditioning, samples, args, 0, schedule.prefix, 0, generator, chunk
            )
        parts: list[list[torch.Tensor]] = [[], [], [], [], []]  # states, next states, means, noise, denoised
        scoring = None  # async_rewards: the decoded chunk scored on the reward thread while the next one samples
        for start in range(0, samples, chunk):
            with phase("rollout"), mixed(), _inside(counter, denoisers):
                trajectory = adapter.sample(
                    denoiser,
                    {key: value[start : start + chunk] for key, value in conditioning.items()},
                    noise[start : start + chunk],
                    generator=generator,
                    steps=range(schedule.prefix, args.num_inference_steps),
                    stochastic_steps=schedule.stochastic,
                )
                if schedule.prefix:
                    trajectory = join_prefix(prefix[start : start + chunk], trajectory)
            with phase("vae_decode"), mixed():
                chunk_images = adapter.decode(trajectory.latents[:, -1])
            with phase("rollout"):
                trained = trained_transitions(adapter, trajectory, steps)
                if args.offload_trajectories:  # `.cpu()` copies: the device ones are freed with the chunk
                    for tensor in trained:
                        counter.relabel(tensor, HOST)
                elif split:  # each rank of the group keeps its share of every latent
                    for tensor in trained:
                        counter.relabel(tensor, TRAJECTORIES)
                if data_from_samples:
                    # data_source="base_model": one sample per prompt, drawn from the reference (here: its size).
                    final_latents.append(trajectory.latents[:, -1].clone())
            for kept, tensor in zip(parts, trained):
                kept.append(tensor)
            scoring = chunk_images if args.async_rewards else None
            del chunk_images, trajectory, trained, kept, tensor  # the loop's names kept the last chunk's alive
        del scoring
        buffer_label = HOST if args.offload_trajectories else TRAJECTORIES if split else None
        with phase("rollout"), counter.labelled(buffer_label) if buffer_label else contextlib.nullcontext():
            transitions = [torch.cat(kept) if kept else None for kept in parts]
        del parts
        with phase("rollout"):
            advantages = torch.zeros(samples, device=device)

        data_latents = data_conditioning = None
        if args.data_beta > 0:
            with phase("data"), mixed():
                if args.data_source == "base_model":
                    data_latents, data_conditioning = torch.cat(final_latents), conditioning
                    del final_latents
                else:
                    distinct = len(set(prompts))
                    shape = (adapter.pixel_channels, *adapter.resolution)
                    if adapter.num_frames is not None:
                        shape = (adapter.num_frames, *shape)
                    pixels = torch.zeros(distinct, *shape, device=device)
                    index = torch.tensor([sorted(set(prompts)).index(prompt) for prompt in prompts], device=device)
                    data_latents = adapter.encode_pixels(pixels, generator=generator)[index]
                    data_conditioning = collator.conditioning(prompts, rows)
                    data_conditioning.update(
                        {key: value[index] for key, value in adapter.data_conditioning(pixels).items()}
                    )
                    data_conditioning.update(modes)
                    del pixels

        with phase("rollout"):
            num_steps = len(schedule.trained)
            order, data_rows = order_micro_batches(
                torch.randperm(samples * num_steps),
                num_steps,
                args.per_device_train_batch_size,
                args.data_on_first_step_only,
            )
            states, next_states, old_means, initial_noise, previous_denoised = transitions
            buffer = RolloutBuffer(
                states=states,
                next_states=next_states,
                old_means=old_means,
                step_indices=steps,
                advantages=advantages,
                conditioning=conditioning,
                initial_noise=initial_noise,
                data_latents=data_latents,
                data_conditioning=data_conditioning,
                order=order if args.offload_trajectories else order.to(device),
                data_rows=data_rows,
                previous_denoised=previous_denoised,
                device=device if args.offload_trajectories else None,
            )
            del transitions, states, next_states, old_means, initial_noise, previous_denoised, advantages

    def accumulate(parameter):
        counter.relabel(parameter.grad, "gradients")

    computing = [*denoisers, *([reference] if reference is not None else [])]
    if args.kl_beta > 0 and args.precompute_reference_means:
        # As DDRLTrainer._reference_means: the reference means of every transition, once per rollout, micro-batch by
        # micro-batch as the replay would, before it ([S, K, ...] float32, on the host with offload_trajectories).
        with phase("reference_means"), torch.no_grad(), _inside(counter, computing):
            with counter.labelled(HOST if args.offload_trajectories else "reference_means"):
                reference_means = torch.empty_like(buffer.old_means)
            num_steps, size = buffer.states.shape[1], args.per_device_train_batch_size
            with (
                _reference(denoiser, reference, counter, parallelism, args) as model,
                _autocast_each_call(computing, mixed),
            ):
                for index in range(math.ceil(len(buffer.order) / size)):
                    flat = buffer.order[index * size : (index + 1) * size]
                    inputs = buffer.micro_batch(index, size)
                    mean = transition_step(adapter, model, inputs).mean
                    reference_means[flat // num_steps, flat % num_steps] = mean
                    del inputs, mean, flat
        buffer.reference_means = reference_means
        del reference_means

    hooks = [parameter.register_post_accumulate_grad_hook(accumulate) for parameter in trainable]
    # As accelerate's prepared model: each denoiser call autocasts (its cache of the trained weights' low-precision
    # casts lives for the call), the loss and the backward pass run outside autocast.
    with phase("replay"), _inside(counter, computing), _autocast_each_call(computing, mixed):
        with counter.window() as first:
            inputs = buffer.micro_batch(0, args.per_device_train_batch_size)
            data_term = None
            if args.data_beta > 0 and inputs["num_data_rows"]:
                data_term = args.data_beta * data_term_loss(adapter, denoiser, inputs, args.data_noise)
                if args.separate_data_backward:  # backpropagated before the policy forward (DDRLTrainer.compute_loss)
                    _backward(counter, data_term * args.loss_scale)
                    data_term = None
            step = transition_step(adapter, denoiser, inputs)
            log_ratio = transition_log_ratio(step, inputs["old_means"], args.log_ratio_form)
            policy_loss, _, _ = clipped_policy_loss(log_ratio, inputs["advantages"], args.clip_range)
            loss = policy_loss.mean()
            if data_term is not None:
                loss = loss + data_term
            if args.kl_beta > 0:
                if "reference_means" in inputs:  # precompute_reference_means: no reference forward here
                    reference_mean = inputs["reference_means"]
                else:
                    with torch.no_grad(), _reference(denoiser, reference, counter, parallelism, args) as model:
                        reference_mean = transition_step(adapter, model, inputs).mean
                loss = (
                    loss
                    + args.kl_beta
                    * reverse_kl(step.mean, reference_mean, step.std, step.edm_scale, args.kl_form).mean()
                )
                del reference_mean
            _backward(counter, loss * args.loss_scale)
            del inputs, step, policy_loss, loss, data_term
        if args.gradient_accumulation_steps > 1 and args.steps_per_generation > 1:
            # The next micro-batches repeat the first with every gradient already there (accumulated in place).
            counter.check(
                extra={
                    label: size - first.start.get(label, 0)
                    for label, size in first.snapshot.items()
                    if label[0] != "gradients"
                }
            )
    for hook in hooks:
        hook.remove()
    with phase("optimizer"):
        if not eight_bit:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        with phase("ema"), counter.labelled(HOST) if ema_on_host else contextlib.nullcontext():
            ema.step()
    for module, method in memoized:
        delattr(module, method)


def _backward(counter: LiveBytes, loss: torch.Tensor) -> None:
    """`loss.backward()`, what it allocates counted as the denoiser's (activations, transient gradients)."""
    counter.inside_denoiser += 1
    try:
        loss.backward()
    finally:
        counter.inside_denoiser -= 1


@contextlib.contextmanager
def _reference(denoiser, reference, counter: LiveBytes, parallelism: Parallelism, args=None):
    """The reference model: the adapter-disabled denoiser under LoRA, else the frozen copy (gathered whole when
    sharded: TRL's `prepare_fsdp` / ZeRO-3 wrap it at the root; on the GPU only for the block with
    `offload_reference_model`, as `DDRLTrainer._reference_denoiser`)."""
    if reference is None:
        denoiser.disable_adapters()
        try:
            yield denoiser
        finally:
            denoiser.enable_adapters()
        return
    gathered = 0
    if parallelism.sharding in ("fsdp2", "zero3") and parallelism.num_processes > 1:
        gathered = sum(p.numel() * p.element_size() for p in reference.parameters())
    offloaded = _module_tensors([reference]) if args is not None and args.offload_reference_model else []
    for tensor in offloaded:
        counter.relabel(tensor, "reference")
    counter.gathered += gathered
    try:
        yield reference
    finally:
        counter.gathered -= gathered
        for tensor in offloaded:
            counter.relabel(tensor, HOST)


# ---- the estimator --------------------------------------------------------------------------------------------------


def _resolve_model(model_or_name) -> tuple[str, dict | None, Callable | None]:
    """(name, shipped spec or None, builder of a pipeline or None)."""
    from . import model_configs

    if isinstance(model_or_name, str):
        if model_or_name in model_configs.list_models():
            return model_or_name, model_configs.load_model_config(model_or_name), None
        raise ValueError(
            f"model={model_or_name!r} is not a shipped architecture; use one of "
            f"{', '.join(model_configs.list_models())}, or pass a function that builds the pipeline."
        )
    if callable(model_or_name):
        return getattr(model_or_name, "__name__", "pipeline"), None, model_or_name
    raise TypeError(f"model must be a shipped architecture name or a pipeline builder; got {type(model_or_name)}.")


def _measure(build: Callable, args, peft_config, parallelism: Parallelism, fake: bool) -> tuple[dict, int]:
    """Run one iteration of a freshly built pipeline; return each phase's peak window and the gathered bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    pipeline = build()
    if fake_mode is not None:
        for module in pipeline.components.values():
            if isinstance(module, nn.Module):
                _fake_parameters(module, fake_mode)
    counter = LiveBytes(parallelism.weight, fake=fake)
    windows: dict[str, _Window] = {}
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        adapter_denoiser = getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)
        if parallelism.sharding in ("fsdp2", "zero3") and parallelism.num_processes > 1:
            dtype_size = 2 if args.bf16 else next(adapter_denoiser.parameters()).element_size()
            counter.gathered = 2 * _largest_block_bytes(adapter_denoiser, dtype_size)
        with (
            counter,
            _resize_without_torchvision(),
            _experts_take_whole_batches(fake),
            _prompts_fill_their_padding(pipeline, fake),
        ):
            run_iteration(pipeline, args, counter, peft_config, parallelism, windows)
    return windows, counter.gathered


def estimate_memory(
    model_or_name,
    args,
    *,
    num_processes: int = 1,
    sharding: str = "none",
    context_parallel_size: int | None = None,
    peft_config: Any | None = None,
    torch_dtype: torch.dtype | str | None = None,
    depth: str = "extrapolate",
    fake: bool = True,
) -> MemoryEstimate:
    """
    Estimate the peak GPU memory per process of one DDRL iteration of `args` (a [`DDRLConfig`]).

    Args:
        model_or_name (`str` or callable): A shipped architecture (`trl_ddrl.model_configs.list_models()`: the real
            configs, no weights), or a function returning a diffusers pipeline (built on the meta device or with real
            weights; its tensors are replaced by fake ones unless `fake=False`).
        args ([`DDRLConfig`]): The training configuration (sizes, group size, steps, micro-batches, EMA, KL, ...).
        num_processes (`int`): Processes (GPUs) of the run.
        sharding (`str`): `"none"`, `"ddp"`, `"zero1"`, `"zero2"`, `"zero3"` or `"fsdp2"`.
        context_parallel_size (`int`, *optional*): Defaults to `args.context_parallel_size`.
        peft_config (`peft.LoraConfig`, *optional*): Estimate LoRA training instead of full fine-tuning.
        torch_dtype (`torch.dtype` or `str`, *optional*): Weight dtype; defaults to
            `args.model_init_kwargs["torch_dtype"]`, else bfloat16.
        depth (`str`): `"extrapolate"` (shipped architectures: two reduced depths, extrapolated) or `"full"`.
        fake (`bool`): Run on fake tensors (no memory). `False` runs for real, on the CPU (for validation).

    Returns:
        [`MemoryEstimate`]: `peak_bytes`, per-phase peaks, what is live at the peak.
    """
    from .model_configs import build_pipeline_from_spec

    name, spec, builder = _resolve_model(model_or_name)
    dtype = torch_dtype or (args.model_init_kwargs or {}).get("torch_dtype") or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cp = context_parallel_size or args.context_parallel_size
    parallelism = Parallelism(num_processes, sharding, cp)
    args = _for_processes(args, parallelism, dtype)
    if spec is not None:
        spec = _with_defaults(spec, args)
    runs: list[tuple[float, dict]] = []
    units = _depth_units(spec) if spec is not None and depth == "extrapolate" else 0
    if units > 2:
        for used in (2, 4) if units >= 4 else (1, 2):
            scaled = _scaled_spec(spec, used, units)
            windows, _ = _measure(
                lambda scaled=scaled: build_pipeline_from_spec(scaled, dtype, "meta"),
                args,
                peft_config,
                parallelism,
                fake,
            )
            runs.append((used, windows))
        phases = _extrapolate(runs, units, parallelism)
    else:
        build = (lambda: build_pipeline_from_spec(spec, dtype, "meta")) if spec is not None else builder
        windows, _ = _measure(build, args, peft_config, parallelism, fake)
        phases = {name_: (window.peak, window.snapshot) for name_, window in windows.items()}
    return _result(name, phases, parallelism, args, peft_config, dtype)


def _for_processes(args, parallelism: Parallelism, dtype: torch.dtype):
    """A copy of `args` with the derived per-process sizes of `parallelism` (the config derives them for its own)."""
    args = copy.copy(args)
    samples = args.prompts_per_step * args.num_generations
    if samples % parallelism.data_parallel_size:
        raise ValueError(
            f"prompts_per_step * num_generations = {samples} must be divisible by the {parallelism.data_parallel_size} "
            "data-parallel processes. Change prompts_per_step or num_processes."
        )
    args.samples_per_process = samples // parallelism.data_parallel_size
    transitions = args.samples_per_process * args.num_trained_steps
    args.steps_per_generation = max(1, transitions // args.per_device_train_batch_size)
    if getattr(args, "_derive_gradient_accumulation", False):
        args.gradient_accumulation_steps = args.steps_per_generation
    if args.bf16 is False and dtype in (torch.bfloat16, torch.float16):
        args.bf16 = True  # bf16 weights train under bf16 autocast on a GPU
    return args


def _with_defaults(spec: dict, args) -> dict:
    """The shipped resolution and frame count when `args` leaves them unset."""
    height, width = spec.get("default_resolution", (None, None))
    args.height = args.height or height
    args.width = args.width or width
    if args.num_frames is None and spec.get("default_num_frames"):
        args.num_frames = spec["default_num_frames"]
    return spec


def _extrapolate(runs: list[tuple[float, dict]], units: int, parallelism: Parallelism) -> dict:
    """Each phase's live bytes at its peak, extrapolated linearly from the reduced depths to `units`."""
    (u1, first), (u2, second) = runs
    phases = {}
    for name in first:
        a, b = first[name].snapshot, second[name].snapshot
        snapshot = {}
        for label in set(a) | set(b):
            value = a.get(label, 0) + (b.get(label, 0) - a.get(label, 0)) * (units - u1) / (u2 - u1)
            snapshot[label] = max(0, int(value))
        if (GATHERED, False) in b:
            # Two blocks whatever the depth, measured at the deeper run: at one unit a list of one block (Wan's 40
            # blocks at 1/40) is not seen as repeated, and a smaller list's block stood in for it.
            snapshot[(GATHERED, False)] = b[(GATHERED, False)]
        phases[name] = (sum(size * parallelism.weight(label) for label, size in snapshot.items()), snapshot)
    return phases


def _category_name(label: tuple[str, bool]) -> str:
    category, inside = label
    if category in PERSISTENT or category == GATHERED:
        return category
    return f"{category}/activations" if inside else category


def _memory_options(args) -> dict:
    """The memory options of `args` that the estimate models, where they differ from the defaults."""
    options = {
        "ema_device": args.ema_device,
        "offload_text_encoders": args.offload_text_encoders,
        "precompute_prompt_embeddings": args.precompute_prompt_embeddings,
        "offload_trajectories": args.offload_trajectories,
        "offload_reference_model": args.offload_reference_model,
        "precompute_reference_means": args.precompute_reference_means,
        "optim": _optim_name(args),
    }
    defaults = {"ema_device": None, "optim": "adamw_torch"}
    return {key: value for key, value in options.items() if value and value != defaults.get(key)}


def _optim_name(args) -> str:
    return str(getattr(args.optim, "value", args.optim))


# bitsandbytes' 8-bit AdamW (`optim="adamw_bnb_8bit"`, also "adamw_8bit" and "paged_adamw_8bit"): each moment is one
# uint8 per value plus a float32 absmax per block of 256 values (blockwise quantization), for tensors of at least
# `min_8bit_size` (4096) values; smaller tensors keep float32 moments.
ADAMW_8BIT = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")
BNB_BLOCK_SIZE = 256
BNB_MIN_8BIT_SIZE = 4096


def _result(name, phases: dict, parallelism: Parallelism, args, peft_config, dtype) -> MemoryEstimate:
    peaks = {phase: int(value) for phase, (value, _) in phases.items()}
    peak_phase = max(peaks, key=peaks.get)
    breakdown: dict[str, int] = defaultdict(int)
    for label, size in phases[peak_phase][1].items():
        if parallelism.weight(label):
            breakdown[_category_name(label)] += int(size * parallelism.weight(label))
    settings = {
        "num_processes": parallelism.num_processes,
        "sharding": parallelism.sharding,
        "context_parallel_size": parallelism.context_parallel_size,
        "lora": peft_config is not None,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "num_generations": args.num_generations,
        "prompts_per_step": args.prompts_per_step,
        "samples_per_process": args.samples_per_process,
        "rollout_batch_size": args.rollout_batch_size,
        "num_inference_steps": args.num_inference_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "activation_checkpointing": bool(args.activation_checkpointing or args.gradient_checkpointing),
        "use_ema": args.use_ema,
        "kl_beta": args.kl_beta,
        "data_beta": args.data_beta,
        "guidance_scale": args.guidance_scale,
        "memory_options": _memory_options(args),
    }
    ordered = {phase: peaks[phase] for phase in PHASES if phase in peaks}
    return MemoryEstimate(
        model=name,
        peak_bytes=peaks[peak_phase],
        phases=ordered,
        breakdown=dict(breakdown),
        peak_phase=peak_phase,
        settings=settings,
    )


# ---- what to change --------------------------------------------------------------------------------------------------


def _fitting_steps(args, sharding: str, lora: bool) -> list[tuple[str, dict]]:
    """
    The changes [`fit_memory`] tries, in order, each adding to the previous: `(why, {field: value})`. First the
    activations (one transition per micro-batch, one sample per rollout chunk), then the memory options that cost
    time or host memory but not the method (docs/memory.md, "Options that cut memory"). Steps that change nothing for
    `args` are left out.
    """
    steps = []
    if args.per_device_train_batch_size > 1 or args.rollout_batch_size != 1:
        steps.append(("activations", {"per_device_train_batch_size": 1, "rollout_batch_size": 1}))
    if not (args.offload_text_encoders or args.precompute_prompt_embeddings):
        steps.append(("text encoders", {"offload_text_encoders": True}))
    if args.use_ema and args.ema_device is None:
        steps.append(("EMA", {"ema_device": "cpu"}))
    if not args.offload_trajectories:
        steps.append(("trajectories", {"offload_trajectories": True}))
    if args.kl_beta > 0 and not lora and not args.precompute_reference_means:
        changes = {"precompute_reference_means": True}
        if sharding in ("none", "ddp"):  # FSDP2 and ZeRO-3 shard the reference model instead
            changes["offload_reference_model"] = True
        steps.append(("reference model", changes))
    return steps


def fit_memory(
    model_or_name,
    args,
    gpu_memory_gib: float = 80.0,
    *,
    peft_config: Any | None = None,
    sharding: str = "none",
    **estimate_kwargs,
) -> list[tuple[dict, MemoryEstimate]]:
    """
    Estimate `args`, then add the changes of [`_fitting_steps`] one at a time until the estimate fits a GPU of
    `gpu_memory_gib` ([`MemoryEstimate.fits`]). Returns every setting tried, `(changes so far, estimate)`, the first
    with no changes; the last fits, unless none did (then what is left is the largest term's advice: LoRA, more GPUs
    with FSDP2, context parallelism, fewer samples or frames, which change the run, not only its memory).
    Takes one estimate per step (seconds for images, minutes for long videos).
    """
    estimate = estimate_memory(model_or_name, args, peft_config=peft_config, sharding=sharding, **estimate_kwargs)
    tried = [({}, estimate)]
    changes: dict = {}
    for _, step in _fitting_steps(args, sharding, peft_config is not None):
        if estimate.fits(gpu_memory_gib):
            break
        changes = {**changes, **step}
        changed = copy.copy(args)
        for name, value in changes.items():
            setattr(changed, name, value)
        estimate = estimate_memory(
            model_or_name, changed, peft_config=peft_config, sharding=sharding, **estimate_kwargs
        )
        tried.append((changes, estimate))
    return tried


def command_line_flags(changes: dict) -> str:
    """`{"offload_trajectories": True, "rollout_batch_size": 1}` -> `--offload_trajectories --rollout_batch_size 1`."""
    return " ".join(f"--{name}" if value is True else f"--{name} {value}" for name, value in changes.items())


# ---- command line ---------------------------------------------------------------------------------------------------


def shipped_name(model_name_or_path: str) -> str | None:
    """The shipped architecture of `model_name_or_path`: its name, or a shipped spec's `hub_id` (as in the recipes)."""
    from .model_configs import list_models, load_model_config

    if model_name_or_path in list_models():
        return model_name_or_path
    for name in list_models():
        if load_model_config(name).get("hub_id") == model_name_or_path:
            return name
    return None


def parallelism_from_accelerate_config(path: str) -> tuple[int, str]:
    """
    `(num_processes, sharding)` of an accelerate config file (a recipe's `accelerate_config`): `distributed_type`
    `FSDP` is `"fsdp2"` (`"zero2"` with `fsdp_sharding_strategy: SHARD_GRAD_OP`), `DEEPSPEED` is `"zero<stage>"`,
    `MULTI_GPU` is `"ddp"`; one process is `"none"`.
    """
    import yaml

    with open(path) as file:
        config = yaml.safe_load(file) or {}
    num_processes = int(config.get("num_processes") or 1)
    kind = str(config.get("distributed_type", "NO")).upper()
    sharding = "none"
    if kind == "FSDP":
        strategy = str((config.get("fsdp_config") or {}).get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        sharding = "zero2" if strategy in ("SHARD_GRAD_OP", "2") else "fsdp2"
    elif kind == "DEEPSPEED":
        stage = int((config.get("deepspeed_config") or {}).get("zero_stage", 0))
        sharding = f"zero{stage}" if stage else "ddp"
    elif kind == "MULTI_GPU":
        sharding = "ddp"
    return num_processes, sharding if num_processes > 1 else "none"


def main(argv: list[str], prog: str = "trl-ddrl estimate-memory") -> int:
    """
    `trl-ddrl estimate-memory --model_name_or_path NAME [training options] [--num_processes N] [--sharding S]`:
    print the estimate for the training options (the same as `trl-ddrl`'s, `--config` included) and exit with 0 when
    it fits `--gpu_memory_gib`, 1 when not. A recipe's `accelerate_config` gives the process count and the sharding
    unless `--num_processes` / `--sharding` are given; its `model_name_or_path` (a Hub id) is the shipped architecture
    with that `hub_id`. With `--fit`, a setting that does not fit is changed step by step ([`fit_memory`]) and the
    flags to add are printed (exit 0 when one fits).
    """
    import argparse
    import json

    from .launch_configs import resolve_accelerate_config
    from .model_configs import list_models
    from .scripts.ddrl import get_lora_config, get_model_init_kwargs, make_parser

    own = argparse.ArgumentParser(prog=prog, add_help=False)
    own.add_argument(
        "--num_processes", type=int, default=None, help="GPUs of the run (default 1, or the accelerate config's)."
    )
    own.add_argument(
        "--sharding",
        choices=SHARDING_CHOICES,
        default=None,
        help="Default: the accelerate config's, else fsdp2 with >1 process.",
    )
    own.add_argument("--gpu_memory_gib", type=float, default=80.0, help="Memory of one GPU (default 80).")
    own.add_argument("--json", action="store_true", help="Print the estimate as JSON.")
    own.add_argument(
        "--fit",
        action="store_true",
        help="If it does not fit, add changes one at a time (micro-batch and rollout chunk of 1, then the memory "
        "options) until it does, and print the flags that fit.",
    )
    own.add_argument("--help", "-h", action="store_true")
    known, rest = own.parse_known_args(argv)
    parser = make_parser(prog=prog)
    if known.help:
        own.print_help()
        print(f"\nArchitectures: {', '.join(list_models())}. Every training option of `trl-ddrl --help` applies.")
        return 0
    _, training_args, model_args, config_remaining, cli_remaining = parser.parse_args_and_config(
        rest, return_remaining_strings=True, separate_remaining_strings=True
    )
    try:
        launch = resolve_accelerate_config(config_remaining + cli_remaining)
    except ValueError as error:
        parser.error(str(error))
    accelerate_file = launch[1] if launch[:1] == ["--config_file"] else None
    if launch[2 if accelerate_file else 0 :]:
        parser.error(f"unrecognized arguments: {' '.join(launch[2 if accelerate_file else 0 :])}")
    name = shipped_name(model_args.model_name_or_path)
    if name is None:
        parser.error(
            f"--model_name_or_path {model_args.model_name_or_path!r}: estimate-memory knows the shipped architectures "
            f"{', '.join(list_models())} (or their Hub ids)."
        )
    num_processes, sharding = parallelism_from_accelerate_config(accelerate_file) if accelerate_file else (1, None)
    num_processes = known.num_processes or num_processes
    sharding = known.sharding or sharding or ("fsdp2" if num_processes > 1 else "none")
    kwargs = dict(
        num_processes=num_processes,
        sharding=sharding,
        peft_config=get_lora_config(model_args),
        torch_dtype=(get_model_init_kwargs(model_args, training_args).get("torch_dtype") or "auto").replace(
            "auto", "bfloat16"
        ),
    )
    if known.fit:
        tried = fit_memory(name, training_args, known.gpu_memory_gib, **kwargs)
    else:
        tried = [({}, estimate_memory(name, training_args, **kwargs))]
    changes, estimate = tried[-1]
    fits = estimate.fits(known.gpu_memory_gib)
    if known.json:
        steps = [{"changes": step, "peak_gib_per_gpu": round(e.peak_gib, 2)} for step, e in tried]
        print(
            json.dumps(
                {**estimate.to_dict(), "fits": fits, "gpu_memory_gib": known.gpu_memory_gib, "tried": steps}, indent=2
            )
        )
        return 0 if fits else 1
    print(estimate.table())
    if len(tried) > 1:
        print("\ntried (each adds to the previous):")
        for step, tried_estimate in tried:
            print(f"  {tried_estimate.peak_gib:8.1f} GiB  {command_line_flags(step) or '(as given)'}")
    verdict = "fits" if fits else "does NOT fit"
    print(f"\n{verdict} a {known.gpu_memory_gib:g} GiB GPU (peak + 5% fragmentation + 2 GiB CUDA context).")
    if fits and changes:
        print(f"add: {command_line_flags(changes)}")
    elif not fits and known.fit:
        print("no memory option is enough: change the run (see the largest term's advice above).")
    return 0 if fits else 1
