# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The Cosmos Predict2.5 adapter (text-, image- and video-to-world) on tiny random pipelines."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from family_checks import (
    CPU,
    PROMPTS,
    assert_lora_loads_into_a_fresh_pipeline,
    assert_reloaded_pipeline_has_the_trained_weights,
    changed_components,
    lora_config,
    mean_pixel,
    module_states,
    train_one_step,
)
from test_pipelines_flow import assert_replay_ratio_is_one
from test_pipelines_unet import ddrl_config
from tiny_models import tiny_cosmos2_5_pipeline, tiny_cosmos2_pipeline, tiny_wan_pipeline

from trl_ddrl import DDRLTrainer
from trl_ddrl.digits.pipeline import random_digits_pipeline
from trl_ddrl.parallel import ProcessMesh
from trl_ddrl.pipelines import Cosmos2_5PredictAdapter, SamplingSettings, get_adapter
from trl_ddrl.rollout import read_prompt_rows


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


# ---- Modes mixed per group (num_conditioning_frames_choices), the authors' Cosmos-Predict2.5 recipe -----------------


def test_mixed_modes_condition_each_row_as_a_run_of_its_own_mode():
    """Rows of one batch in different modes get exactly the velocity and data loss of a run in that mode."""
    pipeline = tiny_cosmos2_5_pipeline()
    mixed = get_adapter(pipeline, settings(num_frames=9, num_conditioning_frames_choices=(0, 1, 5)))
    assert mixed.num_conditioning_frames == 5  # the frames read from each row: the most any row is given
    video = torch.rand(3, 9, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    conditioning = mixed.encode_prompts(PROMPTS[:1] * 3, CPU)
    conditioning.update(mixed.encode_condition_frames(video))
    frames = torch.tensor([0, 1, 5])
    conditioning.update(mixed.frame_mode_conditioning(frames))
    assert conditioning["condition_latent_frames"].tolist() == [0, 1, 2]
    latents = torch.randn(3, *mixed.latent_shape(), generator=torch.Generator().manual_seed(1))
    x0 = mixed.encode_video(video, mode=True)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    step = torch.ones(3, dtype=torch.long)
    with torch.no_grad():
        velocity = mixed.predict(mixed.denoiser, latents, step, conditioning)
        loss = mixed.diffusion_loss(mixed.denoiser, x0, conditioning, step, noise)
        for row, count in enumerate(frames.tolist()):
            single = get_adapter(pipeline, settings(num_frames=9, num_conditioning_frames=count))
            alone = single.encode_prompts(PROMPTS[:1], CPU)
            if count:
                alone.update(single.encode_condition_frames(video[row : row + 1]))
            rows = slice(row, row + 1)
            torch.testing.assert_close(
                velocity[rows], single.predict(single.denoiser, latents[rows], step[rows], alone), rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                loss[rows],
                single.diffusion_loss(single.denoiser, x0[rows], alone, step[rows], noise[rows]),
                rtol=1e-4,
                atol=1e-6,
            )
    del conditioning["condition_latent_frames"]
    with pytest.raises(ValueError, match=r"needs each row's mode: add .*frame_mode_conditioning"):
        mixed.predict(mixed.denoiser, latents, step, conditioning)


def mixed_mode_trainer(tmp_path, **overrides) -> DDRLTrainer:
    """A trainer on 4 prompts with videos, text- or image-to-world per group, data term on the prompts' own videos."""
    rng = np.random.default_rng(0)
    rows = {
        "prompt": [f"scene {i}" for i in range(4)],
        "image": [rng.random((5, 32, 32, 3), dtype=np.float32) for _ in range(4)],
    }
    config = dict(
        max_sequence_length=16,
        height=32,
        width=32,
        num_frames=5,
        prompts_per_step=4,
        num_generations=2,
        per_device_train_batch_size=4,
        num_conditioning_frames_choices=[0, 1],
        data_latents="mean",
    )
    config.update(overrides)
    args = ddrl_config(tmp_path, **config)
    return DDRLTrainer(tiny_cosmos2_5_pipeline(), mean_pixel, args=args, train_dataset=Dataset.from_dict(rows))


def test_mixed_modes_are_drawn_per_group_from_the_rows_videos_and_shared_by_the_data_term(tmp_path):
    trainer = mixed_mode_trainer(tmp_path)
    dataset = trainer.train_dataset
    rows = read_prompt_rows(dataset, [0, 0, 1, 1, 2, 2, 3, 3])
    modes_by_iteration = []
    for iteration in range(3):
        buffer = trainer.rollout.generate(rows, iteration, trainer.state)
        modes = buffer.conditioning["condition_latent_frames"]
        groups = modes.view(4, 2)
        assert (groups == groups[:, :1]).all()  # every group in one mode
        # The data term of each row is conditioned as its group's rollouts.
        assert torch.equal(buffer.data_conditioning["condition_latent_frames"], modes)
        image_to_world = modes == 1
        # Image-to-world rows continue the first frame of their row's video: their given latent frame is that of the
        # video's posterior mean, which the data term also encodes (the causal VAE's first latent frame sees frame 0).
        given = buffer.conditioning["condition_latents"][:, :, 0]
        torch.testing.assert_close(
            given[image_to_world], buffer.data_latents[image_to_world, :, 0], rtol=1e-4, atol=1e-5
        )
        modes_by_iteration.append(groups[:, 0].tolist())
    assert {mode for modes in modes_by_iteration for mode in modes} == {0, 1}  # both modes occur across groups
    assert len({tuple(modes) for modes in modes_by_iteration}) > 1  # and the draw changes with the iteration
    # The draw is a function of the seed and the iteration (a resumed run draws the same), and a group spanning two
    # processes gets the same mode on both.
    engine = trainer.rollout
    whole = engine.group_conditioning_frames(8, 1)
    assert torch.equal(whole, engine.group_conditioning_frames(8, 1))
    halves = []
    for rank in range(2):
        engine.mesh = ProcessMesh(world_size=2, rank=rank)
        halves.append(engine.group_conditioning_frames(4, 1))
    assert torch.equal(torch.cat(halves), whole)


def test_mixed_modes_train_and_other_families_refuse_them(tmp_path):
    trainer = mixed_mode_trainer(tmp_path, max_steps=1, eval_num_generations=2)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss/data" in entry)
    assert 0 <= logged["num_conditioning_frames"] <= 1 and np.isfinite(logged["loss/data"])
    # The evaluation gives each held-out prompt (its samples and its data loss) a mode of its own.
    metrics = trainer.evaluate(trainer.train_dataset)
    assert np.isfinite(metrics["eval_reward"]) and np.isfinite(metrics["eval_data_loss"])
    pipeline = tiny_cosmos2_5_pipeline()
    with pytest.raises(ValueError, match=r"num_conditioning_frames_choices=\[0, 2\] .* in \[0, 1, 5\]"):
        get_adapter(pipeline, settings(num_conditioning_frames_choices=(0, 2)))
    with pytest.raises(ValueError, match=r"num_conditioning_frames_choices=\[0, 5\] leaves nothing to generate"):
        get_adapter(pipeline, settings(num_conditioning_frames_choices=(0, 5)))
    with pytest.raises(ValueError, match="DigitsFlowPipeline has a single conditioning mode"):
        get_adapter(random_digits_pipeline(), settings(num_conditioning_frames_choices=(0, 1)))


def transformer_text_inputs(adapter, conditioning) -> torch.Tensor:
    """The `encoder_hidden_states` the transformer gets in one guided prediction: `[2B, L, D]`, negative rows first."""
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"])

    handle = adapter.denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        latents = adapter.sample_noise(len(PROMPTS), torch.Generator().manual_seed(0))
        adapter.predict(adapter.denoiser, latents, torch.zeros(len(PROMPTS), dtype=torch.long), conditioning)
    finally:
        handle.remove()
    (embeds,) = seen
    return embeds


@pytest.mark.parametrize("family", ["cosmos2_5", "cosmos2"])
def test_zeros_unconditional_branch_gives_the_transformer_a_zeroed_text_embedding(family):
    """The authors' unconditional branch (cosmos-rl's text conditioner at dropout rate 1) zeroes the text embedding."""
    if family == "cosmos2_5":
        pipeline, frames = tiny_cosmos2_5_pipeline(), 5
    else:
        pipeline, frames = tiny_cosmos2_pipeline(), None
    guided = dict(guidance_scale=3.0, num_frames=frames)
    default = get_adapter(pipeline, settings(**guided))
    zeros = get_adapter(pipeline, settings(**guided, guidance_unconditional="zeros"))
    assert zeros.settings.guidance_unconditional == "zeros"
    uncond, cond = transformer_text_inputs(zeros, zeros.encode_prompts(PROMPTS, CPU)).chunk(2)
    assert not uncond.any()
    assert cond.flatten(1).abs().amax(dim=1).gt(0).all()
    # Without the option: today's negative prompt, the pipeline's own default.
    default_uncond, default_cond = transformer_text_inputs(default, default.encode_prompts(PROMPTS, CPU)).chunk(2)
    negative = pipeline.encode_prompt(PROMPTS, do_classifier_free_guidance=True, max_sequence_length=16, device=CPU)[1]
    torch.testing.assert_close(default_uncond, negative)
    assert default_uncond.flatten(1).abs().amax(dim=1).gt(0).all()
    torch.testing.assert_close(cond, default_cond)


def test_zeros_unconditional_branch_is_refused_by_the_other_families():
    for pipeline in (random_digits_pipeline(), tiny_wan_pipeline()):
        name = type(pipeline).__name__
        with pytest.raises(ValueError, match=f"guidance_unconditional='zeros' is not available for {name}"):
            get_adapter(pipeline, settings(guidance_unconditional="zeros"))
