# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
`ParameterEMA` on an FSDP2-sharded model (`fully_shard`, gloo, CPU), against the same training without sharding.
accelerate runs FSDP configs as plain multi-CPU DDP on a CPU, so this script shards with torch directly. Run with
`torchrun --nproc_per_node 2 fsdp2_ema.py <output dir>`; each rank writes `rank<r>.json`. Used by
tests/test_distributed.py.
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from trl_ddrl.ema import ParameterEMA


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    model[2].bias.requires_grad_(False)  # frozen: not averaged
    return model


def gather(shard: torch.Tensor, full_shape: torch.Size) -> torch.Tensor:
    """The full tensor from the dim-0 shards of every rank (FSDP2's `Shard(0)`, unpadded local views)."""
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([shard.shape[0]]))
    rows = max(int(size) for size in sizes)
    padded = torch.zeros(rows, *full_shape[1:])
    padded[: shard.shape[0]] = shard
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(size)] for part, size in zip(parts, sizes)])


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = build()
    sharded = copy.deepcopy(reference)
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer)
    fully_shard(sharded)

    models = {"reference": reference, "sharded": sharded}
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05) for name, m in models.items()
    }
    emas = {name: ParameterEMA(m, iteration_shift=5) for name, m in models.items()}
    inputs = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(1))  # the same batches on every rank
    for batch in inputs:
        for name, model in models.items():
            model(batch).pow(2).mean().backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            emas[name].step()

    ema, expected = emas["sharded"], emas["reference"]
    shapes = {name: p.shape for name, p in reference.named_parameters()}
    gathered = {name: gather(shadow, shapes[name]) for name, shadow in zip(ema.names, ema.shadow)}
    ema_error = max((gathered[n] - s).abs().max().item() for n, s in zip(expected.names, expected.shadow))

    probe = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        raw_output = sharded(probe)
        with ema.swapped_in(), expected.swapped_in():
            ema_output, expected_output = sharded(probe), reference(probe)
            exported = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
        restored_output = sharded(probe)
    export_error = max((exported[n] - s).abs().max().item() for n, s in zip(expected.names, expected.shadow))

    folder = os.path.join(output_dir, "ema")
    ema.save(folder, rank, world)
    dist.barrier()
    fresh = copy.deepcopy(build())
    for layer in (fresh[0], fresh[2]):
        fully_shard(layer)
    fully_shard(fresh)
    reloaded = ParameterEMA(fresh, iteration_shift=5)
    loaded = reloaded.load(folder, rank, world)
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(
            {
                "sharded": ema.sharded,
                "names": ema.names,
                "local_numel": sum(shadow.numel() for shadow in ema.shadow),
                "trainable_numel": sum(p.numel() for p in reference.parameters() if p.requires_grad),
                "updates": ema.optimization_step,
                "ema_error": ema_error,
                "ema_vs_raw": (ema_output - raw_output).abs().max().item(),
                "swapped_output_error": (ema_output - expected_output).abs().max().item(),
                "restored_output_error": (restored_output - raw_output).abs().max().item(),
                "export_error": export_error,
                "loaded": loaded,
                "reload_error": max((a - b).abs().max().item() for a, b in zip(reloaded.shadow, ema.shadow)),
                "reloaded_updates": reloaded.optimization_step,
            },
            file,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
