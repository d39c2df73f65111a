# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
`push_to_hub` against a real HTTP server: tests/hub_server.py serves an in-memory Hub on 127.0.0.1 and
tests/scripts/hub_push.py downloads a tiny SD3 pipeline from it, trains it (full and LoRA) with
`hub_strategy="every_save"`, and pushes. `huggingface_hub` reads `HF_ENDPOINT` at import, so training runs in a
subprocess; the checks read the server's stored commits.
"""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from hub_server import FakeHub, serve
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "hub_push.py")
BASE = "tester/tiny-sd3"
FULL = "tester/ddrl-tiny"
LORA = "tester/ddrl-tiny-lora"
DENOISER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def hub(tiny_sd3_path, tmp_path_factory) -> FakeHub:
    hub = FakeHub()
    hub.add_folder(BASE, tiny_sd3_path)
    work = tmp_path_factory.mktemp("hub-push")
    with serve(hub) as endpoint:
        env = {
            **os.environ,
            "HF_ENDPOINT": endpoint,
            "HF_TOKEN": hub.token,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HOME": str(work / "hf_home"),
        }
        result = subprocess.run(
            [sys.executable, SCRIPT, BASE, str(work / "runs")],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    hub.runs = work / "runs"
    return hub


def front_matter(card: bytes) -> dict:
    return yaml.safe_load(card.decode().split("---")[1])


def sample(pipeline) -> torch.Tensor:
    return pipeline(
        ["a cat", "a dog"],
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=16,
    ).images


def test_only_implemented_endpoints_were_called(hub):
    assert hub.unhandled == []


def test_full_fine_tune_is_pushed_as_a_diffusers_pipeline(hub, tmp_path):
    files = hub.repos[FULL].files
    for name in (
        "model_index.json",
        "transformer/config.json",
        DENOISER_WEIGHTS,
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
        "samples.png",
        "README.md",
        "training_args.bin",
        "ddrl_config.json",
    ):
        assert name in files, name
    # Nothing in transformers' layout, no checkpoint folders, no LoRA file.
    assert not {"config.json", "model.safetensors", LORA_WEIGHTS} & set(files)
    assert not [path for path in files if path.startswith("checkpoint-")]

    base_weights = load_safetensors(hub.repos[BASE].files[DENOISER_WEIGHTS])
    pushed_weights = load_safetensors(files[DENOISER_WEIGHTS])
    assert pushed_weights.keys() == base_weights.keys()
    assert any(not torch.equal(pushed_weights[key], base_weights[key]) for key in base_weights)

    pipeline = DiffusionPipeline.from_pretrained(hub.write_repo(FULL, tmp_path / "repo"))
    for key, value in pipeline.transformer.state_dict().items():
        assert torch.equal(value, pushed_weights[key]), key
    images = sample(pipeline)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("repo_id", [FULL, LORA])
def test_model_card_and_config(hub, repo_id):
    files = hub.repos[repo_id].files
    card = files["README.md"]
    metadata = front_matter(card)
    assert metadata["library_name"] == "diffusers"
    assert metadata["base_model"] == BASE
    assert {"ddrl", "trl", "diffusers", "text-to-image"} <= set(metadata["tags"])
    assert ("lora" in metadata["tags"]) == (repo_id == LORA)
    text = card.decode()
    assert "2512.04332" in text and "@article{ye2025ddrl" in text
    assert "Reward functions: brightness" in text
    assert "![samples](samples.png)" in text and "samples.png" in files
    assert f'"{repo_id}"' in text  # the quick-start snippet loads the pushed repo

    config = json.loads(files["ddrl_config.json"])
    assert config["hub_model_id"] == repo_id
    assert config["hub_strategy"] == "every_save"
    assert (config["num_generations"], config["max_steps"], config["data_beta"]) == (4, 2, 0.0)
    args = torch.load(io.BytesIO(files["training_args.bin"]), weights_only=False)
    assert args.hub_model_id == repo_id


@pytest.mark.parametrize("repo_id, weights", [(FULL, DENOISER_WEIGHTS), (LORA, LORA_WEIGHTS)])
def test_every_save_pushes_each_checkpoint(hub, repo_id, weights):
    commits = hub.repos[repo_id].commits
    assert len(commits) >= 2, [commit.summary for commit in commits]
    first = commits[0]
    assert first.summary == "Training in progress, step 1"
    expected = {weights, "samples.png", "README.md", "ddrl_config.json", "training_args.bin"}
    assert expected <= set(first.added), sorted(first.added)
    assert "![samples](samples.png)" in first.added["README.md"].decode()
    if repo_id == FULL:
        assert "model_index.json" in first.added
    # The weights at the head come from step 2, not from the checkpoint of step 1.
    head, step_1 = load_safetensors(hub.repos[repo_id].files[weights]), load_safetensors(first.added[weights])
    assert any(not torch.equal(head[key], step_1[key]) for key in step_1)
    summaries = [commit.summary for commit in commits[1:]]
    assert set(summaries) <= {"Training in progress, step 2", "End of training"}, summaries


def test_lora_is_pushed_alone_and_loads_on_the_base_model(hub, tmp_path):
    files = hub.repos[LORA].files
    assert LORA_WEIGHTS in files
    assert not [path for path in files if path.startswith("transformer/")]
    assert "model_index.json" not in files
    assert [path for path in files if path.endswith(".safetensors")] == [LORA_WEIGHTS]
    lora_weights = load_safetensors(files[LORA_WEIGHTS])
    assert lora_weights and all(key.startswith("transformer.") and "lora" in key for key in lora_weights)

    pipeline = DiffusionPipeline.from_pretrained(hub.write_repo(BASE, tmp_path / "base"))
    untouched = sample(pipeline)
    pipeline.load_lora_weights(hub.write_repo(LORA, tmp_path / "lora"))
    adapted = sample(pipeline)
    assert adapted.shape == untouched.shape and torch.isfinite(adapted).all()
    assert not torch.allclose(adapted, untouched, atol=1e-5)


@pytest.mark.parametrize("repo_id, run, weights", [(FULL, "full", DENOISER_WEIGHTS), (LORA, "lora", LORA_WEIGHTS)])
def test_every_push_holds_the_ema_weights(hub, repo_id, run, weights):
    commits = hub.repos[repo_id].commits
    for step, files in ((1, commits[0].added), (2, hub.repos[repo_id].files)):
        checkpoint = hub.runs / run / f"checkpoint-{step}"
        ema = load_file(checkpoint / "ema" / "ema_state.safetensors")
        pushed = load_safetensors(files[weights])
        if (
            repo_id == LORA
        ):  # diffusers' names: `transformer.<module>.lora_A.weight` for `<module>.lora_A.default.weight`
            ema = {f"transformer.{name.replace('.default', '')}": value for name, value in ema.items()}
            raw = load_file(checkpoint / LORA_WEIGHTS)
        else:
            raw = load_file(checkpoint / DENOISER_WEIGHTS)
        assert set(ema) <= set(pushed)
        for name, value in ema.items():
            assert torch.equal(pushed[name], value), (step, name)
        # With ema_iteration_shift=10 the EMA lags behind the raw weights from the first step on.
        assert any(not torch.equal(raw[name], value) for name, value in ema.items()), step
