# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The `--help` of `trl-ddrl`: its ~200 options in groups, DDRL's first, and the options refused for diffusers
pipelines hidden.

The parser takes the fields of three dataclasses (the script's, `DDRLConfig` with every `TrainingArguments` field, and
TRL's `ModelConfig`), which `HfArgumentParser` lists in one group in field order, DDRL's own after ~130 generic ones.
"""

import argparse


# (title, description, options) in the order shown; options of no group go to the last one.
OPTION_GROUPS: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "model",
        "The diffusers pipeline to train and how its denoiser is trained.",
        (
            "model_name_or_path",
            "model_revision",
            "dtype",
            "model_init_kwargs",
            "use_peft",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            "lora_target_parameters",
            "use_rslora",
            "use_dora",
            "train_experts",
            "activation_checkpointing",
            "gradient_checkpointing",
            "save_full_pipeline",
        ),
    ),
    (
        "data",
        "Prompts, and the images or videos of the data term.",
        (
            "dataset_name",
            "dataset_config",
            "dataset_train_split",
            "dataset_test_split",
            "prompt_column",
            "data_dataset_name",
            "data_dataset_config",
            "data_dataset_split",
            "image_column",
            "caption_column",
            "source_image_column",
            "num_conditioning_frames",
            "num_conditioning_frames_choices",
        ),
    ),
    (
        "DDRL objective",
        "The clipped policy gradient, the data term (data_beta) and the reverse-KL baseline (kl_beta).",
        (
            "data_beta",
            "kl_beta",
            "clip_range",
            "advantage_clip",
            "exp_advantage",
            "loss_scale",
            "log_ratio_form",
            "kl_form",
            "data_loss_weighting",
            "data_source",
            "data_noise",
            "data_on_first_step_only",
            "num_iterations",
            "train_timesteps",
            "train_timestep_fraction",
            "train_timestep_selection",
            "update_ref_every",
            "use_ema",
            "ema_sigma_rel",
            "ema_iteration_shift",
            "ema_decay",
            "export_ema_weights",
        ),
    ),
    (
        "sampling",
        "The rollouts: groups of samples per prompt from a stochastic sampler.",
        (
            "num_generations",
            "prompts_per_step",
            "rollout_batch_size",
            "num_inference_steps",
            "sampler",
            "eta",
            "guidance_scale",
            "guidance_scale_2",
            "guidance_unconditional",
            "height",
            "width",
            "num_frames",
            "max_sequence_length",
            "same_initial_noise",
            "sde_window_size",
            "sde_window_position",
            "sde_window_range",
            "sde_window_shift_every",
            "sde_window_share_prefix",
        ),
    ),
    (
        "rewards",
        "Reward functions and how their scores become advantages.",
        (
            "reward_funcs",
            "reward_weights",
            "scale_rewards",
            "multi_objective_aggregation",
            "async_rewards",
            "reward_device",
            "reward_error_policy",
        ),
    ),
    (
        "evaluation and logging",
        "Held-out evaluation, metrics and sample grids.",
        (
            "eval_strategy",
            "eval_steps",
            "eval_on_start",
            "eval_num_generations",
            "eval_seed",
            "eval_use_ema",
            "eval_guidance_scale",
            "per_device_eval_batch_size",
            "logging_steps",
            "log_samples_steps",
            "num_samples_to_log",
            "report_to",
            "run_name",
            "project",
            "disable_tqdm",
        ),
    ),
    (
        "training",
        "Run length, optimizer, precision, checkpoints and the Hub.",
        (
            "output_dir",
            "max_steps",
            "num_train_epochs",
            "learning_rate",
            "lr_scheduler_type",
            "warmup_steps",
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "max_grad_norm",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "seed",
            "bf16",
            "fp16",
            "save_strategy",
            "save_steps",
            "save_total_limit",
            "save_only_model",
            "resume_from_checkpoint",
            "push_to_hub",
            "hub_model_id",
            "hub_token",
            "hub_strategy",
            "hub_private_repo",
        ),
    ),
    (
        "parallelism",
        "Several GPUs: data parallel through accelerate (--accelerate_config), context parallel for long videos.",
        ("context_parallel_size", "context_parallel_method", "attention_backend", "deepspeed", "fsdp", "fsdp_config"),
    ),
]
OTHER_GROUP = ("other training options", "Further transformers TrainingArguments fields; rarely needed for DDRL.")

# ModelConfig options for transformers language models that the script refuses for diffusers pipelines: parsed (so
# that the refusal names them) but not listed.
REFUSED_OPTIONS = (
    "load_in_4bit",
    "load_in_8bit",
    "bnb_4bit_quant_type",
    "use_bnb_nested_quant",
    "bnb_4bit_quant_storage",
    "attn_implementation",
    "lora_task_type",
    "lora_modules_to_save",
)


def group_options(parser: argparse.ArgumentParser) -> None:
    """Move the parser's options into [`OPTION_GROUPS`] (in that order) and hide [`REFUSED_OPTIONS`], in place."""
    by_name = {}
    for action in parser._actions:
        names = [option.lstrip("-") for option in action.option_strings if option.startswith("--")]
        if names:
            by_name.setdefault(names[0], action)
    for name in REFUSED_OPTIONS:
        if name in by_name:
            by_name[name].help = argparse.SUPPRESS
    placed = set()
    groups = []
    for title, description, names in [*OPTION_GROUPS, (*OTHER_GROUP, ())]:
        group = parser.add_argument_group(title, description)
        for name in names:
            if name in by_name and id(by_name[name]) not in placed:
                group._group_actions.append(by_name[name])
                placed.add(id(by_name[name]))
        groups.append(group)
    other = groups[-1]
    for default_group in [group for group in parser._action_groups if group not in groups]:
        remaining = []  # `--help` stays first, in the default group
        for action in default_group._group_actions:
            if id(action) in placed:
                continue
            if action.dest == "help" or not action.option_strings:
                remaining.append(action)
            else:
                other._group_actions.append(action)
                placed.add(id(action))
        default_group._group_actions[:] = remaining
