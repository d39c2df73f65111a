# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The recipes in `recipes/` load with the CLI's parser and hold the values they claim.

The Cosmos-Predict2.5 recipes are checked field by field against the authors' release, NVIDIA cosmos-rl (snapshot of
2026-07-31, commit 89f2e5b5c817d99a240f1194ce37239ceb6f058a): the comment beside each value names its file and line.
`toml` is `configs/cosmos-predict2-5/cosmos-predict2-5-{2b,14b}-720-reason-embedding-ddrl.toml`, `config` is
`cosmos_rl/policy/config/wfm/__init__.py`, `sampler` is `cosmos_rl/policy/model/wfm/sampler/__init__.py`, `trainer`
is `cosmos_rl/policy/trainer/wfm_trainer.py`, `model` is `cosmos_rl/policy/model/wfm/models/t2v_model.py`.
"""

from pathlib import Path

import pytest
import torch
import yaml

from trl_ddrl.cli import plan


RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# Values of both Cosmos-Predict2.5 tomls; toml lines are given as 2B / 14B where they differ.
OFFICIAL_COSMOS = {
    "num_generations": 8,  # toml L71 / L75 num_rollout = 8
    "prompts_per_step": 16,  # toml L27-28: 8 x 16 (2B), 32 x 4 (14B) = 128 model instances / 8 rollouts
    "sampler": "churn",  # config L157-161 solver_option "2ab", s_churn 1, s_t_min 0, s_t_max inf (every step)
    "num_inference_steps": 21,  # toml L70 / L74 sample_steps = 20 churned steps + the clean denoise (sampler L743, L787-794)
    "karras_sigmas": [200.0, 0.01, 7.0],  # config L92-96 SDEConfig sigma_max 200, sigma_min 0.01; sampler L707 rho=7
    "eta": 1 / 21,  # sampler L600 / trainer L475-478: min(s_churn / (sample_steps + 1), sqrt(1.2) - 1)
    "train_timesteps": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18],  # toml L72 / L76 train_on
    "train_timestep_selection": "fixed",  # toml L72 / L76 (no -1 entries; model L594-608)
    "same_initial_noise": False,  # toml L78 / L82 use_same_seed = false
    "guidance_scale": 1.0,  # toml L75 / L79 guidance = 0.0 (x0_fn_NoCFG)
    "height": 720,  # toml L232 / L239 video_size = [1280, 720]
    "width": 1280,
    "num_frames": 93,  # toml L231 / L238 num_frames = 93
    # model L585-589: each rollout group draws num_conditional_frames in [min, max] (latent frames; 1 = one frame);
    # toml L77 / L81 min_num_conditional_frames = 0, config L167-170 max_num_conditional_frames = 1 (default)
    "num_conditioning_frames_choices": [0, 1],
    "num_conditioning_frames": None,
    "data_beta": 0.01,  # toml L74 / L78
    "kl_beta": 0.0,  # toml L76 / L80
    "update_ref_every": None,  # toml L73 / L77 update_ref_every_iter = 0
    "clip_range": 1e-4,  # config L172 clip_ratio
    "advantage_clip": 5.0,  # config L138-139 adv_clip_max / adv_clip_min
    "scale_rewards": "group",  # model L714-719 (r - mean) / (std + 1e-4) within the rollout group
    "exp_advantage": False,  # config L185-187 exp_reward
    "multi_objective_aggregation": "normalize_then_average",  # trainer L545-546 sum(advantages) / N_RM
    "reward_clip": 5.0,  # config L117-123 RemoteRewardConfig reward_clip_min / max = -5, 5
    "reward_error_policy": "group_mean",  # model L704-712 invalid rewards take the group's mean
    "log_ratio_form": "edm_squared_distance",  # trainer L487 -(diff_current - diff_old)
    "kl_form": "edm_squared_distance",  # trainer L492-497
    "data_loss_weighting": "edm",  # model L840-848 (sigma^2 + 1) / sigma^2
    "loss_scale": 10.0,  # config L226 loss_scale; trainer L634
    "num_iterations": 1,  # config L154 on_policy = True: one pass over each rollout
    "data_source": "dataset",  # trainer L505 get_data_and_condition(data_batch): the prompt's own video
    "data_noise": "rollout",  # config L177-179 use_rl_sigma_and_noise = True; trainer L507-516
    "data_on_first_step_only": False,  # config L180-182 data_on_first_only
    "data_text_dropout": 0.2,  # toml L16 (both) dropout_rate = 0.2 (conditioner/emb_models.py L84-97 zeroes the embedding)
    "data_latents": "mean",  # tokenizer/wan2pt1.py L643 encode returns mu
    "learning_rate": 1e-5,  # toml L212 / L219
    "weight_decay": 1e-4,  # toml L213 / L220
    "adam_beta1": 0.9,  # config L254 betas
    "adam_beta2": 0.99,
    "adam_epsilon": 1e-8,  # config L255
    "lr_scheduler_type": "constant_with_warmup",  # toml L215-220 / L222-227 f_max = f_min = 1 after the warm-up
    "warmup_steps": 50,  # toml L219 / L226 warm_up_steps = [50]
    "max_grad_norm": 1.0,  # toml L84-86 / L91-93 grad_clip clip_norm = 1.0
    "max_steps": 2001,  # toml L81 / L88 max_iter (counted in optimizer steps, trainer L294-297)
    "per_device_train_batch_size": 1,  # one transition per forward: trainer L677 grad accumulation x len(train_on)
    "use_ema": True,  # config L86-89 EMAConfig enabled, rate 0.1, iteration_shift 0
    "ema_sigma_rel": 0.1,
    "ema_iteration_shift": 0,
    "export_ema_weights": True,
    "save_steps": 32,  # toml L258 / L265 save_iter = 32
    "log_samples_steps": 32,  # toml L160 / L167 every_n = 32 (every_n_sample_reg)
    "eval_steps": 32,  # toml L160 / L167, L178 / L185 every_n = 32 (every_n_sample_reg, every_n_sample_ema)
    "eval_use_ema": True,  # toml L163-178 / L170-185 every_n_sample_ema (and _reg: the raw weights, not evaluated here)
    # toml L157, L175 / L164, L182 use_negative_prompt = false: the uncondition of conditioner/__init__.py L142-172
    # (get_condition_uncondition, used by model L940-947) sets the text embedder's dropout rate to 1, a zeroed embedding
    "guidance_unconditional": "zeros",
}


def load(name: str):
    """Parse `recipes/<name>` as `trl-ddrl --config` does; the output folder is the only added flag."""
    launch = plan(["--config", str(RECIPES / name), "--output_dir", "unused"], prog="trl-ddrl")
    return launch


def assert_fields(saved: dict, expected: dict) -> None:
    """Each expected field equals the saved config's: numbers (and lists of numbers) to float precision."""
    for key, value in expected.items():
        numeric = isinstance(value, float) or (isinstance(value, list) and all(isinstance(v, float) for v in value))
        assert saved[key] == (pytest.approx(value) if numeric else value), key


@pytest.mark.parametrize(
    ("name", "model", "eval_guidance", "context_parallel"),
    [
        # toml L152 guidance = [7]; the authors' context parallel 2 (toml L27-32) is not needed to fit: off
        ("cosmos-predict2.5-2b-ddrl.yaml", "nvidia/Cosmos-Predict2.5-2B", 7, 1),
        # toml L159 guidance = [3]; toml L27-32 context parallel 8, without which one sample does not fit 80 GB
        ("cosmos-predict2.5-14b-ddrl.yaml", "nvidia/Cosmos-Predict2.5-14B", 3, 8),
    ],
)
def test_cosmos_recipes_are_the_authors_runs(name, model, eval_guidance, context_parallel):
    launch = load(name)
    script_args, config, model_args = launch.parsed
    assert model_args.model_name_or_path == model  # toml L256 / L263 load_path
    assert model_args.dtype == "bfloat16"  # config L221 precision
    assert not model_args.use_peft  # full fine-tuning
    saved = config.to_dict()
    assert_fields(saved, OFFICIAL_COSMOS)
    # toml L152 / L159 guidance = [7] / [3] in cond + g (cond - uncond) (model L974): uncond + (g + 1) (cond - uncond)
    assert config.eval_guidance_scale == eval_guidance + 1
    # Launched through accelerate with the recipe's config: 128 processes; one model instance (one sample) each, or
    # with context parallelism groups of `context_parallel` processes that hold the same samples.
    argv = launch.accelerate_argv
    accelerate = yaml.safe_load(Path(argv[argv.index("--config_file") + 1]).read_text())
    assert accelerate["num_processes"] == config.prompts_per_step * config.num_generations == 128
    assert config.context_parallel_size == context_parallel and config.context_parallel_method == "ulysses"
    assert accelerate["distributed_type"] == "FSDP" and accelerate["fsdp_config"]["fsdp_version"] == 2
    assert f"guidance {eval_guidance}" in (RECIPES / name).read_text()  # the evaluation guidance is named


def test_cosmos_recipe_samples_on_the_authors_levels():
    """The 2B recipe's settings give the authors' trained noise levels (the churned Karras levels, flow t)."""
    from tiny_models import tiny_cosmos2_5_pipeline

    from trl_ddrl.pipelines import SamplingSettings, get_adapter

    _, config, _ = load("cosmos-predict2.5-2b-ddrl.yaml").parsed
    adapter = get_adapter(
        tiny_cosmos2_5_pipeline(),
        SamplingSettings(
            num_inference_steps=config.num_inference_steps,
            eta=config.eta,
            sampler=config.sampler,
            karras_sigmas=tuple(config.karras_sigmas),
            height=32,
            width=32,
            num_frames=5,
        ),
    )
    levels = adapter.model_sigmas()[torch.tensor(config.train_timesteps)]
    assert [round(float(t), 3) for t in levels] == [
        0.995,
        0.992,
        0.985,
        0.972,
        0.944,
        0.882,
        0.751,
        0.515,
        0.237,
        0.065,
    ]


# Flow-GRPO (yifan123/flow_grpo, snapshot 2025-07-18): config/grpo.py pickscore_sd3 L106-141, general_ocr_sd3 L29-67,
# geneval_sd3 L69-104; config/base.py for the rest.
FLOW_GRPO_SD35 = {
    "height": 512,  # grpo.py L40 / L80 / L117 resolution = 512
    "width": 512,
    "num_inference_steps": 10,  # L36 / L76 / L113 sample.num_steps = 10
    "guidance_scale": 4.5,  # L38 / L78 / L115 guidance_scale = 4.5
    "sampler": "flow_sde",
    "eta": 0.7,  # base.py L54 sample.noise_level = 0.7
    "num_generations": 24,  # L42 / L82 / L119 num_image_per_prompt = 24
    "train_timesteps": list(range(9)),  # L50 / L90 / L127 timestep_fraction = 0.99 of 10 steps
    "per_device_train_batch_size": 9,  # L41 / L81 / L118 train_batch_size = 9
    "scale_rewards": "batch",  # L54 / L92 / L129 global_std = True
    "clip_range": 1e-4,  # base.py L86
    "advantage_clip": 5.0,  # base.py L84
    "learning_rate": 3e-4,  # base.py L63
    "adam_beta2": 0.999,  # base.py L67
    "max_grad_norm": 1.0,  # base.py L76
    "kl_beta": 0.0,  # DDRL: the data term replaces Flow-GRPO's reverse KL (beta 0.04 / 0.04 / 0.01)
    "data_beta": 0.01,
}


@pytest.mark.parametrize(
    ("name", "reward", "expected"),
    [
        ("sd3.5-medium-pickscore-ddrl.yaml", ["pickscore"], "21.72 -> 23.31"),
        ("sd3.5-medium-ocr-ddrl.yaml", ["ocr"], "0.59 -> 0.92"),
        ("sd3.5-medium-geneval-ddrl.yaml", None, "0.63 -> 0.95"),  # a GenEval reward server is given by the user
    ],
)
def test_sd35_recipes_translate_flow_grpo(name, reward, expected):
    launch = load(name)
    script_args, config, model_args = launch.parsed
    assert model_args.model_name_or_path == "stabilityai/stable-diffusion-3.5-medium"
    assert model_args.use_peft and (model_args.lora_r, model_args.lora_alpha) == (32, 64)  # train script: r 32, a 64
    assert script_args.reward_funcs == reward
    saved = config.to_dict()
    assert_fields(saved, FLOW_GRPO_SD35)
    text = (RECIPES / name).read_text()
    assert expected in text and "GiB estimated" in text and "watch" in text
    argv = launch.accelerate_argv
    assert yaml.safe_load(Path(argv[argv.index("--config_file") + 1]).read_text())["num_processes"] == 32


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("flux1-dev-pickscore-ddrl.yaml", "black-forest-labs/FLUX.1-dev"),
        ("wan2.1-t2v-1.3b-ddrl.yaml", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    ],
)
def test_other_recipes_load_and_name_hardware_and_evaluation(name, model):
    launch = load(name)
    _, config, model_args = launch.parsed
    assert model_args.model_name_or_path == model
    assert config.data_beta == 0.01 and config.kl_beta == 0.0
    assert config.train_timesteps == list(range(0, 19, 2))
    text = (RECIPES / name).read_text()
    assert "Hardware" in text and "GiB estimated" in text and "watch" in text
    assert launch.accelerate_argv is not None


def test_every_recipe_is_tested():
    tested = {
        "cosmos-predict2.5-2b-ddrl.yaml",
        "cosmos-predict2.5-14b-ddrl.yaml",
        "sd3.5-medium-pickscore-ddrl.yaml",
        "sd3.5-medium-ocr-ddrl.yaml",
        "sd3.5-medium-geneval-ddrl.yaml",
        "flux1-dev-pickscore-ddrl.yaml",
        "wan2.1-t2v-1.3b-ddrl.yaml",
    }
    assert {path.name for path in RECIPES.glob("*.yaml")} == tested


def test_load_recipe_gives_the_clis_objects():
    from trl_ddrl.recipes import load_recipe

    script_args, config, model_args = load_recipe(RECIPES / "cosmos-predict2.5-2b-ddrl.yaml", "--max_steps", "3")
    assert config.karras_sigmas == [200.0, 0.01, 7.0] and config.max_steps == 3
    assert model_args.model_name_or_path == "nvidia/Cosmos-Predict2.5-2B" and script_args.reward_funcs is None
