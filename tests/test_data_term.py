# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The data term's weight per iteration (`DDRLTrainer._data_loss` over the micro-batches of `order_micro_batches`)."""

from types import SimpleNamespace

import pytest
import torch

from trl_ddrl import DDRLTrainer
from trl_ddrl.rollout import RolloutEngine, order_micro_batches


class FirstColumnLoss:
    """An adapter whose diffusion loss of a row is the first value of its data latents."""

    def diffusion_loss(self, model, x0, conditioning, step_index, noise):
        return x0[:, 0]


def iteration_data_term(sample_losses: torch.Tensor, num_steps: int, size: int, first_only: bool, seed: int) -> float:
    """The data term of one iteration: the mean of `_data_loss` over its micro-batches (one optimizer step)."""
    trainer = SimpleNamespace(args=SimpleNamespace(data_noise="rollout"), adapter=FirstColumnLoss())
    num_samples = len(sample_losses)
    order = torch.randperm(num_samples * num_steps, generator=torch.Generator().manual_seed(seed))
    order, data_rows = order_micro_batches(order, num_steps, size, first_only)
    terms = []
    for index, rows in enumerate(data_rows):
        sample = order[index * size : (index + 1) * size] // num_steps
        inputs = {
            "num_data_rows": rows,
            "advantages": torch.zeros(len(sample)),
            "data_latents": sample_losses[sample, None],
            "initial_noise": torch.zeros(len(sample), 1),
            "data_conditioning": {},
            "step_index": torch.zeros(len(sample), dtype=torch.long),
        }
        terms.append(DDRLTrainer._data_loss(trainer, None, inputs))
    return float(torch.stack(terms).mean())


@pytest.mark.parametrize("seed", range(20))
def test_data_on_first_step_only_weighs_the_data_loss_one_over_k(seed):
    sample_losses = torch.rand(8, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64) + 0.5
    num_steps = 5
    # The authors: the data term on the first of K trained steps, the loss averaged over the K steps -> 1 / K.
    term = iteration_data_term(sample_losses, num_steps, size=4, first_only=True, seed=seed)
    assert term == pytest.approx(float(sample_losses.mean()) / num_steps, rel=1e-12)
    # On every trained step the data term is the mean data loss.
    term = iteration_data_term(sample_losses, num_steps, size=4, first_only=False, seed=seed)
    assert term == pytest.approx(float(sample_losses.mean()), rel=1e-12)


def test_the_micro_batch_order_is_the_same_on_every_rank():
    def generator(rank: int, per_rank: bool) -> int:
        trainer = SimpleNamespace(args=SimpleNamespace(seed=3), mesh=SimpleNamespace(data_parallel_rank=rank))
        return RolloutEngine.generator(trainer, 2, 3, per_rank=per_rank).initial_seed()

    assert generator(0, per_rank=False) == generator(1, per_rank=False) == generator(0, per_rank=True)
    assert generator(0, per_rank=True) != generator(1, per_rank=True)
