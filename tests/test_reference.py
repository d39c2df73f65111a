# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The reference model's memory options: means precomputed after the rollout, the reference offloaded to the CPU."""

import pytest
import torch
from test_trainer import brightness, make_args, prompt_dataset, state_of

from trl_ddrl import DDRLConfig, DDRLTrainer


def run(path, output_dir, monkeypatch, **options):
    """Two optimizer steps with the KL term, 4 micro-batches each; the weights, KL logs, reference moves and calls."""
    args = make_args(output_dir, kl_beta=0.1, per_device_train_batch_size=4, logging_steps=1, **options)
    trainer = DDRLTrainer(path, brightness, args=args, train_dataset=prompt_dataset())
    moves, calls = [], []
    to, step = trainer.ref_model.to, trainer._reference_step
    monkeypatch.setattr(trainer.ref_model, "to", lambda device: moves.append(str(device)) or to(device))
    monkeypatch.setattr(trainer, "_reference_step", lambda inputs: calls.append(len(inputs["states"])) or step(inputs))
    trainer.train()
    kl = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    return state_of(trainer.pipeline.transformer), kl, moves, calls


def test_precomputed_reference_means_and_an_offloaded_reference_train_bit_identically(
    tiny_sd3_path, tmp_path, monkeypatch
):
    expected, expected_kl, moves, calls = run(tiny_sd3_path, tmp_path / "plain", monkeypatch)
    assert moves == [] and len(calls) == 8 and len(expected_kl) == 2  # a reference forward per micro-batch
    for name, options in {
        "precomputed": dict(precompute_reference_means=True),
        "offloaded": dict(offload_reference_model=True),
        "both": dict(precompute_reference_means=True, offload_reference_model=True, offload_trajectories=True),
    }.items():
        weights, kl, moves, calls = run(tiny_sd3_path, tmp_path / name, monkeypatch, **options)
        assert kl == expected_kl, name
        assert all(torch.equal(weights[key], value) for key, value in expected.items()), name
        assert len(calls) == 8, name  # the same forwards, after the rollout or inside the replay
        # Offloaded: to the device and back around each use, once per rollout when the means are precomputed.
        uses = 0 if "offload_reference_model" not in options else 2 if "precompute_reference_means" in options else 8
        assert len(moves) == 2 * uses, name


def test_precomputed_reference_means_refuse_a_reference_that_changes_within_a_rollout(tmp_path):
    with pytest.raises(ValueError, match="precompute_reference_means=True with update_ref_every=1"):
        DDRLConfig(
            str(tmp_path),
            kl_beta=0.1,
            update_ref_every=1,
            precompute_reference_means=True,
            gradient_accumulation_steps=1,
            per_device_train_batch_size=8,
        )
