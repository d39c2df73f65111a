# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The FLUX.2 adapter (`Flux2Pipeline` and `Flux2KleinPipeline`) on tiny random pipelines."""

import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import DiffusionPipeline, Flux2KleinPipeline, Flux2Pipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft import LoraConfig
from test_pipelines_flow import assert_replay_ratio_is_one, mean_pixel
from test_pipelines_unet import ddrl_config
from tiny_models import tiny_flux2_pipeline

from trl_ddrl import DDRLTrainer
from trl_ddrl.pipelines import Flux2Adapter, SamplingSettings, get_adapter


PROMPTS = ["a cat", "a red car"]
CPU = torch.device("cpu")


def settings(**overrides) -> SamplingSettings:
    kwargs = dict(num_inference_steps=3, eta=1.0, height=16, width=16, max_sequence_length=16)
    kwargs.update(overrides)
    return SamplingSettings(**kwargs)


@pytest.mark.parametrize("klein, guidance_scale", [(False, 1.0), (False, 2.5), (True, 1.0), (True, 4.0)])
def test_deterministic_sampling_matches_the_pipeline(klein, guidance_scale):
    """FLUX.2-dev embeds the guidance (4.0 by default); klein with guidance_scale > 1 runs CFG."""
    pipeline = tiny_flux2_pipeline(klein=klein)
    adapter = get_adapter(pipeline, settings(eta=0.0, guidance_scale=guidance_scale))
    assert type(adapter) is Flux2Adapter and adapter.latent_shape() == (16, 16)
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    assert ("guidance" in conditioning) == (not klein)
    assert ("negative_prompt_embeds" in conditioning) == (klein and guidance_scale > 1)
    noise = adapter.sample_noise(2, torch.Generator().manual_seed(0))
    ours = adapter.sample(adapter.denoiser, conditioning, noise).latents[:, -1]
    pipeline_guidance = guidance_scale if guidance_scale > 1 or klein else 4.0
    # The pipelines take their noise unpacked, [B, 4 C, H / 16, W / 16].
    call = dict(prompt=PROMPTS, height=16, width=16, num_inference_steps=3, max_sequence_length=16)
    call.update(latents=noise.transpose(1, 2).reshape(2, 16, 4, 4), guidance_scale=pipeline_guidance)
    if not klein:  # Flux2Pipeline's latent output is the packed tokens (klein's is unpacked and de-normalised)
        torch.testing.assert_close(ours, pipeline(**call, output_type="latent").images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.decode(ours), pipeline(**call, output_type="pt").images, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("klein", [False, True])
def test_on_policy_ratio_is_one(klein):
    adapter = get_adapter(tiny_flux2_pipeline(klein=klein), settings(guidance_scale=3.0))
    assert_replay_ratio_is_one(adapter, adapter.encode_prompts(PROMPTS, CPU))


def test_data_latents_are_the_pipelines_batch_normalised_patchified_latents(monkeypatch):
    """The data term encodes as the pipeline encodes its reference images (with the posterior mean for both here)."""
    pipeline = tiny_flux2_pipeline()
    adapter = get_adapter(pipeline, settings())
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    ours = adapter.encode_pixels(pixels)
    theirs = pipeline._pack_latents(pipeline._encode_vae_image(pixels, generator=None))
    assert ours.shape == (2, *adapter.latent_shape())
    torch.testing.assert_close(ours, theirs)
    # The batch-norm statistics matter: without them the latents differ.
    raw = pipeline._pack_latents(pipeline._patchify_latents(pipeline.vae.encode(pixels).latent_dist.mode()))
    assert not torch.allclose(ours, raw, atol=1e-2)


def test_bad_settings_are_clear_errors():
    with pytest.raises(
        ValueError, match=r"height=20 and width=18 must be multiples of 4 pixels .* height=20, width=16"
    ):
        get_adapter(tiny_flux2_pipeline(), settings(height=20, width=18))
    with pytest.raises(ValueError, match=r"height=18 and width=16 must be multiples of 4 .* height=16"):
        get_adapter(tiny_flux2_pipeline(), settings(height=18))
    with pytest.raises(ValueError, match="is_distilled=True.*set guidance_scale=1.0"):
        get_adapter(tiny_flux2_pipeline(klein=True, is_distilled=True), settings(guidance_scale=4.0))


def train(pipeline, output_dir, peft_config=None) -> DDRLTrainer:
    rng = np.random.default_rng(0)
    images = [rng.random((16, 16, 3), dtype=np.float32) for _ in PROMPTS]
    args = ddrl_config(output_dir, max_sequence_length=16, height=16, width=16, max_steps=1)
    trainer = DDRLTrainer(
        pipeline,
        mean_pixel,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS, "image": images}),
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model()
    return trainer


def test_one_step_trains_only_the_transformer_and_the_saved_pipeline_reloads(tmp_path):
    pipeline = tiny_flux2_pipeline()
    before = {
        name: {key: value.clone() for key, value in module.state_dict().items()}
        for name, module in pipeline.components.items()
        if isinstance(module, torch.nn.Module)
    }
    trainer = train(pipeline, tmp_path)
    assert any(np.isfinite(entry.get("loss/data", np.nan)) for entry in trainer.state.log_history)
    for name, state in before.items():
        after = getattr(pipeline, name).state_dict()
        changed = any(not torch.equal(value, after[key]) for key, value in state.items())
        assert changed == (name == "transformer"), name
    reloaded = DiffusionPipeline.from_pretrained(str(tmp_path))
    assert isinstance(reloaded, Flux2Pipeline)
    for key, value in pipeline.transformer.state_dict().items():
        assert torch.equal(value, reloaded.transformer.state_dict()[key])
    # The VAE's batch-norm statistics (buffers) travel with the saved pipeline.
    assert torch.equal(reloaded.vae.bn.running_var, pipeline.vae.bn.running_var)
    assert os.path.isfile(tmp_path / "samples.png")


def test_klein_lora_loads_with_load_lora_weights(tmp_path):
    base_dir = tmp_path / "base"
    tiny_flux2_pipeline(klein=True).save_pretrained(base_dir)
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = train(DiffusionPipeline.from_pretrained(str(base_dir)), tmp_path / "out", peft_config=lora)
    assert isinstance(trainer.adapter.pipeline, Flux2KleinPipeline)
    assert os.path.isfile(tmp_path / "out" / "pytorch_lora_weights.safetensors")

    pipeline = DiffusionPipeline.from_pretrained(str(base_dir))
    adapter = get_adapter(pipeline, settings(eta=0.0))
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    noise = adapter.sample_noise(2, torch.Generator().manual_seed(0))
    base_sample = adapter.sample(adapter.denoiser, conditioning, noise).latents[:, -1]
    pipeline.load_lora_weights(str(tmp_path / "out"))
    lora_sample = adapter.sample(adapter.denoiser, conditioning, noise).latents[:, -1]
    assert not torch.allclose(base_sample, lora_sample)
