# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The shipped real-architecture configs and the random-pipeline builder (on the meta device: no memory)."""

import pytest
import torch

from trl_ddrl.model_configs import build_random_pipeline, list_models, load_model_config, parameter_count


# Denoiser sizes as published (diffusers' parameter counts of the released checkpoints), within 1%; Wan 2.2 A14B's is
# one expert's (two of them: 27B in all, 14B active per step). Qwen-Image: 20.43B (its 40.86 GB of bf16 safetensors);
# HunyuanVideo 1.5: 8.3B; Wan 2.1 14B: 14.29B; Cosmos-Predict2.5-14B: 14.37B (its model card says 14B).
PUBLISHED_DENOISER_PARAMETERS = {
    "sd3.5-medium": 2.24e9,
    "flux.1-dev": 11.90e9,
    "wan2.1-t2v-1.3b": 1.42e9,
    "cosmos-predict2.5-2b": 2.06e9,
    "qwen-image": 20.43e9,
    "wan2.1-t2v-14b": 14.29e9,
    "wan2.2-t2v-a14b": 14.29e9,
    "hunyuanvideo-1.5": 8.33e9,
    "cosmos-predict2.5-14b": 14.37e9,
}


def test_every_documented_gpu_check_family_is_shipped():
    assert set(PUBLISHED_DENOISER_PARAMETERS) <= set(list_models())


@pytest.mark.parametrize("name", sorted(PUBLISHED_DENOISER_PARAMETERS))
def test_denoiser_has_the_published_size(name):
    count = parameter_count(name, "transformer")
    assert count == pytest.approx(PUBLISHED_DENOISER_PARAMETERS[name], rel=0.01)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="Unknown model config 'sd4'.*sd3.5-medium"):
        load_model_config("sd4")


def test_sd35_medium_builds_on_meta_with_the_real_sequence_lengths():
    pipeline = build_random_pipeline("sd3.5-medium", device="meta")
    assert type(pipeline).__name__ == "StableDiffusion3Pipeline"
    assert pipeline.transformer.device.type == "meta" and pipeline.transformer.dtype == torch.bfloat16
    assert pipeline.tokenizer.model_max_length == 77 and pipeline.tokenizer_3.model_max_length == 256
    # The CLIP encoders pool at the offline tokenizer's end-of-text token.
    assert pipeline.text_encoder.config.eos_token_id == pipeline.tokenizer.eos_token_id
    assert pipeline.text_encoder_2.config.eos_token_id == pipeline.tokenizer_2.eos_token_id
    assert pipeline.text_encoder_3.config.d_model == 4096


@pytest.mark.parametrize("name", list_models())
def test_every_architecture_builds_on_meta(name):
    """Wan's and Cosmos' UniPC scheduler failed under `torch.device("meta")` (it copies its sigmas to the CPU)."""
    pipeline = build_random_pipeline(name, device="meta")
    assert type(pipeline).__name__ == load_model_config(name)["pipeline_class"]
    assert pipeline.transformer.device.type == "meta"
    assert pipeline.scheduler.sigmas.device.type == "cpu"


def test_wan22_has_two_experts_split_at_the_published_boundary():
    pipeline = build_random_pipeline("wan2.2-t2v-a14b", device="meta")
    assert pipeline.transformer_2 is not None and pipeline.config.boundary_ratio == 0.875
    assert parameter_count("wan2.2-t2v-a14b", "transformer_2") == parameter_count("wan2.2-t2v-a14b", "transformer")
