# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""float32 master weights for pipelines loaded in bfloat16 / float16 (trl_ddrl/precision.py and the trainer)."""

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from test_trainer import brightness, make_args, prompt_dataset
from tiny_models import tiny_cosmos2_5_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

from trl_ddrl import DDRLTrainer
from trl_ddrl.precision import autocast_in_load_dtype, in_dtype, upcast_trained_parameters


def test_upcast_makes_only_the_trained_parameters_float32_in_place():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    trained = model[1].weight
    assert upcast_trained_parameters(model) == torch.bfloat16
    assert model[1].weight is trained and trained.dtype == torch.float32 and model[1].bias.dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16  # frozen: stays in the load dtype
    assert upcast_trained_parameters(torch.nn.Linear(2, 2)) == torch.float32


def test_upcast_refuses_trained_parameters_of_several_dtypes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3).half())
    with pytest.raises(ValueError, match="torch_dtype"):
        upcast_trained_parameters(model)


def test_autocast_follows_the_load_dtype_unless_the_config_chose():
    args = SimpleNamespace(bf16=False, fp16=False, mixed_precision="no")
    autocast_in_load_dtype(args, torch.bfloat16)
    assert (args.bf16, args.fp16, args.mixed_precision) == (True, False, "bf16")
    args = SimpleNamespace(bf16=False, fp16=False, mixed_precision="no")
    autocast_in_load_dtype(args, torch.float16)
    assert (args.bf16, args.fp16, args.mixed_precision) == (False, True, "fp16")
    for dtype, bf16, fp16 in ((torch.float32, False, False), (torch.bfloat16, False, True)):
        args = SimpleNamespace(bf16=bf16, fp16=fp16, mixed_precision="no")
        autocast_in_load_dtype(args, dtype)
        assert (args.bf16, args.fp16, args.mixed_precision) == (bf16, fp16, "no")


def test_in_dtype_casts_floating_tensors_only():
    state = in_dtype({"w": torch.ones(2), "step": torch.tensor(3)}, torch.bfloat16)
    assert state["w"].dtype == torch.bfloat16 and state["step"].dtype == torch.int64


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=True)


def low_precision_trainer(path, tmp_path, dtype: str, peft: bool, **overrides):
    args = make_args(tmp_path, model_init_kwargs={"torch_dtype": dtype}, **overrides)
    return DDRLTrainer(
        path, brightness, args=args, train_dataset=prompt_dataset(), peft_config=lora() if peft else None
    )


def trained(trainer) -> dict[str, torch.Tensor]:
    return {name: p for name, p in trainer.pipeline.transformer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_low_precision_load_trains_float32_weights_and_saves_in_the_load_dtype(tiny_sd3_path, tmp_path, dtype, peft):
    trainer = low_precision_trainer(tiny_sd3_path, tmp_path, dtype, peft)
    load_dtype = getattr(torch, dtype)
    assert trainer.load_dtype == load_dtype
    assert trained(trainer) and all(p.dtype == torch.float32 for p in trained(trainer).values())
    frozen = [p for p in trainer.pipeline.transformer.parameters() if not p.requires_grad]
    assert bool(frozen) == peft and all(p.dtype == load_dtype for p in frozen)  # the frozen base under LoRA
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert getattr(trainer.pipeline, name).dtype == load_dtype
    assert trainer.args.mixed_precision == {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    trainer.save_model()
    if peft:
        saved = load_file(os.path.join(tmp_path, "pytorch_lora_weights.safetensors"))
    else:
        saved = load_file(os.path.join(tmp_path, "transformer", "diffusion_pytorch_model.safetensors"))
    assert saved and {value.dtype for value in saved.values()} == {load_dtype}
    assert all(p.dtype == torch.float32 for p in trained(trainer).values())  # the save cast a copy


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_bfloat16_load_changes_essentially_every_trained_weight_at_lr_1e_5(tiny_sd3_path, tmp_path, peft):
    trainer = low_precision_trainer(
        tiny_sd3_path, tmp_path, "bfloat16", peft, learning_rate=1e-5, max_steps=3, use_ema=True
    )
    before = {name: p.detach().clone() for name, p in trained(trainer).items()}
    trainer.train()
    changed = torch.cat([(p.detach() != before[name]).flatten() for name, p in trained(trainer).items()])
    assert changed.float().mean() > 0.95  # the rest get no gradient (2% in float32 too)
    logs = [entry for entry in trainer.state.log_history if "loss/policy" in entry]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    # The first micro-batch replays the rollout's own weights: ratio 1 within the clip range.
    assert abs(logs[0]["ratio/mean"] - 1) < trainer.args.clip_range
    assert all(shadow.dtype == torch.float32 for shadow in trainer.ema.shadow)


@pytest.mark.parametrize("choice, trained_experts", [("all", 2), ("low_noise", 1)])
def test_every_trained_wan22_expert_is_float32_and_the_frozen_one_stays_bfloat16(tmp_path, choice, trained_experts):
    from family_checks import train_one_step
    from test_pipelines_wan22 import SIZE, video_rows
    from tiny_models import tiny_wan22_pipeline

    pipeline = tiny_wan22_pipeline().to(torch.bfloat16)
    trainer = train_one_step(pipeline, tmp_path, video_rows(), train_timesteps=[0, 1], train_experts=choice, **SIZE)
    dtypes = {
        name: {p.dtype for p in getattr(pipeline, name).parameters()} for name in ("transformer", "transformer_2")
    }
    assert list(dtypes.values()).count({torch.float32}) == trained_experts
    assert list(dtypes.values()).count({torch.bfloat16}) == 2 - trained_experts
    trainer.save_model()
    for name in ("transformer", "transformer_2"):
        saved = load_file(os.path.join(tmp_path, name, "diffusion_pytorch_model.safetensors"))
        assert {value.dtype for value in saved.values()} == {torch.bfloat16}, name


def image_rows() -> dict:
    rng = np.random.default_rng(0)
    return {"prompt": ["a cat", "a dog"], "image": [rng.random((16, 16, 3), dtype=np.float32) for _ in range(2)]}


def video_rows() -> dict:
    rng = np.random.default_rng(0)
    return {"prompt": ["a cat", "a dog"], "image": [rng.random((5, 32, 32, 3), dtype=np.float32) for _ in range(2)]}


FAMILIES = {
    "sd3": (tiny_sd3_pipeline, image_rows, dict(height=16, width=16, max_sequence_length=16)),
    "flux": (tiny_flux_pipeline, image_rows, dict(height=16, width=16, max_sequence_length=16)),
    "cosmos2_5": (
        tiny_cosmos2_5_pipeline,
        video_rows,
        dict(height=32, width=32, num_frames=5, max_sequence_length=16),
    ),
}


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_ddrl_step_of_a_bfloat16_pipeline(tmp_path, family, peft):
    from family_checks import lora_config, mean_pixel
    from test_pipelines_unet import ddrl_config

    builder, rows, config = FAMILIES[family]
    args = ddrl_config(tmp_path, max_steps=1, use_ema=True, **config)
    trainer = DDRLTrainer(
        builder().to(torch.bfloat16),
        mean_pixel,
        args=args,
        train_dataset=Dataset.from_dict(rows()),
        peft_config=lora_config() if peft else None,
    )
    before = {name: p.detach().clone() for name, p in trained(trainer).items()}
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss/policy" in entry)
    # The replay of the rollout's own weights, under bf16 autocast: ratio 1 within the clip range.
    assert abs(log["ratio/mean"] - 1) < args.clip_range and log["clip_ratio"] == 0
    assert math.isfinite(log["loss"]) and math.isfinite(log["loss/data"])
    changed = torch.cat([(p.detach() != before[name]).flatten() for name, p in trained(trainer).items()])
    assert changed.float().mean() > 0.9
    assert all(p.dtype == torch.float32 for p in trained(trainer).values())
    assert all(shadow.dtype == torch.float32 for shadow in trainer.ema.shadow)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_bnb_8bit"])
def test_fused_and_8bit_adamw_step_the_float32_master_weights(tiny_sd3_path, tmp_path, optim):
    """`optim="adamw_torch_fused"` (one kernel per step) and bitsandbytes' 8-bit AdamW (where installed)."""
    if optim == "adamw_bnb_8bit":
        pytest.importorskip("bitsandbytes")
    trainer = low_precision_trainer(
        tiny_sd3_path, tmp_path, "bfloat16", False, max_steps=1, use_ema=False, optim=optim
    )
    before = {name: p.detach().clone() for name, p in trained(trainer).items()}
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
    assert all(p.dtype == torch.float32 for p in trained(trainer).values())
    assert any(not torch.equal(p, before[name]) for name, p in trained(trainer).items())
    if optim == "adamw_torch_fused":
        assert optimizer.defaults["fused"] is True
    else:
        # 8-bit state for every tensor of at least bitsandbytes' min_8bit_size (4096) elements: 2 bytes per weight.
        large = [p for p in optimizer.state if p.numel() >= 4096]
        assert large and all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in large)
