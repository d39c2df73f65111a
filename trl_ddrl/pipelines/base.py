# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The adapter protocol between the DDRL trainer and a diffusers pipeline family.

The trainer never touches a pipeline directly: it encodes prompts, samples trajectories, replays one step's
log-likelihood, computes the diffusion loss on data and decodes samples through a [`DiffusionAdapter`]. One subclass
per model family fills in the family-specific parts (how prompts are encoded, how the denoiser is called, how latents
are decoded); the sampling loop and the step math are shared.
"""

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import nn

from ..losses import flow_matching_edm_weight, flow_matching_loss, flow_matching_noisy_sample
from ..sampling import (
    StepOutput,
    churn_eta,
    churn_sigma,
    edm_churn_step,
    flow_cps_step,
    flow_sde_step,
    karras_flow_sigmas,
    score_transition,
    to_device,
)
from .latents import normalized_vae_decode, normalized_vae_encode


Conditioning = dict[str, torch.Tensor]
"""Batch-first tensors that condition the denoiser (prompt embeddings, pooled embeddings, ...), all `[B, ...]`."""


def positive_conditioning(conditioning: Conditioning) -> Conditioning:
    """The conditioning without its `negative_*` (CFG) entries."""
    return {key: value for key, value in conditioning.items() if not key.startswith("negative_")}


def negative_conditioning(conditioning: Conditioning) -> Conditioning:
    """The `negative_*` (CFG) entries of the conditioning, under their names without the prefix."""
    prefix = "negative_"
    return {key[len(prefix) :]: value for key, value in conditioning.items() if key.startswith(prefix)}


def drop_text(conditioning: Conditioning, keep: torch.Tensor) -> Conditioning:
    """
    Zero the prompt embeddings of the rows where `keep` (`[B]` bool, on the CPU) is False: every tensor whose key holds
    `embeds` (masks, image latents and the rest are kept), as the authors' text conditioner drops its embedding
    (cosmos-rl `conditioner/emb_models.py` `random_dropout_input`: the embedding times a Bernoulli mask). Used by the
    data term's `data_text_dropout` and by the CFG unconditional branch of `guidance_unconditional="zeros"`.
    """
    dropped = {}
    for key, value in conditioning.items():
        if "embeds" in key:
            mask = keep.to(device=value.device, dtype=value.dtype).view(-1, *([1] * (value.ndim - 1)))
            value = value * mask
        dropped[key] = value
    return dropped


@dataclass
class Trajectory:
    """
    A batch of sampled trajectories.

    Attributes:
        latents (`torch.Tensor` of shape `[B, T + 1, ...]`): States `x_0` (pure noise) to `x_T` (the sample), float32.
        log_probs (`torch.Tensor` of shape `[B, T]`): Log-likelihood of each transition at sampling time.
        means (`torch.Tensor` of shape `[B, T, ...]`): Mean of each transition at sampling time, float32: the
            replay's exact log-ratio ([`~trl_ddrl.sampling.transition_log_ratio`]) is taken against it.
        denoised (`torch.Tensor` of shape `[B, T, ...]`, *optional*): Each step's denoised estimate, recorded by
            multistep samplers (`"churn"`), whose replay of step `i` needs the estimate of step `i - 1`.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    means: torch.Tensor
    denoised: torch.Tensor | None = None


@dataclass
class SamplingSettings:
    """What a rollout needs to know, taken from [`DDRLConfig`]."""

    num_inference_steps: int
    eta: float | None
    """Sampler noise level; `None` takes the sampler's default (see `DDRLConfig.eta`)."""
    guidance_scale: float = 1.0
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    max_sequence_length: int | None = None
    num_conditioning_frames: int | None = None
    num_conditioning_frames_choices: tuple[int, ...] | None = None
    """Modes drawn per group (see `DDRLConfig.num_conditioning_frames_choices`); `None`: one mode per run."""
    log_ratio_form: str = "edm_squared_distance"
    """Score of a transition for the policy ratio (see `DDRLConfig.log_ratio_form`)."""
    data_loss_weighting: str = "edm"
    """Weighting of `diffusion_loss` over noise levels (see `DDRLConfig.data_loss_weighting`)."""
    sampler: str = "auto"
    """Stochastic sampler (see `DDRLConfig.sampler`); `"auto"` takes the family's default."""
    guidance_scale_2: float | None = None
    """CFG scale of the low-noise expert's steps of a two-expert denoiser; `None` takes `guidance_scale`."""
    guidance_unconditional: str = "negative_prompt"
    """CFG's unconditional branch: the default negative prompt or zeroed prompt embeddings (see `DDRLConfig`)."""
    train_experts: str = "all"
    """Which experts of a two-expert denoiser train (see `DDRLConfig.train_experts`)."""
    karras_sigmas: tuple[float, float, float] | None = None
    """EDM `(sigma_max, sigma_min, rho)` of a Karras schedule replacing the scheduler's (see `DDRLConfig`)."""

    @classmethod
    def from_config(cls, args) -> "SamplingSettings":
        """The settings of a [`DDRLConfig`] `args`: one place that the trainer and the memory estimator share."""
        return cls(
            num_inference_steps=args.num_inference_steps,
            eta=args.eta,
            sampler=args.sampler,
            guidance_scale=args.guidance_scale,
            guidance_scale_2=args.guidance_scale_2,
            guidance_unconditional=args.guidance_unconditional,
            height=args.height,
            width=args.width,
            num_frames=args.num_frames,
            max_sequence_length=args.max_sequence_length,
            num_conditioning_frames=args.num_conditioning_frames,
            num_conditioning_frames_choices=(
                tuple(args.num_conditioning_frames_choices) if args.num_conditioning_frames_choices else None
            ),
            log_ratio_form=args.log_ratio_form,
            data_loss_weighting=args.data_loss_weighting,
            train_experts=args.train_experts,
            karras_sigmas=tuple(args.karras_sigmas) if args.karras_sigmas else None,
        )


def default_eta(sampler: str, num_inference_steps: int, karras: bool = False) -> float:
    """
    `eta` of a sampler when it is not set: Flow-GRPO's 0.7 for its SDE, DDPO's 1.0 for DDIM, the authors' churn for
    the churned steps (with a Karras schedule the last step is the clean denoise, not churned: `1 / num_inference_steps`,
    the authors' `1 / (sample_steps + 1)`).
    """
    if sampler == "churn":
        return churn_eta(num_inference_steps - 1 if karras else num_inference_steps)
    return {"flow_sde": 0.7, "cps": 0.7, "ddim": 1.0}[sampler]


class DiffusionAdapter(ABC):
    """
    Base class of the per-family adapters.

    Subclasses list the pipeline class names they serve in `pipeline_class_names` and implement the abstract methods.
    `step_index` arguments are `[B]` long tensors: index `i` is the transition from state `i` to state `i + 1`.

    Args:
        pipeline (`diffusers.DiffusionPipeline`): The pipeline; its denoiser is trained, the rest stays frozen.
        settings ([`SamplingSettings`]): Sampling settings.
    """

    pipeline_class_names: tuple[str, ...] = ()
    num_conditioning_frames: int = 0
    """
    Ground-truth frames read from each row and each sample is conditioned on (video-to-world pipelines); 0 for
    text-conditioned models. With modes mixed per group (`settings.num_conditioning_frames_choices`) the most any
    sample is conditioned on; each row's own count is then in its conditioning ([`frame_mode_conditioning`]).
    """
    conditioning_frame_choices: tuple[int, ...] = ()
    """
    The values of `num_conditioning_frames` the family supports. A family listing several can mix them per group
    (`settings.num_conditioning_frames_choices`) and implements [`frame_mode_conditioning`].
    """
    conditioned_on_source_image: bool = False
    """
    Image editing: each sample is conditioned on a source image (the rows' `source_image_column`), which
    `encode_prompts(prompts, device, source_images=...)` takes as `[B, C, H, W]` pixels in `[-1, 1]`.
    """
    samplers: tuple[str, ...] = ()
    """The stochastic samplers the family supports; the first is its default (`sampler="auto"`)."""
    guidance_unconditional_choices: tuple[str, ...] = ("negative_prompt",)
    """
    The CFG unconditional branches the family supports (`settings.guidance_unconditional`): `"negative_prompt"`, and
    for the families whose own training drops the text by zeroing its embedding (Cosmos) `"zeros"`.
    """

    def __init__(self, pipeline, settings: SamplingSettings):
        self.pipeline = pipeline
        if settings.sampler == "auto":
            settings = replace(settings, sampler=self.samplers[0])
        if settings.sampler not in self.samplers:
            raise ValueError(
                f"sampler={settings.sampler!r} is not available for {type(pipeline).__name__}; choose one of "
                f"{', '.join(map(repr, self.samplers))}, or 'auto' for {self.samplers[0]!r}."
            )
        if settings.karras_sigmas is not None and "churn" not in self.samplers:
            raise ValueError(
                f"karras_sigmas={list(settings.karras_sigmas)} replaces a flow-matching schedule, but "
                f"{type(pipeline).__name__} samples with {self.samplers[0]!r}. Leave karras_sigmas unset."
            )
        if settings.eta is None:
            karras = settings.karras_sigmas is not None
            settings = replace(settings, eta=default_eta(settings.sampler, settings.num_inference_steps, karras))
        self.settings = settings
        if settings.train_experts != "all" and not self.has_experts:
            raise ValueError(
                f"train_experts={settings.train_experts!r} picks one expert of a two-expert denoiser (Wan 2.2 A14B: "
                f"transformer for high noise, transformer_2 for low noise), but {type(pipeline).__name__} has a single "
                "denoiser. Leave train_experts='all' (the default), or load a Wan 2.2 A14B pipeline."
            )
        if settings.guidance_unconditional not in self.guidance_unconditional_choices:
            raise ValueError(
                f"guidance_unconditional={settings.guidance_unconditional!r} is not available for "
                f"{type(pipeline).__name__}: its CFG unconditional branch is one of "
                f"{', '.join(map(repr, self.guidance_unconditional_choices))}. Leave guidance_unconditional="
                "'negative_prompt' (the default); 'zeros' is for the Cosmos families, trained with a zeroed text "
                "embedding."
            )
        if settings.guidance_scale_2 is not None and not self.has_experts:
            raise ValueError(
                f"guidance_scale_2={settings.guidance_scale_2} is the CFG scale of the low-noise expert of a two-expert "
                f"denoiser (Wan 2.2 A14B), but {type(pipeline).__name__} has a single denoiser. Leave it unset."
            )
        choices = settings.num_conditioning_frames_choices
        if choices is not None and (
            len(self.conditioning_frame_choices) < 2 or not set(choices) <= set(self.conditioning_frame_choices)
        ):
            supported = (
                f"supports num_conditioning_frames in {list(self.conditioning_frame_choices)}"
                if len(self.conditioning_frame_choices) > 1
                else "has a single conditioning mode"
            )
            raise ValueError(
                f"num_conditioning_frames_choices={list(choices)} draws each group's conditioning mode, but "
                f"{type(pipeline).__name__} {supported}. Choose among those values, or leave "
                "num_conditioning_frames_choices unset (Cosmos Predict2.5 mixes 0, 1 and 5 frames)."
            )
        self.check_resolution()

    # ---- components -------------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def denoiser_name(self) -> str:
        """Name of the trained component in the pipeline (`"transformer"` or `"unet"`)."""

    @property
    def denoiser(self) -> nn.Module:
        """The trained network."""
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def has_experts(self) -> bool:
        """Whether the denoiser is two experts split by noise level ([`~trl_ddrl.pipelines.experts.TimestepExperts`])."""
        return False

    def trainable_steps(self) -> list[int] | None:
        """
        The stochastic sampling steps (`0 .. num_inference_steps - 2`) computed by a trained part of the denoiser, or
        `None` when that is all of them (every family but a two-expert model training one expert).
        """
        return None

    def frozen_modules(self) -> list[nn.Module]:
        """Every other `nn.Module` component of the pipeline (VAE, text encoders): frozen, outside the optimizer."""
        return [
            module
            for name, module in self.pipeline.components.items()
            if isinstance(module, nn.Module) and name != self.denoiser_name
        ]

    # ---- family-specific parts ----------------------------------------------------------------------------------

    @abstractmethod
    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        """Encode prompts (and, when CFG is on, the empty negative prompt under `negative_*` keys); no grad."""

    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latents, without the batch dimension."""

    @abstractmethod
    def predict(
        self, denoiser: nn.Module, latents: torch.Tensor, step_index: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """The denoiser's output at (`latents`, step `step_index`), with CFG if `settings.guidance_scale > 1`."""

    @abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        latents: torch.Tensor,
        step_index: torch.Tensor,
        eta: float,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """The Gaussian transition of the family's stochastic sampler."""

    @abstractmethod
    def diffusion_loss(
        self,
        denoiser: nn.Module,
        x0: torch.Tensor,
        conditioning: Conditioning,
        step_index: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """The family's training loss on clean latents `x0`, noised to the level of `step_index` with `noise`: `[B]`."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to pixels in `[0, 1]`: `[B, C, H, W]` for images, `[B, F, C, H, W]` for videos; no grad."""

    @abstractmethod
    def encode_pixels(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        """
        Pixels in `[-1, 1]` (`[B, C, H, W]` or `[B, F, C, H, W]`) to latents: a posterior sample, or with `mode` the
        posterior's mode (its mean); no grad.
        """

    @property
    @abstractmethod
    def resolution(self) -> tuple[int, int]:
        """(height, width) in pixels of the samples."""

    # ---- shared parts -------------------------------------------------------------------------------------------

    def guide(
        self, uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Classifier-free guidance `uncond + g * (cond - uncond)` with `g = scale` (a number, or per row `[B, 1, ...]`),
        by default `settings.guidance_scale`.
        """
        scale = self.settings.guidance_scale if scale is None else scale
        return uncond + scale * (cond - uncond)

    def guided(
        self,
        prediction,
        latents: torch.Tensor,
        level: torch.Tensor,
        conditioning: Conditioning,
        scale: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        `prediction(latents, level, conditioning)` (the denoiser's output at noise level or timestep `level`, `[B]`),
        with CFG when `settings.guidance_scale > 1`: the negative and positive halves run as one doubled batch and are
        combined by [`~DiffusionAdapter.guide`] with `scale` (default `settings.guidance_scale`). Every positive key
        needs its `negative_` counterpart.
        """
        positive = positive_conditioning(conditioning)
        if self.settings.guidance_scale <= 1.0:
            return prediction(latents, level, positive)
        negative = negative_conditioning(conditioning)
        both = {key: torch.cat([negative[key], positive[key]]) for key in positive}
        uncond, cond = prediction(torch.cat([latents, latents]), torch.cat([level, level]), both).chunk(2)
        return self.guide(uncond, cond, scale)

    @property
    def resolution_multiple(self) -> int:
        """Height and width must be multiples of this many pixels (the VAE's downsampling, times the patch size)."""
        return 1

    def check_resolution(self) -> None:
        """
        Raises:
            `ValueError`: naming `height`/`width` and the nearest valid values, for a resolution the model cannot
                sample.
        """
        height, width = self.resolution
        multiple = self.resolution_multiple
        if height % multiple or width % multiple:

            def nearest(size: int) -> int:
                return max(multiple, round(size / multiple) * multiple)

            raise ValueError(
                f"height={height} and width={width} must be multiples of {multiple} pixels for "
                f"{type(self.pipeline).__name__} (its VAE downsampling times the denoiser's patch size). "
                f"Use for example height={nearest(height)}, width={nearest(width)}."
            )

    @property
    def num_frames(self) -> int | None:
        """Frames per generated video; `None` for image models."""
        return None

    def data_conditioning(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> Conditioning:
        """
        Conditioning that the data term takes from the data pixels themselves (for example the first frame of an
        image-to-video model), merged into the captions' conditioning by the collator; `{}` for most families.
        """
        return {}

    def encode_condition_frames(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> Conditioning:
        """
        Conditioning from ground-truth frames `[B, F, C, H, W]` in `[-1, 1]`, merged into the prompt conditioning of
        rollouts. Only adapters with `num_conditioning_frames > 0` implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} is not conditioned on frames.")

    def frame_mode_conditioning(self, num_frames: torch.Tensor) -> Conditioning:
        """
        Conditioning entries that give each row its own number of conditioning frames `num_frames` (`[B]`, each one
        of `settings.num_conditioning_frames_choices`), merged into the conditioning of rollouts and of the data term.
        Only adapters with several `conditioning_frame_choices` implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} has a single conditioning mode.")

    @contextlib.contextmanager
    def using_guidance_scale(self, scale: float | None) -> Iterator[None]:
        """
        Inside the block, encode and sample with CFG scale `scale` instead of `settings.guidance_scale` (the
        evaluation's `eval_guidance_scale`); `None` changes nothing. Conditioning encoded inside the block has the
        `negative_*` entries that `scale` needs.
        """
        settings = self.settings
        if scale is not None:
            self.settings = replace(settings, guidance_scale=scale)
        try:
            yield
        finally:
            self.settings = settings

    @property
    def pixel_channels(self) -> int:
        """Channels of the pixels the model generates: the VAE's input channels, or the latent channels without one."""
        vae = getattr(self.pipeline, "vae", None)
        if vae is None:
            return self.latent_shape()[0]
        # `AutoencoderKLQwenImage` names it `input_channels`.
        return vae.config.get("in_channels", vae.config.get("input_channels"))

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def sample_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial latents: standard normal noise `[batch_size, *latent_shape]`, float32, drawn on the CPU."""
        shape = (batch_size, *self.latent_shape())
        return to_device(torch.randn(shape, generator=generator, dtype=torch.float32), self.device)

    def standard_noise(self, initial_state: torch.Tensor) -> torch.Tensor:
        """
        The standard-normal noise `eps` of a rollout's recorded initial state `[B, ...]`, which the data term reuses
        (`data_noise="rollout"`, the authors' `gaussian_noise`): the state itself for families that start from `eps`.
        """
        return initial_state

    @torch.no_grad()
    def sample(
        self,
        denoiser: nn.Module,
        conditioning: Conditioning,
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        eta: float | None = None,
        steps: range | None = None,
        stochastic_steps: Collection[int] | None = None,
    ) -> Trajectory:
        """
        Run the stochastic sampler from `noise`, recording every state and every transition's mean and
        log-likelihood.

        Every step but the last is stochastic with `eta` (default `settings.eta`; 0 gives the deterministic sampler);
        the last one lands on the clean sample and is deterministic (its log-likelihood is 0 and it is never trained).
        With `stochastic_steps` (an SDE window), only those steps use `eta` and all others are deterministic.

        `steps` (default: all `num_inference_steps`) runs only a contiguous part of the schedule, from the state
        `noise` at step `steps.start`: the returned trajectory then holds the `len(steps) + 1` states from there.
        """
        eta = self.settings.eta if eta is None else eta
        num_steps = self.settings.num_inference_steps
        steps = range(num_steps) if steps is None else steps
        latents = [noise.float()]
        log_probs, means = [], []
        batch = noise.shape[0]
        for i in steps:
            stochastic = i < num_steps - 1 and (stochastic_steps is None or i in stochastic_steps)
            step_index = torch.full((batch,), i, dtype=torch.long, device=noise.device)
            output = self.predict(denoiser, latents[-1], step_index, conditioning)
            out = self.step(output, latents[-1], step_index, eta if stochastic else 0.0, generator=generator)
            out = score_transition(out, self.settings.log_ratio_form)
            latents.append(out.prev_sample)
            log_probs.append(out.log_prob)
            means.append(out.mean)
        return Trajectory(
            latents=torch.stack(latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            means=torch.stack(means, dim=1),
        )

    def transition_log_prob(
        self,
        denoiser: nn.Module,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        step_index: torch.Tensor,
        conditioning: Conditioning,
        previous_denoised: torch.Tensor | None = None,
    ) -> StepOutput:
        """
        Replay stored transitions under `denoiser`: the log-likelihood of `next_latents` given `latents`, scored with
        `settings.log_ratio_form` exactly as in [`sample`]. `previous_denoised` (`[B, ...]`, the rollout's denoised
        estimate of step `step_index - 1`) is used by multistep samplers only.
        """
        output = self.predict(denoiser, latents, step_index, conditioning)
        step = self.step(output, latents, step_index, self.settings.eta, prev_sample=next_latents.float())
        return score_transition(step, self.settings.log_ratio_form)


class FlowMatchingAdapter(DiffusionAdapter):
    """
    Shared parts of rectified-flow families (`x_sigma = (1 - sigma) x0 + sigma * noise`, velocity `noise - x0`).

    Subclasses implement `velocity(denoiser, latents, sigma, conditioning)` for the conditional prediction; CFG,
    the sampler step (`settings.sampler`: the SDE step, CPS or the authors' churn sampler) and the data loss are
    handled here. The sigma schedule comes from the pipeline's scheduler. The data loss is the velocity MSE, weighted
    by `(1 - sigma)^2 + sigma^2` (EDM's weighting of the x0 error) when `settings.data_loss_weighting == "edm"`.
    """

    default_resolution: tuple[int, int] | None = None
    """(height, width) when the config sets none; `None` uses `pipeline.default_sample_size * vae_scale_factor`."""
    samplers = ("flow_sde", "churn", "cps")

    @abstractmethod
    def velocity(
        self, denoiser: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """The denoiser's velocity prediction at noise level `sigma` (`[B]`), without guidance."""

    @property
    def resolution(self) -> tuple[int, int]:
        if self.default_resolution is not None:
            default_height, default_width = self.default_resolution
        else:
            default_height = default_width = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return self.settings.height or default_height, self.settings.width or default_width

    def initial_noise_scale(self) -> torch.Tensor | None:
        """
        The factor `sample_noise` puts on standard noise (a 0-d tensor on `device`), or `None` for 1: schedules that
        start at pure noise (`t = 1`). One that starts below it (Cosmos Predict2's `80 / 81`, a Karras schedule's
        `s_max / (1 + s_max)`) starts from the flow state `t_0 * eps`, the EDM state `s_max * eps`.
        """
        return None if self.settings.karras_sigmas is None else self._sigma_table()[0]

    def sample_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = super().sample_noise(batch_size, generator)
        scale = self.initial_noise_scale()
        return noise if scale is None else noise * scale

    def standard_noise(self, initial_state: torch.Tensor) -> torch.Tensor:
        """
        `initial_state / (initial_noise_scale * churned_level_0 / sigma_0)`: the churn sampler rescales the initial
        noise to its churned level (see `sample`), the other samplers start from `sample_noise` as it is. Device
        arithmetic only (no read-back).
        """
        factor = self.initial_noise_scale()
        if self.settings.sampler == "churn":
            churn = self.model_sigmas()[0] / self._sigma_table()[0]
            factor = churn if factor is None else factor * churn
        return initial_state if factor is None else initial_state / factor

    def model_sigmas(self, eta: float | None = None) -> torch.Tensor:
        """
        The noise level of each recorded state, `[num_inference_steps + 1]`: the schedule's sigmas, or for the churn
        sampler the churned levels `churn_sigma(sigma_i, eta)` (default `settings.eta`) and 0 for the final sample.
        """
        sigmas = self._sigma_table()
        if self.settings.sampler != "churn":
            return sigmas
        eta = self.settings.eta if eta is None else eta
        cache = getattr(self, "_cached_churn_levels", {})
        if eta not in cache or cache[eta].device != sigmas.device:
            levels = churn_sigma(sigmas.double(), eta).float()
            levels[-1] = 0.0
            cache[eta] = levels
            self._cached_churn_levels = cache
        return cache[eta]

    def sigmas(self) -> torch.Tensor:
        """
        The `num_inference_steps + 1` noise levels of the sampler, from 1 down to 0, float32 on `device`: the
        scheduler's sigmas after `set_timesteps(num_inference_steps, **scheduler_kwargs())`.

        A first level within one training timestep of 1 (UniPC's flow sigmas start at `shift(1 - 1 / 1000)`, 0.9997
        for `flow_shift=3`) is pure noise in all but name and is set to 1, so that the SDE's noise coefficient, which
        diverges at 1, is clamped at the second level as for the other schedules (at 0.9997 the first step's noise
        would be ~7x larger).

        Raises:
            `ValueError`: for a scheduler whose sigmas are not decreasing flow-matching noise levels from 1 to 0.
        """
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(self.settings.num_inference_steps, device=self.device, **self.scheduler_kwargs())
        sigmas = scheduler.sigmas.float().to(self.device).clone()
        if sigmas[0] > 1 - 1 / scheduler.config.get("num_train_timesteps", 1000):
            sigmas[0] = 1.0
        if not (sigmas[0] <= 1.0 and sigmas[-1] == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())):
            raise ValueError(
                f"The scheduler of {type(self.pipeline).__name__} ({type(scheduler).__name__}) gives sigmas "
                f"{sigmas.tolist()}, not flow-matching noise levels from 1 to 0. Use the checkpoint's own scheduler "
                "(a FlowMatchEulerDiscreteScheduler, or UniPCMultistepScheduler with use_flow_sigmas=True and "
                "prediction_type='flow_prediction')."
            )
        return sigmas

    def scheduler_kwargs(self) -> dict:
        """Extra arguments of `scheduler.set_timesteps` (for example `mu` for dynamically shifted schedules)."""
        return {}

    def dynamic_shift_kwargs(self, image_seq_len: int) -> dict:
        """
        `scheduler_kwargs` of the resolution-dependent schedule of FLUX.1 and Qwen-Image: sigmas `linspace(1, 1 / T,
        T)` shifted by `mu`, linear in the image's token count between the scheduler config's `base_shift` (at
        `base_image_seq_len` tokens) and `max_shift` (at `max_image_seq_len`).
        """
        steps = self.settings.num_inference_steps
        config = self.pipeline.scheduler.config
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": mu}

    def _sigma_table(self) -> torch.Tensor:
        """The schedule: `sigmas()`, or with `settings.karras_sigmas` their Karras levels (`karras_flow_sigmas`)."""
        if getattr(self, "_cached_sigmas", None) is None or self._cached_sigmas.device != self.device:
            karras = self.settings.karras_sigmas
            if karras is None:
                self._cached_sigmas = self.sigmas()
            else:
                steps = self.settings.num_inference_steps - 1
                self._cached_sigmas = karras_flow_sigmas(*karras, steps).float().to(self.device)
            # Read once here, so that no sampler step reads a device value back to the host.
            self._noise_sigma_max = float(self._cached_sigmas[1])
        return self._cached_sigmas

    def predict(self, denoiser, latents, step_index, conditioning):
        return self._guided_velocity(denoiser, latents, self.model_sigmas()[step_index], conditioning)

    def _guided_velocity(self, denoiser, latents, sigma, conditioning):
        """The velocity at noise levels `sigma` (`[B]`), with CFG when `settings.guidance_scale > 1`."""

        def velocity(latents, sigma, conditioning):
            return self.velocity(denoiser, latents, sigma, conditioning)

        return self.guided(velocity, latents, sigma, conditioning)

    def step(self, model_output, latents, step_index, eta, prev_sample=None, generator=None, previous_denoised=None):
        """
        The transition of `settings.sampler`: [`~trl_ddrl.sampling.flow_sde_step`], or with `"churn"`
        [`~trl_ddrl.sampling.edm_churn_step`] from the churned level of `eta` (`previous_denoised` is the previous
        step's denoised estimate, `None` for a first-order step).
        """
        if self.settings.sampler == "churn":
            return self._churn_step(model_output, latents, step_index, eta, previous_denoised, prev_sample, generator)
        sigmas = self._sigma_table()
        if self.settings.sampler == "cps":
            return flow_cps_step(
                latents,
                model_output,
                sigmas[step_index],
                sigmas[step_index + 1],
                eta=eta,
                prev_sample=prev_sample,
                generator=generator,
            )
        return flow_sde_step(
            latents,
            model_output,
            sigmas[step_index],
            sigmas[step_index + 1],
            eta=eta,
            # The SDE's noise diverges at sigma = 1: clamp it at the second noise level, as Flow-GRPO does, also for
            # schedules that start just below 1 (where the first level would give a huge first-step noise).
            noise_sigma_max=self._noise_sigma_max,
            prev_sample=prev_sample,
            generator=generator,
        )

    def _churn_step(self, model_output, latents, step_index, eta, previous_denoised, prev_sample, generator):
        levels = self.model_sigmas(eta)
        # Step 0 has no previous estimate: a previous level of 1 (EDM sigma = infinity) makes the 2AB step Euler's.
        previous_sigma = torch.where(step_index > 0, levels[(step_index - 1).clamp(min=0)], torch.ones_like(levels[0]))
        return edm_churn_step(
            latents,
            model_output,
            levels[step_index],
            self._sigma_table()[step_index + 1],
            eta,
            previous_denoised=previous_denoised,
            previous_sigma=previous_sigma,
            prev_sample=prev_sample,
            generator=generator,
        )

    @torch.no_grad()
    def sample(
        self, denoiser, conditioning, noise, generator=None, eta=None, steps=None, stochastic_steps=None
    ) -> Trajectory:
        """
        As [`DiffusionAdapter.sample`]; with the churn sampler, every state is recorded at its churned level and each
        step's denoised estimate is recorded too (`Trajectory.denoised`), for the second-order step of the next one.
        The first churn acts on pure noise, where adding EDM noise equals, in distribution, rescaling the noise to the
        churned level: the initial state is `noise * churned_level_0 / sigma_0`. The final step to 0 is deterministic.
        """
        if self.settings.sampler != "churn":
            return super().sample(denoiser, conditioning, noise, generator, eta, steps, stochastic_steps)
        if stochastic_steps is not None or (steps is not None and steps != range(self.settings.num_inference_steps)):
            raise ValueError(
                "sampler='churn' makes every step stochastic (the authors' recipe) and has no SDE window: leave "
                "sde_window_size unset, or set sampler='flow_sde' or 'cps' to use one."
            )
        eta = self.settings.eta if eta is None else eta
        levels = self.model_sigmas(eta)
        latents = [noise.float() * (levels[0] / self._sigma_table()[0])]
        log_probs, means, denoised = [], [], []
        for i in range(self.settings.num_inference_steps):
            step_index = torch.full((noise.shape[0],), i, dtype=torch.long, device=noise.device)
            output = self._guided_velocity(denoiser, latents[-1], levels[step_index], conditioning)
            previous = denoised[-1] if denoised else None
            out = self._churn_step(output, latents[-1], step_index, eta, previous, None, generator)
            out = score_transition(out, self.settings.log_ratio_form)
            latents.append(out.prev_sample)
            log_probs.append(out.log_prob)
            means.append(out.mean)
            denoised.append(out.denoised)
        return Trajectory(
            latents=torch.stack(latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            means=torch.stack(means, dim=1),
            denoised=torch.stack(denoised, dim=1),
        )

    def transition_log_prob(self, denoiser, latents, next_latents, step_index, conditioning, previous_denoised=None):
        if self.settings.sampler != "churn":
            return super().transition_log_prob(denoiser, latents, next_latents, step_index, conditioning)
        output = self.predict(denoiser, latents, step_index, conditioning)
        step = self._churn_step(
            output, latents, step_index, self.settings.eta, previous_denoised, next_latents.float(), None
        )
        return score_transition(step, self.settings.log_ratio_form)

    def diffusion_loss(self, denoiser, x0, conditioning, step_index, noise):
        sigma = self.model_sigmas()[step_index]
        noisy = flow_matching_noisy_sample(x0.float(), noise.float(), sigma)
        velocity = self.velocity(denoiser, noisy, sigma, positive_conditioning(conditioning))
        loss = flow_matching_loss(velocity, x0, noise)
        if self.settings.data_loss_weighting == "edm":
            loss = loss * flow_matching_edm_weight(sigma).to(loss.device)
        return loss


class VideoFlowMatchingAdapter(FlowMatchingAdapter):
    """
    Shared parts of flow families on a causal video VAE with per-channel latent statistics (`AutoencoderKLWan` and its
    relatives): latents `[C, F', H', W']` for `num_frames = temporal * (F' - 1) + 1` frames (the first frame is
    encoded alone, then every `temporal` frames make one latent frame), normalised as `(z - latents_mean) /
    latents_std * sigma_data`, the frame-count check, and encoding/decoding. With `default_num_frames = None` the
    family generates images on the same VAE: one latent frame `[C, 1, H', W']`, pixels `[B, C, H, W]`.
    """

    default_num_frames: int | None = None
    """Frames per video when the config sets none; `None` for image models."""

    def __init__(self, pipeline, settings: SamplingSettings):
        super().__init__(pipeline, settings)
        self.check_num_frames()

    @property
    def sigma_data(self) -> float:
        """Scale of the normalised latents (the EDM data scale of Cosmos); 1 for the others."""
        return 1.0

    @property
    def num_frames(self) -> int | None:
        """Frames per generated video (conditioning frames included); `None` for image models."""
        if self.default_num_frames is None:
            return None
        return self.settings.num_frames or self.default_num_frames

    @property
    def temporal_compression(self) -> int:
        return self.pipeline.vae_scale_factor_temporal

    @property
    def spatial_compression(self) -> int:
        return self.pipeline.vae_scale_factor_spatial

    @property
    def resolution_multiple(self) -> int:
        return self.spatial_compression * self.denoiser.config.patch_size[1]

    @property
    def latent_channels(self) -> int:
        """Channels of the latents (the denoiser's input channels, unless it also takes conditioning channels)."""
        return self.denoiser.config.in_channels

    def latent_frames(self) -> int:
        """Latent frames per sample: `(num_frames - 1) // temporal + 1`, 1 for images."""
        if self.num_frames is None:
            return 1
        return (self.num_frames - 1) // self.temporal_compression + 1

    def latent_shape(self) -> tuple[int, ...]:
        height, width = self.resolution
        spatial = self.spatial_compression
        return (self.latent_channels, self.latent_frames(), height // spatial, width // spatial)

    def check_num_frames(self) -> None:
        """
        Raises:
            `ValueError`: naming `num_frames` and the nearest valid count, for a count the VAE cannot encode.
        """
        num_frames, temporal = self.num_frames, self.temporal_compression
        if num_frames is not None and (num_frames < 1 or (num_frames - 1) % temporal):
            nearest = max(0, round((num_frames - 1) / temporal)) * temporal + 1
            raise ValueError(
                f"num_frames={num_frames} is not {temporal}k + 1, which the VAE of {type(self.pipeline).__name__} "
                f"needs (its first frame is encoded alone, then every {temporal} frames make one latent frame). Use "
                f"for example num_frames={nearest}."
            )

    @torch.no_grad()
    def encode_video(
        self, video: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        """
        Videos `[B, F, C, H, W]` in `[-1, 1]` to normalised latents `[B, C', F', H', W']`, float32: a posterior
        sample, or with `mode` the posterior's mode.
        """
        return normalized_vae_encode(
            self.pipeline.vae, video.permute(0, 2, 1, 3, 4), generator, self.sigma_data, mode=mode
        )

    @torch.no_grad()
    def encode_pixels(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        expected = 4 if self.num_frames is None else 5
        if pixels.ndim != expected:
            what = "images [B, C, H, W]" if expected == 4 else "videos [B, F, C, H, W]"
            raise ValueError(
                f"{type(self.pipeline).__name__} trains on {what}; got pixels of shape {tuple(pixels.shape)}."
                + (f" Give the data term videos of num_frames={self.num_frames} frames." if expected == 5 else "")
            )
        return self.encode_video(pixels[:, None] if expected == 4 else pixels, generator, mode=mode)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        video = normalized_vae_decode(self.pipeline.vae, latents, self.sigma_data)
        return video[:, 0] if self.num_frames is None else video


@torch.no_grad()
def encode_prompt_pairs(adapter: DiffusionAdapter, prompts: list[str], device: torch.device) -> Conditioning:
    """
    Prompt conditioning of the pipelines whose `encode_prompt(prompt, do_classifier_free_guidance,
    max_sequence_length, device)` returns `(prompt_embeds, negative_prompt_embeds)` (Wan, Cosmos): only when CFG is
    on, `negative_prompt_embeds` `[B, L, D]` is the pipeline's default negative prompt, or with
    `settings.guidance_unconditional="zeros"` the prompt embeddings zeroed ([`drop_text`], the authors' unconditional
    branch; the negative prompt is then not encoded). The sequence length is `settings.max_sequence_length`, or the
    adapter's `default_max_sequence_length`.
    """
    use_cfg = adapter.settings.guidance_scale > 1.0
    zeros = adapter.settings.guidance_unconditional == "zeros"
    embeds, negative_embeds = adapter.pipeline.encode_prompt(
        prompt=prompts,
        do_classifier_free_guidance=use_cfg and not zeros,
        max_sequence_length=adapter.settings.max_sequence_length or adapter.default_max_sequence_length,
        device=device,
    )
    conditioning = {"prompt_embeds": embeds}
    if use_cfg:
        if zeros:
            negative_embeds = drop_text(conditioning, torch.zeros(len(prompts), dtype=torch.bool))["prompt_embeds"]
        conditioning["negative_prompt_embeds"] = negative_embeds
    return conditioning
