# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The Cosmos Predict2.5 adapter (text-, image- and video-to-world) on tiny random pipelines."""

import numpy as np
import pytest
import torch
from family_checks import (
    CPU,
    PROMPTS,
    assert_lora_loads_into_a_fresh_pipeline,
    assert_reloaded_pipeline_has_the_trained_weights,
    changed_components,
    lora_config,
    module_states,
    train_one_step,
)
from test_pipelines_flow import assert_replay_ratio_is_one
from tiny_models import tiny_cosmos2_5_pipeline

from trl_ddrl.pipelines import Cosmos2_5PredictAdapter, SamplingSettings, get_adapter


def settings(**overrides) -> SamplingSettings:
    kwargs = dict(num_inference_steps=3, eta=1.0, max_sequence_length=16, height=32, width=32, num_frames=5)
    kwargs.update(overrides)
    return SamplingSettings(**kwargs)


@pytest.mark.parametrize("num_conditioning_frames, num_frames", [(0, 5), (5, 9)])
def test_deterministic_sampling_matches_the_pipeline(num_conditioning_frames, num_frames):
    """Text-to-world, and video-to-world from 5 frames (2 latent frames), on the pipeline's Euler scheduler."""
    pipeline = tiny_cosmos2_5_pipeline(euler=True)
    adapter = get_adapter(
        pipeline, settings(eta=0.0, num_frames=num_frames, num_conditioning_frames=num_conditioning_frames)
    )
    assert isinstance(adapter, Cosmos2_5PredictAdapter)
    video = torch.rand(1, 3, num_frames, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    conditioning = adapter.encode_prompts(PROMPTS[:1], CPU)
    mode = {}
    if num_conditioning_frames:
        given = video[:, :, :num_conditioning_frames]
        conditioning.update(adapter.encode_condition_frames(given.permute(0, 2, 1, 3, 4)))
        mode = dict(video=given, num_latent_conditional_frames=2)
    noise = adapter.sample_noise(1, torch.Generator().manual_seed(0))
    ours = adapter.sample(adapter.denoiser, conditioning, noise).latents[:, -1]
    theirs = pipeline(
        prompt=PROMPTS[:1],
        height=32,
        width=32,
        num_frames=num_frames,
        num_inference_steps=3,
        guidance_scale=1.0,
        max_sequence_length=16,
        latents=noise,
        output_type="latent",
        **mode,
    ).frames
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if num_conditioning_frames:  # the two given latent frames are kept
        torch.testing.assert_close(ours[:, :, :2], conditioning["condition_latents"][:, :, :2])
    assert adapter.decode(ours).shape == (1, num_frames, 3, 32, 32)


def test_image_to_world_on_the_unipc_schedule_has_on_policy_ratio_one():
    adapter = get_adapter(tiny_cosmos2_5_pipeline(), settings(num_conditioning_frames=1))
    assert adapter.sigmas()[0] == 1.0 and adapter.condition_latent_frames() == 1
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    conditioning.update(adapter.encode_condition_frames(torch.rand(2, 3, 32, 32) * 2 - 1))
    assert_replay_ratio_is_one(adapter, conditioning)


def test_invalid_modes_and_frame_counts_name_the_valid_values():
    pipeline = tiny_cosmos2_5_pipeline()
    with pytest.raises(ValueError, match=r"num_conditioning_frames=2 .* one of \[0, 1, 5\]"):
        get_adapter(pipeline, settings(num_conditioning_frames=2))
    with pytest.raises(ValueError, match="num_conditioning_frames=5 leaves nothing to generate in num_frames=5"):
        get_adapter(pipeline, settings(num_conditioning_frames=5))
    with pytest.raises(ValueError, match="num_frames=8 is not 4k . 1.* num_frames=9"):
        get_adapter(pipeline, settings(num_frames=8))
    with pytest.raises(ValueError, match=r"height=44 and width=32 must be multiples of 16 .* height=48"):
        get_adapter(pipeline, settings(height=44))
    adapter = get_adapter(pipeline, settings(num_conditioning_frames=1))
    with pytest.raises(ValueError, match="needs the conditioning frames"):
        adapter.predict(
            adapter.denoiser,
            torch.zeros(1, *adapter.latent_shape()),
            torch.zeros(1, dtype=torch.long),
            adapter.encode_prompts(PROMPTS[:1], CPU),
        )


def video_rows() -> dict:
    rng = np.random.default_rng(0)
    return {"prompt": PROMPTS, "image": [rng.random((5, 32, 32, 3), dtype=np.float32) for _ in PROMPTS]}


def test_image_to_world_training_changes_only_the_transformer_and_reloads(tmp_path):
    pipeline = tiny_cosmos2_5_pipeline()
    before = module_states(pipeline)
    trainer = train_one_step(
        pipeline,
        tmp_path,
        video_rows(),
        max_sequence_length=16,
        height=32,
        width=32,
        num_frames=5,
        num_conditioning_frames=1,
    )
    assert trainer.adapter.num_conditioning_frames == 1
    assert changed_components(pipeline, before) == {"transformer"}
    assert_reloaded_pipeline_has_the_trained_weights(trainer, ("transformer",))


def test_text_to_world_lora_loads_with_load_lora_weights(tmp_path):
    config = dict(max_sequence_length=16, height=32, width=32, num_frames=5, learning_rate=1e-2)
    trainer = train_one_step(tiny_cosmos2_5_pipeline(), tmp_path, video_rows(), peft_config=lora_config(), **config)
    assert_lora_loads_into_a_fresh_pipeline(
        trainer, tiny_cosmos2_5_pipeline, lambda adapter: adapter.encode_prompts(PROMPTS, CPU)
    )


def official_karras_sigmas(t_min: float, t_max: float, num_steps: int, order: float) -> list[float]:
    """cosmos-rl `sampler/__init__.py` L542-546 (`get_rev_ts`), the EDM levels of the authors' rollouts."""
    return [
        (t_max ** (1 / order) + i / num_steps * (t_min ** (1 / order) - t_max ** (1 / order))) ** order
        for i in range(num_steps + 1)
    ]


def test_karras_schedule_is_the_authors_cosmos_predict2_5_rollout():
    """
    The authors' Cosmos Predict2.5 rollout: 20 churned steps on Karras levels from EDM sigma 200 to 0.01 (rho 7;
    config/wfm/__init__.py L92-96 `SDEConfig`, sampler L707 `rho=7`), churn 1/21 (L600), then the clean denoise
    (`sample_clean`, L787-794), starting from `200 * eps` (wfm_trainer.py L898-904).
    """
    adapter = get_adapter(
        tiny_cosmos2_5_pipeline(), settings(num_inference_steps=21, eta=None, karras_sigmas=(200.0, 0.01, 7.0))
    )
    assert adapter.settings.sampler == "churn" and adapter.settings.eta == pytest.approx(1 / 21)
    edm = torch.tensor(official_karras_sigmas(0.01, 200.0, 20, 7), dtype=torch.float64)
    expected = torch.cat([edm / (1 + edm), torch.zeros(1, dtype=torch.float64)]).float()
    torch.testing.assert_close(adapter._sigma_table(), expected)
    # The trained (churned) levels of train_on = [0, 2, ..., 18], as the issue lists them.
    trained = [round(float(level), 3) for level in adapter.model_sigmas()[0:19:2]]
    assert trained == [0.995, 0.992, 0.985, 0.972, 0.944, 0.882, 0.751, 0.515, 0.237, 0.065]
    # The initial state is the EDM state 200 * eps in flow coordinates; the data term gets eps back.
    noise = adapter.sample_noise(2, torch.Generator().manual_seed(0))
    eps = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise, eps * (200 / 201))
    conditioning = adapter.encode_prompts(["a cat", "a red car"], torch.device("cpu"))
    trajectory = adapter.sample(adapter.denoiser, conditioning, noise, generator=torch.Generator().manual_seed(1))
    assert trajectory.latents.shape[1] == 22
    torch.testing.assert_close(adapter.standard_noise(trajectory.latents[:, 0]), eps)
    assert bool((trajectory.log_probs[:, -1] == 0).all())  # the clean denoise is deterministic


def test_karras_sigmas_need_a_flow_family():
    from tiny_models import tiny_sd15_pipeline

    with pytest.raises(ValueError, match="karras_sigmas"):
        get_adapter(
            tiny_sd15_pipeline(), SamplingSettings(num_inference_steps=3, eta=1.0, karras_sigmas=(80, 0.002, 7))
        )
