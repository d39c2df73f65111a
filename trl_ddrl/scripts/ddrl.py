# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The DDRL training script: post-train a diffusers pipeline with DDRL from the command line.

Run it with `trl-ddrl` or `trl ddrl` (which add `--accelerate_config`), or directly:

```bash
accelerate launch -m trl_ddrl.scripts.ddrl \
    --model_name_or_path stabilityai/stable-diffusion-3.5-medium \
    --dataset_name prompts.txt \
    --reward_funcs jpeg_compressibility \
    --data_beta 0 \
    --output_dir sd35-ddrl
```

Without `--model_name_or_path` it runs the package's built-in default job instead (see `trl_ddrl.digits`).
"""

import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from trl import ModelConfig, TrlParser

from trl_ddrl.config import DDRLConfig


if TYPE_CHECKING:
    from datasets import Dataset
    from peft import LoraConfig

    from trl_ddrl.trainer import DDRLTrainer


# Attention projections of diffusers' transformers and UNets (`add_*` / `to_add_out` are the text branch of MMDiT
# blocks such as SD3's and Flux's). Names absent from a model are skipped; PEFT needs at least one to match.
DEFAULT_LORA_TARGET_MODULES = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]

# `datasets` builder for each local prompt-file extension accepted by `--dataset_name`.
LOCAL_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# `TrainingArguments` replaces an unset `output_dir` with this name.
UNSET_OUTPUT_DIR = "trainer_output"

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class UsageError(ValueError):
    """A command-line option is missing or wrong; the message names it and the fix. Printed without a traceback."""


@dataclass
class DDRLScriptArguments:
    """
    Arguments of the DDRL training script that are not fields of [`DDRLConfig`] or TRL's `ModelConfig`.

    Args:
        dataset_name (`str`, *optional*):
            Prompts to train on: a Hub dataset id, a local folder loadable with `datasets.load_dataset` or written by
            `save_to_disk`, or a local file: `.txt` (one prompt per line), `.json` / `.jsonl`, `.csv` or `.parquet`.
        dataset_config (`str`, *optional*):
            Configuration name of the dataset (the `name` argument of `datasets.load_dataset`).
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split of the dataset to train on. Local files have a single `train` split.
        dataset_test_split (`str`, *optional*, defaults to `"test"`):
            Split of the dataset to evaluate on when `eval_strategy` is not `"no"` (as in TRL's scripts); its prompts
            (and images, if the `image_column` is there) become the trainer's `eval_dataset`. A local file has no such
            split: use a folder or Hub dataset that has one (for example a folder with `train.jsonl` and
            `test.jsonl`).
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column of the dataset holding the prompts; renamed to `prompt`. Ignored for `.txt` files.
        data_dataset_name (`str`, *optional*):
            Separate data for the data term (images or videos in `image_column`, captions in `caption_column`), loaded
            like `dataset_name`. Without it, the data term uses the `image_column` of the prompt dataset.
        data_dataset_config (`str`, *optional*):
            Configuration name of `data_dataset_name`.
        data_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of `data_dataset_name` to use.
        reward_funcs (`list[str]`, *optional*):
            Reward functions: names known to `trl_ddrl.rewards.get_reward_function` (`jpeg_compressibility`,
            `brightness`, `name:argument`, `http(s)://` reward-server URLs) or `module:function` import paths to your
            own functions (the current directory is importable). Required when `model_name_or_path` is given.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a Hub dataset id, a local folder (also one written by save_to_disk), or a local .txt (one prompt per line), .json, .jsonl, "
            ".csv or .parquet file."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name (the `name` argument of datasets.load_dataset)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Dataset split to train on."})
    dataset_test_split: str = field(
        default="test",
        metadata={
            "help": "Dataset split to evaluate on when eval_strategy is not 'no'. Local files have only 'train': use a "
            "folder (e.g. train.jsonl + test.jsonl) or a Hub dataset with this split."
        },
    )
    prompt_column: str = field(
        default="prompt", metadata={"help": "Column holding the prompts (renamed to 'prompt'); ignored for .txt."}
    )
    data_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Separate image/video data for the data term, loaded like dataset_name."},
    )
    data_dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of data_dataset_name."}
    )
    data_dataset_split: str = field(default="train", metadata={"help": "Split of data_dataset_name to use."})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: registered names (jpeg_compressibility, brightness, name:argument), reward "
            "server URLs, or module:function import paths. Required with model_name_or_path."
        },
    )

    def __post_init__(self):
        # `reward_funcs: brightness` in a YAML file arrives as a string, which would be read as a list of letters.
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]


class DDRLParser(TrlParser):
    """
    [`~trl.TrlParser`] whose errors are one line naming the option, without a traceback or the full usage.

    Wrong values caught by the dataclasses' `__post_init__` (for example `num_generations=1`), unknown options and an
    unreadable `--config` file all exit with status 2 and a message on stderr.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nRun `{self.prog} --help` to list the options.\n")

    def parse_args_and_config(self, args: Iterable[str] | None = None, **kwargs) -> tuple[Any, ...]:
        import yaml

        try:
            return super().parse_args_and_config(args, **kwargs)
        except (ValueError, yaml.YAMLError) as error:
            self.error(str(error))
        except OSError as error:
            self.error(f"cannot read the --config file: {error}")


def make_parser(prog: str | None = "trl-ddrl") -> DDRLParser:
    """
    The parser of the script: `DDRLScriptArguments`, [`DDRLConfig`] and TRL's `ModelConfig`, plus `--config`; its
    `--help` is grouped, DDRL's options first ([`~trl_ddrl.cli_help.group_options`]).
    """
    from trl_ddrl.cli_help import REFUSED_OPTIONS, group_options

    parser = DDRLParser(
        (DDRLScriptArguments, DDRLConfig, ModelConfig),
        prog=prog,
        usage="%(prog)s [--config FILE.yaml] [--accelerate_config NAME|FILE.yaml] [options]",
        description="Post-train a diffusers pipeline with DDRL (Data-regularized Diffusion RL, arXiv 2512.04332). "
        "Without --model_name_or_path, runs the built-in default job.",
        epilog="Options that are not listed here (for example --num_processes, --mixed_precision, "
        "--main_process_port) go to `accelerate launch`. --accelerate_config takes zero2, zero3, fsdp, multi_gpu, "
        "single_gpu, a config shipped with TRL, or a path to an accelerate YAML file. Not listed: options of "
        f"transformers language models that do not apply to diffusers pipelines ({', '.join(REFUSED_OPTIONS)}); "
        "those that would change the run are refused with an error.",
    )
    group_options(parser)
    return parser


def saved_splits(path: str) -> list[str] | None:
    """
    The splits of a folder written by `Dataset.save_to_disk` (`["train"]` for a single `Dataset`, whatever its split
    name) or `DatasetDict.save_to_disk`, or None for any other path.
    """
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        import json

        with open(os.path.join(path, "dataset_dict.json")) as file:
            return list(json.load(file)["splits"])
    if os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")):
        return ["train"]
    return None


def load_saved_dataset(path: str, split: str, option: str) -> "Dataset":
    """The `split` of a `save_to_disk` folder (a single saved `Dataset` is its only split); `UsageError` if absent."""
    from datasets import DatasetDict, load_from_disk

    splits = saved_splits(path)
    if split not in splits:
        raise UsageError(
            f"--{option}={path!r} is a saved dataset with the splits {splits}, not {split!r}. Set the split option "
            f"to one of them."
        )
    dataset = load_from_disk(path)
    return dataset[split] if isinstance(dataset, DatasetDict) else dataset


def load_dataset_argument(name: str, config: str | None, split: str, option: str) -> "Dataset":
    """
    Load `name` (a Hub id, a local folder or a local prompt file) with `datasets.load_dataset`.

    Args:
        name (`str`): Value of the option.
        config (`str` or `None`): Dataset configuration name.
        split (`str`): Split to return; local files have only `train`.
        option (`str`): Name of the option, for error messages (`"dataset_name"`).

    Returns:
        `datasets.Dataset`: The requested split. `.txt` files have their lines, without blank ones, in `prompt`.
    """
    from datasets import load_dataset

    extension = os.path.splitext(name)[1].lower()
    looks_local = extension in LOCAL_FILE_BUILDERS or name.startswith(("./", "../", "/", "~"))
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise UsageError(
            f"--{option}={name!r}: file not found (relative paths are read from {os.getcwd()!r}). Fix the path; a Hub "
            "dataset id has no file extension."
        )
    if os.path.isfile(name) and extension not in LOCAL_FILE_BUILDERS:
        raise UsageError(
            f"--{option}={name!r} is a {extension or 'extension-less'} file; local files must end in "
            f"{', '.join(LOCAL_FILE_BUILDERS)}."
        )
    if os.path.isfile(name) and extension != ".parquet":
        check_utf8(name, option)
    try:
        if os.path.isfile(name):
            dataset = load_dataset(LOCAL_FILE_BUILDERS[extension], data_files=name, split="train")
        elif saved_splits(name) is not None:
            dataset = load_saved_dataset(name, split, option)
        else:
            dataset = load_dataset(name, name=config, split=split)
    except Exception as error:  # any failure here comes from the option's value; the cause is chained
        raise UsageError(
            f"--{option}={name!r} could not be loaded ({type(error).__name__}: {error}). Pass a Hub dataset id, a "
            f"local folder, or a local {'/'.join(LOCAL_FILE_BUILDERS)} file; check the split and config options."
        ) from error
    if extension == ".txt" and os.path.isfile(name):
        dataset = dataset.rename_column("text", "prompt").filter(lambda row: bool(row["prompt"].strip()))
    return dataset


def check_utf8(path: str, option: str) -> None:
    """Raise a `UsageError` naming the line, the byte and the likely encoding when a text file is not UTF-8."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as file:
        head = file.read(4)
        file.seek(0)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            encoding, found = "utf-16", "starts with a UTF-16 byte-order mark"
        else:
            encoding = None
            while chunk := file.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as error:
                    before = chunk[: error.start]
                    line += before.count(b"\n")
                    column = error.start - before.rfind(b"\n")
                    found = (
                        f"has the byte 0x{chunk[error.start]:02x} at line {line}, byte {column}, which is not UTF-8"
                    )
                    encoding = "latin-1"  # the usual culprit (Windows-1252 / ISO-8859-1)
                    break
                line += chunk.count(b"\n")
    if encoding is not None:
        raise UsageError(
            f"--{option}={path!r} {found}. Local prompt files must be UTF-8: convert it, e.g. "
            f"`iconv -f {encoding} -t utf-8 {path} > utf8-{os.path.basename(path)}` (if it is {encoding}), or in "
            f"Python open(path, encoding='{encoding}').read() and write it back with encoding='utf-8'."
        )


def require_dataset_name(script_args: DDRLScriptArguments) -> None:
    """Raise a `UsageError` when `--dataset_name` is missing."""
    if script_args.dataset_name is None:
        raise UsageError(
            "--dataset_name is required with --model_name_or_path: give the prompts to train on, as a Hub dataset "
            "id, a local folder, or a .txt (one prompt per line), .jsonl or .csv file."
        )


def load_prompt_dataset(script_args: DDRLScriptArguments, split: str | None = None) -> "Dataset":
    """
    The prompt dataset of `--dataset_name`, with its prompt column named `prompt`.

    Args:
        script_args ([`DDRLScriptArguments`]): The script options.
        split (`str`, *optional*): Split to load; defaults to `dataset_train_split`.
    """
    require_dataset_name(script_args)
    dataset = load_dataset_argument(
        script_args.dataset_name,
        script_args.dataset_config,
        script_args.dataset_train_split if split is None else split,
        "dataset_name",
    )
    name = script_args.dataset_name
    is_text_file = os.path.isfile(name) and name.lower().endswith(".txt")
    column = "prompt" if is_text_file else script_args.prompt_column
    if column not in dataset.column_names:
        raise UsageError(
            f"--dataset_name={name!r} has no {column!r} column (columns: {dataset.column_names}). Set "
            "--prompt_column to the column holding the prompts."
        )
    if column != "prompt":
        if "prompt" in dataset.column_names:
            raise UsageError(
                f"--prompt_column={column!r}, but the dataset also has a 'prompt' column. Drop --prompt_column to "
                "use 'prompt', or remove that column from the dataset."
            )
        dataset = dataset.rename_column(column, "prompt")
    return dataset


def load_eval_dataset(script_args: DDRLScriptArguments, training_args: DDRLConfig) -> "Dataset | None":
    """
    The `eval_dataset` of the trainer, as in `trl grpo`: the `dataset_test_split` split of `--dataset_name` when
    `eval_strategy` is not `"no"`, else `None`.

    A split that the dataset lacks (a local file has only `train`) is a `UsageError` naming `--dataset_test_split`,
    `--eval_strategy` and the fix.
    """
    if training_args.eval_strategy == "no":
        return None
    from datasets import get_dataset_split_names

    name, split = script_args.dataset_name, script_args.dataset_test_split
    if os.path.isfile(name):
        splits, has = ["train"], "is a single file, which loads as one 'train' split"
    elif saved_splits(name) is not None:
        splits = saved_splits(name)
        has = f"is a saved dataset with only the splits {splits}"
    else:
        try:
            splits = get_dataset_split_names(name, script_args.dataset_config)
        except Exception:  # not inspectable here (offline, no split metadata): `load_dataset` reports any problem
            splits = None
        has = f"has only the splits {splits}"
    if splits is not None and split not in splits:
        raise UsageError(
            f"--eval_strategy={training_args.eval_strategy.value} evaluates on the --dataset_test_split={split!r} "
            f"split of --dataset_name, but {name!r} {has}. Pass a dataset with a {split!r} split (a Hub dataset, or "
            f"a folder holding train.jsonl and {split}.jsonl), set --dataset_test_split to one of {splits}, or set "
            "--eval_strategy no to train without evaluating."
        )
    return load_prompt_dataset(script_args, split=split)


def resolve_reward_func(spec: str) -> Callable[..., list[float | None]]:
    """
    Build one reward function from a `--reward_funcs` value.

    Registered names and URLs go to [`~trl_ddrl.rewards.get_reward_function`]; other `module:function` values are
    imported (with the current directory on `sys.path`).
    """
    from trl_ddrl.rewards import available_rewards, get_reward_function

    try:
        return get_reward_function(spec)
    except ValueError as error:
        registry_error = error
    if spec.partition(":")[0] in available_rewards() or not _IMPORT_PATH.match(spec):
        raise UsageError(
            f"--reward_funcs {spec!r}: {registry_error} Your own functions are given as module:function."
        ) from registry_error
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise UsageError(
            f"--reward_funcs {spec!r} is neither a registered reward nor an importable module:function "
            f"({type(error).__name__}: {error}). Known names: {', '.join(available_rewards())}."
        ) from error
    if not callable(function):
        raise UsageError(f"--reward_funcs {spec!r} names a {type(function).__name__}, not a function.")
    return function


def get_lora_config(model_args: ModelConfig) -> "LoraConfig | None":
    """
    The LoRA configuration of the denoiser from `--use_peft` and the `--lora_*` options, or `None`.

    Without `--lora_target_modules`, LoRA goes on the attention projections ([`DEFAULT_LORA_TARGET_MODULES`]).
    """
    if not model_args.use_peft:
        return None
    if model_args.lora_modules_to_save:
        raise UsageError(
            "--lora_modules_to_save is not supported: diffusers' LoRA format stores only adapter weights. Remove it, "
            "or train without --use_peft to update every weight."
        )
    from peft import LoraConfig

    targets = model_args.lora_target_modules or DEFAULT_LORA_TARGET_MODULES
    # ModelConfig turns a single name into a string, which PEFT would match as a regular expression on full module
    # names; module names of diffusers models are suffixes, so keep it a list.
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    extra = {"target_parameters": model_args.lora_target_parameters} if model_args.lora_target_parameters else {}
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        **extra,
    )


def get_model_init_kwargs(model_args: ModelConfig, training_args: DDRLConfig) -> dict[str, Any]:
    """Keyword arguments of `DiffusionPipeline.from_pretrained`: `--dtype`, `--model_revision`, `model_init_kwargs`."""
    for name, fix in (
        ("load_in_4bit", "Remove it; quantised loading of diffusers pipelines is not supported by this script."),
        ("load_in_8bit", "Remove it; quantised loading of diffusers pipelines is not supported by this script."),
        (
            "attn_implementation",
            "It applies to transformers models; diffusers pipelines pick their attention backend themselves.",
        ),
    ):
        if getattr(model_args, name):
            raise UsageError(f"--{name}={getattr(model_args, name)!r} is not supported. {fix}")
    kwargs = {"dtype": model_args.dtype, "revision": model_args.model_revision}
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def resume_argument(value: str | None) -> str | bool | None:
    """`--resume_from_checkpoint` as `trainer.train` takes it: `true` (any case) resumes from the newest checkpoint."""
    return True if isinstance(value, str) and value.lower() == "true" else value


def check_before_loading(script_args: DDRLScriptArguments, training_args: DDRLConfig, model_args: ModelConfig) -> None:
    """
    The checks that need no model, before anything is loaded: the model path, the output folder (a new run in a folder
    holding checkpoints), the Hub token with `--push_to_hub`, and the options refused for diffusers pipelines. The
    trainer checks the datasets and rewards before it loads the pipeline. Raise `UsageError` naming the option.
    """
    from trl_ddrl.fault_handling import CheckpointError, check_fresh_output_dir
    from trl_ddrl.preflight import check_hub_token, check_model_path

    get_model_init_kwargs(model_args, training_args)
    try:
        check_model_path(model_args.model_name_or_path, option="--model_name_or_path")
        check_hub_token(training_args)
    except ValueError as error:
        raise UsageError(str(error).replace("push_to_hub=True", "--push_to_hub")) from error
    if training_args.resume_from_checkpoint is None:
        try:
            check_fresh_output_dir(training_args)
        except CheckpointError:
            output_dir = training_args.output_dir
            raise UsageError(
                f"--output_dir {output_dir} already holds checkpoints of an earlier run. Choose one: resume it with "
                f"--resume_from_checkpoint true (or the path of one checkpoint folder); start a new run with another "
                f"--output_dir; or delete the old checkpoints (rm -r {os.path.join(output_dir, 'checkpoint-*')}) to "
                "overwrite it."
            ) from None


def build_trainer(
    script_args: DDRLScriptArguments, training_args: DDRLConfig, model_args: ModelConfig
) -> "DDRLTrainer":
    """Load the datasets and rewards named by the options and build the [`DDRLTrainer`]; raise `UsageError` if wrong."""
    if not script_args.reward_funcs:
        raise UsageError(
            "--reward_funcs is required with --model_name_or_path: give one or more registered reward names (for "
            "example jpeg_compressibility), reward-server URLs, or module:function paths to your own functions."
        )
    require_dataset_name(script_args)
    check_before_loading(script_args, training_args, model_args)
    reward_funcs = [resolve_reward_func(spec) for spec in script_args.reward_funcs]
    train_dataset = load_prompt_dataset(script_args)
    eval_dataset = load_eval_dataset(script_args, training_args)
    data_dataset = None
    if script_args.data_dataset_name is not None:
        data_dataset = load_dataset_argument(
            script_args.data_dataset_name,
            script_args.data_dataset_config,
            script_args.data_dataset_split,
            "data_dataset_name",
        )
    training_args.model_init_kwargs = get_model_init_kwargs(model_args, training_args)
    from trl_ddrl.trainer import DDRLTrainer

    try:
        return DDRLTrainer(
            model=model_args.model_name_or_path,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_dataset=data_dataset,
            peft_config=get_lora_config(model_args),
        )
    except ValueError as error:
        raise UsageError(str(error)) from error


def run_default_job_with_args(script_args: DDRLScriptArguments, training_args: DDRLConfig) -> dict[str, Any]:
    """
    Run the built-in default job, passing it `output_dir`, `seed`, `max_steps` and `report_to` where they were changed
    from their defaults; the job keeps its own values for the others.
    """
    given = [name for name in ("dataset_name", "data_dataset_name", "reward_funcs") if getattr(script_args, name)]
    if given:
        raise UsageError(
            f"--{given[0]} is set but --model_name_or_path is not. Pass --model_name_or_path (a Hub id or a local "
            "diffusers pipeline folder) to train your own model, or drop the dataset and reward options to run the "
            "built-in default job."
        )
    from trl_ddrl.digits.default_job import run_default_job

    defaults = {"output_dir": UNSET_OUTPUT_DIR, "seed": 42, "max_steps": -1, "report_to": []}
    kwargs = {name: getattr(training_args, name) for name, default in defaults.items()}
    kwargs = {name: value for name, value in kwargs.items() if value != defaults[name]}
    print(
        "No --model_name_or_path given: running the built-in default job"
        + (f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else "")
        + ". Only --output_dir, --seed, --max_steps and --report_to apply to it."
    )
    return run_default_job(**kwargs)


def hub_auth_hint(error: Exception, output_dir: str) -> str | None:
    """For a Hub error answered 401 or 403, the message saying how to log in and that the model is saved; else None."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status not in (401, 403):
        return None
    return (
        f"--push_to_hub: the Hub refused the upload ({status} {'Unauthorized' if status == 401 else 'Forbidden'}: "
        f"{str(error).splitlines()[0]}). Log in with a token that can write to the repository: `hf auth login`, the "
        f"HF_TOKEN environment variable, or --hub_token. The trained model is saved in {output_dir}; upload it "
        f"later with `hf upload <repo id> {output_dir}`."
    )


def main(script_args: DDRLScriptArguments, training_args: DDRLConfig, model_args: ModelConfig) -> None:
    """Train, save and optionally push; without `model_name_or_path`, run the built-in default job instead."""
    if model_args.model_name_or_path is None:
        result = run_default_job_with_args(script_args, training_args)
        for key, value in result.items():
            print(f"{key}: {value}")
        return

    from trl_ddrl.fault_handling import CheckpointError

    trainer = build_trainer(script_args, training_args, model_args)
    try:
        trainer.train(resume_from_checkpoint=resume_argument(training_args.resume_from_checkpoint))
    except CheckpointError as error:  # a checkpoint to resume from that is missing, incomplete or incompatible
        raise UsageError(f"--resume_from_checkpoint: {error}") from error
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)  # the card names the prompt dataset
    if trainer.is_world_process_zero():  # `accelerator.print` prints once per node
        print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        try:
            trainer.push_to_hub(dataset_name=script_args.dataset_name)
        except Exception as error:
            hint = hub_auth_hint(error, training_args.output_dir)
            if hint is None:
                raise
            raise UsageError(hint) from error
        if trainer.is_world_process_zero():
            print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}.")
    trainer.accelerator.end_training()  # finish the trackers and destroy the process group (Trainer.end in 5.18+)


def run(args: list[str] | None = None, prog: str = "trl-ddrl") -> None:
    """Parse `args` (default `sys.argv[1:]`) and run [`main`]; option errors exit with status 2 and one message."""
    parser = make_parser(prog=prog)
    script_args, training_args, model_args = parser.parse_args_and_config(args, fail_with_unknown_args=False)
    try:
        main(script_args, training_args, model_args)
    except UsageError as error:
        parser.error(str(error))


if __name__ == "__main__":
    run()
