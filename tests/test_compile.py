# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""`torch_compile=True`: the rollouts and the training forwards both run the compiled denoiser."""

import pytest
from test_trainer import brightness, make_args, prompt_dataset

from trl_ddrl import DDRLTrainer


@pytest.mark.slow  # dynamo traces the model for the rollout and for the training shapes: about 20 s of CPU
def test_rollouts_run_the_compiled_denoiser(tiny_sd3_path, tmp_path, monkeypatch):
    # The "eager" backend traces with dynamo without generating code: the wiring of inductor, in seconds.
    args = make_args(tmp_path, torch_compile=True, torch_compile_backend="eager", max_steps=1)
    trainer = DDRLTrainer(tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset())
    sampled_with = []
    sample = trainer.adapter.sample

    def recording_sample(denoiser, *args, **kwargs):
        sampled_with.append(type(denoiser).__name__)
        return sample(denoiser, *args, **kwargs)

    monkeypatch.setattr(trainer.adapter, "sample", recording_sample)
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    # TRL's unwrap_model_for_generation keeps the compiled wrapper (accelerate's keep_torch_compile=True).
    assert sampled_with == ["OptimizedModule"]
    assert abs(trainer.state.log_history[0]["ratio/mean"] - 1) < args.clip_range
