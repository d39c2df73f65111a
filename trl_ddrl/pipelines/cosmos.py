# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
r"""
Adapters for NVIDIA Cosmos Predict2 (`Cosmos2TextToImagePipeline`, `Cosmos2VideoToWorldPipeline`), the model family
of the DDRL paper.

The Cosmos Predict2 pipelines are written in EDM form: the state is `x = x0 + s * eps` with EDM noise level `s`
(Karras schedule from `sigma_max = 80` to `sigma_min = 0.002`), and the transformer is wrapped with the
preconditioning `c_in = c_skip = 1 - t`, `c_out = -t`, `t = s / (1 + s)`. Written out, the transformer's input is

$$ c_{in} x = \frac{x_0 + s\,\epsilon}{1 + s} = (1 - t)\,x_0 + t\,\epsilon, $$

which is exactly the rectified-flow state at `sigma = t`, and the denoised estimate `c_skip x + c_out F = x_t - t F`
is the rectified-flow `x0 = x_t - t v`: the transformer's raw output `F` *is* the velocity `eps - x0` at flow
noise level `t`. The adapters therefore work in flow coordinates, `x_t = x / (1 + s)` with sigmas `t = s / (1 + s)`,
and the shared [`FlowMatchingAdapter`] SDE step and flow-matching data loss apply unchanged. The pipeline's EDM Euler
step and the flow Euler step are the same DDIM update, so `eta = 0` reproduces the pipeline's trajectory.

Two details differ from the pipeline:

- The pipeline starts from `x = 80 * eps`, i.e. the flow state `t_0 * eps` with `t_0 = 80 / 81`; `sample_noise`
  returns that state. The data term's rollout noise is `eps` itself (`standard_noise`), as the authors' trainer
  reuses its standard-normal draw.
- The pipeline repeats its last sigma (`final_sigmas_type="sigma_min"`), so its last step is a no-op and it decodes
  the state at `s = 0.002`. DDRL's last step goes on to `t = 0`, decoding the denoised estimate at that level.

The Cosmos transformer resizes its padding mask with torchvision, so the real checkpoints (`concat_padding_mask=True`)
need `torchvision` installed.
"""

import torch
from torch import nn

from .base import Conditioning, SamplingSettings, VideoFlowMatchingAdapter, encode_prompt_pairs


class Cosmos2TextToImageAdapter(VideoFlowMatchingAdapter):
    """
    `Cosmos2TextToImagePipeline`: T5-XXL prompt embeddings, Wan-VAE latents `[C, 1, H', W']` (an image is a one-frame
    video) normalised by `latents_mean` / `latents_std` and scaled by `sigma_data`.

    With `guidance_scale > 1` rollouts use CFG against the pipeline's default negative prompt, or with
    `guidance_unconditional="zeros"` against a zeroed prompt embedding (the authors' unconditional branch). DDRL uses
    the standard convention `uncond + g * (cond - uncond)`; the pipeline's `guidance_scale=g` means
    `cond + g * (cond - uncond)`, i.e. DDRL's `g + 1`.
    """

    pipeline_class_names = ("Cosmos2TextToImagePipeline",)
    # The authors' sampler, made for this EDM schedule, is the default here.
    samplers = ("churn", "flow_sde")
    guidance_unconditional_choices = ("negative_prompt", "zeros")
    denoiser_name = "transformer"
    default_resolution = (768, 1360)
    default_max_sequence_length = 512

    @property
    def sigma_data(self) -> float:
        """EDM data scale of the latents (1 for the released checkpoints)."""
        return self.pipeline.scheduler.config.get("sigma_data", 1.0)

    def sigmas(self) -> torch.Tensor:
        """The pipeline's EDM sigmas `s` (Karras schedule) as flow sigmas `s / (1 + s)`, then 0."""
        scheduler = self.pipeline.scheduler
        steps = self.settings.num_inference_steps
        scheduler.set_timesteps(sigmas=torch.linspace(0, 1, steps, dtype=torch.float64), device=self.device)
        edm = scheduler.sigmas[:steps].double()
        if steps > 1 and not bool((edm[1:] < edm[:-1]).all()):
            raise ValueError(
                f"The scheduler of {type(self.pipeline).__name__} gives increasing EDM sigmas {edm.tolist()}; Cosmos "
                "Predict2 needs its Karras schedule. Load the checkpoint's own scheduler (FlowMatchEulerDiscreteScheduler "
                "with use_karras_sigmas=True)."
            )
        flow = edm / (1 + edm)
        return torch.cat([flow, flow.new_zeros(1)]).float().to(self.device)

    def initial_noise_scale(self) -> torch.Tensor:
        """The pipeline's initial state `sigma_max * eps` in flow coordinates: `t_0 * eps`, `t_0 = s_max / (1 + s_max)`."""
        return self._sigma_table()[0]

    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        return encode_prompt_pairs(self, prompts, device)

    def _padding_mask(self, like: torch.Tensor) -> torch.Tensor:
        """The pipeline's all-zero pixel padding mask `[1, 1, H, W]`."""
        return like.new_zeros(1, 1, *self.resolution)

    def velocity(self, denoiser: nn.Module, latents, sigma, conditioning):
        embeds = conditioning["prompt_embeds"]
        return denoiser(
            hidden_states=latents.to(embeds.dtype),
            timestep=sigma.to(embeds.dtype),
            encoder_hidden_states=embeds,
            padding_mask=self._padding_mask(embeds),
            return_dict=False,
        )[0]


class CosmosFrameConditioning:
    """
    Conditioning on given frames, shared by the Cosmos Predict video adapters (mixed in before a
    [`VideoFlowMatchingAdapter`] subclass).

    The first `(num_conditioning_frames - 1) // 4 + 1` latent frames are the ground truth, as in the pipelines: the
    transformer sees the clean conditioning latents there, at flow noise level `condition_sigma`, with a
    conditioning-mask channel of ones; and the denoised estimate there is replaced by the conditioning latents, which
    in velocity form is `v = (x_t - c) / t`. The same replacement applies in rollouts and in the data term, where the
    conditioning latents are the data video's own first latent frames, so the conditioning frames carry no loss.
    Rollouts need the conditioning latents under `condition_latents` (and `negative_condition_latents` with CFG),
    from `encode_condition_frames`. With `num_conditioning_frames = 0` (text-to-world) the mask is all zeros and no
    conditioning latents are needed.

    `settings.num_conditioning_frames` overrides the class default; it must be one of `conditioning_frame_choices`.
    With `settings.num_conditioning_frames_choices` each row has its own mode: its number of conditioning latent
    frames `[B]` is in the conditioning under `condition_latent_frames` ([`frame_mode_conditioning`]), the
    conditioning latents hold the most frames any row is given (`num_conditioning_frames` is their maximum), and each
    row uses its first `condition_latent_frames` of them: a row given 1 frame of a 5-frame encoding uses its first
    latent frame, which the causal VAE computes from the first frame alone.
    """

    num_conditioning_frames: int = 1
    conditioning_frame_choices: tuple[int, ...] = (1,)
    condition_sigma: float
    """Flow noise level at which the transformer sees the conditioning frames."""
    fps: int | None = None
    """Frame rate given to the transformer's rotary embedding; `None` for the transformer's default."""

    def __init__(self, pipeline, settings: SamplingSettings):
        super().__init__(pipeline, settings)
        field = f"num_conditioning_frames={self.num_conditioning_frames}"
        if settings.num_conditioning_frames_choices is not None:
            self.num_conditioning_frames = max(settings.num_conditioning_frames_choices)
            field = f"num_conditioning_frames_choices={list(settings.num_conditioning_frames_choices)}"
        elif settings.num_conditioning_frames is not None:
            self.num_conditioning_frames = settings.num_conditioning_frames
            field = f"num_conditioning_frames={self.num_conditioning_frames}"
        if self.num_conditioning_frames not in self.conditioning_frame_choices:
            raise ValueError(
                f"{field} is not supported by {type(pipeline).__name__}; use one of "
                f"{list(self.conditioning_frame_choices)}."
            )
        if self.num_conditioning_frames >= self.num_frames:
            raise ValueError(
                f"{field} leaves nothing to generate in num_frames={self.num_frames} frames; raise num_frames."
            )

    @property
    def latent_channels(self) -> int:
        # The transformer also takes the conditioning-mask channel.
        return self.denoiser.config.in_channels - 1

    def condition_latent_frames(self) -> int:
        """Latent frames that hold the given frames: `(num_conditioning_frames - 1) // 4 + 1`, 0 without any."""
        if self.num_conditioning_frames == 0:
            return 0
        return (self.num_conditioning_frames - 1) // self.temporal_compression + 1

    def frame_mode_conditioning(self, num_frames: torch.Tensor) -> Conditioning:
        """
        `condition_latent_frames`: each row's conditioning latent frames `[B]` (long), `(n - 1) // 4 + 1` for `n > 0`
        given frames `num_frames` (`[B]`), 0 for text-to-world; with its `negative_` copy when `guidance_scale > 1`.
        """
        latent = torch.where(num_frames > 0, (num_frames - 1) // self.temporal_compression + 1, 0).long()
        conditioning = {"condition_latent_frames": latent}
        if self.settings.guidance_scale > 1.0:
            conditioning["negative_condition_latent_frames"] = latent
        return conditioning

    def _condition_indicator(self, like: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """
        `[1, 1, F', 1, 1]` (one mode per run) or `[B, 1, F', 1, 1]` (modes per row, from `condition_latent_frames`):
        1 on the conditioning latent frames, 0 elsewhere.
        """
        if self.settings.num_conditioning_frames_choices is None:
            indicator = like.new_zeros(1, 1, like.shape[2], 1, 1)
            indicator[:, :, : self.condition_latent_frames()] = 1.0
            return indicator
        if "condition_latent_frames" not in conditioning:
            raise ValueError(
                f"{type(self.pipeline).__name__} with num_conditioning_frames_choices="
                f"{list(self.settings.num_conditioning_frames_choices)} needs each row's mode: add the output of "
                "adapter.frame_mode_conditioning(num_frames) to the conditioning."
            )
        frames = conditioning["condition_latent_frames"].to(like.device)
        positions = torch.arange(like.shape[2], device=like.device)
        return (positions < frames[:, None]).to(like.dtype).view(-1, 1, like.shape[2], 1, 1)

    def encode_conditioning_video(self, frames: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The conditioning latents `[B, *latent_shape]` of the given frames `[B, num_conditioning_frames, C, H, W]`."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_condition_frames(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> Conditioning:
        """
        Encode conditioning frames as the pipeline does.

        Args:
            pixels (`torch.Tensor`): `[B, C, H, W]` (an image) or `[B, F_c, C, H, W]` in `[-1, 1]`, with `F_c >=
                num_conditioning_frames`; the first `num_conditioning_frames` frames are used.
            generator (`torch.Generator`, *optional*): Generator for the VAE posterior sample.

        Returns:
            `dict` with `condition_latents` (`[B, *latent_shape]`), and `negative_condition_latents` (the same) when
            `guidance_scale > 1`: merge it into the conditioning from `encode_prompts`.
        """
        if pixels.ndim == 4:
            pixels = pixels[:, None]
        if pixels.shape[1] < self.num_conditioning_frames:
            raise ValueError(
                f"Got {pixels.shape[1]} conditioning frames but num_conditioning_frames={self.num_conditioning_frames}."
            )
        latents = self.encode_conditioning_video(pixels[:, : self.num_conditioning_frames], generator)
        conditioning = {"condition_latents": latents}
        if self.settings.guidance_scale > 1.0:
            conditioning["negative_condition_latents"] = latents
        return conditioning

    def velocity(self, denoiser: nn.Module, latents, sigma, conditioning):
        latents = latents.float()
        if "condition_latents" in conditioning:
            condition = conditioning["condition_latents"].float()
        elif self.num_conditioning_frames == 0:
            condition = torch.zeros_like(latents)
        else:
            raise ValueError(
                f"{type(self.pipeline).__name__} with num_conditioning_frames={self.num_conditioning_frames} needs the "
                "conditioning frames: add the output of adapter.encode_condition_frames(pixels) to the conditioning."
            )
        embeds = conditioning["prompt_embeds"]
        indicator = self._condition_indicator(latents, conditioning)
        sigma_b = sigma.float().view(-1, 1, 1, 1, 1)
        model_input = indicator * condition + (1 - indicator) * latents
        timestep = indicator * self.condition_sigma + (1 - indicator) * sigma_b
        output = denoiser(
            hidden_states=model_input.to(embeds.dtype),
            timestep=timestep.expand(-1, -1, latents.shape[2], -1, -1).to(embeds.dtype),
            encoder_hidden_states=embeds,
            fps=self.fps,
            condition_mask=indicator.expand(latents.shape[0], 1, -1, *latents.shape[3:]).to(embeds.dtype),
            padding_mask=self._padding_mask(embeds),
            return_dict=False,
        )[0]
        # Where the frames are given, the denoised estimate is the conditioning itself: x0 = c, v = (x_t - c) / t.
        return indicator * (latents - condition) / sigma_b + (1 - indicator) * output.float()

    def diffusion_loss(self, denoiser, x0, conditioning, step_index, noise):
        conditioning = {**conditioning, "condition_latents": x0}
        return super().diffusion_loss(denoiser, x0, conditioning, step_index, noise)


class Cosmos2VideoToWorldAdapter(CosmosFrameConditioning, Cosmos2TextToImageAdapter):
    """
    `Cosmos2VideoToWorldPipeline`: videos of `num_frames = 4k + 1` frames (93 by default) continuing the first
    `num_conditioning_frames` frames (1: image-to-world), as described in [`CosmosFrameConditioning`]. The given
    frames are seen at EDM noise level `1e-4` (flow `1e-4 / (1 + 1e-4)`); they are encoded as the pipeline does, the
    last frame repeated up to `num_frames` and the whole video encoded (a posterior sample).
    """

    pipeline_class_names = ("Cosmos2VideoToWorldPipeline",)
    default_resolution = (704, 1280)
    default_num_frames = 93
    condition_sigma = 1e-4 / (1 + 1e-4)
    fps = 16

    def encode_conditioning_video(self, frames, generator):
        padding = frames[:, -1:].expand(-1, self.num_frames - frames.shape[1], -1, -1, -1)
        return self.encode_video(torch.cat([frames, padding], dim=1), generator)
