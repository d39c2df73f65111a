# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Tests of the `trl-ddrl` command, its training script, and the start-up hook adding `trl ddrl` to TRL's CLI."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from accelerate.commands.launch import launch_command_parser

import _trl_ddrl_hook
from trl_ddrl import cli, launch_configs
from trl_ddrl.scripts import ddrl


ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "a dog", "a red car", "a tree"]
TINY_TRAINING_ARGS = [
    "--reward_funcs", "brightness",
    "--max_steps", "2",
    "--num_generations", "2",
    "--prompts_per_step", "2",
    "--num_inference_steps", "4",
    "--per_device_train_batch_size", "4",
    "--max_sequence_length", "16",
    "--data_beta", "0",
    "--report_to", "none",
    "--disable_tqdm", "true",
]  # fmt: skip


def run_command(*args: str, cwd: Path, timeout: int = 110) -> subprocess.CompletedProcess:
    """Run a command in `cwd` with no GPU, no default accelerate config (HF_HOME in `cwd`) and the Hub offline."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(args, check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def write_prompts(path: Path) -> Path:
    path.write_text("".join(f'{{"prompt": "{prompt}"}}\n' for prompt in PROMPTS))
    return path


def fake_pipeline_folder(tmp_path: Path) -> str:
    """A folder that passes the model-path check; loading it fails (use with `no_pipeline_loading`)."""
    folder = tmp_path / "pipeline"
    folder.mkdir(exist_ok=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    return str(folder)


@pytest.fixture
def no_pipeline_loading(monkeypatch):
    """Fail the test if a pipeline is loaded: the checks under test must come before."""
    from trl_ddrl.trainer import DDRLTrainer

    def fail(*args, **kwargs):
        pytest.fail("the pipeline was loaded before the check")

    monkeypatch.setattr(DDRLTrainer, "_load_pipeline", staticmethod(fail))


@pytest.fixture
def single_process(monkeypatch):
    """Make in-process runs independent of this machine's accelerators and accelerate config."""
    monkeypatch.setattr(cli, "runs_in_one_process", lambda: True)


# ---- help and errors ---------------------------------------------------------------------------------------------


def test_help_lists_ddrl_fields(tmp_path):
    result = run_command(sys.executable, "-m", "trl_ddrl.cli", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in (
        "--data_beta",
        "--kl_beta",
        "--num_generations",
        "--train_timesteps",
        "--prompts_per_step",
        "--reward_funcs",
        "--dataset_name",
        "--dataset_test_split",
        "--model_name_or_path",
        "--use_peft",
        "--output_dir",
    ):
        assert option in result.stdout, option
    assert "--accelerate_config" in result.stdout


def test_help_groups_the_options_and_hides_the_language_model_ones():
    help_text = ddrl.make_parser().format_help()
    titles = [line[:-1] for line in help_text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles == [
        "options",
        "model",
        "data",
        "DDRL objective",
        "sampling",
        "rewards",
        "evaluation and logging",
        "training",
        "parallelism",
        "other training options",
    ]
    sections = dict(
        zip(titles, re.split(r"^(?:" + "|".join(map(re.escape, titles)) + "):$", help_text, flags=re.M)[1:])
    )
    assert "--model_name_or_path" in sections["model"] and "--data_beta" in sections["DDRL objective"]
    assert "--reward_funcs" in sections["rewards"] and "--dataset_name" in sections["data"]
    assert "--adam_epsilon" in sections["other training options"]
    for refused in ("--load_in_4bit", "--attn_implementation", "--lora_task_type"):
        assert f"  {refused}" not in help_text, refused
    # Still parsed, so that the refusal names the option.
    assert ddrl.make_parser().parse_args_into_dataclasses(["--load_in_4bit", "true"])[2].load_in_4bit


def test_bad_field_value_is_one_clear_error(tmp_path):
    result = run_command(sys.executable, "-m", "trl_ddrl.cli", "--num_generations", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "num_generations" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--scale_rewards", "bogus"], "scale_rewards"),
        (["--num_generations", "many"], "--num_generations"),
        (["--data_bta", "0.1"], "--data_bta"),
        (["--accelerate_config", "zero9"], "zero9"),
        (["--config", "missing.yaml"], "missing.yaml"),
    ],
)
def test_option_errors_exit_2_with_the_name(argv, expected, capsys, single_process):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_model_without_dataset_explains_dataset_name(tmp_path, capsys, single_process):
    status = cli.main(["--model_name_or_path", str(tmp_path), "--reward_funcs", "brightness"])
    assert status == 2
    assert "--dataset_name" in capsys.readouterr().err


def test_model_without_rewards_explains_reward_funcs(tmp_path, capsys, single_process):
    status = cli.main(
        ["--model_name_or_path", str(tmp_path), "--dataset_name", str(write_prompts(tmp_path / "p.jsonl"))]
    )
    assert status == 2
    assert "--reward_funcs" in capsys.readouterr().err


def test_rerunning_the_same_config_is_one_line_with_the_three_choices(
    tmp_path, capsys, single_process, no_pipeline_loading
):
    output_dir = tmp_path / "out"
    (output_dir / "checkpoint-2").mkdir(parents=True)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": fake_pipeline_folder(tmp_path),
                "dataset_name": str(write_prompts(tmp_path / "p.jsonl")),
                "reward_funcs": "brightness",
                "output_dir": str(output_dir),
            }
        )
    )
    assert cli.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--output_dir {output_dir} already holds checkpoints of an earlier run" in err
    for choice in ("--resume_from_checkpoint true", "another --output_dir", f"rm -r {output_dir}/checkpoint-*"):
        assert choice in err


def test_a_refused_push_is_one_line_naming_the_ways_to_log_in(tmp_path, capsys, single_process, monkeypatch):
    class Refused(Exception):
        response = types.SimpleNamespace(status_code=401)

    class Trainer:
        hub_model_id = "me/model"
        accelerator = types.SimpleNamespace(end_training=lambda: None)
        train = save_model = create_model_card = lambda *args, **kwargs: None
        is_world_process_zero = staticmethod(lambda: True)

        def push_to_hub(self, **kwargs):
            raise Refused("401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create")

    monkeypatch.setattr(ddrl, "build_trainer", lambda *args: Trainer())
    argv = ["--model_name_or_path", "org/model", "--push_to_hub", "--output_dir", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--push_to_hub: the Hub refused the upload (401 Unauthorized: 401 Client Error" in err
    assert "`hf auth login`, the HF_TOKEN environment variable, or --hub_token" in err
    assert f"The trained model is saved in {tmp_path / 'out'}" in err and "Traceback" not in err
    assert ddrl.hub_auth_hint(ValueError("x"), "out") is None


def test_resume_from_checkpoint_true_resumes_the_newest():
    assert ddrl.resume_argument("true") is True and ddrl.resume_argument("True") is True
    assert ddrl.resume_argument("out/checkpoint-2") == "out/checkpoint-2"
    assert ddrl.resume_argument(None) is None


def test_yaml_key_typo_names_the_file_and_the_closest_option(tmp_path, capsys, single_process):
    config = tmp_path / "sd35.yaml"
    config.write_text("data_bta: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", str(config), "--num_generatons", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"key 'data_bta' of the --config file {config} (did you mean --data_beta?)" in err
    assert "--num_generatons (did you mean --num_generations?)" in err


def test_data_term_without_images_stops_before_loading(tmp_path, capsys, single_process, no_pipeline_loading):
    argv = ["--model_name_or_path", fake_pipeline_folder(tmp_path), "--reward_funcs", "brightness"]
    argv += ["--dataset_name", str(write_prompts(tmp_path / "p.jsonl")), "--output_dir", str(tmp_path / "out")]
    assert cli.main([*argv, "--data_beta", "0.1"]) == 2
    assert "data_beta=0.1 needs data images, but train_dataset has no 'image' column" in capsys.readouterr().err


def test_mistyped_model_folder_stops_before_loading(tmp_path, capsys, single_process, no_pipeline_loading):
    fake_pipeline_folder(tmp_path)
    argv = ["--model_name_or_path", str(tmp_path / "pipelin"), "--reward_funcs", "brightness"]
    assert cli.main([*argv, "--dataset_name", str(write_prompts(tmp_path / "p.jsonl"))]) == 2
    err = capsys.readouterr().err
    assert f"--model_name_or_path='{tmp_path / 'pipelin'}': no such folder" in err
    assert f"did you mean '{tmp_path / 'pipeline'}'?" in err and "internet" not in err


def test_push_to_hub_without_a_token_stops_before_loading(
    tmp_path, capsys, single_process, no_pipeline_loading, monkeypatch
):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    argv = ["--model_name_or_path", fake_pipeline_folder(tmp_path), "--reward_funcs", "brightness", "--push_to_hub"]
    assert cli.main([*argv, "--dataset_name", str(write_prompts(tmp_path / "p.jsonl"))]) == 2
    err = capsys.readouterr().err
    assert "--push_to_hub, but no Hugging Face token was found" in err
    assert "`hf auth login`" in err and "HF_TOKEN" in err and "--hub_token" in err


def test_unknown_reward_name_stops_before_loading(tmp_path, capsys, single_process, no_pipeline_loading):
    argv = ["--model_name_or_path", fake_pipeline_folder(tmp_path), "--reward_funcs", "brightnes"]
    assert cli.main([*argv, "--dataset_name", str(write_prompts(tmp_path / "p.jsonl"))]) == 2
    err = capsys.readouterr().err
    assert "--reward_funcs 'brightnes': Unknown reward function 'brightnes'. Known names: " in err
    assert "brightness" in err and "Your own functions are given as module:function." in err


def test_dtype_reaches_diffusers_without_its_torch_dtype_future_warning(tiny_sd3_path, tmp_path):
    """Issue #28 item 12: `--dtype` (and `model_init_kwargs={"torch_dtype": ...}`) load without the warning."""
    import warnings

    from trl import ModelConfig

    from trl_ddrl import DDRLConfig
    from trl_ddrl.trainer import DDRLTrainer

    for model_init_kwargs in (None, {"torch_dtype": "float32"}):
        args = DDRLConfig(output_dir=str(tmp_path), report_to="none", model_init_kwargs=model_init_kwargs)
        args.model_init_kwargs = ddrl.get_model_init_kwargs(ModelConfig(dtype="float32"), args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            DDRLTrainer._load_pipeline(tiny_sd3_path, args)
        assert not [w for w in caught if "torch_dtype" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("main_process", [True, False])
def test_model_saved_is_printed_by_the_main_process_only(tmp_path, capsys, single_process, monkeypatch, main_process):
    class Trainer:
        accelerator = types.SimpleNamespace(end_training=lambda: None)
        train = save_model = create_model_card = lambda *args, **kwargs: None
        is_world_process_zero = staticmethod(lambda: main_process)

    monkeypatch.setattr(ddrl, "build_trainer", lambda *args: Trainer())
    assert cli.main(["--model_name_or_path", "org/model", "--output_dir", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.count(f"Model saved to {tmp_path / 'out'}.") == (1 if main_process else 0)


# ---- training through the CLI ------------------------------------------------------------------------------------


def test_cli_trains_tiny_sd3_and_writes_a_checkpoint(tiny_sd3_path, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    output_dir = tmp_path / "out"
    result = run_command(
        sys.executable, "-m", "trl_ddrl.cli",
        "--model_name_or_path", tiny_sd3_path,
        "--dataset_name", str(prompts),
        "--output_dir", str(output_dir),
        "--save_steps", "2",
        *TINY_TRAINING_ARGS,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output_dir / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output_dir / "model_index.json").is_file()  # the final save is a whole pipeline


def test_config_file_with_lora_and_data_folder(tiny_sd3_path, tmp_path, monkeypatch, single_process):
    from PIL import Image

    monkeypatch.setenv("TRL_DDRL_TEST_ENV", "")  # removed again after the test

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    data = tmp_path / "data"
    data.mkdir()
    for index in range(len(PROMPTS)):
        Image.new("RGB", (16, 16), (60 * index, 100, 200)).save(data / f"{index}.png")
    (data / "metadata.jsonl").write_text(
        "".join(f'{{"file_name": "{index}.png", "prompt": "{prompt}"}}\n' for index, prompt in enumerate(PROMPTS))
    )
    output_dir = tmp_path / "out"
    settings = dict(zip(TINY_TRAINING_ARGS[::2], TINY_TRAINING_ARGS[1::2]))
    config = {key.removeprefix("--"): value for key, value in settings.items()}
    config.update(
        model_name_or_path=tiny_sd3_path,
        dataset_name=str(prompts),
        data_dataset_name=str(data),
        reward_funcs=["brightness", "jpeg_compressibility"],
        data_beta=0.1,
        use_peft=True,
        lora_r=4,
        lora_target_modules=["to_q", "to_v"],
        output_dir=str(output_dir),
        save_strategy="no",
        env={"TRL_DDRL_TEST_ENV": "from-config"},
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    argv = ["--config", str(tmp_path / "config.yaml"), "--max_steps", "1"]

    script_args, training_args, model_args = cli.plan(argv, prog="trl-ddrl").parsed
    assert os.environ["TRL_DDRL_TEST_ENV"] == "from-config"
    assert training_args.max_steps == 1  # the command line overrides the config file
    assert training_args.data_beta == 0.1 and model_args.use_peft and model_args.lora_r == 4
    assert script_args.reward_funcs == ["brightness", "jpeg_compressibility"]

    assert cli.main(argv) == 0
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()


# ---- launching through accelerate --------------------------------------------------------------------------------


def test_accelerate_config_builds_the_accelerate_launch_command(tmp_path):
    argv = [
        "--accelerate_config", "zero3",
        "--num_processes", "2",
        "--model_name_or_path", "some/model",
        "--dataset_name", "prompts.txt",
        "--reward_funcs", "brightness",
        "--main_process_port", "29555",
    ]  # fmt: skip
    launch = cli.plan(argv, prog="trl-ddrl")
    zero3 = ROOT / "trl_ddrl" / "accelerate_configs" / "zero3.yaml"
    assert launch.accelerate_argv == [
        "--config_file", str(zero3),
        "--num_processes", "2",
        "--main_process_port", "29555",
        "--module", "trl_ddrl.scripts.ddrl",
        "--model_name_or_path", "some/model",
        "--dataset_name", "prompts.txt",
        "--reward_funcs", "brightness",
    ]  # fmt: skip
    accelerate_args = launch_command_parser().parse_args(launch.accelerate_argv)
    assert accelerate_args.config_file == str(zero3)
    assert accelerate_args.num_processes == 2
    assert accelerate_args.module and accelerate_args.training_script == "trl_ddrl.scripts.ddrl"
    assert accelerate_args.training_script_args == argv[4:10]
    assert launch.parsed[2].model_name_or_path == "some/model"


def test_accelerate_config_accepts_a_path_and_trl_names(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: 'NO'\n")
    assert launch_configs.resolve_accelerate_config(["--accelerate_config", str(own)]) == ["--config_file", str(own)]
    twice = ["--accelerate_config", "zero2", "--num_processes", "2", "--accelerate_config", str(own)]  # last wins
    assert launch_configs.resolve_accelerate_config(twice) == ["--config_file", str(own), "--num_processes", "2"]
    configs = launch_configs.packaged_accelerate_configs()
    assert {"zero2", "zero3", "fsdp", "multi_gpu", "single_gpu"} <= set(configs)
    assert configs["zero3"].parent == ROOT / "trl_ddrl" / "accelerate_configs"
    assert "zero1" in configs and configs["zero1"].parent.parent.name == "trl"  # TRL's, for names we do not ship


@pytest.mark.parametrize("name", ["zero2", "zero3", "fsdp", "multi_gpu", "single_gpu", "context_parallel"])
def test_packaged_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "trl_ddrl" / "accelerate_configs" / f"{name}.yaml"))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    if name.startswith("zero"):
        assert config.deepspeed_config["zero3_init_flag"] is False  # diffusers models ignore zero.Init


def test_launch_options_in_config_file_go_to_accelerate(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"num_processes": 2, "accelerate_config": "zero2"}))
    launch = cli.plan(["--config", str(tmp_path / "config.yaml"), "--max_steps", "3"], prog="trl-ddrl")
    assert launch.accelerate_argv[:2] == [
        "--config_file",
        str(ROOT / "trl_ddrl" / "accelerate_configs" / "zero2.yaml"),
    ]
    assert launch.accelerate_argv[2:] == [
        "--num_processes", "2", "--module", "trl_ddrl.scripts.ddrl", "--config", str(tmp_path / "config.yaml"),
        "--max_steps", "3",
    ]  # fmt: skip


def test_no_launch_option_runs_in_process(single_process):
    assert cli.plan(["--max_steps", "3"], prog="trl-ddrl").accelerate_argv is None


def test_remove_subsequence():
    assert cli.remove_subsequence(["--a", "1", "--n", "2", "--b", "2"], ["--n", "2"]) == ["--a", "1", "--b", "2"]


# ---- the default job, rewards, datasets, LoRA --------------------------------------------------------------------


def test_no_model_runs_the_default_job_with_the_options_set(tmp_path, monkeypatch, single_process):
    calls = []
    fake = types.ModuleType("trl_ddrl.digits.default_job")
    fake.run_default_job = lambda **kwargs: calls.append(kwargs) or {"accuracy": 1.0}
    monkeypatch.setitem(sys.modules, "trl_ddrl.digits.default_job", fake)

    assert cli.main(["--max_steps", "3", "--output_dir", str(tmp_path)]) == 0
    assert calls == [{"max_steps": 3, "output_dir": str(tmp_path)}]
    assert cli.main(["--seed", "7", "--report_to", "tensorboard"]) == 0
    assert calls[-1] == {"seed": 7, "report_to": ["tensorboard"]}


def test_no_model_with_a_dataset_is_an_error(capsys, single_process):
    assert cli.main(["--dataset_name", "prompts.txt"]) == 2
    assert "--model_name_or_path" in capsys.readouterr().err


def test_reward_funcs_accept_names_and_import_paths(tmp_path, monkeypatch):
    (tmp_path / "my_cli_rewards.py").write_text(
        "def redness(prompts, images, **kwargs):\n    return [1.0] * len(prompts)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert ddrl.resolve_reward_func("my_cli_rewards:redness")(["a"], None) == [1.0]
    assert callable(ddrl.resolve_reward_func("brightness"))
    with pytest.raises(ddrl.UsageError, match="no_such_module"):
        ddrl.resolve_reward_func("no_such_module:f")
    with pytest.raises(ddrl.UsageError, match="module:function"):
        ddrl.resolve_reward_func("no_such_reward")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_local_prompt_files(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    if suffix == ".txt":
        path.write_text("a cat\n\na dog\n")
    elif suffix == ".jsonl":
        path.write_text('{"caption": "a cat"}\n{"caption": "a dog"}\n')
    else:
        path.write_text("caption,score\na cat,1\na dog,2\n")
    script_args = ddrl.DDRLScriptArguments(dataset_name=str(path), prompt_column="caption")
    assert ddrl.load_prompt_dataset(script_args)["prompt"] == ["a cat", "a dog"]


@pytest.mark.parametrize("as_dict", [False, True])
def test_save_to_disk_folders_load(tmp_path, as_dict):
    from datasets import Dataset, DatasetDict

    dataset = Dataset.from_dict({"caption": ["a cat", "a dog"]})
    (DatasetDict({"train": dataset, "test": dataset.select([0])}) if as_dict else dataset).save_to_disk(tmp_path / "d")
    script_args = ddrl.DDRLScriptArguments(dataset_name=str(tmp_path / "d"), prompt_column="caption")
    assert ddrl.load_prompt_dataset(script_args)["prompt"] == ["a cat", "a dog"]
    if as_dict:
        assert ddrl.load_prompt_dataset(script_args, split="test")["prompt"] == ["a cat"]
    with pytest.raises(ddrl.UsageError, match=r"is a saved dataset with the splits \[.*'train'.*\], not 'valid'"):
        ddrl.load_prompt_dataset(script_args, split="valid")


def test_missing_prompt_column_names_the_option(tmp_path):
    write_prompts(tmp_path / "p.jsonl")
    script_args = ddrl.DDRLScriptArguments(dataset_name=str(tmp_path / "p.jsonl"), prompt_column="text")
    with pytest.raises(ddrl.UsageError, match="--prompt_column"):
        ddrl.load_prompt_dataset(script_args)


def write_split_folder(folder: Path, splits: dict[str, list[str]]) -> Path:
    """A local dataset folder with one `<split>.jsonl` file of prompts per split (`datasets` names splits by file)."""
    folder.mkdir()
    for split, prompts in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(f'{{"caption": "{prompt}"}}\n' for prompt in prompts))
    return folder


def parse_script_options(*argv: str) -> tuple:
    return ddrl.make_parser().parse_args_and_config(list(argv), fail_with_unknown_args=False)[:3]


@pytest.mark.parametrize("eval_strategy", ["steps", "no"])
def test_eval_strategy_gives_the_trainer_the_test_split(tiny_sd3_path, tmp_path, eval_strategy):
    folder = write_split_folder(tmp_path / "prompts", {"train": PROMPTS, "test": ["a boat", "a house"]})
    script_args, training_args, model_args = parse_script_options(
        "--model_name_or_path", tiny_sd3_path,
        "--dataset_name", str(folder),
        "--prompt_column", "caption",
        "--eval_strategy", eval_strategy,
        "--eval_steps", "1",
        "--eval_num_generations", "2",
        "--output_dir", str(tmp_path / "out"),
        "--save_strategy", "no",
        *TINY_TRAINING_ARGS,
        "--max_steps", "1",
    )  # fmt: skip
    assert script_args.dataset_test_split == "test"  # TRL's default

    trainer = ddrl.build_trainer(script_args, training_args, model_args)
    assert trainer.train_dataset["prompt"] == PROMPTS
    if eval_strategy == "no":
        assert trainer.eval_dataset is None
    else:
        assert trainer.eval_dataset["prompt"] == ["a boat", "a house"]
    trainer.train()
    evaluations = [log for log in trainer.state.log_history if "eval_reward" in log]
    assert len(evaluations) == (eval_strategy == "steps")


def test_eval_strategy_with_a_missing_test_split_names_the_options(tmp_path, capsys, single_process):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    folder = write_split_folder(tmp_path / "prompts", {"train": PROMPTS, "test": ["a boat"]})
    _, training_args, _ = parse_script_options("--eval_strategy", "steps", "--output_dir", str(tmp_path / "out"))

    for name, test_split, has in ((prompts, "test", "single file"), (folder, "validation", "['train', 'test']")):
        script_args = ddrl.DDRLScriptArguments(dataset_name=str(name), dataset_test_split=test_split)
        with pytest.raises(ddrl.UsageError) as error_info:
            ddrl.load_eval_dataset(script_args, training_args)
        message = str(error_info.value)
        for expected in (f"--dataset_test_split={test_split!r}", "--eval_strategy=steps", has, "--eval_strategy no"):
            assert expected in message, (expected, message)

    model = fake_pipeline_folder(tmp_path)
    argv = ["--model_name_or_path", model, "--dataset_name", str(prompts), "--reward_funcs", "brightness"]
    assert cli.main([*argv, "--eval_strategy", "steps"]) == 2  # before the model is loaded
    assert "--dataset_test_split='test'" in capsys.readouterr().err


def test_lora_config_from_model_args():
    from trl import ModelConfig

    assert ddrl.get_lora_config(ModelConfig()) is None
    config = ddrl.get_lora_config(ModelConfig(use_peft=True, lora_r=4, lora_target_modules=["to_q"]))
    assert config.r == 4 and config.target_modules == {"to_q"}  # a single name stays a module name, not a regex
    config = ddrl.get_lora_config(ModelConfig(use_peft=True))
    assert set(config.target_modules) == set(ddrl.DEFAULT_LORA_TARGET_MODULES)
    with pytest.raises(ddrl.UsageError, match="--lora_modules_to_save"):
        ddrl.get_lora_config(ModelConfig(use_peft=True, lora_modules_to_save=["proj_out"]))


# ---- `trl ddrl`: the start-up hook -------------------------------------------------------------------------------


class FakeCommand:
    def __init__(self, name):
        self.name = name


def test_hook_inserts_ddrl_in_alphabetical_order():
    names = ["distillation", "dpo", "env", "grpo"]
    get_commands = _trl_ddrl_hook.with_ddrl_command(lambda: [FakeCommand(name) for name in names])
    commands = get_commands()
    assert [command.name for command in commands] == ["ddrl", *names]
    assert isinstance(commands[0], cli.DDRLCommand)


def test_hook_steps_aside_when_trl_has_a_ddrl_command():
    existing = [FakeCommand("ddrl"), FakeCommand("sft")]
    assert _trl_ddrl_hook.with_ddrl_command(lambda: existing)() is existing


def test_hook_never_breaks_trl_when_trl_ddrl_is_broken(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl_ddrl.cli", None)  # makes `from trl_ddrl.cli import ...` fail
    commands = [FakeCommand("sft")]
    assert _trl_ddrl_hook.with_ddrl_command(lambda: commands)() is commands


def test_hook_pth_adds_ddrl_to_trl(tmp_path):
    """The .pth file and hook module from this checkout, in a fresh site directory (no installation needed)."""
    shutil.copy(ROOT / "trl_ddrl_hook.pth", tmp_path)
    shutil.copy(ROOT / "_trl_ddrl_hook.py", tmp_path)
    code = (
        f"import site, sys; site.addsitedir({str(tmp_path)!r}); from trl.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = run_command(sys.executable, "-c", code, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ddrl" in result.stdout and "sft" in result.stdout
    result = run_command(sys.executable, "-c", code, "ddrl", "--num_generations", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert "trl ddrl: error" in result.stderr and "num_generations" in result.stderr


def test_installed_trl_command_has_ddrl(tmp_path):
    try:
        distribution = importlib.metadata.distribution("trl_ddrl")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("trl_ddrl is not installed (pip install -e .), so the start-up hook is not in site-packages")
    assert any(file.name == "trl_ddrl_hook.pth" for file in distribution.files or []), (
        "the installed trl_ddrl has no trl_ddrl_hook.pth: it was installed before the hook existed. Reinstall it "
        "with `pip install -e .`."
    )
    trl = shutil.which("trl", path=os.path.dirname(sys.executable)) or shutil.which("trl")
    if trl is None:
        pytest.skip("TRL's `trl` console script is not on PATH")
    result = run_command(trl, "ddrl", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: trl ddrl" in result.stdout and "--data_beta" in result.stdout
