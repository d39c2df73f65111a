import math
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from trl_ddrl.losses import clipped_policy_loss
from trl_ddrl.sampling import (
    StepOutput,
    churn_eta,
    ddim_step,
    edm_squared_distance_log_prob,
    flow_cps_step,
    flow_sde_step,
    gaussian_log_prob,
    score_transition,
    transition_log_ratio,
)


def test_gaussian_log_prob_matches_torch_normal():
    torch.manual_seed(0)
    x, mean = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    std = torch.tensor([0.5, 1.0, 2.0])
    expected = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)


def test_gaussian_log_prob_is_zero_for_deterministic_transitions():
    x = torch.randn(2, 5)
    out = gaussian_log_prob(x, x + 1, torch.tensor([0.0, 1.0]))
    assert out[0] == 0
    assert math.isfinite(out[1].item()) and out[1] != 0


def test_flow_sde_step_log_prob_is_the_normal_density_of_the_draw():
    torch.manual_seed(0)
    x, v = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    out = flow_sde_step(x, v, torch.full((4,), 0.8), torch.full((4,), 0.6), eta=0.7, noise_sigma_max=0.95)
    expected = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1)).log_prob(out.prev_sample)
    torch.testing.assert_close(out.log_prob, expected.mean(dim=(1, 2, 3)))
    # the draw is mean + std * noise: standardised residuals look standard normal
    z = (out.prev_sample - out.mean) / out.std.view(-1, 1, 1, 1)
    assert abs(z.mean().item()) < 0.15 and abs(z.std().item() - 1) < 0.15


def test_flow_sde_step_std_follows_the_formula():
    sigma, sigma_next, eta = 0.5, 0.4, 0.7
    out = flow_sde_step(torch.zeros(1, 2), torch.zeros(1, 2), sigma, sigma_next, eta=eta, noise_sigma_max=0.9)
    g = eta * math.sqrt(sigma / (1 - sigma))
    assert out.std.item() == pytest.approx(g * math.sqrt(sigma - sigma_next), rel=1e-6)


def test_flow_sde_replay_gives_ratio_one():
    torch.manual_seed(1)
    x, v = torch.randn(5, 4, 6, 6), torch.randn(5, 4, 6, 6)
    sigma, sigma_next = torch.rand(5) * 0.5 + 0.4, torch.rand(5) * 0.3
    rollout = flow_sde_step(x, v, sigma, sigma_next, eta=1.0, noise_sigma_max=0.95)
    replay = flow_sde_step(x, v, sigma, sigma_next, eta=1.0, noise_sigma_max=0.95, prev_sample=rollout.prev_sample)
    ratio = torch.exp(replay.log_prob - rollout.log_prob)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6)
    # a different velocity gives a different likelihood
    moved = flow_sde_step(
        x, v + 0.1, sigma, sigma_next, eta=1.0, noise_sigma_max=0.95, prev_sample=rollout.prev_sample
    )
    assert not torch.allclose(moved.log_prob, rollout.log_prob)


def test_flow_sde_with_eta_zero_is_the_diffusers_euler_sampler():
    torch.manual_seed(2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    sigmas = scheduler.sigmas
    ours = theirs = torch.randn(2, 4, 8, 8)
    weight = torch.randn(4, 4)
    for i, t in enumerate(scheduler.timesteps):
        velocity_ours = torch.einsum("oc,bchw->bohw", weight, ours)
        velocity_theirs = torch.einsum("oc,bchw->bohw", weight, theirs)
        theirs = scheduler.step(velocity_theirs, t, theirs).prev_sample
        step = flow_sde_step(ours, velocity_ours, sigmas[i], sigmas[i + 1], eta=0.0, noise_sigma_max=float(sigmas[1]))
        assert torch.all(step.std == 0) and torch.all(step.log_prob == 0)
        ours = step.prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_flow_sde_clamps_sigma_one_inside_the_noise_level():
    out = flow_sde_step(torch.zeros(1, 3), torch.ones(1, 3), 1.0, 0.9, eta=0.7, noise_sigma_max=0.95)
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.log_prob).all()


def test_ddim_step_with_eta_zero_matches_diffusers_ddim():
    torch.manual_seed(3)
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(5)
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = scheduler.timesteps[1]
    prev_t = t - scheduler.config.num_train_timesteps // 5
    expected = scheduler.step(eps, t, x, eta=0.0).prev_sample
    out = ddim_step(x, eps, scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[prev_t], eta=0.0)
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)


def test_ddim_step_std_matches_diffusers_variance_and_replays_exactly():
    torch.manual_seed(4)
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(5)
    t = int(scheduler.timesteps[1])
    prev_t = t - scheduler.config.num_train_timesteps // 5
    x, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    out = ddim_step(x, eps, scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[prev_t], eta=1.0)
    expected_std = scheduler._get_variance(t, prev_t).sqrt()
    torch.testing.assert_close(out.std, expected_std.expand(3).float())
    replay = ddim_step(
        x, eps, scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[prev_t], eta=1.0, prev_sample=out.prev_sample
    )
    assert torch.allclose(torch.exp(replay.log_prob - out.log_prob), torch.ones(3), atol=1e-6)


def test_flow_cps_step_mean_std_and_log_prob_follow_the_formula():
    # Hand-sized: two samples of two values, re-derived from x0 = x - sigma v, x1 = x + (1 - sigma) v.
    x = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    v = torch.tensor([[1.0, 0.5], [-0.5, 2.0]])
    sigma, sigma_next, eta = torch.tensor([0.8, 0.6]), torch.tensor([0.6, 0.3]), 0.8
    noise = torch.tensor([[0.3, -1.2], [0.7, 0.1]])
    out = flow_cps_step(x, v, sigma, sigma_next, eta=eta, noise=noise)
    for b in range(2):
        s, s_next = sigma[b].item(), sigma_next[b].item()
        std = s_next * math.sin(eta * math.pi / 2)
        for d in range(2):
            x0 = x[b, d].item() - s * v[b, d].item()
            x1 = x[b, d].item() + (1 - s) * v[b, d].item()
            mean = (1 - s_next) * x0 + math.sqrt(s_next**2 - std**2) * x1
            assert out.mean[b, d].item() == pytest.approx(mean, abs=1e-6)
            assert out.prev_sample[b, d].item() == pytest.approx(mean + std * noise[b, d].item(), abs=1e-6)
        assert out.std[b].item() == pytest.approx(std, rel=1e-6)
        density = [
            -((out.prev_sample[b, d].item() - out.mean[b, d].item()) ** 2) / (2 * std**2)
            - math.log(std)
            - 0.5 * math.log(2 * math.pi)
            for d in range(2)
        ]
        assert out.log_prob[b].item() == pytest.approx(sum(density) / 2, rel=1e-5)


def test_flow_cps_replay_gives_ratio_exactly_one():
    torch.manual_seed(3)
    x, v = torch.randn(5, 4, 6, 6), torch.randn(5, 4, 6, 6)
    sigma, sigma_next = torch.rand(5) * 0.5 + 0.4, torch.rand(5) * 0.3 + 0.05
    rollout = flow_cps_step(x, v, sigma, sigma_next, eta=0.8)
    replay = flow_cps_step(x, v, sigma, sigma_next, eta=0.8, prev_sample=rollout.prev_sample)
    assert torch.equal(torch.exp(replay.log_prob - rollout.log_prob), torch.ones(5))
    moved = flow_cps_step(x, v + 0.1, sigma, sigma_next, eta=0.8, prev_sample=rollout.prev_sample)
    assert not torch.allclose(moved.log_prob, rollout.log_prob)


def test_flow_cps_preserves_the_flow_coefficients():
    # With the exact velocity of a point x0 noised by eps, the next state is (1 - s') x0 plus noise of total std s'.
    torch.manual_seed(4)
    x0, eps = torch.randn(1, 20000), torch.randn(1, 20000)
    s, s_next = 0.7, 0.4
    x = (1 - s) * x0 + s * eps
    out = flow_cps_step(x, eps - x0, s, s_next, eta=0.8)
    residual = out.prev_sample - (1 - s_next) * x0
    assert residual.std().item() == pytest.approx(s_next, rel=0.03)
    # The Euler-Maruyama SDE at the same eta overshoots the schedule's noise level.
    sde = flow_sde_step(x, eps - x0, s, s_next, eta=0.8, noise_sigma_max=0.9)
    assert (sde.prev_sample - (1 - s_next) * x0).std().item() > 1.05 * s_next


def test_flow_cps_with_eta_zero_or_a_last_step_is_the_euler_step():
    torch.manual_seed(5)
    x, v = torch.randn(3, 8), torch.randn(3, 8)
    euler = flow_cps_step(x, v, 0.6, 0.2, eta=0.0)
    torch.testing.assert_close(euler.prev_sample, x + v * (0.2 - 0.6))
    assert torch.all(euler.std == 0) and torch.all(euler.log_prob == 0)
    last = flow_cps_step(x, v, 0.3, 0.0, eta=0.8)
    torch.testing.assert_close(last.prev_sample, x - 0.3 * v)
    assert torch.all(last.std == 0) and torch.all(last.log_prob == 0)


def high_noise_transition(num_changed: int, form: str):
    """
    A churn transition at EDM sigma 150 (`|l|` about 2200) whose replayed mean differs from the rollout's by a
    relative 1e-6 of the residual in the first `num_changed` of 4096 elements (alternating signs over 4 samples):
    the true log-ratios are about `1e-6 * num_changed`. Returns the replayed step, the rollout's mean and the float64
    reference log-ratio computed from the same float32 tensors.
    """
    generator = torch.Generator().manual_seed(0)
    sigma_edm, eta = 150.0, churn_eta(20)
    to_flow = 1 / (1 + sigma_edm)  # 1 - t at the next state's level
    std = to_flow * sigma_edm * math.sqrt(eta**2 + 2 * eta)
    old_mean = torch.randn(4, 4096, generator=generator)
    x = old_mean + std * torch.randn(4, 4096, generator=generator)
    mean = old_mean.clone()
    signs = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    mean[:, :num_changed] += 1e-6 * signs * (x - old_mean)[:, :num_changed]
    step = StepOutput(
        prev_sample=x,
        mean=mean,
        std=torch.full((4,), std),
        log_prob=torch.zeros(4),
        edm_scale=torch.full((4,), 1 / to_flow),
    )
    weight = step.edm_scale.double() ** 2 if form == "edm_squared_distance" else 1 / (2 * step.std.double() ** 2)
    distance = (x.double() - mean.double()) ** 2 - (x.double() - old_mean.double()) ** 2
    return step, old_mean, -weight * distance.mean(dim=1)


@pytest.mark.parametrize("num_changed", [1, 10, 100, 1000])
def test_high_noise_log_ratio_matches_a_float64_reference(num_changed):
    step, old_mean, reference = high_noise_transition(num_changed, "edm_squared_distance")
    assert 1e-7 < reference.abs().min() and reference.abs().max() < 2e-3  # true differences of 1e-6 .. 1e-3
    assert score_transition(step, "edm_squared_distance").log_prob.abs().min() > 2000
    _, ratio, _ = clipped_policy_loss(
        transition_log_ratio(step, old_mean, "edm_squared_distance"), torch.ones(4), clip_range=1e-4
    )
    torch.testing.assert_close(ratio.double(), reference.exp(), atol=1e-7, rtol=0)
    # Subtracting the two per-sample float32 scores (the old way) is off by up to their spacing, 2.4e-4.
    old_way = edm_squared_distance_log_prob(step.prev_sample, step.mean, step.edm_scale) - (
        edm_squared_distance_log_prob(step.prev_sample, old_mean, step.edm_scale)
    )
    assert (old_way.double().exp() - reference.exp()).abs().max() > 1e-6


def test_gaussian_log_ratio_matches_a_float64_reference():
    step, old_mean, reference = high_noise_transition(100, "gaussian")
    log_ratio = transition_log_ratio(step, old_mean, "gaussian").double()
    torch.testing.assert_close(log_ratio, reference, atol=1e-9, rtol=1e-6)
    # It is the difference of the two Gaussian log-densities.
    old = gaussian_log_prob(step.prev_sample, old_mean, step.std)
    new = gaussian_log_prob(step.prev_sample, step.mean, step.std)
    torch.testing.assert_close(log_ratio.float(), new - old, atol=1e-6, rtol=0)


@pytest.mark.parametrize("form", ["edm_squared_distance", "gaussian"])
def test_log_ratio_is_exactly_zero_on_a_bit_identical_replay_and_on_deterministic_steps(form):
    x, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    rollout = flow_sde_step(x, v, 0.9, 0.7, eta=1.0, noise_sigma_max=0.9)
    replay = flow_sde_step(x, v, 0.9, 0.7, eta=1.0, noise_sigma_max=0.9, prev_sample=rollout.prev_sample)
    assert torch.equal(transition_log_ratio(replay, rollout.mean, form), torch.zeros(3))
    last = flow_sde_step(x, v, 0.3, 0.0, eta=0.0, noise_sigma_max=0.9)
    assert torch.equal(transition_log_ratio(last, rollout.mean, form), torch.zeros(3))


@pytest.mark.parametrize("form", ["edm_squared_distance", "gaussian"])
def test_log_ratio_gradient_is_the_score_gradient(form):
    x, old_mean = torch.randn(2, 6), torch.randn(2, 6)
    mean = (old_mean + 0.1 * torch.randn(2, 6)).requires_grad_()
    std, edm_scale = torch.tensor([0.5, 0.7]), torch.tensor([3.0, 2.0])
    step = StepOutput(prev_sample=x, mean=mean, std=std, log_prob=torch.zeros(2), edm_scale=edm_scale)
    transition_log_ratio(step, old_mean, form).sum().backward()
    expected_mean = mean.detach().requires_grad_()
    replay = replace(step, log_prob=gaussian_log_prob(x, expected_mean, std), mean=expected_mean)
    score_transition(replay, form).log_prob.sum().backward()
    torch.testing.assert_close(mean.grad, expected_mean.grad)
