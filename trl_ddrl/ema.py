# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Exponential moving average (EMA) of the trained weights, kept as the DDRL authors keep it.

The authors' release (cosmos-rl, `EMAConfig(enabled=True, rate=0.1, iteration_shift=0)` and `ema_beta` in
`t2v_model.py`) updates an fp32 copy of the trained weights after every optimizer step with the power-function EMA of
EDM2 (Karras et al., 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", eq. 3-4):

    ema <- beta_t * ema + (1 - beta_t) * theta_t,     beta_t = (1 - 1 / t) ** (gamma + 1)

where `t` counts the optimizer steps taken (plus `iteration_shift`, with `beta = 0` while that is below 2, so the
first update copies the weights) and `gamma` is fixed by the relative width `sigma_rel` of the averaging profile
(`sigma_rel = 0.1`: the EMA averages roughly the last 10% of training, whatever its length). `gamma` is the largest
real root of `gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0`. The released checkpoints
are the EMA weights.

`ParameterEMA` is shaped like diffusers' `EMAModel` (`step`, `copy_to`, `swapped_in`, `state_dict` /
`load_state_dict`) but tracks only the parameters that train (`requires_grad`: under LoRA the adapter weights) and
keeps, for each, the copy this process holds: the whole tensor without sharding (single process, DDP, ZeRO-1/2), the
local shard under FSDP2 (`DTensor.to_local()`) and the local partition under DeepSpeed ZeRO-3 (`ds_tensor`). Updates
and swaps are then purely local, with no communication (except re-gathering ZeRO-3's persistent parameters).

Memory: the EMA is one float32 copy of the (local) trained weights, on their device or, with `device="cpu"`
(`ema_device="cpu"`), in host memory. Nothing else of the model's size is ever allocated: `step` folds the parameters
in chunks of at most `chunk_bytes` (a float32 or host copy of one chunk at a time, none for float32 parameters on the
EMA's device), and the swap for evaluation and export exchanges each parameter with its EMA tensor in place, through
a copy of one parameter at a time (the former `store` / `restore` held a second copy of every parameter).
`EMACallback` creates it once the Trainer has wrapped the model, updates it after every optimizer step and saves and
restores it with the checkpoints.
"""

import contextlib
import json
import os
from collections.abc import Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging


logger = logging.get_logger(__name__)

EMA_FOLDER = "ema"
EMA_STATE_NAME = "ema_state.safetensors"


def power_ema_exponent(sigma_rel: float) -> float:
    """
    Exponent `gamma` of the power-function EMA with relative standard deviation `sigma_rel` (EDM2 eq. 3): the largest
    real root of `gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2)`. `sigma_rel=0.1` gives
    `gamma ~ 6.94`.
    """
    if not 0.0 < sigma_rel <= 0.28:
        # The profile's relative width peaks near 0.289 (gamma = 0): past it the cubic has no meaningful root.
        raise ValueError(f"ema_sigma_rel={sigma_rel} must be in (0, 0.28]; the authors use 0.1.")
    inverse_square = sigma_rel**-2
    return float(np.roots([1.0, 7.0, 16.0 - inverse_square, 12.0 - inverse_square]).real.max())


def ema_decay(step: int, gamma: float, iteration_shift: int = 0) -> float:
    """
    Decay `beta` of the `step`-th EMA update (1-based: the update after the `step`-th optimizer step), as the
    authors' `ema_beta(iteration)` with `iteration = step - 1`: `0` while `step - 1 + iteration_shift < 1`, else
    `(1 - 1 / (step + iteration_shift)) ** (gamma + 1)`.
    """
    iteration = step - 1 + iteration_shift
    if iteration < 1:
        return 0.0
    return (1.0 - 1.0 / (iteration + 1)) ** (gamma + 1.0)


def _local_tensor(parameter: nn.Parameter) -> torch.Tensor:
    """The part of `parameter` this process stores: its ZeRO-3 partition, its FSDP2 shard, or the tensor itself."""
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor
    if hasattr(parameter, "to_local") and hasattr(parameter, "placements"):
        return parameter.to_local()
    return parameter.data


def _is_sharded(parameter: nn.Parameter) -> bool:
    return hasattr(parameter, "ds_tensor") or hasattr(parameter, "placements")


class ParameterEMA:
    """
    EMA of the trainable parameters of `module`.

    Args:
        module (`nn.Module`): The (unwrapped) trained model; every parameter with `requires_grad` is tracked. Build
            it after the model is sharded (FSDP2, ZeRO-3): the EMA holds this process's part of each parameter.
        sigma_rel (`float`, *optional*, defaults to `0.1`): Relative width of the power-function EMA profile.
        iteration_shift (`int`, *optional*, defaults to `0`): Added to the step count in the decay formula.
        decay (`float`, *optional*): A constant decay instead of the power-function schedule.
        device (`str` or `torch.device`, *optional*): Where the EMA tensors live; default the parameters' device.
            `"cpu"` keeps them in host memory (each update and swap then copies one chunk at a time across).
        chunk_bytes (`int`, *optional*, defaults to 256 MiB): The most bytes of parameters folded in at once by `step`.

    The EMA tensors are float32: one extra fp32 copy of the trainable parameters per process without sharding,
    `1 / world_size` of it under FSDP2 or ZeRO-3, on the accelerator unless `device="cpu"`.
    """

    def __init__(
        self,
        module: nn.Module,
        sigma_rel: float = 0.1,
        iteration_shift: int = 0,
        decay: float | None = None,
        device: str | torch.device | None = None,
        chunk_bytes: int = 256 * 2**20,
    ):
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay={decay} must be in [0, 1), or None for the power-function schedule.")
        self.module = module
        self.sigma_rel = sigma_rel
        self.iteration_shift = iteration_shift
        self.decay = decay
        self.gamma = power_ema_exponent(sigma_rel)
        named = [(name, parameter) for name, parameter in module.named_parameters() if parameter.requires_grad]
        if not named:
            raise ValueError("The EMA found no trainable parameters (requires_grad) in the model. Set use_ema=False.")
        self.names = [name for name, _ in named]
        self.parameters = [parameter for _, parameter in named]
        self.sharded = any(_is_sharded(parameter) for parameter in self.parameters)
        self.device = torch.device(device) if device is not None else None
        self.chunk_bytes = chunk_bytes
        self.shadow = [
            _local_tensor(parameter).detach().to(self.device or parameter.device, torch.float32, copy=True)
            for parameter in self.parameters
        ]
        self.optimization_step = 0
        self._swapped = False  # inside `swapped_in`: the parameters hold the EMA, `shadow` the trained weights
        self._held: dict[int, torch.Tensor] = {}  # while swapped: parameters not in float32, kept as they were

    def get_decay(self, step: int) -> float:
        """Decay of the `step`-th update (see `ema_decay`), or the constant `decay` when one is set."""
        if self.decay is not None:
            return self.decay
        return ema_decay(step, self.gamma, self.iteration_shift)

    def chunks(self) -> Iterator[list[int]]:
        """The parameters' positions in consecutive groups of at most `chunk_bytes` (a larger one alone)."""
        chunk, size = [], 0
        for index, shadow in enumerate(self.shadow):
            if chunk and size + shadow.nbytes > self.chunk_bytes:
                yield chunk
                chunk, size = [], 0
            chunk.append(index)
            size += shadow.nbytes
        if chunk:
            yield chunk

    @torch.no_grad()
    def step(self) -> float:
        """
        Fold the current parameters in: `ema = beta * ema + (1 - beta) * theta`, `chunk_bytes` of parameters at a
        time (the same elementwise arithmetic as one update of all of them). Returns `beta`.
        """
        if self._swapped:
            raise RuntimeError("The EMA cannot step while its weights are swapped into the model (swapped_in).")
        self.optimization_step += 1
        beta = self.get_decay(self.optimization_step)
        for chunk in self.chunks():
            shadows = [self.shadow[i] for i in chunk]
            sources = [
                _local_tensor(self.parameters[i]).to(shadow.device, torch.float32)
                for i, shadow in zip(chunk, shadows, strict=True)
            ]
            torch._foreach_mul_(shadows, beta)
            torch._foreach_add_(shadows, sources, alpha=1.0 - beta)
            del sources  # freed before the next chunk's copies
        return beta

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the EMA into the parameters (cast to their dtype)."""
        for parameter, shadow in zip(self.parameters, self.shadow, strict=True):
            _local_tensor(parameter).copy_(shadow)
        self._refresh_gathered()

    @torch.no_grad()
    def _swap(self) -> None:
        """
        Exchange the parameters and the EMA tensors in place, one parameter at a time; calling it twice restores
        both bit for bit. A float32 parameter trades values with its EMA tensor; another dtype (a ZeRO-3 partition
        in bfloat16) is kept aside, on the EMA's device, while the EMA is in.
        """
        for index, (parameter, shadow) in enumerate(zip(self.parameters, self.shadow, strict=True)):
            local = _local_tensor(parameter)
            if local.dtype != shadow.dtype:
                if self._swapped:
                    local.copy_(self._held.pop(index))
                else:
                    self._held[index] = local.to(shadow.device, copy=True)
                    local.copy_(shadow)
                continue
            held = local.to(shadow.device, copy=True)
            local.copy_(shadow)
            shadow.copy_(held)
            del held  # freed before the next parameter's copy: one parameter's bytes at a time
        self._swapped = not self._swapped
        self._refresh_gathered()

    def _current_shadow(self) -> list[torch.Tensor]:
        """The EMA tensors, wherever they are now: in the float32 parameters while swapped in."""
        if not self._swapped:
            return self.shadow
        return [
            shadow if index in self._held else _local_tensor(parameter).detach().to(shadow.device)
            for index, (parameter, shadow) in enumerate(zip(self.parameters, self.shadow, strict=True))
        ]

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """
        Run the block with the EMA weights in the model, then restore the trained weights exactly. A nested call (an
        `evaluate()` with `eval_use_ema` inside `trainer.ema_weights()`) finds the EMA already in and changes nothing.
        """
        if self._swapped:
            yield
            return
        self._reshard()
        self._swap()
        try:
            yield
        finally:
            self._reshard()
            self._swap()

    def _reshard(self) -> None:
        # FSDP2 modules left unsharded by a forward compute with their gathered copy, not the local shards we write.
        from torch.distributed.fsdp import FSDPModule

        for submodule in self.module.modules():
            if isinstance(submodule, FSDPModule):
                submodule.reshard()

    def _refresh_gathered(self) -> None:
        # ZeRO-3 keeps small "persistent" parameters gathered (and all of them inside a gather): re-gather those from
        # the partitions just written, as DeepSpeed does around an optimizer step (`partition` only frees the gathered
        # copy). A collective: every process swaps at the same time.
        gathered = [p for p in self.parameters if getattr(getattr(p, "ds_status", None), "name", None) == "AVAILABLE"]
        if gathered:
            gathered[0].partition(gathered)
            gathered[0].all_gather(gathered)

    def state_dict(self) -> dict:
        """`{"optimization_step", "sigma_rel", "iteration_shift", "decay", "shadow": {name: fp32 tensor}}`."""
        return {
            "optimization_step": self.optimization_step,
            "sigma_rel": self.sigma_rel,
            "iteration_shift": self.iteration_shift,
            "decay": self.decay,
            "shadow": dict(zip(self.names, self._current_shadow(), strict=True)),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a `state_dict()`; the tracked parameters (names and local shapes) must match."""
        if self._swapped:
            raise RuntimeError("Load the EMA state outside swapped_in(): its weights are in the model now.")
        shadow = state["shadow"]
        missing, unexpected = set(self.names) - set(shadow), set(shadow) - set(self.names)
        if missing or unexpected:
            raise ValueError(
                f"The EMA state does not match the trained parameters: missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(unexpected)[:3]}. Resume with the same model and peft_config, or set use_ema=False."
            )
        for name, tensor in zip(self.names, self.shadow, strict=True):
            if shadow[name].shape != tensor.shape:
                raise ValueError(
                    f"EMA tensor {name} has shape {tuple(shadow[name].shape)} in the checkpoint but "
                    f"{tuple(tensor.shape)} here: a sharded EMA resumes only with the same number of processes and "
                    "the same sharding (FSDP2 / ZeRO-3) as the run that saved it."
                )
            tensor.copy_(shadow[name])
        self.optimization_step = int(state["optimization_step"])

    def state_file_name(self, process_index: int, num_processes: int) -> str:
        """One file for an unsharded EMA; one per process (its shards) for a sharded one."""
        if not self.sharded:
            return EMA_STATE_NAME
        return f"ema_state-rank{process_index:05d}-of-{num_processes:05d}.safetensors"

    def save(self, folder: str, process_index: int = 0, num_processes: int = 1) -> None:
        """Write this process's EMA tensors and counters to `folder` (only process 0 writes an unsharded EMA)."""
        if not self.sharded and process_index != 0:
            return
        os.makedirs(folder, exist_ok=True)
        state = self.state_dict()
        metadata = {key: json.dumps(value) for key, value in state.items() if key != "shadow"}
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state["shadow"].items()}
        save_file(tensors, os.path.join(folder, self.state_file_name(process_index, num_processes)), metadata)

    def load(self, folder: str, process_index: int = 0, num_processes: int = 1) -> bool:
        """Load what `save` wrote to `folder`; `False` if there is no EMA state there."""
        path = os.path.join(folder, self.state_file_name(process_index, num_processes))
        if not os.path.isfile(path):
            if (
                self.sharded
                and os.path.isdir(folder)
                and any(name.startswith("ema_state") for name in os.listdir(folder))
            ):
                raise ValueError(
                    f"{folder} holds an EMA saved with another number of processes or sharding (no "
                    f"{os.path.basename(path)}). Resume with the same launch configuration, or set use_ema=False."
                )
            return False
        from safetensors import safe_open

        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
        state = {key: json.loads(value) for key, value in metadata.items()}
        state["shadow"] = load_file(path, device=str(self.shadow[0].device))
        self.load_state_dict(state)
        return True


class EMACallback(TrainerCallback):
    """
    Keeps the trainer's `ParameterEMA`: built when training starts (after the Trainer wraps and shards the model, and
    loads a checkpoint), updated after every optimizer step, written into each checkpoint's `ema/` folder by the
    trainer's `save_model`, and read back on resume.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.ema: ParameterEMA | None = None

    def start(self, resume_from_checkpoint: str | None) -> None:
        """Build the EMA from the current weights, then load the checkpoint's EMA state when resuming."""
        trainer, args = self.trainer, self.trainer.args
        self.ema = ParameterEMA(
            trainer.accelerator.unwrap_model(trainer.model),
            sigma_rel=args.ema_sigma_rel,
            iteration_shift=args.ema_iteration_shift,
            decay=args.ema_decay,
            device=args.ema_device,
        )
        if resume_from_checkpoint is None:
            return
        folder = os.path.join(resume_from_checkpoint, EMA_FOLDER)
        if not self.ema.load(folder, trainer.accelerator.process_index, trainer.accelerator.num_processes):
            # As the authors' loader: a checkpoint without EMA (use_ema was off) starts the EMA from its weights.
            self.ema.optimization_step = trainer.state.global_step
            logger.warning(
                f"{resume_from_checkpoint} has no EMA state ({EMA_FOLDER}/{EMA_STATE_NAME}); the EMA restarts from "
                "the resumed weights."
            )

    def save(self, checkpoint_folder: str) -> None:
        if self.ema is not None:
            accelerator = self.trainer.accelerator
            self.ema.save(
                os.path.join(checkpoint_folder, EMA_FOLDER), accelerator.process_index, accelerator.num_processes
            )

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.step()
