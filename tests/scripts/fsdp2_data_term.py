# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The trainer's data term (`DDRLTrainer._data_loss`) on an FSDP2-sharded model (`fully_shard`, gloo, CPU): a
micro-batch without data rows (`data_on_first_step_only`) and one with data rows, each added to a policy term and
backpropagated, then an optimizer step; then the same gradients from one backward of policy + data term and
from two (`separate_data_backward`). accelerate runs FSDP configs as plain multi-CPU DDP on a CPU, so this script
shards with torch directly. Run with `torchrun --nproc_per_node 2 fsdp2_data_term.py <output dir>`; each rank writes
`rank<r>.json`. Used by tests/test_distributed.py.
"""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from trl_ddrl import DDRLTrainer


class SquareLoss:
    """An adapter whose diffusion loss is the mean square of the model's output on `x0`, per row."""

    def diffusion_loss(self, model, x0, conditioning, step_index, noise):
        return model(x0).pow(2).mean(dim=1)


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    trainer = SimpleNamespace(args=SimpleNamespace(data_noise="rollout"), adapter=SquareLoss())
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "advantages": torch.ones(4),
        "data_latents": torch.randn(4, 4, generator=generator),
        "initial_noise": torch.randn(4, 4, generator=generator),
        "data_conditioning": {},
        "step_index": torch.zeros(4, dtype=torch.long),
    }
    record = {"data_terms": []}
    for data_rows in (0, 2):  # the same on every rank: their micro-batches share one order
        policy = model(torch.randn(4, 4, generator=generator)).mean()
        data = DDRLTrainer._data_loss(trainer, model, {**inputs, "num_data_rows": data_rows})
        (policy + 0.5 * data).backward()
        optimizer.step()
        optimizer.zero_grad()
        record["data_terms"].append(float(data))
    with torch.no_grad():
        expected = model(inputs["data_latents"][:2]).pow(2).mean(dim=1).sum() / 4
        record["data_term_after"] = float(DDRLTrainer._data_loss(trainer, model, {**inputs, "num_data_rows": 2}))
        record["expected_after"] = float(expected)
    # `separate_data_backward`: the data term backpropagated alone before the policy term's forward gives the
    # gradients of one backward of the sum (FSDP2 reduce-scatters twice and accumulates the sharded gradients).
    gradients = {}
    policy_input = torch.randn(4, 4, generator=generator)
    for separate in (False, True):
        data = DDRLTrainer._data_loss(trainer, model, {**inputs, "num_data_rows": 2})
        if separate:
            (0.5 * data).backward()
            model(policy_input).mean().backward()
        else:
            (model(policy_input).mean() + 0.5 * data).backward()
        gradients[separate] = [p.grad.full_tensor().clone() for p in model.parameters()]
        optimizer.zero_grad()
    record["separate_backward_max_diff"] = max(
        float((a - b).abs().max()) for a, b in zip(gradients[False], gradients[True])
    )
    record["gradient_norm"] = float(torch.stack([g.norm() for g in gradients[False]]).norm())
    record["sharded"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(record, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
