# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Every example script runs end to end, one optimizer step, on a tiny random pipeline of its family saved to disk.

The scripts are run as `__main__` with their own argument parsing; only the model, the data, the reward (the scripts'
defaults are Hub reward models), the resolution and the number of steps are changed from the command line.
"""

import functools
import json
import os
import runpy
import sys

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from tiny_models import (
    TINY_HUNYUAN_GLYPH_LENGTH,
    tiny_cosmos2_5_pipeline,
    tiny_cosmos2_pipeline,
    tiny_flux2_pipeline,
    tiny_flux_pipeline,
    tiny_hunyuan_video15_pipeline,
    tiny_qwenimage_edit_pipeline,
    tiny_qwenimage_pipeline,
    tiny_sd3_pipeline,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
    tiny_wan22_pipeline,
    tiny_wan_i2v_pipeline,
    tiny_wan_pipeline,
)

from trl_ddrl import DDRLConfig


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
PROMPTS = ["a cat", "a dog", "a red car", "a tree"]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    """A prompt file, an image folder with captions, a videos JSON-lines file and a Cosmos prompt/image file."""
    root = tmp_path_factory.mktemp("example-data")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    images = root / "images"
    images.mkdir()
    videos, cosmos = [], []
    for index, prompt in enumerate(PROMPTS):
        Image.new("RGB", (32, 32), (60 * index, 100, 200)).save(images / f"{index}.png")
        frames = [Image.new("RGB", (32, 32), (40 * index + 10 * k, 100, 200)) for k in range(5)]
        frames[0].save(root / f"{index}.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
        videos.append({"video": str(root / f"{index}.gif"), "text": prompt})
        cosmos.append({"prompt": prompt, "image": str(images / f"{index}.png")})
    (images / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": f"{index}.png", "prompt": prompt}) + "\n" for index, prompt in enumerate(PROMPTS)
        )
    )
    (root / "videos.jsonl").write_text("".join(json.dumps(row) + "\n" for row in videos))
    (root / "cosmos.jsonl").write_text("".join(json.dumps(row) + "\n" for row in cosmos))
    edits = [
        {"source_image": str(images / f"{index}.png"), "image": str(images / f"{(index + 1) % 4}.png"), "prompt": p}
        for index, p in enumerate(PROMPTS)
    ]
    (root / "edits.jsonl").write_text("".join(json.dumps(row) + "\n" for row in edits))
    return {
        "prompts": str(root / "prompts.txt"),
        "images": str(images),
        "videos": str(root / "videos.jsonl"),
        "cosmos": str(root / "cosmos.jsonl"),
        "edits": str(root / "edits.jsonl"),
    }


def image_args(data: dict[str, str]) -> list[str]:
    return ["--prompts", data["prompts"], "--data_dataset", data["images"], "--resolution", "16"]


# script, tiny pipeline, denoiser folder, arguments beyond --model/--output_dir/--reward/--max_steps
CASES = {
    "sd3": ("train_sd3.py", tiny_sd3_pipeline, "transformer", lambda data: [*image_args(data), "--no_bf16"]),
    "sd3-lora": (
        "train_sd3.py",
        tiny_sd3_pipeline,
        "transformer",
        lambda data: [*image_args(data), "--no_bf16", "--lora", "--guidance_scale", "1"],
    ),
    "sd15": ("train_sd15.py", tiny_sd15_pipeline, "unet", image_args),
    "sd15-lora": ("train_sd15.py", tiny_sd15_pipeline, "unet", lambda data: [*image_args(data), "--lora"]),
    "sdxl": ("train_sdxl.py", tiny_sdxl_pipeline, "unet", lambda data: [*image_args(data), "--no_bf16"]),
    "flux": ("train_flux.py", tiny_flux_pipeline, "transformer", lambda data: [*image_args(data), "--no_bf16"]),
    "flux2": ("train_flux2.py", tiny_flux2_pipeline, "transformer", lambda data: [*image_args(data), "--no_bf16"]),
    "flux2-klein-lora": (
        "train_flux2.py",
        functools.partial(tiny_flux2_pipeline, klein=True),
        "transformer",
        lambda data: [*image_args(data), "--no_bf16", "--lora", "--guidance_scale", "2.0"],
    ),
    "wan": (
        "train_wan.py",
        tiny_wan_pipeline,
        "transformer",
        lambda data: (
            ["--prompts", data["prompts"], "--data_videos", data["videos"], "--no_bf16"]
            + ["--height", "32", "--width", "32", "--num_frames", "5"]
        ),
    ),
    "wan2.2-low_noise": (
        "train_wan.py",
        tiny_wan22_pipeline,
        "transformer_2",
        lambda data: (
            [
                "--prompts",
                data["prompts"],
                "--data_videos",
                data["videos"],
                "--no_bf16",
                "--train_experts",
                "low_noise",
            ]
            + ["--height", "32", "--width", "32", "--num_frames", "5"]
        ),
    ),
    "wan2.2-lora": (
        "train_wan.py",
        tiny_wan22_pipeline,
        "transformer",
        lambda data: (
            ["--prompts", data["prompts"], "--data_videos", data["videos"], "--no_bf16", "--lora"]
            + ["--height", "32", "--width", "32", "--num_frames", "5"]
        ),
    ),
    "hunyuan_video15": (
        "train_hunyuan_video15.py",
        tiny_hunyuan_video15_pipeline,
        "transformer",
        lambda data: (
            ["--prompts", data["prompts"], "--data_videos", data["videos"], "--no_bf16"]
            + ["--height", "32", "--width", "32", "--num_frames", "5"]
        ),
    ),
    "cosmos": (
        "train_cosmos.py",
        tiny_cosmos2_pipeline,
        "transformer",
        lambda data: ["--prompts", data["cosmos"], "--height", "32", "--width", "32", "--no_bf16"],
    ),
    "qwenimage-lora": (
        "train_qwenimage.py",
        tiny_qwenimage_pipeline,
        "transformer",
        lambda data: (
            ["--prompts", data["prompts"], "--data_dataset", data["images"], "--resolution", "32"]
            + ["--lora", "--no_bf16"]
        ),
    ),
    "qwenimage-edit": (
        "train_qwenimage_edit.py",
        tiny_qwenimage_edit_pipeline,
        "transformer",
        lambda data: ["--edits", data["edits"], "--resolution", "32", "--no_bf16"],
    ),
    "wan-i2v": (
        "train_wan_i2v.py",
        tiny_wan_i2v_pipeline,
        "transformer",
        lambda data: ["--data", data["videos"], "--no_bf16", "--height", "32", "--width", "32", "--num_frames", "5"],
    ),
    "cosmos2.5": (
        "train_cosmos2_5.py",
        tiny_cosmos2_5_pipeline,
        "transformer",
        lambda data: (
            ["--data", data["videos"], "--num_conditioning_frames", "1", "--no_bf16"]
            + ["--height", "32", "--width", "32", "--num_frames", "5"]
        ),
    ),
}


def shrink_the_iteration(monkeypatch) -> None:
    """
    The examples' DDRLConfig at a test's size: 2 prompts x 2 samples, 4 sampling steps, micro-batches of 2 (the scripts' 4 x 8 x 20 steps
    made this file most of the default suite's time). Everything else in the scripts' configs is kept.
    """
    original_post_init = DDRLConfig.__post_init__

    def post_init(self):
        self.prompts_per_step, self.num_generations, self.num_inference_steps = 2, 2, 4
        self.per_device_train_batch_size = 2  # divides the 4 samples' trained steps of any expert
        if self.rollout_batch_size is not None:
            self.rollout_batch_size = min(self.rollout_batch_size, 4)
        original_post_init(self)

    monkeypatch.setattr(DDRLConfig, "__post_init__", post_init)


def keep_tiny_glyph_length(monkeypatch) -> None:
    """
    `HunyuanVideo15Pipeline.from_pretrained` resets the ByT5 prompt length to 256, where the tiny pipeline encodes
    `TINY_HUNYUAN_GLYPH_LENGTH`: at 256 the fixed 2048-wide glyph projection makes the one-step example take minutes on a CPU.
    """
    from diffusers import HunyuanVideo15Pipeline

    original_init = HunyuanVideo15Pipeline.__init__

    @functools.wraps(original_init)
    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.tokenizer_2_max_length = TINY_HUNYUAN_GLYPH_LENGTH

    monkeypatch.setattr(HunyuanVideo15Pipeline, "__init__", init)


@pytest.mark.parametrize("case", list(CASES))
def test_example_trains_and_saves_a_loadable_result(case, data_files, tmp_path, monkeypatch):
    script, make_pipeline, denoiser_name, extra_args = CASES[case]
    model_dir, output_dir = tmp_path / "model", tmp_path / "out"
    make_pipeline().save_pretrained(model_dir)
    base_weights = load_file(model_dir / denoiser_name / "diffusion_pytorch_model.safetensors")
    argv = [script, "--model", str(model_dir), "--output_dir", str(output_dir), "--reward", "jpeg_compressibility"]
    # One optimizer step: without warm-up, since the first warm-up step has learning rate 0.
    monkeypatch.setattr(sys, "argv", [*argv, "--max_steps", "1", "--warmup_steps", "0", *extra_args(data_files)])

    shrink_the_iteration(monkeypatch)
    if case == "hunyuan_video15":
        keep_tiny_glyph_length(monkeypatch)
    runpy.run_path(os.path.join(EXAMPLES, script), run_name="__main__")

    pipeline = DiffusionPipeline.from_pretrained(model_dir if case.endswith("lora") else output_dir)
    if case.endswith("lora"):
        assert os.path.isfile(output_dir / "pytorch_lora_weights.safetensors")
        denoiser = getattr(pipeline, denoiser_name)
        before = {key: value.clone() for key, value in denoiser.state_dict().items()}
        pipeline.load_lora_weights(str(output_dir))
        assert any(key not in before for key in denoiser.state_dict())  # the LoRA layers are attached
    else:
        trained = getattr(pipeline, denoiser_name).state_dict()
        assert any(not torch.equal(trained[key].float(), value.float()) for key, value in base_weights.items())
