# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""End-to-end tests of DDRLTrainer on a tiny random Stable Diffusion 3 pipeline (CPU, no network)."""

import os
import zlib

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from tiny_models import tiny_sd3_pipeline
from transformers import TrainerCallback

from trl_ddrl import DDRLConfig, DDRLTrainer
from trl_ddrl.rewards import RewardFunctionError, resolve_reward_funcs


PROMPTS = ["a cat", "a dog", "a red car", "a tree"]


def prompt_dataset(with_images: bool = False) -> Dataset:
    columns = {"prompt": PROMPTS}
    if with_images:
        rng = np.random.default_rng(0)
        columns["image"] = [rng.random((16, 16, 3), dtype=np.float32) for _ in PROMPTS]
    return Dataset.from_dict(columns)


def make_args(output_dir, **overrides) -> DDRLConfig:
    settings = dict(
        output_dir=str(output_dir),
        num_generations=4,
        prompts_per_step=2,
        num_inference_steps=4,
        per_device_train_batch_size=8,
        max_steps=2,
        max_sequence_length=16,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_beta=0.0,
        # The authors' 50 warm-up steps would leave these few-step runs at a learning rate near 0.
        warmup_steps=0,
        activation_checkpointing=False,  # on by default; these tiny models run faster without
    )
    settings.update(overrides)
    return DDRLConfig(**settings)


def brightness(prompts, images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[key], value) for key, value in module.state_dict().items())


def assert_same_weights(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)


def test_training_changes_the_transformer_only(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(
        tiny_sd3_path, brightness, args=make_args(tmp_path, data_beta=0.1), train_dataset=prompt_dataset(True)
    )
    pipeline = trainer.pipeline
    frozen = {
        name: state_of(getattr(pipeline, name)) for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    }
    transformer_before = state_of(pipeline.transformer)

    trainer.train()

    assert changed(transformer_before, pipeline.transformer)
    for name, before in frozen.items():
        assert not changed(before, getattr(pipeline, name)), f"{name} was modified"
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in pipeline.transformer.parameters()}
    logs = [entry for entry in trainer.state.log_history if "loss/policy" in entry]
    assert len(logs) == 2
    for key in (
        "reward",
        "rewards/brightness/mean",
        "rewards/brightness/std",
        "advantages/std",
        "frac_reward_zero_std",
        "loss/policy",
        "loss/data",
        "ratio/mean",
        "clip_ratio",
        "learning_rate",
    ):
        assert key in logs[0], key
    # The first micro-batch of each iteration replays the rollout's own policy: the ratio is 1.
    assert logs[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-3)


def test_data_beta_adds_the_data_loss(tiny_sd3_path, tmp_path):
    losses = {}
    for data_beta in (0.0, 1.0):
        trainer = DDRLTrainer(
            tiny_sd3_path,
            brightness,
            args=make_args(tmp_path / str(data_beta), data_beta=data_beta, max_steps=1),
            train_dataset=prompt_dataset(True),
        )
        trainer.train()
        losses[data_beta] = trainer.state.log_history[0]
    assert "loss/data" not in losses[0.0]
    assert losses[1.0]["loss/data"] > 0
    # Same seed, same rollouts: the policy term is the same and the data term is added on top; the optimised loss is
    # the sum times loss_scale (the authors' 10), the logged terms are unscaled.
    assert losses[1.0]["loss/policy"] == pytest.approx(losses[0.0]["loss/policy"], abs=1e-6)
    scale = trainer.args.loss_scale
    assert scale == 10.0
    assert losses[1.0]["loss"] == pytest.approx(losses[0.0]["loss"] + scale * losses[1.0]["loss/data"], rel=1e-4)


def mean_brightness(pipeline) -> float:
    generator = torch.Generator().manual_seed(123)
    images = pipeline(
        PROMPTS * 2,
        num_inference_steps=6,
        height=16,
        width=16,
        output_type="pt",
        generator=generator,
        max_sequence_length=16,
    ).images
    return images.mean().item()


def test_brightness_reward_is_learned(tmp_path):
    pipeline = tiny_sd3_pipeline(with_t5=False)
    before = mean_brightness(pipeline)
    args = make_args(
        tmp_path,
        max_steps=30,
        num_inference_steps=6,
        per_device_train_batch_size=12,
        learning_rate=3e-3,
        clip_range=1.0,
        eta=1.0,
        data_beta=0.0,
    )
    trainer = DDRLTrainer(pipeline, brightness, args=args, train_dataset=prompt_dataset())
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.01
    assert mean_brightness(pipeline) > before + 0.01


def test_saved_pipeline_reloads_and_samples(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(tiny_sd3_path, "brightness", args=make_args(tmp_path), train_dataset=prompt_dataset())
    trainer.train()
    trainer.save_model()

    for name in ("model_index.json", "transformer/config.json", "samples.png", "README.md", "training_args.bin"):
        assert os.path.exists(tmp_path / name), name
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    with trainer.ema_weights():  # the export holds the EMA weights (use_ema and export_ema_weights by default)
        exported = state_of(trainer.pipeline.transformer)
    for key, value in exported.items():
        assert torch.equal(reloaded.transformer.state_dict()[key], value), key
    images = reloaded(
        "a cat", num_inference_steps=2, height=16, width=16, output_type="pt", max_sequence_length=16
    ).images
    assert images.shape == (1, 3, 16, 16)

    card = (tmp_path / "README.md").read_text()
    assert "library_name: diffusers" in card
    assert "2512.04332" in card
    assert "brightness" in card
    assert "exponential moving average (EMA)" in card


def test_the_final_save_writes_the_denoiser_weights_once(tiny_sd3_path, tmp_path, monkeypatch):
    # The pipeline's own save wrote the denoiser, which was then rewritten from the state dict: twice the bytes.
    from diffusers import SD3Transformer2DModel

    import trl_ddrl.utils

    written, pipeline_saves = [], []
    save = trl_ddrl.utils.save_torch_state_dict
    monkeypatch.setattr(
        trl_ddrl.utils,
        "save_torch_state_dict",
        lambda state, folder, **kwargs: written.append(folder) or save(state, folder, **kwargs),
    )
    monkeypatch.setattr(
        SD3Transformer2DModel, "save_pretrained", lambda self, *args, **kw: pipeline_saves.append(args)
    )
    args = make_args(tmp_path, max_steps=1)
    trainer = DDRLTrainer(tiny_sd3_path, "brightness", args=args, train_dataset=prompt_dataset())
    trainer.train()
    trainer.save_model()
    assert pipeline_saves == [] and written == [str(tmp_path / "transformer")]
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    with trainer.ema_weights():
        assert_same_weights(reloaded.transformer, state_of(trainer.pipeline.transformer))


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_failure_saves_the_last_finished_step_and_the_same_trainer_resumes(tiny_sd3_path, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=100, data_beta=0.1)
    full = DDRLTrainer(
        tiny_sd3_path, brightness, args=make_args(tmp_path / "full", **common), train_dataset=prompt_dataset(True)
    )
    full.train()

    calls = []

    def flaky_brightness(prompts, images, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 3:  # the third iteration's scoring, after two finished optimizer steps
            raise ConnectionError("reward server down")
        return brightness(prompts, images)

    output_dir = tmp_path / "flaky"
    trainer = DDRLTrainer(
        tiny_sd3_path, flaky_brightness, args=make_args(output_dir, **common), train_dataset=prompt_dataset(True)
    )
    with pytest.raises(RewardFunctionError, match="reward server down"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert {"optimizer.pt", "trainer_state.json", "transformer"} <= set(os.listdir(output_dir / "checkpoint-2"))

    trainer.train(resume_from_checkpoint=True)  # the server is back
    assert trainer.state.global_step == 4
    assert_same_weights(trainer.pipeline.transformer, full.pipeline.transformer.state_dict())


def test_ctrl_c_inside_an_iteration_saves_and_the_same_trainer_resumes(tiny_sd3_path, tmp_path):
    # Micro-batches of 4 transitions: each iteration is several micro-batches, and Ctrl-C comes in the middle of one.
    common = dict(max_steps=3, save_strategy="steps", save_steps=100, per_device_train_batch_size=4)
    full = DDRLTrainer(
        tiny_sd3_path, brightness, args=make_args(tmp_path / "full", **common), train_dataset=prompt_dataset()
    )
    full.train()
    micro_batches_per_step = full.args.gradient_accumulation_steps
    assert micro_batches_per_step > 1

    trainer = DDRLTrainer(
        tiny_sd3_path, brightness, args=make_args(tmp_path / "stopped", **common), train_dataset=prompt_dataset()
    )
    compute_loss, calls = trainer.compute_loss, []

    def interrupted_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == micro_batches_per_step + 2:  # the second micro-batch of the second optimizer step
            raise KeyboardInterrupt
        return compute_loss(*args, **kwargs)

    trainer.compute_loss = interrupted_loss
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.state.global_step == 1 and (tmp_path / "stopped" / "checkpoint-1" / "optimizer.pt").exists()

    trainer.train(resume_from_checkpoint=True)
    assert_same_weights(trainer.pipeline.transformer, full.pipeline.transformer.state_dict())


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian"
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_matches_uninterrupted_run(lora, tiny_sd3_path, tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, data_beta=0.1)
    if lora:
        common["learning_rate"] = 1e-2

    def trainer(output_dir, **kwargs):
        return DDRLTrainer(
            tiny_sd3_path,
            brightness,
            args=make_args(output_dir, **common),
            train_dataset=prompt_dataset(True),
            peft_config=lora_config() if lora else None,
            **kwargs,
        )

    full = trainer(tmp_path / "full")
    full.train()

    interrupted = trainer(tmp_path / "resumed", callbacks=[_StopAt(2)])
    interrupted.train()
    assert interrupted.state.global_step == 2
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    weights = "pytorch_lora_weights.safetensors" if lora else "transformer/config.json"
    for name in ("optimizer.pt", "scheduler.pt", "trainer_state.json", weights):
        assert (checkpoint / name).exists(), name

    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    expected = full.pipeline.transformer.state_dict()
    halfway = interrupted.pipeline.transformer.state_dict()
    lora_keys = [key for key in expected if "lora" in key]
    assert bool(lora_keys) == lora
    assert_same_weights(resumed.pipeline.transformer, expected)
    # The last two steps moved the trained weights: matching the full run is not matching the checkpoint.
    assert any(not torch.equal(halfway[key], expected[key]) for key in (lora_keys or expected))


def test_lora_is_saved_in_diffusers_format_and_loads(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(
        tiny_sd3_path,
        brightness,
        args=make_args(tmp_path, learning_rate=1e-2),
        train_dataset=prompt_dataset(),
        peft_config=lora_config(),
    )
    base_weights = {k: v.clone() for k, v in trainer.pipeline.transformer.state_dict().items() if "lora" not in k}
    trainer.train()
    trainer.save_model()

    for key, value in trainer.pipeline.transformer.state_dict().items():
        if "lora" not in key:
            assert torch.equal(base_weights[key], value), f"base weight {key} changed under LoRA"
    weights = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") and "base_model.model" not in key for key in weights)
    assert not (tmp_path / "transformer").exists()

    def sample(pipeline):
        return pipeline(
            PROMPTS[:2],
            num_inference_steps=3,
            height=16,
            width=16,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            max_sequence_length=16,
        ).images

    with trainer.ema_weights():  # the saved adapter is the EMA's
        trained = sample(trainer.pipeline)
    fresh = DiffusionPipeline.from_pretrained(tiny_sd3_path)
    untouched = sample(fresh)
    fresh.load_lora_weights(tmp_path)
    loaded = sample(fresh)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    assert not torch.allclose(untouched, trained, atol=1e-5)


def test_reverse_kl_with_reference_model(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(
        tiny_sd3_path,
        brightness,
        args=make_args(tmp_path, kl_beta=0.5, max_steps=3, update_ref_every=2),
        train_dataset=prompt_dataset(),
    )
    assert trainer.ref_model is not None
    trainer.train()
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert len(kls) == 3
    assert kls[0] == pytest.approx(0.0, abs=1e-8)  # policy == reference before the first update
    assert kls[1] > 0
    # Synced at step 2: the reference equals the policy as it was then, so the KL restarts near 0.
    assert kls[2] < kls[1]


def test_failing_reward_names_the_function_and_prompt(tiny_sd3_path, tmp_path):
    calls = []

    def broken(prompts, images, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after one finished optimizer step
            raise ZeroDivisionError("boom")
        return brightness(prompts, images)

    trainer = DDRLTrainer(tiny_sd3_path, broken, args=make_args(tmp_path), train_dataset=prompt_dataset())
    with pytest.raises(RewardFunctionError, match="'broken'.*ZeroDivisionError: boom"):
        trainer.train()
    # save_strategy="no": no checkpoint is written after the failure either.
    assert trainer.state.global_step == 1
    assert not any(name.startswith("checkpoint-") for name in os.listdir(tmp_path))


def test_drop_group_policy_skips_unscored_groups(tiny_sd3_path, tmp_path):
    def half_scored(prompts, images, **kwargs):
        return [None if prompt == prompts[0] else 1.0 + i for i, prompt in enumerate(prompts)]

    trainer = DDRLTrainer(
        tiny_sd3_path,
        half_scored,
        args=make_args(tmp_path, reward_error_policy="drop_group", max_steps=1),
        train_dataset=prompt_dataset(),
    )
    trainer.train()
    assert trainer.state.log_history[0]["reward/dropped_groups"] == 1.0


def test_wrong_reward_length_fails_loudly(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(
        tiny_sd3_path,
        lambda prompts, images, **kwargs: [1.0],
        args=make_args(tmp_path),
        train_dataset=prompt_dataset(),
    )
    with pytest.raises(RewardFunctionError, match="returned 1 rewards for 8 samples"):
        trainer.train()


def test_bad_inputs_have_clear_errors(tiny_sd3_path, tmp_path):
    with pytest.raises(ValueError, match="no 'prompt' column"):
        DDRLTrainer(
            tiny_sd3_path, brightness, args=make_args(tmp_path), train_dataset=Dataset.from_dict({"text": ["a"]})
        )
    with pytest.raises(ValueError, match="train_dataset has 1 rows, but prompts_per_step=2"):
        DDRLTrainer(
            tiny_sd3_path, brightness, args=make_args(tmp_path), train_dataset=Dataset.from_dict({"prompt": ["a"]})
        )
    with pytest.raises(ValueError, match="train_dataset has 0 rows"):
        DDRLTrainer(
            tiny_sd3_path, brightness, args=make_args(tmp_path), train_dataset=Dataset.from_dict({"prompt": []})
        )
    with pytest.raises(
        ValueError, match=r"height=31 and width=16 must be multiples of 4 pixels .* height=32, width=16"
    ):
        DDRLTrainer(tiny_sd3_path, brightness, args=make_args(tmp_path, height=31), train_dataset=prompt_dataset())
    with pytest.raises(ValueError, match="data_beta=0.1 needs data images"):
        DDRLTrainer(tiny_sd3_path, brightness, args=make_args(tmp_path, data_beta=0.1), train_dataset=prompt_dataset())
    with pytest.raises(ValueError, match="reward_weights has 2 values"):
        DDRLTrainer(
            tiny_sd3_path,
            brightness,
            args=make_args(tmp_path, reward_weights=[1.0, 2.0]),
            train_dataset=prompt_dataset(),
        )
    with pytest.raises(ValueError, match=r"model=.*missing.: no such folder.*Fix the path"):
        DDRLTrainer(str(tmp_path / "missing"), brightness, args=make_args(tmp_path), train_dataset=prompt_dataset())


def test_multiple_rewards_are_logged_separately(tiny_sd3_path, tmp_path):
    def darkness(prompts, images, **kwargs):
        return (1 - images.mean(dim=(1, 2, 3))).tolist()

    trainer = DDRLTrainer(
        tiny_sd3_path,
        [brightness, darkness],
        args=make_args(tmp_path, reward_weights=[1.0, 0.5], max_steps=1),
        train_dataset=prompt_dataset(),
    )
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["rewards/brightness/mean"] == pytest.approx(1 - log["rewards/darkness/mean"], abs=1e-5)
    assert log["reward"] == pytest.approx(
        log["rewards/brightness/mean"] + 0.5 * log["rewards/darkness/mean"], abs=1e-5
    )


def test_rewards_overlap_the_next_rollout_chunk(tiny_sd3_path, tmp_path):
    import threading

    next_chunk_started = threading.Event()
    calls = []

    def slow_reward(prompts, images, **kwargs):
        # The first chunk's reward waits for the second chunk's sampling to begin: only possible if they overlap.
        overlapped = next_chunk_started.wait(timeout=20) if not calls else True
        calls.append((threading.current_thread().name, overlapped))
        return images.mean(dim=(1, 2, 3)).tolist()

    trainer = DDRLTrainer(
        tiny_sd3_path,
        slow_reward,
        args=make_args(tmp_path, max_steps=1, rollout_batch_size=4),
        train_dataset=prompt_dataset(),
    )
    sample = trainer.adapter.sample

    sampled = []

    def recording_sample(*args, **kwargs):
        if sampled:
            next_chunk_started.set()
        sampled.append(1)
        return sample(*args, **kwargs)

    trainer.adapter.sample = recording_sample
    trainer.train()
    assert len(calls) == 2
    assert all(name.startswith("ddrl-reward") for name, _ in calls)
    assert calls[0][1], "the first chunk's reward did not run while the second chunk was sampled"


def test_lora_reference_is_the_adapter_disabled_model(tiny_sd3_path, tmp_path):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = DDRLTrainer(
        tiny_sd3_path,
        brightness,
        args=make_args(tmp_path, kl_beta=0.5, learning_rate=1e-2),
        train_dataset=prompt_dataset(),
        peft_config=lora,
    )
    assert trainer.ref_model is None  # no copy of the denoiser: the base weights are the reference
    trainer.train()
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert kls[0] == pytest.approx(0.0, abs=1e-10)  # LoRA B starts at zero: policy == base
    assert kls[1] > 0
    lora_layers = [m for m in trainer.pipeline.transformer.modules() if isinstance(m, BaseTunerLayer)]
    assert lora_layers and not any(
        layer.disable_adapters for layer in lora_layers
    )  # re-enabled after each reference pass


def test_base_model_data_source_regularises_towards_cached_base_samples(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(
        tiny_sd3_path,
        brightness,
        args=make_args(tmp_path, data_beta=0.5, data_source="base_model", max_steps=3),
        train_dataset=prompt_dataset(),  # prompts only: no images needed
    )
    assert trainer.ref_model is not None
    base = {key: value.clone() for key, value in trainer.pipeline.transformer.state_dict().items()}
    trainer.train()
    assert all("loss/data" in entry for entry in trainer.state.log_history[:3])
    seen = set(trainer.rollout.synthetic_latents)
    assert seen and seen <= set(PROMPTS)

    # The cached samples are the base model's deterministic samples, not the trained policy's.
    prompt = sorted(seen)[0]
    adapter = trainer.adapter
    conditioning = adapter.encode_prompts([prompt], torch.device("cpu"))
    noise = adapter.sample_noise(1, generator=torch.Generator().manual_seed(zlib.crc32(prompt.encode())))
    policy_sample = adapter.sample(trainer.pipeline.transformer, conditioning, noise, eta=0.0).latents[0, -1]
    trainer.pipeline.transformer.load_state_dict(base)
    base_sample = adapter.sample(trainer.pipeline.transformer, conditioning, noise, eta=0.0).latents[0, -1]
    torch.testing.assert_close(trainer.rollout.synthetic_latents[prompt], base_sample, atol=1e-5, rtol=0)
    assert not torch.allclose(policy_sample, base_sample, atol=1e-5)


def test_base_model_data_source_refuses_a_data_dataset(tiny_sd3_path, tmp_path):
    with pytest.raises(ValueError, match="data_source='base_model'"):
        DDRLTrainer(
            tiny_sd3_path,
            brightness,
            args=make_args(tmp_path, data_beta=0.5, data_source="base_model"),
            train_dataset=prompt_dataset(),
            data_dataset=prompt_dataset(True),
        )


@pytest.mark.slow
def test_torch_compile_of_the_denoiser(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(
        tiny_sd3_path, brightness, args=make_args(tmp_path, torch_compile=True), train_dataset=prompt_dataset()
    )
    before = state_of(trainer.pipeline.transformer)
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert changed(before, trainer.pipeline.transformer)
    # The compiled replay of the first micro-batch reproduces the (also compiled) rollout's transitions.
    assert trainer.state.log_history[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-3)


def test_activation_checkpointing_checkpoints_the_training_forwards(tiny_sd3_path, tmp_path, monkeypatch):
    checkpointed = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        checkpointed.append(torch.is_grad_enabled())
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    trainer = DDRLTrainer(
        tiny_sd3_path,
        brightness,
        args=make_args(tmp_path, activation_checkpointing=True, data_beta=0.1),
        train_dataset=prompt_dataset(with_images=True),
    )
    before = state_of(trainer.pipeline.transformer)
    trainer.train()  # the rollouts pause checkpointing through diffusers' switch, not transformers'
    assert checkpointed and all(checkpointed)
    assert trainer.pipeline.transformer.is_gradient_checkpointing
    assert changed(before, trainer.pipeline.transformer)


def test_num_iterations_reuses_each_rollout_for_several_updates(tiny_sd3_path, tmp_path):
    trainer = DDRLTrainer(
        tiny_sd3_path,
        brightness,
        args=make_args(tmp_path, num_iterations=2, max_steps=4, logging_steps=1),
        train_dataset=prompt_dataset(),
    )
    rollouts = []
    generate = trainer.rollout.generate
    trainer.rollout.generate = lambda *args: rollouts.append(args[1]) or generate(*args)
    trainer.train()

    assert rollouts == [0, 1]  # two rollouts for four optimizer steps
    ratios = [entry["ratio/mean"] for entry in trainer.state.log_history if "ratio/mean" in entry]
    # The first pass over a rollout replays it under the sampling policy; the second, after one update, does not.
    assert ratios[0] == pytest.approx(1.0, abs=1e-5) and ratios[2] == pytest.approx(1.0, abs=1e-5)
    assert abs(ratios[1] - 1.0) > 1e-5 and abs(ratios[3] - 1.0) > 1e-5


def test_synchronous_rewards_independent_data_noise_and_denoiser_only_saves(tiny_sd3_path, tmp_path):
    args = make_args(
        tmp_path, async_rewards=False, data_beta=0.1, data_noise="independent", save_full_pipeline=False, max_steps=1
    )
    trainer = DDRLTrainer(tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset(with_images=True))
    assert trainer.rollout.reward_executor is None
    trainer.train()
    assert trainer.state.log_history[0]["loss/data"] > 0
    trainer.save_model()
    assert os.path.isdir(tmp_path / "transformer") and not os.path.exists(tmp_path / "model_index.json")


def test_reward_names_are_readable_metric_keys():
    funcs, names = resolve_reward_funcs(["jpeg_compressibility", "http://127.0.0.1:8000", brightness])
    assert names == ["jpeg_compressibility", "remote_127.0.0.1:8000", "brightness"]
    assert all(callable(func) for func in funcs)


def test_unique_with_index_maps_every_item_to_its_first_twin():
    from trl_ddrl.utils import unique_with_index

    assert unique_with_index(["a", "b", "a", "c", "b"]) == (["a", "b", "c"], [0, 1, 0, 2, 1])
    frames = [torch.ones(2), torch.zeros(2), torch.ones(2)]
    unique, index = unique_with_index(frames, same=torch.equal)
    assert len(unique) == 2 and index == [0, 1, 0]


def test_an_iteration_reads_each_prompt_row_once(tiny_sd3_path, tmp_path, monkeypatch):
    # The sampler repeats every prompt's row num_generations times; decoding its image each time is wasted work.
    import trl_ddrl.rollout as rollout_module  # the rollout reads the rows (trl_ddrl/rollout.py)

    read_positions = []
    read_row = rollout_module.read_row

    def counting_read_row(dataset, position, name):
        read_positions.append((name, position))
        return read_row(dataset, position, name)

    monkeypatch.setattr(rollout_module, "read_row", counting_read_row)
    args = make_args(tmp_path, data_beta=0.1, max_steps=1)
    trainer = DDRLTrainer(tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset(with_images=True))
    trainer.train()
    train_reads = [position for name, position in read_positions if name == "train_dataset"]
    assert len(train_reads) == args.prompts_per_step == len(set(train_reads))
    assert trainer.state.log_history[0]["loss/data"] > 0


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_pipeline_dtype_is_passed_as_dtype_without_the_deprecation_warning(tiny_sd3_path, key, recwarn):
    args = DDRLConfig(output_dir="unused", report_to="none", model_init_kwargs={key: "float16"})
    pipeline = DDRLTrainer._load_pipeline(tiny_sd3_path, args)
    assert pipeline.transformer.dtype == torch.float16
    assert not [w for w in recwarn if "torch_dtype" in str(w.message)]
