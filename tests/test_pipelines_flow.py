# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The FLUX, Wan and Cosmos Predict2 adapters (rectified flow, images and videos) on tiny random pipelines."""

import os

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import (
    Cosmos2TextToImagePipeline,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    WanPipeline,
)
from PIL import Image
from test_pipelines_unet import ddrl_config
from tiny_models import tiny_cosmos2_pipeline, tiny_flux_pipeline, tiny_wan_pipeline

import trl_ddrl.data as data_module
from trl_ddrl import DDRLTrainer
from trl_ddrl.data import DiffusionDataCollator
from trl_ddrl.pipelines import (
    Cosmos2TextToImageAdapter,
    Cosmos2VideoToWorldAdapter,
    FluxAdapter,
    SamplingSettings,
    WanAdapter,
    get_adapter,
)
from trl_ddrl.utils import save_video_grid_gif


PROMPTS = ["a cat", "a red car"]
CPU = torch.device("cpu")
# Per family: builder, pipeline class, adapter class, sampling settings, and pixels [C, H, W] or [F, C, H, W].
FAMILIES = {
    "flux": (tiny_flux_pipeline, FluxPipeline, FluxAdapter, dict(height=16, width=16), (16, 16, 3)),
    "wan": (tiny_wan_pipeline, WanPipeline, WanAdapter, dict(height=32, width=32, num_frames=5), (5, 32, 32, 3)),
    "cosmos": (
        tiny_cosmos2_pipeline,
        Cosmos2TextToImagePipeline,
        Cosmos2TextToImageAdapter,
        dict(height=32, width=32),
        (32, 32, 3),
    ),
}


def settings(family: str, **overrides) -> SamplingSettings:
    kwargs = dict(num_inference_steps=3, eta=1.0, max_sequence_length=16, **FAMILIES[family][3])
    kwargs.update(overrides)
    return SamplingSettings(**kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_resolution_off_the_models_grid_is_a_clear_error(family):
    pipeline = FAMILIES[family][0]()
    with pytest.raises(ValueError, match=r"height=31 and width=32 must be multiples of \d+ pixels .* Use for example"):
        get_adapter(pipeline, settings(family, height=31, width=32))


def mean_pixel(prompts, images, **kwargs):
    return images.flatten(1).mean(dim=1).tolist()


def v2w_adapter(**overrides) -> Cosmos2VideoToWorldAdapter:
    kwargs = dict(num_inference_steps=3, eta=1.0, max_sequence_length=16, height=32, width=32, num_frames=5)
    kwargs.update(overrides)
    return Cosmos2VideoToWorldAdapter(tiny_cosmos2_pipeline(video_to_world=True), SamplingSettings(**kwargs))


def assert_replay_ratio_is_one(adapter, conditioning) -> None:
    noise = adapter.sample_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    trajectory = adapter.sample(adapter.denoiser, conditioning, noise, generator=torch.Generator().manual_seed(1))
    steps = adapter.settings.num_inference_steps
    assert trajectory.latents.shape == (len(PROMPTS), steps + 1, *adapter.latent_shape())
    for i in range(steps - 1):  # the last step is deterministic and never trained
        step_index = torch.full((len(PROMPTS),), i)
        # multistep samplers (Cosmos' default "churn") replay with the rollout's previous denoised estimate
        previous = trajectory.denoised[:, i - 1] if trajectory.denoised is not None and i > 0 else None
        with torch.no_grad():
            replay = adapter.transition_log_prob(
                adapter.denoiser,
                trajectory.latents[:, i],
                trajectory.latents[:, i + 1],
                step_index,
                conditioning,
                previous,
            )
        ratio = torch.exp(replay.log_prob - trajectory.log_probs[:, i])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_is_picked_and_on_policy_ratio_is_one(family):
    builder, pipeline_class, adapter_class, _, _ = FAMILIES[family]
    pipeline = builder()
    assert isinstance(pipeline, pipeline_class)
    adapter = get_adapter(pipeline, settings(family))
    assert type(adapter) is adapter_class and adapter.denoiser is pipeline.transformer
    assert_replay_ratio_is_one(adapter, adapter.encode_prompts(PROMPTS, CPU))


def test_video_to_world_on_policy_ratio_is_one():
    adapter = v2w_adapter()
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    conditioning.update(adapter.encode_condition_frames(torch.rand(2, 3, 32, 32) * 2 - 1))
    assert_replay_ratio_is_one(adapter, conditioning)


def test_flux_deterministic_sampling_matches_the_pipeline():
    pipeline = tiny_flux_pipeline()
    adapter = get_adapter(pipeline, settings("flux", eta=0.0))
    noise = adapter.sample_noise(2, torch.Generator().manual_seed(0))
    ours = adapter.sample(adapter.denoiser, adapter.encode_prompts(PROMPTS, CPU), noise).latents[:, -1]
    theirs = pipeline(
        PROMPTS,
        height=16,
        width=16,
        num_inference_steps=3,
        max_sequence_length=16,
        latents=noise,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        adapter.decode(ours),
        pipeline.image_processor.postprocess(
            pipeline.vae.decode(
                pipeline._unpack_latents(theirs, 16, 16, pipeline.vae_scale_factor)
                / pipeline.vae.config.scaling_factor
                + pipeline.vae.config.shift_factor
            ).sample,
            output_type="pt",
        ),
        atol=1e-5,
        rtol=1e-5,
    )


def test_flux_embedded_guidance_replaces_cfg():
    adapter = get_adapter(tiny_flux_pipeline(), settings("flux"))
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    assert conditioning["guidance"].tolist() == [3.5, 3.5]  # FluxPipeline's default
    adapter = get_adapter(tiny_flux_pipeline(), settings("flux", guidance_scale=5.0))
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    assert conditioning["guidance"].tolist() == [5.0, 5.0] and not any(k.startswith("negative_") for k in conditioning)
    # Without the guidance embedding (FLUX.1-schnell) guidance_scale > 1 is real CFG against an empty prompt.
    adapter = get_adapter(tiny_flux_pipeline(guidance_embeds=False), settings("flux", guidance_scale=5.0))
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    assert "guidance" not in conditioning and "negative_prompt_embeds" in conditioning
    assert_replay_ratio_is_one(adapter, conditioning)


def test_wan_samples_on_the_unipc_flow_sigmas_and_matches_an_euler_pipeline():
    pipeline = tiny_wan_pipeline()
    adapter = get_adapter(pipeline, settings("wan", eta=0.0))
    unipc = pipeline.scheduler
    unipc.set_timesteps(3)
    assert adapter.sigmas()[0] == 1.0  # 0.9997 rounded up, so the SDE noise clamp uses the second level
    torch.testing.assert_close(adapter.sigmas()[1:], unipc.sigmas[1:].float())

    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    adapter = get_adapter(pipeline, settings("wan", eta=0.0))
    noise = adapter.sample_noise(2, torch.Generator().manual_seed(0))
    ours = adapter.sample(adapter.denoiser, adapter.encode_prompts(PROMPTS, CPU), noise).latents[:, -1]
    theirs = pipeline(
        PROMPTS,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=3,
        guidance_scale=1.0,
        max_sequence_length=16,
        latents=noise,
        output_type="latent",
    ).frames
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert adapter.decode(ours).shape == (2, 5, 3, 32, 32)


def test_wan_rejects_frame_counts_the_vae_cannot_encode():
    with pytest.raises(ValueError, match="num_frames=6"):
        get_adapter(tiny_wan_pipeline(), settings("wan", num_frames=6))


def test_cosmos_edm_pipeline_is_the_flow_trajectory():
    """The pipeline's EDM state `x` is `x_t / (1 - t)`; both samplers agree up to the pipeline's no-op last step."""
    pipeline = tiny_cosmos2_pipeline()
    # The pipeline's Euler sampler is the flow ODE (the authors' churn sampler is Cosmos' default in DDRL).
    adapter = get_adapter(pipeline, settings("cosmos", eta=0.0, sampler="flow_sde"))
    sigmas = adapter.sigmas()
    torch.testing.assert_close(sigmas[0], torch.tensor(80 / 81))
    noise = adapter.sample_noise(2, torch.Generator().manual_seed(0))
    trajectory = adapter.sample(adapter.denoiser, adapter.encode_prompts(PROMPTS, CPU), noise)
    theirs = pipeline(
        PROMPTS,
        height=32,
        width=32,
        num_inference_steps=3,
        guidance_scale=1.0,
        max_sequence_length=16,
        latents=noise / sigmas[0],
        output_type="latent",
    ).images
    ours = trajectory.latents[:, -2, :, 0] / (1 - sigmas[-2])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_cosmos_video_to_world_matches_the_pipeline_and_keeps_the_given_frames():
    adapter = v2w_adapter(eta=0.0, sampler="flow_sde")
    pipeline = adapter.pipeline
    image = torch.rand(1, 3, 32, 32)
    conditioning = adapter.encode_prompts(PROMPTS[:1], CPU)
    conditioning.update(adapter.encode_condition_frames(image * 2 - 1, generator=torch.Generator().manual_seed(5)))
    sigmas = adapter.sigmas()
    noise = adapter.sample_noise(1, torch.Generator().manual_seed(0))
    trajectory = adapter.sample(adapter.denoiser, conditioning, noise)
    theirs = pipeline(
        image=image,
        prompt=PROMPTS[:1],
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=3,
        guidance_scale=1.0,
        max_sequence_length=16,
        latents=noise / sigmas[0],
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
    ).frames
    torch.testing.assert_close(trajectory.latents[:, -2] / (1 - sigmas[-2]), theirs, atol=1e-4, rtol=1e-4)
    condition = conditioning["condition_latents"]
    torch.testing.assert_close(trajectory.latents[:, -1, :, :1], condition[:, :, :1])
    assert adapter.decode(trajectory.latents[:, -1]).shape == (1, 5, 3, 32, 32)


def test_cosmos_video_to_world_data_loss_skips_the_conditioning_frames():
    adapter = v2w_adapter()
    x0 = torch.randn(2, *adapter.latent_shape())
    noise = torch.randn_like(x0)
    conditioning = adapter.encode_prompts(PROMPTS, CPU)
    step_index = torch.tensor([0, 1])
    with torch.no_grad():
        loss = adapter.diffusion_loss(adapter.denoiser, x0, conditioning, step_index, noise)
        # the data term is at the transition's own level: the churned one under Cosmos' default sampler
        sigma = adapter.model_sigmas()[step_index].view(-1, 1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        velocity = adapter.velocity(
            adapter.denoiser, noisy, sigma.flatten(), {**conditioning, "condition_latents": x0}
        )
    error = (velocity - (noise - x0)) ** 2
    assert error[:, :, :1].max() < 1e-8
    # the default EDM weighting: (1 - t)^2 + t^2 on the velocity MSE
    weight = (1 - sigma.flatten()) ** 2 + sigma.flatten() ** 2
    torch.testing.assert_close(loss, weight * error.mean(dim=(1, 2, 3, 4)))


def pixels_column(family: str) -> list[np.ndarray]:
    generator = np.random.default_rng(0)
    return [generator.random(FAMILIES[family][4], dtype=np.float32) for _ in PROMPTS]


def test_collator_encodes_video_rows_for_video_pipelines():
    adapter = get_adapter(tiny_wan_pipeline(), settings("wan"))
    collator = DiffusionDataCollator(adapter)
    long_video = np.zeros((9, 32, 32, 3), dtype=np.uint8)
    batch = collator([{"image": long_video, "prompt": "a cat"}])  # the first num_frames frames are used
    assert batch["latents"].shape == (1, *adapter.latent_shape())
    with pytest.raises(ValueError, match="num_frames=5"):
        collator([{"image": long_video[:3], "prompt": "a cat"}])
    with pytest.raises(ValueError, match="generates videos"):
        collator([{"image": long_video[0], "prompt": "a cat"}])
    image_collator = DiffusionDataCollator(get_adapter(tiny_flux_pipeline(), settings("flux")))
    with pytest.raises(ValueError, match="generates images"):
        image_collator([{"image": long_video, "prompt": "a cat"}])


def test_collator_encodes_each_distinct_caption_once(monkeypatch):
    # A group's data rows repeat its prompt num_generations times; the text encoders need to see it only once.
    adapter = get_adapter(tiny_flux_pipeline(), settings("flux"))
    collator = DiffusionDataCollator(adapter)
    captions = ["a cat", "a dog", "a cat", "a cat", "a dog"]
    expected = adapter.encode_prompts(captions, adapter.device)
    encoded_batches = []
    encode = adapter.encode_prompts

    def counting_encode(prompts, *args, **kwargs):
        encoded_batches.append(list(prompts))
        return encode(prompts, *args, **kwargs)

    monkeypatch.setattr(adapter, "encode_prompts", counting_encode)
    conditioning = collator.conditioning(captions, [{} for _ in captions])
    assert encoded_batches == [["a cat", "a dog"]]
    assert conditioning.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(conditioning[key], value)


def test_collator_encodes_each_distinct_data_image_once(monkeypatch):
    # Without a data_dataset the data rows are the prompt rows, each repeated num_generations times.
    adapter = get_adapter(tiny_flux_pipeline(), settings("flux"))
    collator = DiffusionDataCollator(adapter)
    height, width = adapter.resolution
    images = [np.random.default_rng(seed).random((height, width, 3), dtype=np.float32) for seed in range(2)]
    rows = [{"prompt": "a cat", "image": images[i]} for i in (0, 0, 1, 0, 1)]
    rows.append({"prompt": "a cat", "image": images[1].copy()})  # equal pixels in another object
    encoded_batches = []
    encode = adapter.encode_pixels

    def counting_encode(pixels, *args, **kwargs):
        encoded_batches.append(pixels.shape[0])
        return encode(pixels, *args, **kwargs)

    monkeypatch.setattr(adapter, "encode_pixels", counting_encode)
    converted = []
    row_pixels = data_module._row_pixels
    monkeypatch.setattr(
        data_module, "_row_pixels", lambda value, *args: converted.append(1) or row_pixels(value, *args)
    )
    latents = collator(rows, generator=torch.Generator().manual_seed(0))["latents"]
    assert encoded_batches == [2] and len(converted) == 3  # each image object is resized once
    distinct = encode(collator.pixels(rows[1:3]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, distinct[torch.tensor([0, 0, 1, 0, 1, 1])])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_training_steps_change_only_the_denoiser_and_the_saved_pipeline_samples(family, tmp_path):
    builder = FAMILIES[family][0]
    pipeline = builder()
    frozen_before = {
        name: {key: value.clone() for key, value in module.state_dict().items()}
        for name, module in pipeline.components.items()
        if isinstance(module, torch.nn.Module) and name != "transformer"
    }
    denoiser_before = {key: value.clone() for key, value in pipeline.transformer.state_dict().items()}
    args = ddrl_config(tmp_path, max_sequence_length=16, **FAMILIES[family][3])
    dataset = Dataset.from_dict({"prompt": PROMPTS, "image": pixels_column(family)})
    trainer = DDRLTrainer(pipeline, mean_pixel, args=args, train_dataset=dataset)
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss/data" in entry]
    assert logs and all(np.isfinite(entry["loss/data"]) for entry in logs)
    assert any(
        not torch.equal(value, pipeline.transformer.state_dict()[key]) for key, value in denoiser_before.items()
    )
    for name, state in frozen_before.items():
        after = getattr(pipeline, name).state_dict()
        assert all(torch.equal(value, after[key]) for key, value in state.items()), f"{name} changed"

    trainer.save_model()
    assert os.path.isfile(tmp_path / "samples.png")
    assert os.path.isfile(tmp_path / "samples.gif") == (family == "wan")
    reloaded = DiffusionPipeline.from_pretrained(str(tmp_path))
    with trainer.ema_weights():  # the export holds the EMA of the trained weights
        for key, value in pipeline.transformer.state_dict().items():
            assert torch.equal(value, reloaded.transformer.state_dict()[key])
    adapter = get_adapter(reloaded, settings(family))
    noise = adapter.sample_noise(1, torch.Generator().manual_seed(0))
    trajectory = adapter.sample(adapter.denoiser, adapter.encode_prompts(PROMPTS[:1], CPU), noise)
    assert torch.isfinite(adapter.decode(trajectory.latents[:, -1])).all()


def test_video_grid_gif_has_one_frame_per_video_frame(tmp_path):
    path = tmp_path / "videos.gif"
    save_video_grid_gif(torch.rand(3, 4, 3, 8, 8), str(path), fps=4)
    with Image.open(path) as gif:
        assert gif.n_frames == 4 and gif.size == (16, 16)


def test_video_to_world_trains_from_each_rows_conditioning_frames(tmp_path):
    pipeline = tiny_cosmos2_pipeline(video_to_world=True)
    denoiser_before = {key: value.clone() for key, value in pipeline.transformer.state_dict().items()}
    rng = np.random.default_rng(0)
    videos = [rng.random((5, 32, 32, 3), dtype=np.float32) for _ in PROMPTS]
    args = ddrl_config(tmp_path, max_sequence_length=16, height=32, width=32, num_frames=5)
    trainer = DDRLTrainer(
        pipeline, mean_pixel, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS, "image": videos})
    )
    assert isinstance(trainer.adapter, Cosmos2VideoToWorldAdapter)
    sampled_conditions = []
    sample = trainer.adapter.sample

    def recording_sample(denoiser, conditioning, noise, **kwargs):
        sampled_conditions.append(conditioning["condition_latents"].clone())
        return sample(denoiser, conditioning, noise, **kwargs)

    trainer.adapter.sample = recording_sample
    trainer.train()
    # Each rollout continues its own row's frames: the two groups have different conditioning latents.
    condition = sampled_conditions[0]
    assert condition.shape[0] == 4 and not torch.equal(condition[0], condition[2])
    torch.testing.assert_close(condition[0], condition[1])
    assert any(
        not torch.equal(value, pipeline.transformer.state_dict()[key]) for key, value in denoiser_before.items()
    )

    # Without the data term (whose own check for an image column runs first), the missing frames are named.
    args.data_beta = 0.0
    with pytest.raises(ValueError, match="conditioning frames"):
        DDRLTrainer(pipeline, mean_pixel, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_collator_posterior_mean_and_text_dropout(family):
    """`data_latents="mean"` encodes to the posterior mean whatever the generator; `data_text_dropout` zeroes rows."""
    adapter = get_adapter(FAMILIES[family][0](), settings(family))
    rows = [{"image": pixels, "prompt": prompt} for pixels, prompt in zip(pixels_column(family), PROMPTS)]
    sampled = [DiffusionDataCollator(adapter)(rows, torch.Generator().manual_seed(i))["latents"] for i in (0, 1)]
    assert not torch.equal(*sampled)
    mean_collator = DiffusionDataCollator(adapter, posterior_mean=True)
    means = [mean_collator(rows, torch.Generator().manual_seed(i))["latents"] for i in (0, 1)]
    torch.testing.assert_close(*means, atol=0, rtol=0)
    # Everything dropped at (almost) 1, nothing at 0: the embeddings are zeroed row by row, other tensors kept.
    kept = DiffusionDataCollator(adapter, text_dropout=0.0)(rows)["conditioning"]
    dropped = DiffusionDataCollator(adapter, text_dropout=0.999)(rows, torch.Generator().manual_seed(0))[
        "conditioning"
    ]
    assert set(kept) == set(dropped)
    for key, value in dropped.items():
        if "embeds" in key:
            assert not value.any() and kept[key].any()
        else:
            torch.testing.assert_close(value, kept[key])


def test_drop_text_zeroes_only_the_dropped_rows_embeddings():
    from trl_ddrl.pipelines.base import drop_text

    conditioning = {"prompt_embeds": torch.ones(3, 2, 4), "prompt_attention_mask": torch.ones(3, 2)}
    dropped = drop_text(conditioning, torch.tensor([True, False, True]))
    assert dropped["prompt_embeds"][:, 0, 0].tolist() == [1.0, 0.0, 1.0]
    assert torch.equal(dropped["prompt_attention_mask"], conditioning["prompt_attention_mask"])
