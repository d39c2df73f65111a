# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Checks every model family's adapter passes on its tiny pipeline: training, saving, reloading, LoRA."""

import os

import torch
from datasets import Dataset
from diffusers import DiffusionPipeline
from peft import LoraConfig
from test_pipelines_unet import ddrl_config

from trl_ddrl import DDRLTrainer
from trl_ddrl.pipelines import get_adapter


PROMPTS = ["a cat", "a red car"]
CPU = torch.device("cpu")


def mean_pixel(prompts, images, **kwargs):
    return images.flatten(1).mean(dim=1).tolist()


def module_states(pipeline) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every `nn.Module` component's weights, by component name."""
    return {
        name: {key: value.clone() for key, value in module.state_dict().items()}
        for name, module in pipeline.components.items()
        if isinstance(module, torch.nn.Module)
    }


def changed_components(pipeline, before: dict[str, dict[str, torch.Tensor]]) -> set[str]:
    """The components whose weights differ from `before`."""
    return {
        name
        for name, state in before.items()
        if any(not torch.equal(value, getattr(pipeline, name).state_dict()[key]) for key, value in state.items())
    }


def train_one_step(pipeline, tmp_path, rows: dict, peft_config=None, **config) -> DDRLTrainer:
    """One optimizer step of DDRL (data term on) on `rows` (a `prompt` and an `image` column)."""
    args = ddrl_config(tmp_path, max_steps=1, **config)
    trainer = DDRLTrainer(
        pipeline, mean_pixel, args=args, train_dataset=Dataset.from_dict(rows), peft_config=peft_config
    )
    trainer.train()
    assert any("loss/data" in entry for entry in trainer.state.log_history)
    return trainer


def assert_reloaded_pipeline_has_the_trained_weights(trainer: DDRLTrainer, names: tuple[str, ...]) -> None:
    """`save_model` writes a repo that `DiffusionPipeline.from_pretrained` loads with the trained denoiser(s)."""
    output_dir = trainer.args.output_dir
    trainer.save_model()
    assert os.path.isfile(os.path.join(output_dir, "samples.png"))
    reloaded = DiffusionPipeline.from_pretrained(output_dir)
    assert type(reloaded) is type(trainer.pipeline)
    for name in names:
        expected = getattr(trainer.pipeline, name).state_dict()
        for key, value in getattr(reloaded, name).state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}.{key} differs after reloading"


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])


def assert_lora_loads_into_a_fresh_pipeline(trainer: DDRLTrainer, builder, conditioning_for, load=None) -> None:
    """
    The LoRA that `trainer` saved loads with `load_lora_weights` (or `load(pipeline, folder)`) into a fresh pipeline
    from `builder`, whose velocity then equals the trained one and differs from the base model's at steps 0 and 1.
    `conditioning_for(adapter)` gives the conditioning.
    """
    output_dir = trainer.args.output_dir
    trainer.save_model()
    fresh, base = builder(), builder()
    if load is None:
        assert os.path.isfile(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
        fresh.load_lora_weights(output_dir)
    else:
        load(fresh, output_dir)
    adapter = get_adapter(fresh, trainer.adapter.settings)
    conditioning = conditioning_for(adapter)
    latents = torch.randn(len(PROMPTS), *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    step_index = torch.tensor([0, 1])
    with torch.no_grad():
        trained = trainer.adapter.predict(trainer.adapter.denoiser, latents, step_index, conditioning)
        loaded = adapter.predict(adapter.denoiser, latents, step_index, conditioning)
        untouched = adapter.predict(get_adapter(base, adapter.settings).denoiser, latents, step_index, conditioning)
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(untouched, trained, atol=1e-5)
