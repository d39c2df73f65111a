# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The EMA of the trained weights: the authors' decay schedule on hand-sized tensors, and in the trainer."""

import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from test_trainer import _StopAt, brightness, lora_config, make_args, prompt_dataset, state_of
from transformers import TrainerCallback

from trl_ddrl import DDRLConfig, DDRLTrainer
from trl_ddrl.ema import EMA_FOLDER, EMA_STATE_NAME, ParameterEMA, ema_decay, power_ema_exponent
from trl_ddrl.memory import LiveBytes


# ---- the math, on hand-sized tensors ----------------------------------------------------------------------------------


def test_power_ema_exponent_has_the_requested_relative_width():
    gamma = power_ema_exponent(0.1)
    # The authors' cubic, and EDM2's definition it comes from: the profile t^gamma on [0, 1] has relative standard
    # deviation sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
    assert gamma**3 + 7 * gamma**2 + (16 - 100) * gamma + (12 - 100) == pytest.approx(0.0, abs=1e-9)
    assert np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(0.1, rel=1e-9)
    assert gamma == pytest.approx(6.9372, abs=1e-4)
    for sigma_rel in (0.0, 0.3, -0.1):
        with pytest.raises(ValueError, match="ema_sigma_rel"):
            power_ema_exponent(sigma_rel)


def test_decay_follows_the_official_beta_of_the_iteration():
    gamma = power_ema_exponent(0.1)
    # Official: `iteration` = optimizer steps taken before this update; beta = 0 if iteration < 1 else
    # (1 - 1 / (iteration + 1)) ** (gamma + 1).
    assert ema_decay(1, gamma) == 0.0
    assert ema_decay(2, gamma) == pytest.approx(0.5 ** (gamma + 1))
    assert ema_decay(10, gamma) == pytest.approx(0.9 ** (gamma + 1))
    assert ema_decay(1, gamma, iteration_shift=4) == pytest.approx((1 - 1 / 5) ** (gamma + 1))
    decays = [ema_decay(step, gamma) for step in range(1, 200)]
    assert decays == sorted(decays) and decays[-1] < 1.0


def test_step_copy_to_and_restore_on_a_linear_layer():
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    layer.bias.requires_grad_(False)  # frozen: not tracked
    ema = ParameterEMA(layer, sigma_rel=0.1, iteration_shift=3)
    assert ema.names == ["weight"]
    gamma = power_ema_exponent(0.1)

    expected = layer.weight.detach().clone()
    for step, delta in enumerate([1.0, -2.0, 0.25], start=1):
        with torch.no_grad():
            layer.weight.add_(delta)
        beta = ema.step()
        assert beta == pytest.approx((1 - 1 / (step + 3)) ** (gamma + 1))
        expected = beta * expected + (1 - beta) * layer.weight.detach()
        torch.testing.assert_close(ema.shadow[0], expected, rtol=0, atol=1e-6)
    assert ema.optimization_step == 3

    raw = layer.weight.detach().clone()
    assert not torch.allclose(raw, expected)
    with ema.swapped_in():
        torch.testing.assert_close(layer.weight.detach(), expected)
        assert torch.equal(layer.bias.detach(), torch.tensor([0.5, -0.5]))
    assert torch.equal(layer.weight.detach(), raw)


def test_constant_decay_and_state_dict_round_trip(tmp_path):
    layer = torch.nn.Linear(3, 1, bias=False)
    ema = ParameterEMA(layer, decay=0.75)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    assert ema.step() == 0.75
    torch.testing.assert_close(ema.shadow[0], 0.75 * start + 0.25 * 3.0 * start)

    ema.save(str(tmp_path))
    assert os.listdir(tmp_path) == [EMA_STATE_NAME]
    other = ParameterEMA(torch.nn.Linear(3, 1, bias=False), decay=0.75)
    assert other.load(str(tmp_path))
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.optimization_step == 1
    assert not ParameterEMA(layer).load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="shape"):
        ParameterEMA(torch.nn.Linear(4, 1, bias=False)).load(str(tmp_path))
    with pytest.raises(ValueError, match="missing"):
        ParameterEMA(torch.nn.Linear(3, 1)).load(str(tmp_path))


def test_bad_ema_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="ema_sigma_rel"):
        DDRLConfig(str(tmp_path), ema_sigma_rel=0.5)
    with pytest.raises(ValueError, match="ema_decay"):
        DDRLConfig(str(tmp_path), ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_iteration_shift"):
        DDRLConfig(str(tmp_path), ema_iteration_shift=-1)
    config = DDRLConfig(str(tmp_path))
    assert (config.use_ema, config.ema_sigma_rel, config.ema_iteration_shift, config.ema_decay) == (True, 0.1, 0, None)
    assert config.export_ema_weights


# ---- in the trainer ------------------------------------------------------------------------------------------------


class _RecordTrainedWeights(TrainerCallback):
    """The trainable weights after every optimizer step."""

    def __init__(self):
        self.trainer, self.weights = None, []

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("ema_device", [None, "cpu"])
def test_the_callback_updates_the_ema_after_each_optimizer_step(ema_device, tiny_sd3_path, tmp_path):
    # Micro-batches of 4 transitions: 4 micro-batches per optimizer step, one EMA update per optimizer step.
    record = _RecordTrainedWeights()
    args = make_args(
        tmp_path, max_steps=3, per_device_train_batch_size=4, ema_iteration_shift=2, ema_device=ema_device
    )
    trainer = DDRLTrainer(tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset(), callbacks=[record])
    record.trainer = trainer
    assert trainer.ema is None  # built when training starts, once the model is prepared
    trainer.train()
    assert trainer.ema.device == (torch.device(ema_device) if ema_device else None)
    assert trainer.args.gradient_accumulation_steps == 4
    assert trainer.ema.optimization_step == trainer.state.global_step == len(record.weights) == 3

    gamma = power_ema_exponent(0.1)
    initial = DiffusionPipeline.from_pretrained(tiny_sd3_path).transformer.state_dict()
    for name, shadow in zip(trainer.ema.names, trainer.ema.shadow, strict=True):
        expected = initial[name].float()
        for step, weights in enumerate(record.weights, start=1):
            beta = (1 - 1 / (step + 2)) ** (gamma + 1) if step + 1 >= 2 else 0.0
            expected = beta * expected + (1 - beta) * weights[name]
        torch.testing.assert_close(shadow, expected, rtol=0, atol=1e-6, msg=name)
    assert set(trainer.ema.names) == {name for name, _ in trainer.pipeline.transformer.named_parameters()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_restores_the_ema_exactly(lora, tiny_sd3_path, tmp_path):
    # A shifted schedule keeps a long memory (beta ~ 0.5 at step 3), so an EMA restarted from the resumed weights
    # would differ from the uninterrupted run's by far more than the tolerance.
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, ema_iteration_shift=10)
    if lora:
        common["learning_rate"] = 1e-2

    def trainer(output_dir, **kwargs):
        return DDRLTrainer(
            tiny_sd3_path,
            brightness,
            args=make_args(output_dir, **common),
            train_dataset=prompt_dataset(),
            peft_config=lora_config() if lora else None,
            **kwargs,
        )

    full = trainer(tmp_path / "full")
    full.train()
    interrupted = trainer(tmp_path / "resumed", callbacks=[_StopAt(2)])
    interrupted.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / EMA_FOLDER / EMA_STATE_NAME).is_file()
    saved = load_file(checkpoint / EMA_FOLDER / EMA_STATE_NAME)
    raw_at_checkpoint = {n: p.detach() for n, p in interrupted.pipeline.transformer.named_parameters()}
    assert set(saved) == set(interrupted.ema.names) and all(("lora" in name) == lora for name in saved)
    assert max((saved[n] - raw_at_checkpoint[n]).abs().max().item() for n in saved) > 1e-4

    def ema_of(run):
        return dict(zip(run.ema.names, run.ema.shadow, strict=True))

    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.ema.optimization_step == 4
    expected = ema_of(full)
    for name, value in ema_of(resumed).items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)
    for name, value in resumed.pipeline.transformer.state_dict().items():
        torch.testing.assert_close(value, full.pipeline.transformer.state_dict()[name], atol=1e-6, rtol=0, msg=name)

    # Control: the same resume from a checkpoint without its EMA state ends on a different EMA.
    stripped = tmp_path / "stripped"
    shutil.copytree(checkpoint, stripped)
    shutil.rmtree(stripped / EMA_FOLDER)
    restarted = trainer(tmp_path / "restarted")
    restarted.train(resume_from_checkpoint=str(stripped))
    assert restarted.ema.optimization_step == 4
    assert max((value - expected[name]).abs().max().item() for name, value in ema_of(restarted).items()) > 1e-5


def test_export_writes_the_ema_weights_and_keeps_the_raw_ones_in_training(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(
        tiny_sd3_path, brightness, args=make_args(tmp_path / "ema", ema_decay=0.9), train_dataset=prompt_dataset()
    )
    trainer.train()
    raw = {key: value.clone() for key, value in trainer.pipeline.transformer.state_dict().items()}
    trainer.save_model()
    for key, value in trainer.pipeline.transformer.state_dict().items():
        assert torch.equal(value, raw[key]), f"{key}: training weights not restored after the export"

    exported = load_file(tmp_path / "ema" / "transformer" / "diffusion_pytorch_model.safetensors")
    ema = dict(zip(trainer.ema.names, trainer.ema.shadow, strict=True))
    assert set(exported) == set(raw) and set(ema) < set(exported)
    for name, value in exported.items():
        assert torch.equal(value, ema.get(name, raw[name])), name  # buffers (pos_embed) are not averaged
    assert any(not torch.equal(exported[name], raw[name]) for name in ema)
    card = (tmp_path / "ema" / "README.md").read_text()
    assert "exponential moving average (EMA)" in card and "constant decay 0.9" in card

    # The same run with export_ema_weights=False exports the raw weights.
    args = make_args(tmp_path / "raw", ema_decay=0.9, export_ema_weights=False)
    raw_trainer = DDRLTrainer(tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset())
    raw_trainer.train()
    raw_trainer.save_model()
    exported_raw = load_file(tmp_path / "raw" / "transformer" / "diffusion_pytorch_model.safetensors")
    for key, value in raw_trainer.pipeline.transformer.state_dict().items():
        assert torch.equal(exported_raw[key], value), key
    assert "raw trained weights" in (tmp_path / "raw" / "README.md").read_text()


def test_lora_ema_tracks_the_adapter_and_is_what_is_exported(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(
        tiny_sd3_path,
        brightness,
        args=make_args(tmp_path, learning_rate=1e-2, ema_decay=0.9),
        train_dataset=prompt_dataset(),
        peft_config=lora_config(),
    )
    trainer.train()
    assert trainer.ema.names and all("lora" in name for name in trainer.ema.names)
    trainer.save_model()
    exported = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    # diffusers' LoRA format: `transformer.<module>.lora_A.weight` for peft's `<module>.lora_A.default.weight`.
    ema = {
        f"transformer.{name.replace('.default', '')}": value
        for name, value in zip(trainer.ema.names, trainer.ema.shadow)
    }
    assert set(exported) == set(ema)
    for name, value in ema.items():
        assert torch.equal(exported[name], value), name

    def sample(pipeline):
        return pipeline(
            ["a cat"],
            num_inference_steps=3,
            height=16,
            width=16,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            max_sequence_length=16,
        ).images

    raw_images = sample(trainer.pipeline)
    with trainer.ema_weights():
        ema_images = sample(trainer.pipeline)
    assert torch.equal(sample(trainer.pipeline), raw_images)  # restored
    fresh = DiffusionPipeline.from_pretrained(tiny_sd3_path)
    fresh.load_lora_weights(tmp_path)
    torch.testing.assert_close(sample(fresh), ema_images, atol=1e-5, rtol=0)
    assert not torch.allclose(ema_images, raw_images, atol=1e-5)


def test_use_ema_false_keeps_no_ema(tiny_sd3_path, tmp_path):
    args = make_args(tmp_path, use_ema=False, save_strategy="steps", save_steps=2)
    trainer = DDRLTrainer(tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset())
    trainer.train()
    assert trainer.ema is None
    assert not (tmp_path / "checkpoint-2" / EMA_FOLDER).exists()
    with trainer.ema_weights():  # a no-op without an EMA
        pass


def test_evaluate_with_the_ema_weights(tiny_sd3_path, tmp_path):
    from test_evaluation import make_trainer

    trainer = make_trainer(tiny_sd3_path, tmp_path, ema_decay=0.9, learning_rate=1e-2, eval_use_ema=False)
    trainer.train()
    raw = trainer.evaluate()
    with trainer.ema_weights():
        ema = trainer.evaluate(metric_key_prefix="eval_ema")
    assert trainer.evaluate()["eval_data_loss"] == raw["eval_data_loss"]  # the raw weights are back
    assert ema["eval_ema_data_loss"] != raw["eval_data_loss"]
    # Evaluation is deterministic for equal weights: the EMA weights written in by hand give the same metrics.
    denoiser = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        parameters = dict(denoiser.named_parameters())
        for name, shadow in zip(trainer.ema.names, trainer.ema.shadow, strict=True):
            parameters[name].copy_(shadow)
    by_hand = trainer.evaluate(metric_key_prefix="eval_hand")
    assert by_hand["eval_hand_data_loss"] == ema["eval_ema_data_loss"]
    assert by_hand["eval_hand_reward"] == ema["eval_ema_reward"]


def _blocks(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """8 bias-free 256 x 256 layers: 2 MiB of float32 weights, 256 KiB each."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(256, 256, bias=False) for _ in range(8)]).to(dtype)


def _peak_bytes(run, ema: ParameterEMA) -> int:
    """The most bytes of tensors allocated by `run()` alive at once, beyond the parameters and the EMA's tensors."""
    counter = LiveBytes(fake=False)
    for tensor in [*ema.parameters, *ema.shadow]:
        counter.register(tensor)
    with counter.window() as window, counter:
        run()
    return int(window.peak - counter.weighted(window.start))


def test_swapping_the_ema_in_and_out_copies_one_parameter_at_a_time():
    model = _blocks()
    ema = ParameterEMA(model, decay=0.5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    ema.step()
    raw, expected = state_of(model), [shadow.clone() for shadow in ema.shadow]

    def evaluate_under_ema():
        with ema.swapped_in():
            for parameter, shadow in zip(model.parameters(), expected, strict=True):
                assert torch.equal(parameter, shadow)
            inside = ema.state_dict()["shadow"]  # the EMA, though its values are in the model now
            assert all(torch.equal(inside[name], shadow) for name, shadow in zip(ema.names, expected, strict=True))

    # One 256 KiB parameter at a time in and out (a store() of the whole model held all 2 MiB).
    assert _peak_bytes(evaluate_under_ema, ema) <= 256 * 2**10
    assert all(torch.equal(value, raw[key]) for key, value in model.state_dict().items())  # restored bit for bit
    assert all(torch.equal(shadow, value) for shadow, value in zip(ema.shadow, expected, strict=True))


@pytest.mark.parametrize("device", [None, "cpu"])
def test_chunked_update_of_low_precision_weights_allocates_one_chunk(device):
    """bfloat16 parameters (a ZeRO-3 partition): each step makes float32 copies of one 512 KiB chunk, not 4 MiB."""
    model = _blocks(torch.bfloat16)
    whole = ParameterEMA(model, decay=0.9)
    chunked = ParameterEMA(model, decay=0.9, device=device, chunk_bytes=512 * 2**10)
    assert list(chunked.chunks()) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(-2.0)
    assert _peak_bytes(whole.step, whole) >= 2 * 2**20  # the float32 copy of every parameter at once
    assert _peak_bytes(chunked.step, chunked) <= 512 * 2**10
    assert all(torch.equal(a, b) for a, b in zip(whole.shadow, chunked.shadow, strict=True))
    assert all(shadow.device.type == "cpu" and shadow.dtype == torch.float32 for shadow in chunked.shadow)
    raw = state_of(model)
    with chunked.swapped_in():
        assert all(torch.equal(p, s.to(torch.bfloat16)) for p, s in zip(model.parameters(), chunked.shadow))
        with pytest.raises(RuntimeError, match="swapped_in"):
            chunked.step()
    assert all(torch.equal(value, raw[key]) for key, value in model.state_dict().items())


def test_ema_device_must_be_cpu_or_unset(tmp_path):
    assert DDRLConfig(str(tmp_path), ema_device="cpu").ema_device == "cpu"
    with pytest.raises(ValueError, match="ema_device='cuda'.*'cpu'"):
        DDRLConfig(str(tmp_path), ema_device="cuda")
