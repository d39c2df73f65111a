# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Two denoisers split by noise level (the Wan 2.2 A14B mixture of experts) seen by the trainer as one denoiser.

`WanPipeline` / `WanImageToVideoPipeline` with `transformer_2` and `boundary_ratio` in their config compute every step
whose timestep `t >= boundary_ratio * num_train_timesteps` with `transformer` (the high-noise expert) and the others
with `transformer_2` (the low-noise expert). [`TimestepExperts`] holds both under those names and routes each row of a
batch the same way, so that the trainer, the reference copy, the EMA and the optimizer see one module whose state
dict is the pipeline's layout (`transformer.*`, `transformer_2.*`). The experts not trained are frozen.
"""

import copy

import torch
from torch import nn


HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"
"""Pipeline component names of the high-noise and the low-noise expert."""

EXPERTS_OF_CHOICE = {"all": (HIGH_NOISE, LOW_NOISE), "high_noise": (HIGH_NOISE,), "low_noise": (LOW_NOISE,)}
"""The experts each `DDRLConfig.train_experts` choice trains."""

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_weight_name(component: str) -> str:
    """
    The LoRA file of a trained component: `pytorch_lora_weights.safetensors` for the (high-noise) `transformer`,
    which `pipeline.load_lora_weights(folder)` loads, and `pytorch_lora_weights_transformer_2.safetensors` for the
    low-noise expert, which `pipeline.load_lora_weights(folder, weight_name=..., load_into_transformer_2=True)` loads.
    """
    return (
        LORA_WEIGHT_NAME
        if component != LOW_NOISE
        else LORA_WEIGHT_NAME.replace(".safetensors", f"_{LOW_NOISE}.safetensors")
    )


def lora_load_arguments(component: str) -> str:
    """The arguments of `pipeline.load_lora_weights(folder<arguments>)` that load `component`'s LoRA file."""
    if component != LOW_NOISE:
        return ""
    return f', weight_name="{lora_weight_name(component)}", load_into_transformer_2=True'


class TimestepExperts(nn.Module):
    """
    Two denoisers of one pipeline, each computing the rows of a batch in its noise range: `transformer` the rows whose
    timestep is `>= boundary_timestep`, `transformer_2` the others, as the pipeline's sampling loop chooses per step.
    A timestep per token (`[B, L]`, Wan 2.2 `expand_timesteps`, 0 on given frames) routes by its largest value.

    Calls take the experts' keyword arguments; every tensor argument with the batch's leading size is split by row.
    A batch within one expert's range runs as one call of that expert (the pipeline's own computation); a mixed
    batch (training micro-batches mix sampling steps) runs each part with its expert and puts the rows back in order.
    Each call reads the routing once on the host.

    Args:
        transformer (`nn.Module`): The high-noise expert.
        transformer_2 (`nn.Module`): The low-noise expert.
        boundary_timestep (`float`): `boundary_ratio * num_train_timesteps` of the pipeline.
        trained (`tuple[str, ...]`): The experts that train (`"transformer"`, `"transformer_2"`); the others are
            frozen (`requires_grad=False`, eval mode) whatever `requires_grad_` / `train` are asked, and a deep copy
            (the trainer's reference model) shares them instead of copying them.
    """

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module, boundary_timestep: float, trained: tuple):
        super().__init__()
        unknown = set(trained) - {HIGH_NOISE, LOW_NOISE}
        if unknown or not trained:
            raise ValueError(f"trained={trained} must name one or both of {HIGH_NOISE!r} and {LOW_NOISE!r}.")
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = float(boundary_timestep)
        self.trained = tuple(name for name in (HIGH_NOISE, LOW_NOISE) if name in trained)
        for name in self.frozen:
            getattr(self, name).requires_grad_(False).eval()

    @property
    def frozen(self) -> tuple[str, ...]:
        return tuple(name for name in (HIGH_NOISE, LOW_NOISE) if name not in self.trained)

    @property
    def trained_experts(self) -> dict[str, nn.Module]:
        """The trained experts by component name."""
        return {name: getattr(self, name) for name in self.trained}

    @property
    def config(self):
        """The high-noise expert's config (both experts share the architecture's shape: patch size, channels)."""
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def is_high_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """`[B]` booleans: the rows the high-noise expert computes (`timestep` `[B]`, or `[B, L]` per token)."""
        level = timestep if timestep.ndim == 1 else timestep.amax(dim=1)
        return level >= self.boundary_timestep

    def forward(self, timestep: torch.Tensor, return_dict: bool = False, **kwargs) -> tuple[torch.Tensor]:
        if return_dict:
            raise ValueError("TimestepExperts returns tuples: call it with return_dict=False.")
        high = self.is_high_noise(timestep)
        batch = high.shape[0]
        num_high = int(high.sum())
        if num_high in (0, batch):
            expert = self.transformer if num_high else self.transformer_2
            return expert(timestep=timestep, return_dict=False, **kwargs)
        rows = (high.nonzero().squeeze(1), (~high).nonzero().squeeze(1))
        outputs = []
        for expert, index in zip((self.transformer, self.transformer_2), rows, strict=True):
            part = {
                key: value[index] if isinstance(value, torch.Tensor) and value.shape[:1] == (batch,) else value
                for key, value in kwargs.items()
            }
            outputs.append(expert(timestep=timestep[index], return_dict=False, **part)[0])
        order = torch.argsort(torch.cat(rows))
        return (torch.cat(outputs)[order],)

    # ---- training switches: the frozen experts stay frozen ----------------------------------------------------------

    def requires_grad_(self, requires_grad: bool = True) -> "TimestepExperts":
        for module in self.trained_experts.values():
            module.requires_grad_(requires_grad)
        return self

    def train(self, mode: bool = True) -> "TimestepExperts":
        self.training = mode
        for module in self.trained_experts.values():
            module.train(mode)
        return self

    def __deepcopy__(self, memo: dict) -> "TimestepExperts":
        for name in self.frozen:
            memo[id(getattr(self, name))] = getattr(self, name)
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone.__dict__ = copy.deepcopy(self.__dict__, memo)
        return clone

    # ---- what the trainer asks of a diffusers denoiser, for each trained expert -------------------------------------

    def add_adapter(self, peft_config) -> None:
        """Attach a LoRA adapter (a copy of `peft_config`) to each trained expert."""
        for module in self.trained_experts.values():
            module.add_adapter(copy.deepcopy(peft_config))

    def disable_adapters(self) -> None:
        for module in self.trained_experts.values():
            module.disable_adapters()

    def enable_adapters(self) -> None:
        for module in self.trained_experts.values():
            module.enable_adapters()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(module.is_gradient_checkpointing for module in self.trained_experts.values())

    def enable_gradient_checkpointing(self) -> None:
        for module in self.trained_experts.values():
            module.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        for module in self.trained_experts.values():
            module.disable_gradient_checkpointing()

    def set_attention_backend(self, backend: str) -> None:
        self.transformer.set_attention_backend(backend)
        self.transformer_2.set_attention_backend(backend)


def trained_components(denoiser: nn.Module, name: str) -> dict[str, nn.Module]:
    """
    The pipeline components that training changes, by component name: `{name: denoiser}` for a single denoiser, each
    trained expert of a [`TimestepExperts`]. What the trainer saves, loads and exports, one folder or file each.
    """
    if isinstance(denoiser, TimestepExperts):
        return denoiser.trained_experts
    return {name: denoiser}


def denoiser_parts(
    denoiser: nn.Module, name: str, state_dict: dict[str, torch.Tensor], frozen_too: bool = False
) -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    """
    [`trained_components`] (with `frozen_too`, every expert), each with its part of the denoiser's `state_dict`
    (possibly gathered from shards): all of it for a single denoiser, the entries under `<expert>.` (prefix removed)
    for each expert. Under ZeRO-3 or FSDP the gathered state dict is the only place a frozen expert's full weights
    exist too: the pipeline's own module holds this process's shards.
    """
    if not isinstance(denoiser, TimestepExperts):
        return {name: (denoiser, state_dict)}
    components = denoiser.trained + (denoiser.frozen if frozen_too else ())
    parts = {}
    for component in components:
        prefix = f"{component}."
        parts[component] = (
            getattr(denoiser, component),
            {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)},
        )
    return parts
