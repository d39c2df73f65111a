# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The terms of the DDRL objective as small pure functions.

    loss = loss_scale * (policy_loss(ratio, advantage) + data_beta * diffusion_loss(data) + kl_beta * reverse_kl)

Per-sample terms are returned unreduced (`[B]`) so the trainer can mask and average them.
"""

from dataclasses import dataclass

import torch

from .sampling import broadcast_per_sample


@dataclass
class Advantages:
    """
    Advantages of one batch of rollouts.

    Attributes:
        advantages (`torch.Tensor` of shape `[N]`): Per-sample advantages, 0 for samples of zero-spread or dropped
            groups.
        total_rewards (`torch.Tensor` of shape `[N]`): Weighted sum of the reward functions (NaN where no function
            gave a reward).
        zero_std_groups (`int`): Groups whose rewards have no spread (they carry no learning signal).
        dropped_groups (`int`): Groups with a sample that no reward function scored.
        num_groups (`int`): Number of groups.
    """

    advantages: torch.Tensor
    total_rewards: torch.Tensor
    zero_std_groups: int
    dropped_groups: int
    num_groups: int


def _nan_group_stats(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of each row of `[num_groups, G]`, ignoring NaNs (std 0 with fewer than 2 values)."""
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1)
    filled = torch.where(valid, grouped, torch.zeros_like(grouped))
    mean = filled.sum(dim=1) / count.clamp(min=1)
    squares = torch.where(valid, (grouped - mean[:, None]) ** 2, torch.zeros_like(grouped))
    std = torch.sqrt(squares.sum(dim=1) / (count - 1).clamp(min=1))
    return mean, torch.where(count > 1, std, torch.zeros_like(std))


def _normalize(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre `[N]` rewards within their groups and scale them; also return which groups have zero spread."""
    grouped = rewards.view(-1, num_generations)
    mean, std = _nan_group_stats(grouped)
    centred = grouped - mean[:, None]
    if scale_rewards == "group":
        centred = centred / (std[:, None] + eps)
    elif scale_rewards == "batch":
        _, batch_std = _nan_group_stats(rewards.view(1, -1))
        centred = centred / (batch_std + eps)
    zero_std = std < eps
    return centred.view(-1), zero_std


def clip_and_fill_rewards(
    rewards_per_func: torch.Tensor, num_generations: int, clip: float | None = None, fill_group_mean: bool = False
) -> torch.Tensor:
    """
    The authors' treatment of raw rewards before the advantages (cosmos-rl `RemoteRewardConfig.reward_clip_min/max`,
    `t2v_model.py` `_sync_rewards_across_rollouts`): clamp to `[-clip, clip]`, then replace each missing (NaN) reward
    by the mean of its group's valid rewards of the same function. A group with no valid reward stays NaN (dropped).

    Args:
        rewards_per_func (`torch.Tensor` of shape `[N, R]`): Raw rewards, NaN where missing, in consecutive groups.
        num_generations (`int`): Group size `G`.
        clip (`float`, *optional*): Clamp bound; `None` clamps nothing.
        fill_group_mean (`bool`): Fill the missing rewards with their group's mean.

    Returns:
        `torch.Tensor` of shape `[N, R]`.
    """
    rewards = rewards_per_func if clip is None else rewards_per_func.clamp(-clip, clip)  # NaN stays NaN
    if not fill_group_mean:
        return rewards
    grouped = rewards.view(-1, num_generations, rewards.shape[1])
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1, keepdim=True)
    mean = torch.where(valid, grouped, torch.zeros_like(grouped)).sum(dim=1, keepdim=True) / count.clamp(min=1)
    mean = torch.where(count > 0, mean, torch.full_like(mean, float("nan")))
    return torch.where(valid, grouped, mean.expand_as(grouped)).reshape(rewards.shape)


def compute_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    multi_objective_aggregation: str = "normalize_then_average",
    exp_advantage: bool = False,
    advantage_clip: float = 5.0,
    eps: float = 1e-4,
) -> Advantages:
    """
    Group-normalised, optionally transformed, clipped advantages.

    Samples come in consecutive groups of `num_generations` (the rollouts of one prompt). A NaN entry of
    `rewards_per_func` means that function gave no reward for that sample (TRL's `None`); a sample with no reward at
    all drops its whole group. Zero-spread and dropped groups get advantage 0, also under `exp_advantage` (whose
    transform `A -> -exp(-A)` would otherwise turn 0 into -1). The authors compute `(r - mean) / (std + 1e-4)` for
    every group: the same 0 for an exactly tied group, but a group with a spread below `eps` keeps its (noise-driven)
    advantages there, and `exp_advantage` turns a tie into -1.

    Args:
        rewards_per_func (`torch.Tensor` of shape `[N, R]`): Raw rewards of `R` functions, NaN where missing.
        reward_weights (`torch.Tensor` of shape `[R]`): Weight of each function.
        num_generations (`int`): Group size `G`; `N` must be a multiple of it.
        scale_rewards (`str`): `"group"`, `"batch"` or `"none"`.
        multi_objective_aggregation (`str`): `"normalize_then_average"` (the weighted mean of the per-function
            advantages), `"normalize_then_sum"` (their weighted sum) or `"sum_then_normalize"`.
        exp_advantage (`bool`): Apply `A -> -exp(-A)` after normalisation.
        advantage_clip (`float`): Clip advantages to `[-advantage_clip, advantage_clip]`.
        eps (`float`): Added to standard deviations; groups with a smaller spread count as zero-spread.

    Returns:
        [`Advantages`]: float32 tensors on the rewards' device. The normalisation runs in float64 on the CPU: in
        float32 a reward with a large offset and a small spread (JPEG compressibility, about -3.94 +- 0.02) loses
        its last digits in `r - mean`, which the division by the spread amplifies to 1e-5 per advantage. (The
        rewards are a few numbers per sample, and float64 is not available on every accelerator.)
    """
    device = rewards_per_func.device
    rewards_per_func = rewards_per_func.detach().to("cpu", torch.float64)
    if rewards_per_func.ndim != 2 or rewards_per_func.shape[0] % num_generations:
        raise ValueError(
            f"rewards must be [N, R] with N a multiple of num_generations={num_generations}, got "
            f"{tuple(rewards_per_func.shape)}."
        )
    weights = reward_weights.to(rewards_per_func)
    scored = ~torch.isnan(rewards_per_func)
    weighted = torch.where(scored, rewards_per_func * weights, torch.zeros_like(rewards_per_func))
    total = torch.where(scored.any(dim=1), weighted.sum(dim=1), torch.full_like(weighted[:, 0], float("nan")))

    if multi_objective_aggregation == "sum_then_normalize":
        advantages, zero_std = _normalize(total, num_generations, scale_rewards, eps)
    elif multi_objective_aggregation in ("normalize_then_sum", "normalize_then_average"):
        per_func = [_normalize(column, num_generations, scale_rewards, eps) for column in rewards_per_func.T]
        normalized = torch.stack([adv for adv, _ in per_func], dim=1)
        advantages = torch.where(scored, normalized * weights, torch.zeros_like(normalized)).sum(dim=1)
        if multi_objective_aggregation == "normalize_then_average":
            # The weighted mean over the functions that scored the sample (cosmos-rl: sum of advantages / N_RM).
            weight_sum = torch.where(scored, weights.expand_as(scored), torch.zeros_like(normalized)).sum(dim=1)
            advantages = advantages / weight_sum.clamp(min=torch.finfo(weight_sum.dtype).tiny)
        zero_std = torch.stack([z for _, z in per_func], dim=1).all(dim=1)
    else:
        raise ValueError(f"multi_objective_aggregation={multi_objective_aggregation!r} is not valid.")

    dropped = torch.isnan(total).view(-1, num_generations).any(dim=1)
    if exp_advantage:
        advantages = -torch.exp(-advantages)
    silent = (zero_std | dropped).repeat_interleave(num_generations)
    advantages = torch.where(silent, torch.zeros_like(advantages), advantages)
    advantages = advantages.clamp(-advantage_clip, advantage_clip)
    return Advantages(
        advantages=advantages.to(device, torch.float32),
        total_rewards=total.to(device, torch.float32),
        zero_std_groups=int((zero_std & ~dropped).sum()),
        dropped_groups=int(dropped.sum()),
        num_groups=int(dropped.numel()),
    )


def clipped_policy_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    PPO's clipped surrogate on the per-step likelihood ratio `r = exp(log_ratio)`:
    `max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range))`.

    Args:
        log_ratio (`torch.Tensor` of shape `[B]`): Log-likelihood ratio of the stored transitions, current model
            over rollout ([`~trl_ddrl.sampling.transition_log_ratio`], exact to float32's relative precision).
        advantages (`torch.Tensor` of shape `[B]`): Advantages.
        clip_range (`float`): Clipping range.

    Returns:
        `tuple` of three `[B]` tensors: the loss, the ratio and whether the clipped branch was taken.
    """
    ratio = torch.exp(log_ratio.float())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


def flow_matching_noisy_sample(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """`x_sigma = (1 - sigma) x0 + sigma * noise`, the rectified-flow forward process. `sigma` is scalar or `[B]`."""
    sigma_b = broadcast_per_sample(sigma, x0).to(x0.dtype)
    return (1 - sigma_b) * x0 + sigma_b * noise.to(x0.dtype)


def edm_loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """EDM's loss weight `(sigma^2 + sigma_data^2) / (sigma * sigma_data)^2` with `sigma_data = 1`, on the x0 error."""
    return (sigma**2 + 1) / sigma**2


def flow_matching_edm_weight(sigma: torch.Tensor | float) -> torch.Tensor:
    r"""
    The EDM weight on the x0 error, expressed on the velocity MSE of a flow model at flow noise level `t = sigma`:

    $$ \frac{s^2 + 1}{s^2}\,\|x_0 - \hat x_0\|^2 = \big((1 - t)^2 + t^2\big)\,\|v - \hat v\|^2,
       \qquad s = \frac{t}{1 - t}, \quad \hat x_0 = x_t - t \hat v, $$

    since `x0 - x0_hat = t (v_hat - v)`. This is the data-term weighting of the authors' Cosmos model
    (`t2v_model.py`, `get_per_sigma_loss_weights`). `sigma` is a float or a `[B]` tensor; returns `[B]` or a scalar.
    """
    t = torch.as_tensor(sigma, dtype=torch.float32)
    return (1 - t) ** 2 + t**2


def ddpm_edm_weight(alpha_prod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    r"""
    The EDM weight on the x0 error, expressed on the training loss of a DDPM model at cumulative alpha `a`: the EDM
    noise level of `x_t = sqrt(a) x0 + sqrt(1 - a) eps` is `s = sqrt((1 - a) / a)` (EDM coordinates `x_t / sqrt(a)`),
    and `(s^2 + 1) / s^2 ||x0 - x0_hat||^2` is `||eps - eps_hat||^2 / a` for epsilon prediction and exactly
    `||v - v_hat||^2` for v-prediction. Returns `[B]`.
    """
    if prediction_type == "v_prediction":
        return torch.ones_like(alpha_prod, dtype=torch.float32)
    return 1.0 / alpha_prod.float()


def mse_per_sample(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the first dimension, in float32: `[B, ...] -> [B]`."""
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


def flow_matching_loss(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """
    Flow-matching loss `||v - (noise - x0)||^2` per sample: the diffusion loss of rectified-flow models, and DDRL's
    forward-KL data term. `velocity` is the model's prediction at `flow_matching_noisy_sample(x0, noise, sigma)`.

    Returns:
        `torch.Tensor` of shape `[B]`.
    """
    return mse_per_sample(velocity, noise - x0)


def reverse_kl(
    mean: torch.Tensor,
    ref_mean: torch.Tensor,
    std: torch.Tensor,
    edm_scale: torch.Tensor | None,
    kl_form: str,
) -> torch.Tensor:
    """
    The per-step reverse-KL penalty of `kl_beta`, per sample (`[B]`).

    `"edm_squared_distance"` (the authors', cosmos-rl `wfm_trainer.py`): `mean((s (mu_ref - mu))^2)` with `s =
    edm_scale`, the mean distance in EDM coordinates. `"gaussian"` (Flow-GRPO's): [`gaussian_kl`]. Both are 0 on
    deterministic steps (`std == 0`).
    """
    if kl_form == "gaussian":
        return gaussian_kl(mean, ref_mean, std)
    if kl_form != "edm_squared_distance":
        raise ValueError(f"kl_form={kl_form!r} is not valid; choose 'edm_squared_distance' or 'gaussian'.")
    scale = broadcast_per_sample(edm_scale if edm_scale is not None else torch.ones_like(std), mean)
    distance = ((scale * (mean.float() - ref_mean.float())) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return torch.where(std.flatten() > 0, distance, torch.zeros_like(distance))


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """
    `KL(N(mean, std^2) || N(ref_mean, std^2))` per dimension, averaged over dimensions: `(mean - ref_mean)^2 /
    (2 std^2)`. Both transitions share the sampler's std, so this is the exact reverse KL of one step. Where `std` is
    0 the result is 0.

    Returns:
        `torch.Tensor` of shape `[B]`.
    """
    std_b = broadcast_per_sample(std, mean)
    safe_std = torch.where(std_b > 0, std_b, torch.ones_like(std_b))
    kl = ((mean.float() - ref_mean.float()) ** 2 / (2 * safe_std**2)).mean(dim=tuple(range(1, mean.ndim)))
    return torch.where(std_b.flatten() > 0, kl, torch.zeros_like(kl))
