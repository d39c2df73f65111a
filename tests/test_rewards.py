# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Reward library: validation, registry, model rewards built from tiny random checkpoints, per-frame video scoring."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tiny_models import tiny_clip_tokenizer
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from trl_ddrl.rewards import (
    AestheticScore,
    CLIPScore,
    HPSv2Score,
    ImageRewardScore,
    OCRReward,
    PerFrameReward,
    PickScore,
    RewardFunctionError,
    available_rewards,
    check_rewards,
    get_reward_function,
    register_reward,
)
from trl_ddrl.rewards.models import clip_preprocess
from trl_ddrl.rewards.ocr import edit_distance, quoted_text


PROMPTS = ["a red cat", "a dog", "a red cat"]


def random_images(*shape: int, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] on the 8-bit grid (so PIL round trips are exact)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=generator).float() / 255


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIPModel (projection 8, 16x16 images) with a tokenizer and a CLIP image processor config."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=8,
        logit_scale_init_value=3.0,
    )
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def reference_logits(clip_dir, prompts: list[str], images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Diagonal `[B]` of `logits_per_image` (transformers processor + `CLIPModel.forward`), and `exp(logit_scale)`."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = tiny_clip_tokenizer()
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    pil = [Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()) for image in images]
    pixels = torch.as_tensor(processor(images=pil, return_tensors="pt")["pixel_values"])
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    return output.logits_per_image.diagonal(), model.logit_scale.exp().item()


# ---- validation and registry ----------------------------------------------------------------------------------------


def test_check_rewards_accepts_numbers_and_maps_none_to_nan():
    checked = check_rewards([1, 2.5, None, torch.tensor(0.5)], 4, "f", ["a", "b", "c", "d"])
    assert checked[:2] == [1.0, 2.5] and math.isnan(checked[2]) and checked[3] == 0.5
    # 1-D arrays and tensors (any dtype) are lists of numbers too.
    assert check_rewards(np.array([1, 2]), 2, "f", ["a", "b"]) == [1.0, 2.0]
    assert check_rewards(torch.tensor([0.5, 1.5], dtype=torch.bfloat16), 2, "f", ["a", "b"]) == [0.5, 1.5]


@pytest.mark.parametrize(
    "values, message",
    [
        ([1.0], "returned 1 rewards for 2 samples"),
        ([1.0, float("nan")], "returned nan for the prompt 'b'"),
        ([float("inf"), 1.0], "returned inf for the prompt 'a'"),
        (["high", 1.0], "rewards must be numbers or None"),
        (torch.ones(2, 1), "returned Tensor of shape (2, 1)"),
        ([1.0, 1e38], "returned 1e+38 for the prompt 'b', beyond +-1e+15, where float32 arithmetic overflows"),
    ],
)
def test_check_rewards_errors_name_the_function_and_prompt(values, message):
    with pytest.raises(RewardFunctionError, match="Reward function 'my_reward'") as error:
        check_rewards(values, 2, "my_reward", ["a", "b"])
    assert message in str(error.value)


def test_check_rewards_can_mark_invalid_values_unscored_and_report_them():
    problems = []
    checked = check_rewards([1.0, float("nan"), "high", -1e20], 4, "my_reward", ["a", "b", "c", "d"], problems)
    assert checked[0] == 1.0 and all(math.isnan(value) for value in checked[1:])
    assert [problem.split(" for the prompt ")[1][:3] for problem in problems] == ["'b'", "'c'", "'d'"]
    with pytest.raises(RewardFunctionError, match="returned 1 rewards"):
        check_rewards([1.0], 2, "my_reward", ["a", "b"], problems)


def test_registry_lists_builtins_and_rejects_unknown_and_duplicate_names():
    names = available_rewards()
    for name in ["aesthetic", "brightness", "clip_score", "hpsv2", "jpeg_compressibility", "ocr", "pickscore"]:
        assert name in names
    with pytest.raises(ValueError, match="Unknown reward function 'clip_scor'") as error:
        get_reward_function("clip_scor")
    assert "clip_score" in str(error.value) and "jpeg_compressibility" in str(error.value)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("brightness")(lambda: None)


def test_builtin_rewards_score_images_and_videos():
    images = random_images(2, 3, 16, 16)
    flat = torch.zeros(2, 3, 16, 16)
    compress = get_reward_function("jpeg_compressibility")
    assert all(f > n for f, n in zip(compress(PROMPTS[:2], flat), compress(PROMPTS[:2], images), strict=True))
    videos = torch.stack([images, flat], dim=1)  # [2, 2, 3, 16, 16]
    brightness = get_reward_function("brightness")
    assert brightness(PROMPTS[:2], videos) == pytest.approx((videos.mean(dim=(1, 2, 3, 4))).tolist())


# ---- CLIP-based rewards ---------------------------------------------------------------------------------------------


def test_clip_preprocess_matches_the_transformers_image_processor():
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    for shape in [(16, 16), (40, 32), (24, 48)]:
        image = random_images(1, 3, *shape, seed=shape[0])
        pil = Image.fromarray((image[0].permute(1, 2, 0) * 255).round().byte().numpy())
        expected = torch.as_tensor(processor(images=[pil], return_tensors="pt")["pixel_values"])
        actual = clip_preprocess(image, 16)
        assert actual.shape == (1, 3, 16, 16)
        # PIL resizes 8-bit pixels, torch floats: equal on the identity, within rounding after a resize.
        assert torch.allclose(actual, expected, atol=1e-5 if shape == (16, 16) else 0.05), shape
    grey = clip_preprocess(torch.ones(2, 1, 16, 16), 16)
    assert grey.shape == (2, 3, 16, 16) and torch.allclose(grey, clip_preprocess(torch.ones(2, 3, 16, 16), 16))


def test_clip_score_loads_by_name_and_equals_the_transformers_forward(clip_dir):
    reward = get_reward_function(f"clip_score:{clip_dir}")
    assert isinstance(reward, CLIPScore) and reward.name == "clip_score"
    images = random_images(3, 3, 16, 16)
    logits, logit_scale = reference_logits(clip_dir, PROMPTS, images)
    scores = reward(prompts=PROMPTS, images=images, trainer_state=None, extra_column=[1, 2, 3])
    assert scores == pytest.approx((logits / logit_scale).tolist(), abs=1e-5)
    assert all(-1 <= score <= 1 for score in scores)
    # batching and the prompt de-duplication do not change the result
    reward.batch_size = 2
    assert reward(PROMPTS, images) == pytest.approx(scores, abs=1e-6)
    assert CLIPScore(str(clip_dir), scale=2.5)(PROMPTS, images) == pytest.approx([2.5 * s for s in scores], abs=1e-5)


def test_pickscore_and_hpsv2_scale_the_cosine(clip_dir):
    images = random_images(3, 3, 16, 16, seed=1)
    logits, logit_scale = reference_logits(clip_dir, PROMPTS, images)
    assert logit_scale == pytest.approx(math.exp(3.0))
    pick = get_reward_function(f"pickscore:{clip_dir},{clip_dir}")
    assert isinstance(pick, PickScore)
    assert pick(PROMPTS, images) == pytest.approx(logits.tolist(), abs=1e-4)
    hps = get_reward_function(f"hpsv2:{clip_dir}")
    assert isinstance(hps, HPSv2Score)
    assert hps(PROMPTS, images) == pytest.approx((100 * logits / logit_scale).tolist(), abs=1e-3)


def test_clip_rewards_explain_missing_checkpoints_and_tokenizers(clip_dir, tmp_path):
    with pytest.raises(ValueError, match="convert them to a transformers CLIPModel"):
        get_reward_function("hpsv2")
    with pytest.raises(ValueError, match="could not load a transformers CLIPModel from"):
        CLIPScore(str(tmp_path / "missing"))
    CLIPModel.from_pretrained(clip_dir).save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match="found no usable tokenizer.*processor_name_or_path"):
        CLIPScore(str(tmp_path / "no_tokenizer"))
    assert len(CLIPScore(str(tmp_path / "no_tokenizer"), str(clip_dir))(PROMPTS[:1], random_images(1, 3, 16, 16))) == 1


def test_clip_score_on_videos_averages_frames(clip_dir):
    reward = CLIPScore(str(clip_dir))
    videos = random_images(2, 3, 3, 20, 16, seed=2)  # [B=2, F=3, C, H, W], non-square frames
    per_frame = reward([p for p in PROMPTS[:2] for _ in range(3)], videos.flatten(0, 1))
    expected = torch.tensor(per_frame).view(2, 3).mean(dim=1)
    assert reward(PROMPTS[:2], videos) == pytest.approx(expected.tolist(), abs=1e-6)


# ---- aesthetic predictor --------------------------------------------------------------------------------------------


class OriginalAestheticMLP(nn.Module):
    """The layout of improved-aesthetic-predictor's MLP, written out here independently of trl_ddrl."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("file_format", ["pth", "safetensors"])
def test_aesthetic_loads_the_original_state_dict_layout(clip_dir, tmp_path, file_format):
    torch.manual_seed(0)
    original = OriginalAestheticMLP(8).eval()
    if file_format == "pth":
        path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
        torch.save(original.state_dict(), path)
        spec = f"aesthetic:{tmp_path},{clip_dir}"  # a directory holding the original file name
    else:
        path = tmp_path / "mlp.safetensors"
        save_file(original.state_dict(), path)
        spec = f"aesthetic:{path},{clip_dir}"
    reward = get_reward_function(spec)
    assert isinstance(reward, AestheticScore)
    images = random_images(3, 3, 16, 16, seed=3)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=clip_preprocess(images, 16)).pooler_output
        expected = original(F.normalize(model.visual_projection(pooled), dim=-1)).squeeze(-1)
    assert reward(PROMPTS, images) == pytest.approx(expected.tolist(), abs=1e-5)


def test_aesthetic_rejects_wrong_layouts_and_sizes(clip_dir, tmp_path):
    torch.save({"net.0.weight": torch.zeros(1024, 8)}, tmp_path / "wrong_keys.pth")
    with pytest.raises(ValueError, match="expected the keys of the original MLP"):
        AestheticScore(str(tmp_path / "wrong_keys.pth"), str(clip_dir))
    state_dict = OriginalAestheticMLP(8).state_dict()
    del state_dict["layers.7.bias"]
    torch.save(state_dict, tmp_path / "missing_key.pth")
    with pytest.raises(ValueError, match=r"missing keys \['layers.7.bias'\]"):
        AestheticScore(str(tmp_path / "missing_key.pth"), str(clip_dir))
    torch.save(OriginalAestheticMLP(768).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="takes 768-dim embeddings but .* projects to 8"):
        AestheticScore(str(tmp_path / "l14.pth"), str(clip_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        AestheticScore(str(tmp_path / "empty"), str(clip_dir))


# ---- ImageReward and OCR hooks --------------------------------------------------------------------------------------


def test_image_reward_without_the_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # makes `import ImageReward` fail
    with pytest.raises(ImportError, match="pip install image-reward"):
        ImageRewardScore()
    with pytest.raises(ImportError, match="pip install image-reward"):
        get_reward_function("image_reward")


def test_ocr_rewards_edit_distance_to_the_quoted_text():
    assert quoted_text('a sign that says "Hello World" at night') == "Hello World"
    assert quoted_text("a sign that says “Open”") == "Open"
    assert quoted_text("no quotes here") is None
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3

    recognized = ["hello world", "HXLLO", "anything", "a completely different and much longer text"]
    reward = OCRReward(recognize=lambda images: recognized[: len(images)])
    prompts = ['a sign "Hello World"', 'a sign "hello"', "no target", 'a sign "abc"']
    rewards = reward(prompts, torch.zeros(4, 3, 8, 8))
    assert rewards == [1.0, pytest.approx(0.8), None, 0.0]

    by_column = OCRReward(recognize=lambda images: ["abd"] * len(images), target_column="text")
    assert by_column(["p", "q"], torch.zeros(2, 3, 8, 8), text=["abd", "abc"]) == [1.0, pytest.approx(2 / 3)]
    with pytest.raises(KeyError, match="no such column"):
        by_column(["p"], torch.zeros(1, 3, 8, 8))


def test_ocr_on_videos_and_without_an_engine(monkeypatch):
    frames_seen = []

    def recognize(images):
        frames_seen.append(images.shape[0])
        return ["ab", "xy"] * (images.shape[0] // 2)  # frame 0 right, frame 1 wrong

    rewards = OCRReward(recognize=recognize)(['"ab"', '"xy"'], torch.zeros(2, 2, 3, 8, 8))
    assert frames_seen == [4] and rewards == [pytest.approx(0.5), pytest.approx(0.5)]
    monkeypatch.setitem(sys.modules, "pytesseract", None)
    with pytest.raises(ImportError, match="pass recognize="):
        get_reward_function("ocr")


# ---- per-frame video wrapper ----------------------------------------------------------------------------------------


def test_per_frame_reward_averages_frames_and_repeats_columns():
    calls = []

    def frame_brightness(prompts, images, **kwargs):
        calls.append((list(prompts), images.shape, kwargs))
        return images.mean(dim=(1, 2, 3)).tolist()

    videos = random_images(2, 4, 3, 8, 8, seed=4)  # [B=2, F=4, C, H, W]
    reward = PerFrameReward(frame_brightness)
    assert reward.name == "frame_brightness"
    rewards = reward(prompts=["a", "b"], images=videos, trainer_state="state", label=[0, 1])
    assert rewards == pytest.approx(videos.mean(dim=(2, 3, 4)).mean(dim=1).tolist(), abs=1e-6)
    prompts, shape, kwargs = calls[-1]
    assert prompts == ["a"] * 4 + ["b"] * 4 and shape == (8, 3, 8, 8)
    assert kwargs == {"trainer_state": "state", "label": [0, 0, 0, 0, 1, 1, 1, 1]}

    two = PerFrameReward(frame_brightness, num_frames=2)(["a", "b"], videos)
    assert two == pytest.approx(videos[:, [0, 3]].mean(dim=(1, 2, 3, 4)).tolist(), abs=1e-6)
    images = videos[:, 0]
    assert reward(["a", "b"], images) == pytest.approx(images.mean(dim=(1, 2, 3)).tolist())


def test_per_frame_reward_ignores_unscored_frames_and_validates():
    def first_frame_only(prompts, images, **kwargs):
        return [1.0 if i % 3 == 0 else None for i in range(len(prompts))] if prompts[0] != "none" else [None] * 3

    reward = PerFrameReward(first_frame_only)
    assert reward(["a", "b"], torch.zeros(2, 3, 3, 4, 4)) == [1.0, 1.0]
    assert reward(["none"], torch.zeros(1, 3, 3, 4, 4)) == [None]
    with pytest.raises(RewardFunctionError, match="'first_frame_only' returned 3 rewards for 6 samples"):
        reward(["none", "b"], torch.zeros(2, 3, 3, 4, 4))
    with pytest.raises(ValueError, match="num_frames=0"):
        PerFrameReward(first_frame_only, num_frames=0)


def test_per_frame_reward_is_a_module_that_moves_a_wrapped_model(clip_dir):
    wrapped = PerFrameReward(CLIPScore(str(clip_dir)), num_frames=2)
    assert isinstance(wrapped, nn.Module) and wrapped.name == "clip_score"
    assert any(True for _ in wrapped.parameters())
    videos = random_images(2, 5, 3, 16, 16, seed=5)
    expected = CLIPScore(str(clip_dir))(PROMPTS[:2], videos[:, [0, 4]])
    assert wrapped(PROMPTS[:2], videos) == pytest.approx(expected, abs=1e-6)


def test_every_registered_reward_is_documented():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "rewards.md").read_text()
    missing = [name for name in available_rewards() if f"`{name}" not in docs]
    assert not missing, f"rewards missing from docs/rewards.md: {missing}"
