# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The sampler loop and the loss never read device values back to the host.

On a GPU such a read (`.item()`, `float(t)`, `if t.any()`, boolean-mask indexing, ...) blocks the host until the
stream has caught up, once per step or micro-batch. A `TorchFunctionMode` sees every such call, so this is checked on
the CPU.
"""

from collections import Counter

import pytest
import torch
from test_trainer import brightness, make_args, prompt_dataset
from tiny_models import tiny_sd15_pipeline
from torch.overrides import TorchFunctionMode

from trl_ddrl import DDRLTrainer
from trl_ddrl.rollout import order_micro_batches


HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.nonzero,
    torch.nonzero,
}


def _is_boolean_mask_index(func, args) -> bool:
    if func is not torch.Tensor.__getitem__:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in index)


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's values back to the host."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls[func.__name__] += 1
        elif _is_boolean_mask_index(func, args):
            self.calls["boolean mask index"] += 1
        return func(*args, **(kwargs or {}))


def record_host_reads(trainer: DDRLTrainer) -> tuple[list[Counter], list[Counter]]:
    """Wrap the trainer's rollout sampler and loss; return the host reads of each call of each."""
    rollouts, losses = [], []

    def recorded(function, calls):
        def wrapper(*args, **kwargs):
            with HostReads() as mode:
                result = function(*args, **kwargs)
            calls.append(mode.calls)
            return result

        return wrapper

    trainer.adapter.sample = recorded(trainer.adapter.sample, rollouts)
    trainer.compute_loss = recorded(trainer.compute_loss, losses)
    return rollouts, losses


@pytest.mark.parametrize(
    "family, overrides",
    [
        # Flow matching with every loss term, the data term on the first trained step only.
        ("sd3", dict(data_beta=0.1, data_on_first_step_only=True, kl_beta=0.1)),
        # DDIM with CFG and the data term on every transition.
        ("sd15", dict(data_beta=0.1, guidance_scale=3.0)),
        # An SDE window with the CPS sampler.
        ("sd3", dict(data_beta=0.1, sde_window_size=2, sampler="cps")),
    ],
)
def test_sampler_and_loss_do_not_read_device_values(family, overrides, tiny_sd3_path, tmp_path):
    model = tiny_sd3_path if family == "sd3" else tiny_sd15_pipeline()
    trainer = DDRLTrainer(
        model=model,
        reward_funcs=brightness,
        args=make_args(tmp_path, per_device_train_batch_size=4, **overrides),
        train_dataset=prompt_dataset(with_images=True),
    )
    rollouts, losses = record_host_reads(trainer)
    trainer.train()

    assert len(rollouts) == 2 and len(losses) >= 4
    # The first rollout builds the cached noise schedule (one read, once per run).
    assert all(not calls for calls in rollouts[1:]), rollouts
    assert all(not calls for calls in losses), losses


def test_host_reads_are_detected():
    with HostReads() as mode:
        values = torch.arange(4.0)
        float(values[0]), bool(values.any()), values[values > 1]
    assert mode.calls == Counter({"__float__": 1, "__bool__": 1, "boolean mask index": 1})


def test_order_micro_batches_puts_first_step_rows_first():
    num_steps, size = 3, 4
    order = torch.randperm(5 * num_steps, generator=torch.Generator().manual_seed(0))

    reordered, data_rows = order_micro_batches(order, num_steps, size, data_on_first_step_only=True)

    assert sorted(reordered.tolist()) == list(range(5 * num_steps))
    for chunk, original, rows in zip(reordered.split(size), order.split(size), data_rows, strict=True):
        assert sorted(chunk.tolist()) == sorted(original.tolist())  # the same transitions in each micro-batch
        assert rows == int((original % num_steps == 0).sum())
        assert bool((chunk[:rows] % num_steps == 0).all()) and not bool((chunk[rows:] % num_steps == 0).any())

    unchanged, all_rows = order_micro_batches(order, num_steps, size, data_on_first_step_only=False)
    assert torch.equal(unchanged, order) and all_rows == [4, 4, 4, 3]
