import math

import pytest
import torch

from trl_ddrl.losses import (
    clip_and_fill_rewards,
    clipped_policy_loss,
    compute_advantages,
    flow_matching_loss,
    flow_matching_noisy_sample,
    gaussian_kl,
)


def _adv(rewards, **kwargs):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    if rewards.ndim == 1:
        rewards = rewards[:, None]
    weights = kwargs.pop("weights", torch.ones(rewards.shape[1]))
    return compute_advantages(rewards, weights, **kwargs)


def test_group_advantages_hand_computed():
    # group 1: [1, 3] -> mean 2, unbiased std sqrt(2); group 2: [0, 0] -> zero spread
    out = _adv([1.0, 3.0, 0.0, 0.0], num_generations=2, eps=0.0 + 1e-12)
    s = math.sqrt(2)
    torch.testing.assert_close(out.advantages, torch.tensor([-1 / s, 1 / s, 0.0, 0.0]))
    assert out.zero_std_groups == 1 and out.num_groups == 2 and out.dropped_groups == 0


def test_scale_none_and_batch():
    rewards = [1.0, 3.0, 10.0, 14.0]
    none = _adv(rewards, num_generations=2, scale_rewards="none")
    torch.testing.assert_close(none.advantages, torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    batch = _adv(rewards, num_generations=2, scale_rewards="batch", eps=1e-12)
    batch_std = torch.tensor(rewards).std()
    torch.testing.assert_close(batch.advantages, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / batch_std)


def test_advantages_are_clipped():
    out = _adv([0.0, 100.0], num_generations=2, scale_rewards="none", advantage_clip=5.0)
    torch.testing.assert_close(out.advantages, torch.tensor([-5.0, 5.0]))


def test_exp_advantage_transform_and_zero_spread_stays_zero():
    out = _adv([1.0, 3.0, 2.0, 2.0], num_generations=2, exp_advantage=True, eps=1e-12)
    a = 1 / math.sqrt(2)
    torch.testing.assert_close(out.advantages, torch.tensor([-math.exp(a), -math.exp(-a), 0.0, 0.0]))


def test_nan_rewards_are_ignored_or_drop_the_group():
    # two functions; sample 1 has only the second function's reward -> still scored
    rewards = [[1.0, 0.0], [float("nan"), 2.0], [float("nan"), float("nan")], [5.0, 5.0]]
    out = _adv(rewards, num_generations=2, scale_rewards="none", multi_objective_aggregation="sum_then_normalize")
    torch.testing.assert_close(out.total_rewards[:2], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(out.advantages, torch.tensor([-0.5, 0.5, 0.0, 0.0]))
    assert out.dropped_groups == 1 and out.zero_std_groups == 0
    assert torch.isfinite(out.advantages).all()


def test_reward_weights_and_normalize_then_sum():
    rewards = [[1.0, 10.0], [3.0, 10.0], [0.0, 1.0], [0.0, 3.0]]
    weights = torch.tensor([2.0, 0.5])
    summed = _adv(
        rewards,
        num_generations=2,
        scale_rewards="none",
        weights=weights,
        multi_objective_aggregation="sum_then_normalize",
    )
    # totals: 2 + 5 = 7, 6 + 5 = 11, 0.5, 1.5 -> centred per group
    torch.testing.assert_close(summed.advantages, torch.tensor([-2.0, 2.0, -0.5, 0.5]))
    per_func = _adv(
        rewards, num_generations=2, weights=weights, multi_objective_aggregation="normalize_then_sum", eps=1e-12
    )
    a = 1 / math.sqrt(2)
    torch.testing.assert_close(per_func.advantages, torch.tensor([-2 * a, 2 * a, -0.5 * a, 0.5 * a]))


def test_group_advantages_stay_exact_for_a_large_offset_and_a_small_spread():
    # Rewards like JPEG compressibility (about -3.94, spread 0.02): in float32, (r - mean) loses about 4e-7 per sample,
    # which the division by the spread blows up to 2e-5, and a group's advantages no longer sum to 0.
    generator = torch.Generator().manual_seed(0)
    rewards = (-3.94 + 0.02 * torch.randn(64, 1, generator=generator, dtype=torch.float64)).float()
    result = compute_advantages(rewards, torch.ones(1), num_generations=4)
    assert result.advantages.dtype == torch.float32
    assert result.advantages.view(-1, 4).sum(dim=1).abs().max() < 1e-6
    exact = (rewards.double().view(-1, 4) - rewards.double().view(-1, 4).mean(1, keepdim=True)) / (
        rewards.double().view(-1, 4).std(1, keepdim=True) + 1e-4
    )
    torch.testing.assert_close(result.advantages.double(), exact.flatten(), rtol=0, atol=1e-6)


def test_bad_shape_is_reported():
    with pytest.raises(ValueError, match="num_generations=4"):
        _adv([1.0, 2.0, 3.0], num_generations=4)


def test_clipped_policy_loss_hand_computed():
    clip = 0.1
    log_prob = torch.log(torch.tensor([1.5, 0.5, 1.05, 1.5]))
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    loss, ratio, clipped = clipped_policy_loss(log_prob - old, adv, clip)
    # A>0, r=1.5 -> clipped at 1.1: -1.1 ; A>0, r=0.5 -> unclipped -0.5 ; A<0, r=1.05 inside -> 2.1 ; A<0 r=1.5 -> 1.5
    torch.testing.assert_close(loss, torch.tensor([-1.1, -0.5, 2.1, 1.5]))
    torch.testing.assert_close(ratio, torch.tensor([1.5, 0.5, 1.05, 1.5]))
    assert clipped.tolist() == [True, False, False, False]


def test_clipped_policy_loss_gradient_vanishes_outside_the_clip():
    log_prob = torch.tensor([0.5, 0.0], requires_grad=True)
    loss, _, _ = clipped_policy_loss(log_prob, torch.tensor([1.0, 1.0]), 0.1)
    loss.sum().backward()
    assert log_prob.grad[0] == 0 and log_prob.grad[1] == -1


def test_flow_matching_loss_hand_computed():
    x0 = torch.tensor([[1.0, 2.0]])
    noise = torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(flow_matching_noisy_sample(x0, noise, 0.25), torch.tensor([[0.75, 1.75]]))
    # target velocity = noise - x0 = [-1, -1]
    torch.testing.assert_close(flow_matching_loss(torch.tensor([[0.0, -1.0]]), x0, noise), torch.tensor([0.5]))


def test_flow_matching_sample_uses_per_sample_sigma():
    x0, noise = torch.ones(2, 3), torch.zeros(2, 3)
    out = flow_matching_noisy_sample(x0, noise, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([[1.0] * 3, [0.0] * 3]))


def test_gaussian_kl_hand_computed_and_matches_torch():
    mean, ref = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    std = torch.tensor([2.0])
    # per dim: 1/8 and 4/8 -> mean 5/16
    torch.testing.assert_close(gaussian_kl(mean, ref, std), torch.tensor([5 / 16]))
    p = torch.distributions.Normal(mean, 2.0)
    q = torch.distributions.Normal(ref, 2.0)
    torch.testing.assert_close(gaussian_kl(mean, ref, std), torch.distributions.kl_divergence(p, q).mean(dim=1))
    assert gaussian_kl(mean, ref, torch.tensor([0.0])).item() == 0


def test_clip_and_fill_rewards_is_the_authors_reward_treatment():
    """
    cosmos-rl `config/wfm/__init__.py` L117-123 (`reward_clip_min/max = -5, 5`) and `t2v_model.py` L704-712: invalid
    rewards take the mean of the group's valid ones; a group without any stays missing.
    """
    nan = float("nan")
    rewards = torch.tensor([[7.0], [nan], [1.0], [-9.0], [nan], [nan]])
    out = clip_and_fill_rewards(rewards, num_generations=3, clip=5.0, fill_group_mean=True)
    assert out[:3, 0].tolist() == [5.0, 3.0, 1.0]  # clamped first, then the group's mean of (5, 1)
    assert out[3, 0] == -5.0
    # the second group has one valid reward: its mean fills the others
    assert out[4:, 0].tolist() == [-5.0, -5.0]
    assert torch.isnan(clip_and_fill_rewards(torch.tensor([[nan], [nan]]), 2, fill_group_mean=True)).all()
    untouched = clip_and_fill_rewards(rewards, 3)
    assert torch.equal(torch.isnan(untouched), torch.isnan(rewards)) and untouched[0, 0] == 7.0
    # the filled group then normalises like the official (r - mean) / (std + 1e-4) over all G values
    result = compute_advantages(out[:3], torch.ones(1), 3, advantage_clip=5.0)
    torch.testing.assert_close(result.advantages[1], torch.tensor(0.0))
