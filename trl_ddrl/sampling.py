# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Stochastic sampler steps with Gaussian log-likelihoods.

Each function here is pure: it maps one denoiser output to the Gaussian transition `x_next ~ N(mean, std^2)` of one
sampling step, and scores `x_next` under it. The same function serves the rollout (draw `x_next`) and the replay
during training (score the stored `x_next` with the current model), which is what makes the on-policy likelihood
ratio exactly one. All arithmetic is done in float32 whatever the model's dtype.

Every transition also carries `edm_scale`, the factor that maps its coordinates to EDM coordinates (`x_edm = x0 +
sigma * eps`, the variance-exploding form the authors' Cosmos sampler works in): `1 / (1 - t_next)` for a flow state
`x_t = (1 - t) x0 + t eps` (with `sigma = t / (1 - t)`), `1 / sqrt(alpha_bar_next)` for a DDPM state `sqrt(a) x0 +
sqrt(1 - a) eps` (with `sigma = sqrt((1 - a) / a)`). [`score_transition`] turns a transition into the log-likelihood
the policy ratio uses, in either of the two forms of `DDRLConfig.log_ratio_form`; [`transition_log_ratio`] forms
the ratio itself from the rollout's mean, element-wise, so that it keeps its precision at high noise.

Shapes: `sample`, `model_output`, `noise` and `prev_sample` are `[B, ...]`; schedule values (`sigma`, `alpha_prod`)
are scalars or `[B]` tensors, one per sample, so that a micro-batch may mix steps.
"""

import math
from dataclasses import dataclass, replace

import torch


@dataclass
class StepOutput:
    """
    One Gaussian transition of a stochastic sampler.

    Attributes:
        prev_sample (`torch.Tensor` of shape `[B, ...]`): The next (less noisy) state, drawn or given.
        mean (`torch.Tensor` of shape `[B, ...]`): Mean of the transition.
        std (`torch.Tensor` of shape `[B]`): Standard deviation of the transition (0 for a deterministic step).
        log_prob (`torch.Tensor` of shape `[B]`): Log-density of `prev_sample` averaged over its dimensions
            (0 where `std` is 0); after [`score_transition`], the score of the chosen `log_ratio_form`.
        edm_scale (`torch.Tensor` of shape `[B]`, *optional*): Factor from the transition's coordinates to EDM
            coordinates, at the noise level of `prev_sample` (1 when not given).
        denoised (`torch.Tensor` of shape `[B, ...]`, *optional*): The x0 prediction the step used, for multistep
            samplers whose next step needs it.
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor
    edm_scale: torch.Tensor | None = None
    denoised: torch.Tensor | None = None


def broadcast_per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or `[B]` schedule value to `[B, 1, ..., 1]` in float32 on `like`'s device."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """
    Move `tensor` to `device` as float32. A CPU-to-CUDA copy goes through pinned memory and does not block the host,
    so that noise drawn by a CPU generator does not stall the sampler loop on the GPU stream.
    """
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        return tensor.float().pin_memory().to(device, non_blocking=True)
    return tensor.to(device, torch.float32)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """
    Log-density of `x` under `N(mean, std^2)`, averaged over all but the first dimension.

    Averaging (rather than summing) keeps the scale independent of the resolution, which is why the likelihood-ratio
    clip range of diffusion RL is small (1e-4). Where `std` is 0 the transition is deterministic and the result is 0.

    Args:
        x (`torch.Tensor` of shape `[B, ...]`): Points to score.
        mean (`torch.Tensor` of shape `[B, ...]`): Means.
        std (`torch.Tensor` of shape `[B]`): Per-sample standard deviations.

    Returns:
        `torch.Tensor` of shape `[B]`, float32.
    """
    x, mean = x.float(), mean.float()
    std_b = broadcast_per_sample(std, x)
    safe_std = torch.where(std_b > 0, std_b, torch.ones_like(std_b))
    log_density = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    log_prob = log_density.mean(dim=tuple(range(1, x.ndim)))
    return torch.where(std_b.flatten() > 0, log_prob, torch.zeros_like(log_prob))


def edm_squared_distance_log_prob(x: torch.Tensor, mean: torch.Tensor, edm_scale: torch.Tensor) -> torch.Tensor:
    r"""
    The authors' per-step log-likelihood: minus the mean squared distance of `x` to `mean` in EDM coordinates,

    $$ \ell = -\operatorname{mean}\big((s\,(x - \mu))^2\big), \qquad s = \text{edm\_scale}, $$

    so that `exp(l_theta - l_old)` is the ratio `exp(-mean((x - mu_theta)^2) + mean((x - mu_old)^2))` of cosmos-rl's
    `wfm_trainer.py` (the line marked `TODO: rethink correct balance`). It is the Gaussian log-density in EDM
    coordinates times `2 std_edm^2`, up to a constant: it puts the weight `1 / (2 std^2)` of the Gaussian form back on
    every step, which moves the policy gradient towards the high-noise steps.

    Args:
        x (`torch.Tensor` of shape `[B, ...]`): Points to score.
        mean (`torch.Tensor` of shape `[B, ...]`): Means.
        edm_scale (`torch.Tensor` of shape `[B]`): Factor from these coordinates to EDM coordinates.

    Returns:
        `torch.Tensor` of shape `[B]`, float32.
    """
    scale = broadcast_per_sample(edm_scale, x)
    return -((scale * (x.float() - mean.float())) ** 2).mean(dim=tuple(range(1, x.ndim)))


def score_transition(step: StepOutput, log_ratio_form: str) -> StepOutput:
    """
    `step` with `log_prob` replaced by the score of `log_ratio_form`: `"gaussian"` keeps the Gaussian log-density,
    `"edm_squared_distance"` uses [`edm_squared_distance_log_prob`]. Deterministic steps (`std == 0`) score 0.
    """
    if log_ratio_form == "gaussian":
        return step
    if log_ratio_form != "edm_squared_distance":
        raise ValueError(
            f"log_ratio_form={log_ratio_form!r} is not valid; choose 'edm_squared_distance' or 'gaussian'."
        )
    edm_scale = step.edm_scale if step.edm_scale is not None else torch.ones_like(step.std)
    score = edm_squared_distance_log_prob(step.prev_sample, step.mean, edm_scale)
    score = torch.where(step.std > 0, score, torch.zeros_like(score))
    return replace(step, log_prob=score)


def log_ratio_weight(step: StepOutput, log_ratio_form: str) -> torch.Tensor:
    """
    The weight `w` (`[B]`, float32) of the squared distance in the score of `log_ratio_form`, `l = -w mean((x -
    mu)^2) + const`: `edm_scale^2` for `"edm_squared_distance"`, `1 / (2 std^2)` for `"gaussian"` (whose `-log std`
    and constant do not depend on the model), 0 on deterministic steps (`std == 0`).
    """
    positive = step.std > 0
    if log_ratio_form == "gaussian":
        safe_std = torch.where(positive, step.std, torch.ones_like(step.std)).float()
        weight = 1 / (2 * safe_std**2)
    elif log_ratio_form == "edm_squared_distance":
        weight = (step.edm_scale if step.edm_scale is not None else torch.ones_like(step.std)).float() ** 2
    else:
        raise ValueError(
            f"log_ratio_form={log_ratio_form!r} is not valid; choose 'edm_squared_distance' or 'gaussian'."
        )
    return torch.where(positive, weight, torch.zeros_like(weight))


def transition_log_ratio(step: StepOutput, old_mean: torch.Tensor, log_ratio_form: str) -> torch.Tensor:
    r"""
    The per-step log-likelihood ratio `l_theta - l_old` of the stored transition `x = step.prev_sample`, between the
    replay `step` (mean `mu`) and the rollout that drew it (mean `old_mean`, same state, same `std`: a step's `std`
    and `edm_scale` depend on the schedule only). Both scores of [`score_transition`] are `-w mean((x - mu)^2) +
    const` (see [`log_ratio_weight`]), so

    $$ \log r = -w \operatorname{mean}ig((x - \mu)^2 - (x - \mu_{old})^2ig)
              = -w \operatorname{mean}ig((\mu_{old} - \mu)\,((x - \mu) + (x - \mu_{old}))ig). $$

    The difference is taken element-wise before the mean (as cosmos-rl's `wfm_trainer.py` does,
    `-(diff_current - diff_old)`), in the factored form: `mu_old - mu` is exact in float32 when the two means are
    close, so the result has float32's relative precision *of the difference*. Subtracting two per-sample scores
    instead loses it at high noise, where `|l|` is in the thousands (about 2250 at EDM sigma 152) and two float32
    scores differ in steps of 2.4e-4, more than the clip range 1e-4. When the replay's mean is bit-identical to the
    rollout's the log-ratio is exactly 0. The gradient is the score's: `d log r / d mu = 2 w (x - mu) / numel`.

    Args:
        step ([`StepOutput`]): The replayed transition, `prev_sample` the stored next state `[B, ...]`.
        old_mean (`torch.Tensor` of shape `[B, ...]`): The transition's mean at rollout time.
        log_ratio_form (`str`): `"edm_squared_distance"` or `"gaussian"`.

    Returns:
        `torch.Tensor` of shape `[B]`, float32.
    """
    x, mean, old_mean = step.prev_sample.float(), step.mean.float(), old_mean.float()
    difference = (old_mean - mean) * ((x - mean) + (x - old_mean))
    return -log_ratio_weight(step, log_ratio_form) * difference.mean(dim=tuple(range(1, x.ndim)))


def _finish_step(
    mean: torch.Tensor,
    std: torch.Tensor,
    noise: torch.Tensor | None,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | None,
    edm_scale: torch.Tensor | None = None,
    denoised: torch.Tensor | None = None,
) -> StepOutput:
    """Draw `prev_sample` from `N(mean, std^2)` unless it is given, and score it."""
    if prev_sample is None:
        if noise is None:
            noise_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
        prev_sample = mean + broadcast_per_sample(std, mean) * to_device(noise, mean.device)
    return StepOutput(
        prev_sample=prev_sample,
        mean=mean,
        std=std,
        log_prob=gaussian_log_prob(prev_sample, mean, std),
        edm_scale=edm_scale,
        denoised=denoised,
    )


def flow_sde_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    eta: float,
    noise_sigma_max: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    r"""
    One Euler-Maruyama step of the reverse-time SDE of a rectified-flow model.

    The model is trained on `x_sigma = (1 - sigma) x_0 + sigma * eps` with velocity `v = eps - x_0`, so the score is
    `-(x + (1 - sigma) v) / sigma`. The reverse SDE with diffusion coefficient `g = eta * sqrt(sigma / (1 - sigma))`
    has the same marginals as the ODE `dx = v dsigma`; its Euler-Maruyama step from `sigma` to `sigma_next` (`dt =
    sigma_next - sigma < 0`) is

    $$ \mu = x + \left[v + \frac{g^2}{2\sigma}(x + (1-\sigma) v)\right] dt, \qquad
       x_{next} \sim \mathcal N(\mu, g^2 |dt|). $$

    With `eta = 0` this is exactly the deterministic Euler step `x + v dt` of `FlowMatchEulerDiscreteScheduler`.
    `edm_scale` is `1 / (1 - sigma_next)`: the next state in EDM coordinates is `x_next / (1 - sigma_next)`.
    `g` diverges at `sigma = 1`, so `sigma` is clamped to `noise_sigma_max` (the schedule's second sigma) inside `g`
    only.

    Args:
        sample (`torch.Tensor` of shape `[B, ...]`): Current state `x` at `sigma`.
        velocity (`torch.Tensor` of shape `[B, ...]`): Model velocity prediction at (`x`, `sigma`).
        sigma (`torch.Tensor` of shape `[B]` or `float`): Current noise level.
        sigma_next (`torch.Tensor` of shape `[B]` or `float`): Next (lower) noise level.
        eta (`float`): Noise level of the SDE; 0 gives the ODE.
        noise_sigma_max (`float`): Upper clamp of `sigma` inside `g`, below 1.
        noise (`torch.Tensor`, *optional*): Standard normal noise to use for the draw.
        prev_sample (`torch.Tensor`, *optional*): A given next state to score instead of drawing one.
        generator (`torch.Generator`, *optional*): Generator for the draw.

    Returns:
        [`StepOutput`]
    """
    x = sample.float()
    v = velocity.float()
    sigma_b = broadcast_per_sample(sigma, x)
    dt = broadcast_per_sample(sigma_next, x) - sigma_b
    noise_sigma = sigma_b.clamp(max=noise_sigma_max)
    g = eta * torch.sqrt(noise_sigma / (1 - noise_sigma))
    mean = x + (v + g**2 / (2 * sigma_b) * (x + (1 - sigma_b) * v)) * dt
    std = (g * torch.sqrt(-dt)).flatten()
    edm_scale = flow_edm_scale(sigma_next, x)
    return _finish_step(mean, std, noise, prev_sample, generator, edm_scale=edm_scale)


def flow_edm_scale(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """`1 / (1 - sigma)` per sample (`[B]`, float32): a flow state at `sigma < 1` in EDM coordinates is `x / (1 - sigma)`."""
    return 1.0 / (1.0 - broadcast_per_sample(sigma, like).flatten())


def ddim_step(
    sample: torch.Tensor,
    epsilon: torch.Tensor,
    alpha_prod: torch.Tensor | float,
    alpha_prod_prev: torch.Tensor | float,
    eta: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    r"""
    One DDIM step (Song et al., 2021, eq. 12) as a Gaussian transition, for epsilon-prediction models.

    With `a = alpha_prod` at the current step and `a' = alpha_prod_prev` at the next (less noisy) one,
    `x0 = (x - sqrt(1 - a) eps) / sqrt(a)`, `std = eta * sqrt((1 - a') / (1 - a)) * sqrt(1 - a / a')` and

    $$ \mu = \sqrt{a'}\, x_0 + \sqrt{1 - a' - std^2}\, \epsilon, \qquad x_{prev} \sim \mathcal N(\mu, std^2). $$

    `x0` is not clipped (use `clip_sample=False` schedulers). v-prediction models convert their output to epsilon
    before calling this. `edm_scale` is `1 / sqrt(a')`: the next state in EDM coordinates is `x_prev / sqrt(a')`.

    Args:
        sample (`torch.Tensor` of shape `[B, ...]`): Current state.
        epsilon (`torch.Tensor` of shape `[B, ...]`): Predicted noise.
        alpha_prod (`torch.Tensor` of shape `[B]` or `float`): Cumulative alpha at the current step.
        alpha_prod_prev (`torch.Tensor` of shape `[B]` or `float`): Cumulative alpha at the next step.
        eta (`float`): DDIM eta; 0 is deterministic DDIM, 1 matches DDPM's posterior variance.
        noise, prev_sample, generator: As in [`flow_sde_step`].

    Returns:
        [`StepOutput`]
    """
    x = sample.float()
    eps = epsilon.float()
    a = broadcast_per_sample(alpha_prod, x)
    a_prev = broadcast_per_sample(alpha_prod_prev, x)
    pred_x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std_b = eta * torch.sqrt(variance.clamp(min=0))
    mean = torch.sqrt(a_prev) * pred_x0 + torch.sqrt((1 - a_prev - std_b**2).clamp(min=0)) * eps
    edm_scale = torch.rsqrt(a_prev).flatten()
    return _finish_step(mean, std_b.flatten(), noise, prev_sample, generator, edm_scale=edm_scale)


def flow_cps_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    eta: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    r"""
    One coefficients-preserving sampling (CPS) step of a rectified-flow model (Wang & Yu, 2025, arXiv 2509.05952;
    Flow-GRPO's `sde_type="cps"`).

    From the model's estimates of the clean sample `x0 = x - sigma v` and of the noise `x1 = x + (1 - sigma) v`, the
    next state keeps the flow's coefficients exactly: `(1 - sigma_next)` on the clean sample and a total noise of
    standard deviation `sigma_next`, split between the estimated noise and fresh noise of standard deviation
    `std = sigma_next * sin(eta * pi / 2)`:

    $$ \mu = (1 - \sigma_{next})\, \hat x_0 + \sqrt{\sigma_{next}^2 - std^2}\, \hat x_1, \qquad
       x_{next} \sim \mathcal N(\mu, std^2). $$

    The Euler-Maruyama SDE step ([`flow_sde_step`]) instead adds more noise than the schedule removes at large `eta`
    and few steps, which leaves visible noise in the samples; CPS never does. With `eta = 0` the step is exactly the
    deterministic Euler step `x + v (sigma_next - sigma)`, and the last step (`sigma_next = 0`) is always deterministic.
    The log-likelihood is the true Gaussian one (Flow-GRPO drops its `1 / (2 std^2)` scale and constants), so the
    same clip range applies as with the other samplers.

    Args:
        sample (`torch.Tensor` of shape `[B, ...]`): Current state `x` at `sigma`.
        velocity (`torch.Tensor` of shape `[B, ...]`): Model velocity prediction at (`x`, `sigma`).
        sigma (`torch.Tensor` of shape `[B]` or `float`): Current noise level.
        sigma_next (`torch.Tensor` of shape `[B]` or `float`): Next (lower) noise level.
        eta (`float`): Share of fresh noise, in `[0, 1]`: `sin(eta * pi / 2)` of the next noise level is fresh.
        noise, prev_sample, generator: As in [`flow_sde_step`].

    Returns:
        [`StepOutput`]
    """
    x = sample.float()
    v = velocity.float()
    sigma_b = broadcast_per_sample(sigma, x)
    sigma_next_b = broadcast_per_sample(sigma_next, x)
    std_b = sigma_next_b * math.sin(eta * math.pi / 2)
    pred_x0 = x - sigma_b * v
    pred_noise = x + (1 - sigma_b) * v
    mean = (1 - sigma_next_b) * pred_x0 + torch.sqrt((sigma_next_b**2 - std_b**2).clamp(min=0)) * pred_noise
    edm_scale = flow_edm_scale(sigma_next, x)
    return _finish_step(mean, std_b.flatten(), noise, prev_sample, generator, edm_scale=edm_scale)


def churn_eta(num_inference_steps: int, s_churn: float = 1.0) -> float:
    """
    The authors' churn per step, `min(s_churn / (num_inference_steps + 1), sqrt(1.2) - 1)` (cosmos-rl sampler,
    `differential_equation_solver`): `1 / 21` for their 20 steps with `s_churn = 1`.
    """
    return min(s_churn / (num_inference_steps + 1), math.sqrt(1.2) - 1)


def karras_flow_sigmas(sigma_max: float, sigma_min: float, rho: float, num_steps: int) -> torch.Tensor:
    r"""
    EDM's Karras noise levels (Karras et al. 2022, eq. 5; cosmos-rl `sampler/__init__.py` `get_rev_ts`) as flow
    sigmas, followed by 0: `num_steps + 2` values

    $$ s_i = \Big(s_{max}^{1/\rho} + \tfrac{i}{n} \big(s_{min}^{1/\rho} - s_{max}^{1/\rho}\big)\Big)^{\rho},
       \quad t_i = \frac{s_i}{1 + s_i}, \quad i = 0 .. n, \qquad t_{n+1} = 0, $$

    in float64. The `n` steps between them are the authors' churned solver steps; the last step, from `s_min` to 0,
    is their clean denoise (`sample_clean`). The authors' Cosmos Predict2.5 recipe: `s_max = 200`, `s_min = 0.01`,
    `rho = 7`, `n = 20`, so `t_0 = 0.995`.
    """
    index = torch.arange(num_steps + 1, dtype=torch.float64)
    inverse_rho = 1.0 / rho
    edm = (sigma_max**inverse_rho + index / num_steps * (sigma_min**inverse_rho - sigma_max**inverse_rho)) ** rho
    return torch.cat([edm / (1 + edm), edm.new_zeros(1)])


def churn_sigma(sigma: torch.Tensor | float, eta: float) -> torch.Tensor:
    r"""
    The flow noise level after a churn: EDM's `s -> (1 + eta) s` with `s = t / (1 - t)`, in flow terms

    $$ \hat t = \frac{(1 + \eta)\, t}{1 + \eta\, t}, $$

    which keeps `t = 0` at 0 and `t = 1` (EDM's infinite noise) at 1.
    """
    t = torch.as_tensor(sigma, dtype=torch.float64)
    return (1 + eta) * t / (1 + eta * t)


def edm_churn_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    eta: float,
    previous_denoised: torch.Tensor | None = None,
    previous_sigma: torch.Tensor | float | None = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    r"""
    One step of the authors' sampler (cosmos-rl `sampler/__init__.py`): EDM's stochastic sampler with churn (Karras
    et al. 2022, Algorithm 2) around the second-order Adams-Bashforth multistep solver `"2ab"` (Zhang et al. 2023,
    arXiv 2308.02157), written for a rectified-flow state and expressed as one Gaussian transition.

    In EDM coordinates (`x_edm = x0 + s * eps`, `s = t / (1 - t)`), a step from a churned state `x` at level `s` with
    denoised estimate `D = x_t - t v` goes deterministically to `s' = sigma_next`, then churns the result up to
    `s_hat' = (1 + eta) s'` by adding noise of standard deviation `s' sqrt(eta^2 + 2 eta)`:

    $$ \mu_{edm} = \frac{s'}{s} x + (1 - r) D + \frac{h - 1 + r}{\log(s / s_{-1})} (D_{-1} - D), \qquad
       r = \frac{s'}{s} = e^{-h}, $$

    $$ x_{next, edm} \sim \mathcal N\big(\mu_{edm},\ s'^2 (\eta^2 + 2\eta)\big), $$

    where `D_{-1}` is the previous step's denoised estimate at its own (churned) level `s_{-1}`. Without a previous
    step (the first one, or a previous level of 1, i.e. `s_{-1} = inf`) the correction vanishes and the step is the
    first-order (DDIM / Euler) step; so is the final step to `sigma_next = 0`, which is deterministic. With `eta = 0`
    and no previous step this is exactly the flow Euler step `x + v (sigma_next - sigma)`.

    The transition is returned in flow coordinates at the churned next level `t_hat' = churn_sigma(sigma_next, eta)`
    (`x_flow = x_edm (1 - t_hat')`), with `edm_scale = 1 / (1 - t_hat')`, so that the authors' log-ratio, the squared
    distance in EDM coordinates, is [`score_transition`]'s `"edm_squared_distance"`. `sigma` is the current state's
    own (churned) level; states at `sigma = 1` are handled exactly (`x_edm / s = x / t` stays finite).

    Args:
        sample (`torch.Tensor` of shape `[B, ...]`): Current state (flow coordinates) at level `sigma`.
        velocity (`torch.Tensor` of shape `[B, ...]`): Model velocity prediction at (`sample`, `sigma`).
        sigma (`torch.Tensor` of shape `[B]` or `float`): Current (churned) flow noise level, in `(0, 1]`.
        sigma_next (`torch.Tensor` of shape `[B]` or `float`): Next flow noise level before its churn.
        eta (`float`): Churn per step (the authors' `1 / (num_inference_steps + 1)`, see [`churn_eta`]).
        previous_denoised (`torch.Tensor` of shape `[B, ...]`, *optional*): The previous step's denoised estimate.
        previous_sigma (`torch.Tensor` of shape `[B]` or `float`, *optional*): Its level; 1 means none.
        noise, prev_sample, generator: As in [`flow_sde_step`].

    Returns:
        [`StepOutput`] with `denoised` set to this step's estimate `D`.
    """
    x, v = sample.float(), velocity.float()
    t = broadcast_per_sample(sigma, x).double()
    t_next = broadcast_per_sample(sigma_next, x).double()
    denoised = x - t.float() * v
    s_next = t_next / (1 - t_next)
    ratio = t_next * (1 - t) / (t * (1 - t_next))  # r = s' / s, 0 at t = 1
    mean_edm = (s_next / t).float() * x + (1 - ratio).float() * denoised  # s' x_edm / s = s' x / t
    if previous_denoised is not None:
        t_prev = broadcast_per_sample(previous_sigma if previous_sigma is not None else 1.0, x).double()
        h = -torch.log(ratio)
        log_step_ratio = torch.log(t * (1 - t_prev)) - torch.log((1 - t) * t_prev)  # log(s / s_prev) < 0
        correction = (h - 1 + ratio) / log_step_ratio
        use = (t_prev < 1) & (t < 1) & (t_next > 0)
        correction = torch.where(use, correction, torch.zeros_like(correction)).float()
        mean_edm = mean_edm + correction * (previous_denoised.float() - denoised)
    t_hat_next = churn_sigma(t_next, eta)
    to_flow = (1 - t_hat_next).float()
    mean = to_flow * mean_edm
    std = (to_flow * (s_next * math.sqrt(eta**2 + 2 * eta)).float()).flatten()
    return _finish_step(mean, std, noise, prev_sample, generator, edm_scale=1 / to_flow.flatten(), denoised=denoised)
