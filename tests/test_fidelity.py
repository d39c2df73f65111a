# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The authors' recipe (NVIDIA cosmos-rl), formula by formula: each expected value is re-derived here from the official
code's expression on hand-sized tensors, in the official EDM coordinates.
"""

import math

import pytest
import torch

from trl_ddrl import DDRLConfig
from trl_ddrl.losses import (
    compute_advantages,
    ddpm_edm_weight,
    edm_loss_weight,
    flow_matching_edm_weight,
    flow_matching_loss,
    gaussian_kl,
    reverse_kl,
)
from trl_ddrl.rollout_plan import select_train_steps
from trl_ddrl.sampling import (
    churn_eta,
    churn_sigma,
    ddim_step,
    edm_churn_step,
    flow_sde_step,
    score_transition,
    transition_log_ratio,
)


def official_log_ratio(sample_edm, mu_current_edm, mu_old_edm):
    """cosmos-rl wfm_trainer.py: log_prob_ratio = -(diff_current - diff_old), averaged over the sample's dimensions."""
    diff_current = (sample_edm - mu_current_edm) ** 2
    diff_old = (sample_edm - mu_old_edm) ** 2
    return (-(diff_current - diff_old)).flatten(1).mean(dim=1)


def test_flow_edm_log_ratio_is_the_official_squared_distance_in_edm_coordinates():
    x = torch.tensor([[0.2, -0.4, 1.0]])
    velocity_old, velocity_new = torch.tensor([[0.5, 0.1, -0.3]]), torch.tensor([[0.6, 0.0, -0.2]])
    sigma, sigma_next = 0.8, 0.6
    old = flow_sde_step(x, velocity_old, sigma, sigma_next, eta=0.7, noise_sigma_max=0.9, noise=torch.ones(1, 3))
    new = flow_sde_step(x, velocity_new, sigma, sigma_next, eta=0.7, noise_sigma_max=0.9, prev_sample=old.prev_sample)
    old_score = score_transition(old, "edm_squared_distance").log_prob
    new_score = score_transition(new, "edm_squared_distance").log_prob
    # Official: x_edm = x_t / (1 - t) at the next state's level; means map the same way.
    to_edm = 1 / (1 - sigma_next)
    expected = official_log_ratio(old.prev_sample * to_edm, new.mean * to_edm, old.mean * to_edm)
    torch.testing.assert_close(new_score - old_score, expected)
    # The trainer forms it element-wise from the rollout's mean, as the official code does.
    torch.testing.assert_close(transition_log_ratio(new, old.mean, "edm_squared_distance"), expected)
    # that is the flow-coordinate squared distance divided by (1 - t_next)^2 ...
    flow_distance = ((old.prev_sample - new.mean) ** 2 - (old.prev_sample - old.mean) ** 2).mean()
    torch.testing.assert_close(new_score - old_score, -flow_distance[None] / (1 - sigma_next) ** 2)
    # ... while the Gaussian form divides the same distance by 2 std^2.
    gaussian = score_transition(new, "gaussian").log_prob - score_transition(old, "gaussian").log_prob
    torch.testing.assert_close(gaussian, -flow_distance[None] / (2 * old.std**2))


def test_ddim_edm_coordinates_divide_by_sqrt_alpha_bar_next():
    x, eps = torch.tensor([[0.3, -1.2]]), torch.tensor([[0.1, 0.4]])
    a, a_prev = 0.5, 0.8
    old = ddim_step(x, eps, a, a_prev, eta=1.0, noise=torch.tensor([[1.0, -1.0]]))
    new = ddim_step(x, eps + 0.2, a, a_prev, eta=1.0, prev_sample=old.prev_sample)
    # DDPM state sqrt(a) x0 + sqrt(1 - a) eps = sqrt(a) (x0 + sigma eps): EDM coordinates x / sqrt(a).
    to_edm = 1 / math.sqrt(a_prev)
    expected = official_log_ratio(old.prev_sample * to_edm, new.mean * to_edm, old.mean * to_edm)
    new_score = score_transition(new, "edm_squared_distance").log_prob
    old_score = score_transition(old, "edm_squared_distance").log_prob
    torch.testing.assert_close(new_score - old_score, expected)


def test_edm_score_is_zero_on_deterministic_steps_and_replays_to_ratio_one():
    x, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    last = score_transition(flow_sde_step(x, v, 0.3, 0.0, eta=0.0, noise_sigma_max=0.9), "edm_squared_distance")
    assert torch.all(last.log_prob == 0)
    rollout = score_transition(flow_sde_step(x, v, 0.9, 0.7, eta=1.0, noise_sigma_max=0.9), "edm_squared_distance")
    replay = flow_sde_step(x, v, 0.9, 0.7, eta=1.0, noise_sigma_max=0.9, prev_sample=rollout.prev_sample)
    assert torch.equal(score_transition(replay, "edm_squared_distance").log_prob, rollout.log_prob)


def test_reverse_kl_forms():
    mean, ref = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    std, edm_scale = torch.tensor([2.0]), torch.tensor([4.0])
    # Official: kl_loss = (mu_ref - mu_current).pow(2).mean() in EDM coordinates.
    expected = ((ref * 4.0 - mean * 4.0) ** 2).mean()
    torch.testing.assert_close(reverse_kl(mean, ref, std, edm_scale, "edm_squared_distance"), expected[None])
    torch.testing.assert_close(reverse_kl(mean, ref, std, edm_scale, "gaussian"), gaussian_kl(mean, ref, std))
    assert reverse_kl(mean, ref, torch.tensor([0.0]), edm_scale, "edm_squared_distance").item() == 0
    with pytest.raises(ValueError, match="kl_form"):
        reverse_kl(mean, ref, std, edm_scale, "l2")


@pytest.mark.parametrize("t", [0.05, 0.3, 0.5, 0.9])
def test_flow_edm_data_weight_equals_the_official_weighted_x0_error(t):
    torch.manual_seed(0)
    x0, eps, network_output = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    # Official (t2v_model.py, RectifiedFlowScaling + get_per_sigma_loss_weights, sigma_data = 1):
    sigma = t / (1 - t)
    x_edm = x0 + sigma * eps
    c_skip, c_out = 1 - t, -t
    x0_pred = c_skip * x_edm + c_out * network_output
    official = (sigma**2 + 1) / sigma**2 * ((x0 - x0_pred) ** 2).flatten(1).mean(dim=1)
    ours = flow_matching_edm_weight(t) * flow_matching_loss(network_output, x0, eps)
    torch.testing.assert_close(ours, official)
    assert flow_matching_edm_weight(t).item() == pytest.approx((1 - t) ** 2 + t**2)
    assert edm_loss_weight(torch.tensor(sigma)).item() == pytest.approx((sigma**2 + 1) / sigma**2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_edm_data_weight_equals_the_weighted_x0_error(prediction_type):
    torch.manual_seed(1)
    a = torch.tensor([0.2, 0.9])
    x0, eps, output = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    sa, s1a = a.sqrt()[:, None], (1 - a).sqrt()[:, None]
    x_t = sa * x0 + s1a * eps
    if prediction_type == "epsilon":
        x0_pred, target = (x_t - s1a * output) / sa, eps
    else:
        x0_pred, target = sa * x_t - s1a * output, sa * eps - s1a * x0
    sigma = ((1 - a) / a).sqrt()
    official = (sigma**2 + 1) / sigma**2 * ((x0 - x0_pred) ** 2).mean(dim=1)
    ours = ddpm_edm_weight(a, prediction_type) * ((output - target) ** 2).mean(dim=1)
    torch.testing.assert_close(ours, official)


def test_normalize_then_average_is_the_official_mean_of_per_reward_advantages():
    rewards = torch.tensor([[1.0, 10.0], [3.0, 14.0], [2.0, 0.0], [6.0, 1.0]])
    out = compute_advantages(rewards, torch.ones(2), num_generations=2, advantage_clip=100.0)
    # Official (t2v_model.py): per reward (r - mean) / (std + 1e-4) over the group, then sum / N_RM.
    expected = torch.zeros(4)
    for k in range(2):
        grouped = rewards[:, k].view(2, 2)
        advantage = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + 1e-4)
        expected += advantage.flatten() / 2
    torch.testing.assert_close(out.advantages, expected)
    # with weights: the weighted mean of the per-reward advantages
    weighted = compute_advantages(rewards, torch.tensor([3.0, 1.0]), num_generations=2, advantage_clip=100.0)
    first = compute_advantages(rewards[:, :1], torch.ones(1), num_generations=2, advantage_clip=100.0).advantages
    second = compute_advantages(rewards[:, 1:], torch.ones(1), num_generations=2, advantage_clip=100.0).advantages
    torch.testing.assert_close(weighted.advantages, (3 * first + second) / 4)


def test_fixed_and_random_train_step_selection():
    assert select_train_steps([0, 2, 4], 10, "fixed", seed=0, iteration=5) == [0, 2, 4]
    draws = [select_train_steps([0, 2, 4], 10, "random", seed=0, iteration=i) for i in range(6)]
    for steps in draws:
        assert len(steps) == 3 and len(set(steps)) == 3 and steps == sorted(steps)
        assert all(0 <= step <= 8 for step in steps)  # the deterministic last step (9) is never drawn
    assert len({tuple(steps) for steps in draws}) > 1  # a fresh subset per iteration
    # resumable: a pure function of (seed, iteration)
    assert select_train_steps([0, 2, 4], 10, "random", seed=0, iteration=3) == draws[3]
    assert select_train_steps([0, 2, 4], 10, "random", seed=1, iteration=3) != draws[3] or draws[3] == [0, 1, 2]
    with pytest.raises(ValueError, match="train_timestep_selection"):
        select_train_steps([0], 4, "every", seed=0, iteration=0)


def test_default_config_is_the_official_recipe(tmp_path):
    config = DDRLConfig(output_dir=str(tmp_path), report_to="none")
    saved = config.to_dict()
    expected = {
        # toml: [optimizer] lr = 1e-5, weight_decay = 1e-4; OptimizerConfig betas (0.9, 0.99)
        "learning_rate": 1e-5,
        "weight_decay": 1e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.99,
        # toml: [scheduler] warm_up_steps = [50], f_max = f_min = 1 (constant after warm-up)
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 50,
        # toml: grad_clip clip_norm = 1.0; ModelConfig.loss_scale = 10
        "max_grad_norm": 1.0,
        "loss_scale": 10.0,
        "log_ratio_form": "edm_squared_distance",
        "kl_form": "edm_squared_distance",
        "data_loss_weighting": "edm",
        # toml: train_on = [0, 2, ..., 18] (fixed), use_same_seed = false, data_beta = 0.01, kl_beta = 0
        "train_timestep_selection": "fixed",
        "train_timesteps": list(range(0, 19, 2)),
        "same_initial_noise": False,
        "data_beta": 0.01,
        "kl_beta": 0.0,
        "multi_objective_aggregation": "normalize_then_average",
    }
    assert {key: saved[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("log_ratio_form", "edm"),
        ("kl_form", "kl"),
        ("data_loss_weighting", "snr"),
        ("train_timestep_selection", "all"),
        ("loss_scale", 0.0),
        ("sde_window_size", 2),  # with train_timestep_selection="random" below
        ("karras_sigmas", [200.0, 0.01]),
        ("karras_sigmas", [0.01, 200.0, 7.0]),
        ("data_text_dropout", 1.0),
        ("data_latents", "mode"),
        ("reward_clip", 0.0),
        ("reward_error_policy", "mean"),
    ],
)
def test_bad_recipe_values_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        extra = (
            {"train_timestep_selection": "random", "train_timestep_fraction": 0.5}
            if field == "sde_window_size"
            else {}
        )
        DDRLConfig(output_dir=str(tmp_path), report_to="none", **{field: value}, **extra)


@pytest.mark.parametrize("same_initial_noise", [False, True])
def test_trainer_shares_initial_noise_within_groups_and_draws_random_steps(tmp_path, same_initial_noise):
    from trl_ddrl import DDRLTrainer
    from trl_ddrl.digits import digits_dataset, ink_reward, random_digits_pipeline

    args = DDRLConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        num_generations=2,
        prompts_per_step=2,
        num_inference_steps=6,
        train_timesteps=[0, 2],
        train_timestep_selection="random",
        same_initial_noise=same_initial_noise,
        per_device_train_batch_size=8,
        data_beta=0.0,
        report_to="none",
        save_strategy="no",
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    pipeline = random_digits_pipeline(seed=0)
    trainer = DDRLTrainer(pipeline, ink_reward, args=args, train_dataset=digits_dataset("base").select(range(8)))
    trainer.train()
    buffer = trainer._buffer
    noise = buffer.initial_noise
    assert (
        torch.equal(noise[0], noise[1]) == same_initial_noise and torch.equal(noise[2], noise[3]) == same_initial_noise
    )
    assert not torch.equal(noise[0], noise[2])
    # the rollout buffer holds this iteration's random steps, the same ones select_train_steps gives on resume
    assert buffer.step_indices.tolist() == select_train_steps([0, 2], 6, "random", seed=args.seed, iteration=0)


def official_2ab_mean(x_s, s, t, x0_s, x0_prev=None, s1=None):
    """cosmos-rl sampler: order2_fn (res_x0_rk2_step, or reg_x0_euler_step without a previous step), EDM coordinates."""
    if x0_prev is None:
        return (s - t) / s * x0_s + t / s * x_s
    s_log, t_log, m_log = -math.log(s), -math.log(t), -math.log(s1)
    dt = t_log - s_log
    c2 = (m_log - s_log) / dt
    phi1 = math.expm1(-dt) / (-dt)
    phi2 = (phi1 - 1.0) / (-dt)
    b1, b2 = phi1 - 1.0 / c2 * phi2, 1.0 / c2 * phi2
    return math.exp(-dt) * x_s + dt * (b1 * x0_s + b2 * x0_prev)


def edm(t):
    return t / (1 - t)


@pytest.mark.parametrize("with_previous", [False, True])
def test_churn_step_is_the_official_2ab_churn_transition(with_previous):
    eta = 1 / 21
    x, v = torch.tensor([[0.4, -1.1, 0.7]], dtype=torch.float64), torch.tensor([[0.2, 0.5, -0.9]], dtype=torch.float64)
    previous = torch.tensor([[0.1, -0.3, 0.2]], dtype=torch.float64)
    t_hat, t_next, t_prev = 0.7, 0.5, 0.85  # flow levels: current (churned), next schedule point, previous (churned)
    out = edm_churn_step(
        x.float(),
        v.float(),
        t_hat,
        t_next,
        eta,
        previous_denoised=previous.float() if with_previous else None,
        previous_sigma=t_prev,
        noise=torch.tensor([[1.0, -2.0, 0.5]]),
    )
    # Official, in EDM coordinates: x_edm = x_flow / (1 - t), x0 = x_t - t v (RectifiedFlowScaling).
    x_edm, x0 = x / (1 - t_hat), x - t_hat * v
    args = (previous, edm(t_prev)) if with_previous else ()
    mu_edm = official_2ab_mean(x_edm, edm(t_hat), edm(t_next), x0, *args)
    std_edm = edm(t_next) * math.sqrt(eta**2 + 2 * eta)  # wfm_trainer.py: sigma_next * sqrt(eta^2 + 2 eta)
    torch.testing.assert_close((out.mean * out.edm_scale[:, None]).double(), mu_edm, rtol=1e-5, atol=1e-6)
    assert (out.std * out.edm_scale).item() == pytest.approx(std_edm, rel=1e-5)
    # the next state sits at the churned level (1 + eta) s': its EDM coordinates are x_flow / (1 - t_hat')
    t_hat_next = (1 + eta) * edm(t_next) / (1 + (1 + eta) * edm(t_next))
    assert out.edm_scale.item() == pytest.approx(1 / (1 - t_hat_next), rel=1e-6)
    assert churn_sigma(t_next, eta).item() == pytest.approx(t_hat_next)
    torch.testing.assert_close(out.denoised.double(), x0, rtol=1e-6, atol=1e-6)


def test_churn_step_without_churn_is_the_flow_euler_step_also_from_sigma_one():
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    for sigma, sigma_next in [(0.8, 0.6), (1.0, 0.9)]:
        ours = edm_churn_step(x, v, sigma, sigma_next, eta=0.0)
        euler = flow_sde_step(x, v, sigma, sigma_next, eta=0.0, noise_sigma_max=0.95)
        torch.testing.assert_close(ours.prev_sample, euler.prev_sample)
        assert torch.all(ours.std == 0)
    # a previous level of 1 (EDM sigma = infinity) leaves the first-order step, as after a t = 1 start
    first = edm_churn_step(x, v, 0.9, 0.7, eta=0.05, noise=torch.ones(2, 5))
    after_one = edm_churn_step(
        x, v, 0.9, 0.7, 0.05, previous_denoised=x * 3, previous_sigma=1.0, noise=torch.ones(2, 5)
    )
    torch.testing.assert_close(after_one.mean, first.mean)
    # the final step to 0 is deterministic: the denoised estimate
    last = edm_churn_step(x, v, 0.1, 0.0, eta=0.05, previous_denoised=x, previous_sigma=0.2)
    assert torch.all(last.std == 0)
    torch.testing.assert_close(last.prev_sample, x - 0.1 * v)


def test_churn_eta_is_the_authors():
    assert churn_eta(20) == pytest.approx(1 / 21)
    assert churn_eta(2) == pytest.approx(math.sqrt(1.2) - 1)


def test_family_default_samplers_and_etas():
    from tiny_models import tiny_cosmos2_pipeline, tiny_sd15_pipeline

    from trl_ddrl.digits import random_digits_pipeline
    from trl_ddrl.pipelines import SamplingSettings, get_adapter

    cosmos = get_adapter(tiny_cosmos2_pipeline(), SamplingSettings(20, None, height=32, width=32))
    assert (cosmos.settings.sampler, cosmos.settings.eta) == ("churn", pytest.approx(1 / 21))
    digits = get_adapter(random_digits_pipeline(seed=0), SamplingSettings(20, None))
    assert (digits.settings.sampler, digits.settings.eta) == ("flow_sde", 0.7)
    sd15 = get_adapter(tiny_sd15_pipeline(), SamplingSettings(20, None))
    assert (sd15.settings.sampler, sd15.settings.eta) == ("ddim", 1.0)
    with pytest.raises(ValueError, match="sampler='churn' is not available for StableDiffusionPipeline"):
        get_adapter(tiny_sd15_pipeline(), SamplingSettings(20, None, sampler="churn"))


@pytest.mark.parametrize("family", ["digits", "cosmos"])
def test_churn_rollout_replays_with_ratio_exactly_one_and_needs_the_previous_estimate(family):
    from tiny_models import tiny_cosmos2_pipeline

    from trl_ddrl.digits import digits_prompt, random_digits_pipeline
    from trl_ddrl.pipelines import SamplingSettings, get_adapter

    if family == "digits":  # a schedule that starts at t = 1
        pipeline, extra, prompts = random_digits_pipeline(seed=0), {}, [digits_prompt(3), digits_prompt(5)]
    else:
        pipeline, extra, prompts = (
            tiny_cosmos2_pipeline(),
            dict(height=32, width=32, max_sequence_length=16),
            ["a", "b"],
        )
    adapter = get_adapter(pipeline, SamplingSettings(5, None, sampler="churn", **extra))
    conditioning = adapter.encode_prompts(prompts, adapter.device)
    noise = adapter.sample_noise(2, torch.Generator().manual_seed(0))
    trajectory = adapter.sample(adapter.denoiser, conditioning, noise, generator=torch.Generator().manual_seed(1))
    assert trajectory.denoised.shape == trajectory.latents[:, 1:].shape
    assert torch.isfinite(trajectory.latents).all() and (trajectory.log_probs[:, :-1] != 0).all()
    assert (trajectory.log_probs[:, -1] == 0).all()  # the final step is deterministic
    for i in range(4):
        index = torch.full((2,), i)
        previous = trajectory.denoised[:, i - 1] if i > 0 else None
        with torch.no_grad():
            replay = adapter.transition_log_prob(
                adapter.denoiser, trajectory.latents[:, i], trajectory.latents[:, i + 1], index, conditioning, previous
            )
            assert torch.equal(replay.log_prob, trajectory.log_probs[:, i])
            if i > 0:
                first_order = adapter.transition_log_prob(
                    adapter.denoiser, trajectory.latents[:, i], trajectory.latents[:, i + 1], index, conditioning
                )
                # The second-order step depends on the previous estimate, except after a state at t = 1 (EDM sigma
                # = infinity: the digits schedule's first state), where 2AB is exactly the first-order step.
                after_pure_noise = family == "digits" and i == 1
                assert torch.equal(first_order.log_prob, trajectory.log_probs[:, i]) == after_pure_noise


def test_trainer_with_the_churn_sampler_replays_on_policy(tmp_path):
    from trl_ddrl import DDRLTrainer
    from trl_ddrl.digits import digits_dataset, ink_reward, random_digits_pipeline

    args = DDRLConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        num_generations=2,
        prompts_per_step=2,
        num_inference_steps=5,
        train_timesteps=[1, 3],
        per_device_train_batch_size=8,
        sampler="churn",
        data_beta=0.1,
        warmup_steps=0,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    trainer = DDRLTrainer(
        random_digits_pipeline(seed=0), ink_reward, args=args, train_dataset=digits_dataset("base").select(range(8))
    )
    assert (args.sampler, args.eta) == ("churn", pytest.approx(churn_eta(5)))  # resolved and written back
    trainer.train()
    assert trainer._buffer.previous_denoised.shape == trainer._buffer.states.shape
    ratios = [log["ratio/mean"] for log in trainer.state.log_history if "ratio/mean" in log]
    assert ratios[0] == 1.0


@pytest.mark.parametrize("sampler", ["churn", "flow_sde"])
def test_data_term_noise_is_the_rollouts_standard_noise_for_cosmos_predict2(tmp_path, sampler):
    """
    cosmos-rl `wfm_trainer.py` L507-516: the data term noises the data with the rollout's standard-normal noise
    (`gaussian_noise`, the `x_sigma` drawn before `* sigma_max`, L898-904, L964). Cosmos Predict2 starts from
    `80 * eps` (flow `t_0 * eps`, churned further): the recorded initial state is not the noise itself.
    """
    from datasets import Dataset
    from test_pipelines_unet import ddrl_config
    from tiny_models import tiny_cosmos2_pipeline

    from trl_ddrl import DDRLTrainer

    args = ddrl_config(
        tmp_path, max_steps=1, data_beta=0.0, sampler=sampler, eta=None, max_sequence_length=16, height=32, width=32
    )
    trainer = DDRLTrainer(
        tiny_cosmos2_pipeline(),
        lambda prompts, images, **kwargs: images.flatten(1).mean(dim=1).tolist(),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a cat", "a red car"]}),
    )
    trainer.train()
    buffer, adapter = trainer._buffer, trainer.adapter
    initial_level = float(adapter.model_sigmas()[0])
    assert initial_level < 0.99  # 80/81, churned: the state is t_0 * eps, not eps
    assert buffer.step_indices[0] == 0
    torch.testing.assert_close(buffer.initial_noise * initial_level, buffer.states[:, 0])
    assert abs(float(buffer.initial_noise.std()) - 1.0) < 0.1
