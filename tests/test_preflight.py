# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Checks that need no model run before the pipeline loads: in `DDRLTrainer.__init__` and in the `trl-ddrl` script."""

import json
import os

import pytest
from datasets import Dataset

from trl_ddrl import DDRLConfig, DDRLTrainer
from trl_ddrl.preflight import check_model_path


PROMPTS = Dataset.from_dict({"prompt": ["a cat", "a dog"]})


def brightness(prompts, images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


@pytest.fixture
def pipeline_folder(tmp_path):
    """A folder that passes the model-path check; loading it fails the test."""
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return str(folder)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the trainer loads a pipeline: every check here must come first."""

    def fail(*args, **kwargs):
        pytest.fail("the pipeline was loaded before the check")

    monkeypatch.setattr(DDRLTrainer, "_load_pipeline", staticmethod(fail))


def config(tmp_path, **kwargs) -> DDRLConfig:
    return DDRLConfig(
        output_dir=str(tmp_path / "out"), num_generations=2, prompts_per_step=2, report_to="none", **kwargs
    )


def test_grpo_config_as_args_says_to_build_a_ddrl_config(pipeline_folder, tmp_path, no_loading):
    from trl import GRPOConfig

    with pytest.raises(
        TypeError, match=r"args is a GRPOConfig; DDRLTrainer needs a DDRLConfig.*DDRLConfig\(output_dir"
    ):
        DDRLTrainer(
            pipeline_folder, brightness, args=GRPOConfig(output_dir=str(tmp_path), bf16=False), train_dataset=PROMPTS
        )


def test_dict_as_args_says_to_wrap_it(pipeline_folder, no_loading):
    with pytest.raises(TypeError, match=r"args is a dict.*args=DDRLConfig\(\*\*your_dict\)"):
        DDRLTrainer(pipeline_folder, brightness, args={"data_beta": 0.1}, train_dataset=PROMPTS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"args_kwargs": {"data_beta": 0.1}}, r"data_beta=0.1 needs data images.*no 'image' column.*set data_beta=0"),
        ({"args_kwargs": {"prompts_per_step": 4}}, r"train_dataset has 2 rows, but prompts_per_step=4"),
        ({"reward_funcs": "no_such_reward"}, r"no_such_reward"),
        ({"args_kwargs": {"data_beta": 0.0, "reward_weights": [1.0, 2.0]}}, r"reward_weights has 2 values"),
    ],
)
def test_data_and_reward_errors_come_before_loading(pipeline_folder, tmp_path, no_loading, kwargs, message):
    args_kwargs = {"data_beta": 0.0, **kwargs.get("args_kwargs", {})}
    args = DDRLConfig(
        output_dir=str(tmp_path / "out"), num_generations=2, report_to="none", **{"prompts_per_step": 2, **args_kwargs}
    )
    with pytest.raises(ValueError, match=message):
        DDRLTrainer(pipeline_folder, kwargs.get("reward_funcs", brightness), args=args, train_dataset=PROMPTS)


def test_push_to_hub_without_a_token_names_the_three_ways_to_log_in(
    pipeline_folder, tmp_path, no_loading, monkeypatch
):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    args = config(tmp_path, data_beta=0.0, push_to_hub=True)
    with pytest.raises(ValueError, match=r"push_to_hub=True.*`hf auth login`.*HF_TOKEN.*hub_token="):
        DDRLTrainer(pipeline_folder, brightness, args=args, train_dataset=PROMPTS)


def test_mistyped_local_model_path_is_named_with_the_closest_folder(pipeline_folder, tmp_path, no_loading):
    mistyped = pipeline_folder + "e"
    with pytest.raises(ValueError, match=r"model='.*pipee': no such folder.*did you mean '.*pipe'\? Fix the path"):
        DDRLTrainer(mistyped, brightness, args=config(tmp_path, data_beta=0.0), train_dataset=PROMPTS)


def test_model_path_check(tmp_path):
    check_model_path("stabilityai/stable-diffusion-3.5-medium")  # a Hub id: left to the Hub client
    with pytest.raises(ValueError, match=r"a folder without model_index.json, not a diffusers pipeline"):
        check_model_path(str(tmp_path))
    with pytest.raises(ValueError, match=r"--model_name_or_path='\./missing/sd3': no such folder.*\. Fix the path"):
        check_model_path("./missing/sd3", option="--model_name_or_path")
    assert not os.path.exists("./missing")


def test_load_error_has_one_period(tmp_path):
    with pytest.raises(ValueError) as error:
        DDRLTrainer._load_pipeline("does-not-exist-org/no-model", None)
    assert ".." not in str(error.value)


def test_an_8bit_optimizer_without_bitsandbytes_fails_before_the_pipeline_loads(monkeypatch, tmp_path):
    import importlib.util

    from test_trainer import brightness, make_args, prompt_dataset

    from trl_ddrl import DDRLTrainer
    from trl_ddrl.preflight import needs_bitsandbytes

    assert needs_bitsandbytes("adamw_bnb_8bit") and needs_bitsandbytes("paged_adamw_8bit")
    assert not needs_bitsandbytes("adamw_torch_fused") and not needs_bitsandbytes("adamw_torch_8bit")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    # A Hub id that is never downloaded: the error comes first.
    with pytest.raises(ImportError, match=r"optim='adamw_bnb_8bit'.*pip install bitsandbytes"):
        DDRLTrainer(
            "someone/never-downloaded",
            brightness,
            args=make_args(tmp_path, optim="adamw_bnb_8bit"),
            train_dataset=prompt_dataset(),
        )
