# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""VideoAlign on a tiny random Qwen2-VL saved in the release's layout, and the torch video preprocessing."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_tiny_videoalign_release
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from trl_ddrl.rewards.qwen_reward import to_qwen2vl_model_keys
from trl_ddrl.rewards.qwen_vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    patchify_video,
    resize_frames_uint8,
    sample_video_frames,
    sampled_frame_count,
    smart_resize,
    video_pixel_inputs,
)
from trl_ddrl.rewards.videoalign import VIDEOALIGN_PROMPT, VideoAlignReward, merge_lora


# A short stand-in for the 3 000-character evaluation prompt (one byte per token with the tiny tokenizer): same
# structure, the prompt then the three reward tokens in order.
SHORT_TEMPLATE = "rate {text_prompt} vq <|VQ_reward|> mq <|MQ_reward|> ta <|TA_reward|>"


@pytest.mark.parametrize(
    ("total", "video_fps", "num_frames", "expected"),
    [
        (33, 16.0, None, 4),  # 33 / 16 * 2 = 4.1 frames -> 4
        (81, 16.0, None, 10),  # Wan's 81 frames at 16 fps: 10.1 -> 10
        (121, 24.0, None, 10),
        (9, 16.0, None, 4),  # below min_frames: raised to 4
        (3, 16.0, None, 2),  # capped by the video: floor(3 / 2) * 2
        (3, 16.0, 8, 3),  # num_frames capped by the video (odd: the sampler repeats the last frame)
        (40, 16.0, 7, 8),
    ],
)
def test_sampled_frame_count(total, video_fps, num_frames, expected):
    assert sampled_frame_count(total, video_fps, 2.0, num_frames) == expected


def test_sampled_frame_count_rejects_what_cannot_be_a_video():
    with pytest.raises(ValueError, match="at least 2"):
        sampled_frame_count(10, 16.0, num_frames=1)
    with pytest.raises(ValueError, match="fps > 0"):
        sampled_frame_count(10, 0.0)


def test_sample_video_frames_keeps_first_and_last_and_evens_the_count():
    videos = torch.arange(33.0).view(1, 33, 1, 1, 1).expand(2, -1, 3, 4, 4)
    assert sample_video_frames(videos, 16.0)[0, :, 0, 0, 0].tolist() == [0, 11, 21, 32]
    short = sample_video_frames(videos[:, :3], 16.0, num_frames=8)
    assert short[0, :, 0, 0, 0].tolist() == [0, 1, 2, 2]
    images = torch.rand(2, 3, 4, 4)
    assert torch.equal(sample_video_frames(images, 16.0), images.unsqueeze(1).expand(-1, 2, -1, -1, -1))


def test_smart_resize_keeps_multiples_of_28_within_the_pixel_budget():
    assert smart_resize(480, 832, max_pixels=200704) == (336, 588)  # Wan 480p, VideoReward's 448 x 448 budget
    assert smart_resize(720, 1280, max_pixels=200704) == (336, 588)  # 197 568 pixels
    assert smart_resize(32, 32, min_pixels=56 * 56, max_pixels=200704) == (56, 56)
    with pytest.raises(ValueError, match="Aspect ratio"):
        smart_resize(1, 400)


def test_resize_frames_uint8_lands_on_the_8_bit_grid():
    frames = torch.rand(2, 3, 30, 40)
    resized = resize_frames_uint8(frames, (28, 56))
    assert resized.shape == (2, 3, 28, 56)
    assert torch.equal(resized * 255, (resized * 255).round()) and resized.min() >= 0 and resized.max() <= 1
    assert torch.equal(resize_frames_uint8(frames, (30, 40)), (frames * 255).round() / 255)


def test_patchify_matches_the_transformers_image_processor():
    # An image is a two-frame still video to Qwen2-VL's image processor (the frame repeated over the temporal patch).
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 84, max_pixels=56 * 84)
    image = (np.random.RandomState(0).rand(56, 84, 3) * 255).astype(np.uint8)
    expected = processor(images=[Image.fromarray(image)], return_tensors="pt")
    frame = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    normalised = (frame - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    patches, grid = patchify_video(torch.stack([normalised, normalised]))
    assert grid.tolist() == expected.image_grid_thw[0].tolist() == [1, 4, 6]
    torch.testing.assert_close(patches, expected.pixel_values, atol=1e-6, rtol=0)
    # The whole pipeline on [0, 1] frames already at the target size: the same patches, twice for two videos.
    videos = torch.stack([frame, frame]).unsqueeze(0).expand(2, -1, -1, -1, -1)
    pixels, grids = video_pixel_inputs(videos, max_pixels=56 * 84, min_pixels=56 * 84)
    assert grids.tolist() == [[1, 4, 6], [1, 4, 6]]
    torch.testing.assert_close(pixels, expected.pixel_values.repeat(2, 1), atol=1e-5, rtol=0)


def test_merge_lora_folds_the_adapters_and_modules_to_save():
    base, lora_a, lora_b = torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 2)
    state = {
        "m.q.base_layer.weight": base,
        "m.q.base_layer.bias": torch.ones(4),
        "m.q.lora_A.default.weight": lora_a,
        "m.q.lora_B.default.weight": lora_b,
        "head.original_module.weight": torch.zeros(1, 3),
        "head.modules_to_save.default.weight": torch.ones(1, 3),
        "m.norm.weight": torch.ones(3),
    }
    merged = merge_lora(state, scale=0.5)
    assert set(merged) == {"m.q.weight", "m.q.bias", "head.weight", "m.norm.weight"}
    torch.testing.assert_close(merged["m.q.weight"], base + 0.5 * lora_b @ lora_a)
    assert torch.equal(merged["head.weight"], torch.ones(1, 3))
    with pytest.raises(ValueError, match="incomplete"):
        merge_lora({"m.q.base_layer.weight": base, "m.q.lora_A.default.weight": lora_a}, 1.0)


def test_state_dict_keys_of_both_transformers_layouts():
    old = {"model.layers.0.w": 1, "visual.blocks.0.w": 2, "lm_head.weight": 3, "rm_head.weight": torch.ones(1, 2)}
    new = {"model.language_model.layers.0.w": 1, "model.visual.blocks.0.w": 2, "rm_head.weight": torch.ones(1, 2)}
    for layout in (old, new):
        weights, head = to_qwen2vl_model_keys(layout)
        assert weights == {"language_model.layers.0.w": 1, "visual.blocks.0.w": 2} and head["weight"].shape == (1, 2)
    with pytest.raises(ValueError, match=r"no reward head \(no 'rm_head\.\*' keys\)"):
        to_qwen2vl_model_keys({"model.layers.0.w": 1})
    with pytest.raises(ValueError, match="Unexpected key 'text.w' in the checkpoint"):
        to_qwen2vl_model_keys({"text.w": 1, "rm_head.weight": 2})


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return save_tiny_videoalign_release(tmp_path_factory.mktemp("videoalign"))


def tiny_reward(path, **kwargs) -> VideoAlignReward:
    kwargs.setdefault("model_init_kwargs", {"dtype": torch.float32})
    reward = VideoAlignReward(str(path), **kwargs)
    reward.settings.min_pixels = 28 * 28  # keep the tiny videos tiny (the release's floor is 128 x 28 x 28)
    reward.prompt_template = SHORT_TEMPLATE
    return reward


def test_release_loads_with_lora_merged_and_its_settings(release):
    path, merged, head = release
    reward = tiny_reward(path)
    state = reward.model.state_dict()
    assert set(state) == set(merged)
    for key, value in merged.items():
        torch.testing.assert_close(state[key], value, msg=key)
    assert torch.equal(reward.head.weight, head)
    assert reward.settings.fps == 2.0 and reward.settings.max_pixels == 56 * 56
    assert reward.mean.tolist() == [0.5, -1.0, 0.0] and reward.std.tolist() == [2.0, 0.5, 4.0]
    assert reward.name == "videoalign_overall"


def test_scores_shapes_normalisation_and_dimensions(release):
    reward = tiny_reward(release[0])
    videos, prompts = torch.rand(3, 9, 3, 30, 40, generator=torch.Generator().manual_seed(0)), ["a cat", "dog", "x"]
    raw = reward.raw_scores(prompts, videos)
    assert raw.shape == (3, 3) and raw.dtype == torch.float32 and torch.isfinite(raw).all()
    scores = reward.scores(prompts, videos)
    normalised = (raw - torch.tensor([0.5, -1.0, 0.0])) / torch.tensor([2.0, 0.5, 4.0])
    for index, name in enumerate(("vq", "mq", "ta")):
        torch.testing.assert_close(scores[name], normalised[:, index])
    torch.testing.assert_close(scores["overall"], normalised.sum(dim=1))
    assert reward(prompts=prompts, images=videos) == scores["overall"].tolist()
    reward.dimension = "mq"
    assert reward(prompts=prompts, images=videos) == scores["mq"].tolist()
    reward.normalize = False
    torch.testing.assert_close(torch.tensor(reward(prompts=prompts, images=videos)), raw[:, 1])


def test_scores_do_not_depend_on_batching_and_are_deterministic(release):
    reward = tiny_reward(release[0], batch_size=3)
    videos = torch.rand(3, 5, 3, 30, 40, generator=torch.Generator().manual_seed(1))
    prompts = ["a long prompt about a cat", "b", "a dog"]  # different lengths: right padding
    together = reward.raw_scores(prompts, videos)
    assert torch.equal(together, reward.raw_scores(prompts, videos))
    reward.batch_size = 1
    alone = reward.raw_scores(prompts, videos)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # The prompt and the video both matter.
    assert not torch.allclose(reward.raw_scores(["a dog"], videos[:1]), alone[:1])
    assert not torch.allclose(reward.raw_scores(prompts[:1], videos[1:2]), alone[:1])


def test_the_release_prompt_and_images(release):
    reward = tiny_reward(release[0])
    reward.prompt_template = VIDEOALIGN_PROMPT
    scores = reward(prompts=["a red ball"], images=torch.rand(1, 3, 30, 40))  # an image: a two-frame still video
    assert len(scores) == 1 and np.isfinite(scores[0])


def test_three_output_head_reads_its_diagonal(tmp_path):
    path, _, head = save_tiny_videoalign_release(tmp_path, output_dim=3)
    reward = tiny_reward(path, normalize=False)
    videos = torch.rand(2, 4, 3, 28, 28)
    raw = reward.raw_scores(["a", "b"], videos)
    reward.head.weight.data = torch.eye(3)[[1, 2, 0]] @ head  # rows permuted: the diagonal picks other rows
    assert raw.shape == (2, 3) and not torch.allclose(raw, reward.raw_scores(["a", "b"], videos))


def test_loading_errors_name_the_fix(release, tmp_path):
    with pytest.raises(ValueError, match="dimension='quality'"):
        VideoAlignReward(str(release[0]), dimension="quality")
    with pytest.raises(ValueError, match="no model_config.json"):
        VideoAlignReward(str(tmp_path))
    config = json.loads((release[0] / "model_config.json").read_text())
    config["data_config"]["prompt_template_type"] = "simple"
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="detailed_special"):
        VideoAlignReward(str(tmp_path))
    config["data_config"]["prompt_template_type"] = "detailed_special"
    (tmp_path / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no checkpoint-<step>"):
        VideoAlignReward(str(tmp_path))
    with pytest.raises(ValueError, match="no checkpoint-3"):
        VideoAlignReward(str(release[0]), checkpoint_step=3)


def test_registered_name_selects_dimension_release_and_options(release):
    from trl_ddrl.rewards import get_reward_function

    reward = get_reward_function(f"videoalign:mq,{release[0]},video_fps=24,min_pixels=784,normalize=false")
    assert isinstance(reward, VideoAlignReward) and reward.dimension == "mq" and reward.name == "videoalign_mq"
    assert reward.video_fps == 24.0 and reward.settings.min_pixels == 784 and not reward.normalize
    assert get_reward_function(f"videoalign:{release[0]}").dimension == "overall"
    with pytest.raises(ValueError, match="no option 'fps'"):
        get_reward_function(f"videoalign:vq,{release[0]},fps=2")
    with pytest.raises(ValueError, match="video_fps='fast' is not a float"):
        get_reward_function(f"videoalign:vq,{release[0]},video_fps=fast")


def test_cli_trains_with_videoalign_and_a_vlm_judge(release, tiny_sd3_path, tmp_path, monkeypatch):
    from tiny_models import save_tiny_llava_judge

    from trl_ddrl import cli

    monkeypatch.setattr(cli, "runs_in_one_process", lambda: True)
    judge = save_tiny_llava_judge(tmp_path / "judge", answer_token="4")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    argv = [
        "--model_name_or_path", tiny_sd3_path,
        "--dataset_name", str(tmp_path / "prompts.jsonl"),
        "--output_dir", str(tmp_path / "out"),
        "--reward_funcs", f"videoalign:vq,{release[0]},min_pixels=784", f"vlm_judge:{judge},max_new_tokens=1",
        "--max_steps", "1", "--save_steps", "1",
        "--num_generations", "2", "--prompts_per_step", "2", "--num_inference_steps", "2",
        "--per_device_train_batch_size", "4", "--max_sequence_length", "16", "--data_beta", "0",
        "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    state = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())
    logged = state["log_history"][0]  # each reward under its object's name
    assert np.isfinite(logged["rewards/videoalign_vq/mean"]) and logged["rewards/videoalign_vq/std"] > 0
    assert logged["rewards/vlm_judge_judge/mean"] == 4.0


def test_the_decoder_sees_sequential_positions_as_in_the_release(release):
    """
    The release's reward forward (transformers 4.45) embeds the video itself and calls the text decoder with
    `position_ids=None`, i.e. positions 0 .. L-1 on all three M-RoPE axes, not Qwen2-VL's multimodal positions.
    """
    reward = tiny_reward(release[0], normalize=False)
    videos, prompts = torch.rand(2, 4, 3, 28, 56, generator=torch.Generator().manual_seed(2)), ["a cat", "a dog"]
    model, vision = reward.model, reward.model.config.vision_config
    frames = sample_video_frames(videos, reward.video_fps, reward.settings.fps, reward.settings.num_frames)
    pixels, grid = video_pixel_inputs(frames, reward.settings.max_pixels, reward.settings.min_pixels)
    count = int(grid[0].prod()) // vision.spatial_merge_size**2
    ids = torch.tensor([reward._text_ids(prompt, count) for prompt in prompts])  # equal lengths: no padding
    embeds = model.get_input_embeddings()(ids)
    video_embeds = torch.cat(model.get_video_features(pixels, grid).pooler_output)
    embeds = embeds.masked_scatter((ids == reward.video_token_id).unsqueeze(-1), video_embeds)
    positions = torch.arange(ids.shape[1]).expand(3, *ids.shape)
    hidden = model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
    rows = torch.stack([(ids == token).nonzero()[:, 1] for token in reward.reward_token_ids], dim=1)
    expected = reward.head(hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])))[..., 0]
    torch.testing.assert_close(reward.raw_scores(prompts, videos), expected, atol=1e-5, rtol=1e-5)
