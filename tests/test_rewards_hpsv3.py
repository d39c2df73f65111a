# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""HPSv3 on a tiny random Qwen2-VL saved in the release's checkpoint layout."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_hpsv3_checkpoint

from trl_ddrl.rewards.hpsv3 import HEAD_KEYS, HPSV3_PROMPT, REWARD_TOKEN, HPSv3Reward


SMALL = 28 * 56  # keep the tiny images tiny (the release resizes every image to 200 704 pixels)


def tiny_reward(path, base, **kwargs) -> HPSv3Reward:
    kwargs = {"model_init_kwargs": {"dtype": torch.float32}, "max_pixels": SMALL, "min_pixels": SMALL} | kwargs
    reward = HPSv3Reward(str(path), base_model_name_or_path=str(base), **kwargs)
    reward.prompt_template = "rate {text_prompt} <|Reward|> END"  # a short stand-in for the 2 400-character prompt
    return reward


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_hpsv3_checkpoint(tmp_path_factory.mktemp("hpsv3"))


@pytest.mark.parametrize("layout", ["new", "old"])
def test_the_release_layouts_load_with_their_head(tmp_path, layout):
    path, base, model, head = save_tiny_hpsv3_checkpoint(tmp_path, layout=layout)
    reward = tiny_reward(path, base)
    state = reward.model.state_dict()
    assert set(state) == set(model)
    for key, value in model.items():
        assert torch.equal(state[key], value), key
    assert all(torch.equal(reward.head.state_dict()[key], head[key]) for key in HEAD_KEYS)
    assert reward.head[0].weight.dtype == torch.float32 and reward.name == "hpsv3"
    # `<|Reward|>` is the token after the base tokenizer's last one, the checkpoint's last embedding row.
    assert reward.reward_token_id == model["language_model.embed_tokens.weight"].shape[0] - 1
    # A folder holding the file loads too.
    assert HPSv3Reward(str(path.parent), base_model_name_or_path=str(base)).reward_token_id == reward.reward_token_id


def test_mu_sigma_shapes_and_the_reward_is_mu(checkpoint):
    reward = tiny_reward(*checkpoint[:2])
    images, prompts = torch.rand(3, 3, 30, 40, generator=torch.Generator().manual_seed(0)), ["a cat", "dog", "x"]
    mu_sigma = reward.mu_sigma(prompts, images)
    assert mu_sigma.shape == (3, 2) and mu_sigma.dtype == torch.float32 and torch.isfinite(mu_sigma).all()
    assert (mu_sigma[:, 1] > 0).all()  # the head's second output is log sigma
    assert reward(prompts=prompts, images=images) == mu_sigma[:, 0].tolist()
    # A video scores the mean of its frames.
    videos = torch.stack([images, images.flip(0)], dim=1)  # [3, 2, C, H, W]
    expected = (mu_sigma[:, 0] + reward.mu_sigma(prompts, images.flip(0))[:, 0]) / 2
    torch.testing.assert_close(torch.tensor(reward(prompts=prompts, images=videos)), expected, atol=1e-5, rtol=1e-5)


def test_scores_do_not_depend_on_batching_and_are_deterministic(checkpoint):
    reward = tiny_reward(*checkpoint[:2], batch_size=3)
    images = torch.rand(3, 3, 30, 40, generator=torch.Generator().manual_seed(1))
    prompts = ["a long prompt about a cat", "b", "a dog"]  # different lengths: right padding
    together = reward.mu_sigma(prompts, images)
    assert torch.equal(together, reward.mu_sigma(prompts, images))
    reward.batch_size = 1
    torch.testing.assert_close(together, reward.mu_sigma(prompts, images), atol=1e-5, rtol=1e-5)
    # The prompt and the image both matter.
    assert not torch.allclose(reward.mu_sigma(["a dog"], images[:1]), together[:1])
    assert not torch.allclose(reward.mu_sigma(prompts[:1], images[1:2]), together[:1])


def test_a_perturbed_head_changes_the_score(checkpoint):
    reward = tiny_reward(*checkpoint[:2])
    images = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    before = reward(prompts=["a", "b"], images=images)
    reward.head[5].bias.data[0] += 1.0  # the output layer's mu bias: every score moves by exactly 1
    torch.testing.assert_close(torch.tensor(reward(prompts=["a", "b"], images=images)), torch.tensor(before) + 1)
    reward.head[0].weight.data.mul_(-1)
    assert not torch.allclose(torch.tensor(reward(prompts=["a", "b"], images=images)), torch.tensor(before) + 1)


def test_the_release_prompt_and_resolution(checkpoint):
    assert HPSV3_PROMPT.count("{text_prompt}") == 1 and HPSV3_PROMPT.count(REWARD_TOKEN) == 1
    assert HPSV3_PROMPT.endswith("Please provide the overall ratings of this image: <|Reward|>\n\nEND\n")
    reward = HPSv3Reward(
        str(checkpoint[0]), base_model_name_or_path=str(checkpoint[1]), model_init_kwargs={"dtype": torch.float32}
    )
    assert reward.max_pixels == reward.min_pixels == 256 * 28 * 28
    scores = reward(prompts=['a sign that says "<|Reward|>"'], images=torch.rand(1, 3, 64, 48))
    assert len(scores) == 1 and torch.isfinite(torch.tensor(scores)).all()  # the prompt's own token was removed


def test_a_wrong_or_missing_head_names_the_file_and_the_expected_keys(checkpoint, tmp_path):
    path, base = checkpoint[:2]
    state = load_file(path)
    linear = {key: value for key, value in state.items() if not key.startswith("rm_head.")}
    save_file(linear | {"rm_head.weight": torch.ones(2, 16)}, tmp_path / "linear.safetensors")
    with pytest.raises(ValueError, match=r"linear\.safetensors has keys \['rm_head\.weight'\].*'rm_head\.0\.weight'"):
        HPSv3Reward(str(tmp_path / "linear.safetensors"), base_model_name_or_path=str(base))
    save_file(linear, tmp_path / "headless.safetensors")
    with pytest.raises(ValueError, match=r"headless\.safetensors has no reward head \(no 'rm_head\.\*' keys\)"):
        HPSv3Reward(str(tmp_path / "headless.safetensors"), base_model_name_or_path=str(base))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds neither HPSv3.safetensors nor model.pth"):
        HPSv3Reward(str(tmp_path / "empty"))


def test_registered_name_takes_checkpoint_base_and_options(checkpoint):
    from trl_ddrl.rewards import HPSv3Reward as Exported
    from trl_ddrl.rewards import get_reward_function

    reward = get_reward_function(f"hpsv3:{checkpoint[0]},{checkpoint[1]},max_pixels=1568,batch_size=2")
    assert isinstance(reward, Exported) and reward.max_pixels == 1568 and reward.batch_size == 2
    with pytest.raises(ValueError, match="no option 'fps'"):
        get_reward_function(f"hpsv3:{checkpoint[0]},{checkpoint[1]},fps=2")


def test_cli_trains_with_hpsv3(checkpoint, tiny_sd3_path, tmp_path, monkeypatch):
    from trl_ddrl import cli

    monkeypatch.setattr(cli, "runs_in_one_process", lambda: True)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    argv = [
        "--model_name_or_path", tiny_sd3_path,
        "--dataset_name", str(tmp_path / "prompts.jsonl"),
        "--output_dir", str(tmp_path / "out"),
        "--reward_funcs", f"hpsv3:{checkpoint[0]},{checkpoint[1]},max_pixels={SMALL},min_pixels={SMALL}",
        "--max_steps", "1", "--save_steps", "1",
        "--num_generations", "2", "--prompts_per_step", "2", "--num_inference_steps", "2",
        "--per_device_train_batch_size", "4", "--max_sequence_length", "16", "--data_beta", "0",
        "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    logged = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())["log_history"][0]
    assert np.isfinite(logged["rewards/hpsv3/mean"]) and logged["rewards/hpsv3/std"] > 0


def test_the_release_resolution_matches_the_transformers_image_processor():
    """A 512 x 384 image at 200 704 pixels: the torch resize is within one 8-bit level of Qwen2-VL's PIL processor."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from trl_ddrl.rewards.hpsv3 import IMAGE_PIXELS
    from trl_ddrl.rewards.qwen_vision import OPENAI_CLIP_STD, video_pixel_inputs

    y, x = np.mgrid[0:512, 0:384] / 40.0
    image = np.stack([np.sin(x) * np.cos(y), np.sin(x + y), np.cos(x * 0.7)], axis=-1) * 127 + 128
    image = image.round().astype(np.uint8)
    processor = Qwen2VLImageProcessorPil(min_pixels=IMAGE_PIXELS, max_pixels=IMAGE_PIXELS)
    expected = processor(images=[Image.fromarray(image)], return_tensors="pt")
    frame = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    pixels, grid = video_pixel_inputs(frame[None, None].expand(1, 2, -1, -1, -1), IMAGE_PIXELS, IMAGE_PIXELS)
    # 196 608 pixels is below the floor: scaled up and rounded up to 532 x 392 (both processors do so).
    assert grid.tolist() == expected.image_grid_thw.tolist() == [[1, 38, 28]]
    one_level = 1.01 / 255 / min(OPENAI_CLIP_STD)
    assert (pixels - expected.pixel_values).abs().max() <= one_level
