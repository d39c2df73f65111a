# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The SD 1.x and SDXL adapters (DDIM on epsilon / v-prediction UNets) on tiny random pipelines."""

import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from tiny_models import tiny_sd15_pipeline, tiny_sdxl_pipeline

from trl_ddrl import DDRLConfig, DDRLTrainer
from trl_ddrl.pipelines import SamplingSettings, StableDiffusionAdapter, StableDiffusionXLAdapter, get_adapter


BUILDERS = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}
PROMPTS = ["a cat", "a red car"]


def brightness(prompts, images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


def train_dataset() -> Dataset:
    generator = np.random.default_rng(0)
    images = [generator.random((16, 16, 3), dtype=np.float32) for _ in PROMPTS]
    return Dataset.from_dict({"prompt": PROMPTS, "image": images})


def ddrl_config(output_dir, **overrides) -> DDRLConfig:
    kwargs = dict(
        output_dir=str(output_dir),
        num_generations=2,
        prompts_per_step=2,
        num_inference_steps=3,
        per_device_train_batch_size=2,
        eta=1.0,
        data_beta=0.1,
        learning_rate=1e-3,
        max_steps=2,
        report_to="none",
        save_strategy="no",
        seed=0,
        # The authors' 50 warm-up steps would leave these one- and two-step runs at a learning rate near 0.
        warmup_steps=0,
    )
    kwargs.update(overrides)
    return DDRLConfig(**kwargs)


@pytest.mark.parametrize(
    "family, pipeline_class, adapter_class",
    [
        ("sd15", StableDiffusionPipeline, StableDiffusionAdapter),
        ("sdxl", StableDiffusionXLPipeline, StableDiffusionXLAdapter),
    ],
)
def test_adapter_is_chosen_from_the_pipeline_class(family, pipeline_class, adapter_class):
    pipeline = BUILDERS[family]()
    assert isinstance(pipeline, pipeline_class)
    adapter = get_adapter(pipeline, SamplingSettings(num_inference_steps=4, eta=1.0))
    assert type(adapter) is adapter_class
    assert adapter.denoiser is pipeline.unet
    assert adapter.latent_shape() == (4, 8, 8) and adapter.resolution == (16, 16)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_resolution_off_the_vae_grid_is_a_clear_error(family):
    with pytest.raises(ValueError, match=r"height=31 and width=32 must be multiples of 2 pixels"):
        get_adapter(BUILDERS[family](), SamplingSettings(num_inference_steps=3, eta=1.0, height=31, width=32))


def test_unsupported_models_raise_errors_naming_the_field():
    pipeline = tiny_sd15_pipeline()
    pipeline.scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        get_adapter(pipeline, SamplingSettings(num_inference_steps=3, eta=1.0))
    pipeline = tiny_sd15_pipeline()
    pipeline.unet.register_to_config(time_cond_proj_dim=8)
    with pytest.raises(ValueError, match="time_cond_proj_dim=8"):
        get_adapter(pipeline, SamplingSettings(num_inference_steps=3, eta=1.0))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_on_policy_replay_ratio_is_one(family, prediction_type):
    pipeline = BUILDERS[family](prediction_type=prediction_type)
    adapter = get_adapter(pipeline, SamplingSettings(num_inference_steps=4, eta=1.0, guidance_scale=2.0))
    conditioning = adapter.encode_prompts(PROMPTS, adapter.device)
    noise = adapter.sample_noise(2, generator=torch.Generator().manual_seed(0))
    trajectory = adapter.sample(pipeline.unet, conditioning, noise, generator=torch.Generator().manual_seed(1))
    assert trajectory.latents.shape == (2, 5, 4, 8, 8) and trajectory.log_probs.shape == (2, 4)
    assert (trajectory.log_probs[:, :-1] != 0).all() and (trajectory.log_probs[:, -1] == 0).all()
    with torch.no_grad():
        for i in range(3):
            step_index = torch.full((2,), i, dtype=torch.long)
            replay = adapter.transition_log_prob(
                pipeline.unet, trajectory.latents[:, i], trajectory.latents[:, i + 1], step_index, conditioning
            )
            ratio = torch.exp(replay.log_prob - trajectory.log_probs[:, i])
            torch.testing.assert_close(ratio, torch.ones(2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eta_zero_sampling_matches_the_pipelines_ddim(family, prediction_type):
    pipeline = BUILDERS[family](prediction_type=prediction_type)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False)
    adapter = get_adapter(pipeline, SamplingSettings(num_inference_steps=4, eta=0.0, guidance_scale=3.0))
    noise = adapter.sample_noise(2, generator=torch.Generator().manual_seed(0))
    trajectory = adapter.sample(pipeline.unet, adapter.encode_prompts(PROMPTS, adapter.device), noise)
    kwargs = dict(num_inference_steps=4, guidance_scale=3.0, eta=0.0)
    expected = pipeline(PROMPTS, latents=noise.clone(), output_type="latent", **kwargs).images
    torch.testing.assert_close(trajectory.latents[:, -1], expected, rtol=1e-4, atol=1e-5)
    images = pipeline(PROMPTS, latents=noise.clone(), output_type="pt", **kwargs).images
    torch.testing.assert_close(adapter.decode(trajectory.latents[:, -1]), images, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weighting", ["uniform", "edm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_the_schedulers_training_loss(prediction_type, weighting):
    pipeline = tiny_sd15_pipeline(prediction_type=prediction_type)
    adapter = get_adapter(pipeline, SamplingSettings(num_inference_steps=4, eta=1.0, data_loss_weighting=weighting))
    conditioning = adapter.encode_prompts(PROMPTS, adapter.device)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    step_index = torch.tensor([0, 2])
    with torch.no_grad():
        loss = adapter.diffusion_loss(pipeline.unet, x0, conditioning, step_index, noise)
        scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        scheduler.set_timesteps(4)
        timesteps = scheduler.timesteps[step_index]
        noisy = scheduler.add_noise(x0, noise, timesteps)
        output = pipeline.unet(noisy, timesteps, encoder_hidden_states=conditioning["prompt_embeds"]).sample
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
    # EDM's weight on the x0 error: 1 / alpha_bar on the epsilon MSE, 1 on the v MSE (tests/test_fidelity.py)
    alpha_prod = scheduler.alphas_cumprod[timesteps]
    weight = 1 / alpha_prod if weighting == "edm" and prediction_type == "epsilon" else torch.ones(2)
    expected = weight * ((output - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_training_changes_only_the_unet_and_saves_a_loadable_pipeline(family, tmp_path):
    pipeline = BUILDERS[family]()
    frozen = {
        name: {key: value.clone() for key, value in module.state_dict().items()}
        for name, module in pipeline.components.items()
        if isinstance(module, torch.nn.Module) and name != "unet"
    }
    unet_before = {key: value.clone() for key, value in pipeline.unet.state_dict().items()}
    trainer = DDRLTrainer(pipeline, brightness, args=ddrl_config(tmp_path), train_dataset=train_dataset())
    trainer.train()

    logs = trainer.state.log_history[0]
    assert abs(logs["ratio/mean"] - 1.0) < 1e-3 and logs["loss/data"] > 0
    assert any(not torch.equal(unet_before[key], value) for key, value in pipeline.unet.state_dict().items())
    for name, state in frozen.items():
        module = getattr(pipeline, name)
        assert all(torch.equal(state[key], value) for key, value in module.state_dict().items()), name

    trainer.save_model(str(tmp_path / "final"))
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "final"))
    assert type(loaded) is type(pipeline)
    with trainer.ema_weights():  # the export holds the EMA of the trained weights
        for key, value in pipeline.unet.state_dict().items():
            torch.testing.assert_close(loaded.unet.state_dict()[key], value, rtol=0, atol=0)
    images = loaded(["a cat"], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_training_saves_diffusers_lora_weights(family, tmp_path):
    pipeline = BUILDERS[family]()
    lora = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    trainer = DDRLTrainer(
        pipeline, brightness, args=ddrl_config(tmp_path, max_steps=1), train_dataset=train_dataset(), peft_config=lora
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    assert os.path.isfile(tmp_path / "lora" / "pytorch_lora_weights.safetensors")

    fresh = BUILDERS[family]()
    fresh.load_lora_weights(str(tmp_path / "lora"))
    adapter = get_adapter(fresh, SamplingSettings(num_inference_steps=3, eta=1.0))
    conditioning = adapter.encode_prompts(PROMPTS, adapter.device)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    step_index = torch.tensor([0, 1])
    with torch.no_grad():
        expected = trainer.adapter.predict(pipeline.unet, latents, step_index, conditioning)
        loaded = adapter.predict(fresh.unet, latents, step_index, conditioning)
        base = adapter.predict(BUILDERS[family]().unet, latents, step_index, conditioning)
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-5)
