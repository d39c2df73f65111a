# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Adapters for Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`) and SDXL (`StableDiffusionXLPipeline`).

Both are discrete-time UNets predicting the noise (`epsilon`) or the velocity (`v_prediction`) of the DDPM forward
process `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`, `a_t` the cumulative alpha at training timestep `t`. Rollouts use
DDIM with `eta > 0` on the pipeline's own noise schedule (its scheduler config converted to a `DDIMScheduler`), and the
data term is the model's ordinary training loss at the rollout's timestep.
"""

from abc import abstractmethod

import torch
from diffusers import DDIMScheduler
from torch import nn

from ..losses import ddpm_edm_weight, mse_per_sample
from ..sampling import StepOutput, broadcast_per_sample, ddim_step
from .base import Conditioning, DiffusionAdapter, SamplingSettings, positive_conditioning
from .latents import posterior_latents


PREDICTION_TYPES = ("epsilon", "v_prediction")


class DDIMAdapter(DiffusionAdapter):
    """
    Shared parts of the epsilon / v-prediction UNet families: the DDIM schedule, CFG, the DDIM step, the data loss and
    the VAE.

    Subclasses implement `noise_prediction(denoiser, latents, timestep, conditioning)`, the raw UNet output, and
    `encode_prompts`. The schedule is the pipeline scheduler's config (betas, `timestep_spacing`, `steps_offset`,
    `set_alpha_to_one`, `prediction_type`, ...) loaded into a `DDIMScheduler` with `clip_sample=False` and
    `thresholding=False`, since the step's Gaussian likelihood needs the unclipped `x0` prediction. Step `i` goes from
    training timestep `t_i` to `t_i - num_train_timesteps // num_inference_steps`, exactly as `DDIMScheduler.step`.
    """

    denoiser_name = "unet"
    samplers = ("ddim",)

    def __init__(self, pipeline, settings: SamplingSettings):
        super().__init__(pipeline, settings)
        prediction_type = pipeline.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler.config.prediction_type={prediction_type!r} is not supported by {type(self).__name__}; "
                f"supported: {', '.join(PREDICTION_TYPES)}. Load a pipeline whose UNet predicts noise or velocity."
            )
        if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
            raise ValueError(
                f"unet.config.time_cond_proj_dim={self.denoiser.config.time_cond_proj_dim}: this UNet takes a guidance "
                "embedding (an LCM-style distillation), which DDRL's DDIM sampler does not feed. Train the base model "
                "it was distilled from."
            )
        self.prediction_type = prediction_type

    @abstractmethod
    def noise_prediction(
        self, denoiser: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """The UNet's output (noise or velocity, `[B, C, h, w]`) at training timesteps `timestep` (`[B]`), no CFG."""

    # ---- schedule ----------------------------------------------------------------------------------------------

    def scheduler(self) -> DDIMScheduler:
        """The pipeline's noise schedule as a `DDIMScheduler`, with timesteps set for `num_inference_steps`."""
        scheduler = DDIMScheduler.from_config(self.pipeline.scheduler.config, clip_sample=False, thresholding=False)
        scheduler.set_timesteps(self.settings.num_inference_steps)
        return scheduler

    def _schedule(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Per sampling step `i`: the training timestep `t_i` (`[N]`, long) and the cumulative alphas before and after
        the step (`[N]` each, float32), on `device`. Cached.
        """
        cached = getattr(self, "_cached_schedule", None)
        if cached is None or cached[0].device != self.device:
            scheduler = self.scheduler()
            timesteps = scheduler.timesteps.long()
            previous = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            alphas = scheduler.alphas_cumprod.float()
            alpha_prod = alphas[timesteps]
            final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
            alpha_prod_prev = torch.where(previous >= 0, alphas[previous.clamp(min=0)], final)
            self._cached_schedule = tuple(t.to(self.device) for t in (timesteps, alpha_prod, alpha_prod_prev))
        return self._cached_schedule

    def _epsilon(self, model_output: torch.Tensor, latents: torch.Tensor, alpha_prod: torch.Tensor) -> torch.Tensor:
        """The noise implied by the model output: itself, or `sqrt(a) v + sqrt(1 - a) x` for v-prediction."""
        if self.prediction_type == "epsilon":
            return model_output.float()
        a = broadcast_per_sample(alpha_prod, latents)
        return torch.sqrt(a) * model_output.float() + torch.sqrt(1 - a) * latents.float()

    # ---- the adapter protocol ----------------------------------------------------------------------------------

    def predict(self, denoiser, latents, step_index, conditioning):
        def noise_prediction(latents, timestep, conditioning):
            return self.noise_prediction(denoiser, latents, timestep, conditioning)

        return self.guided(noise_prediction, latents, self._schedule()[0][step_index], conditioning)

    def step(self, model_output, latents, step_index, eta, prev_sample=None, generator=None) -> StepOutput:
        _, alpha_prod, alpha_prod_prev = self._schedule()
        epsilon = self._epsilon(model_output, latents, alpha_prod[step_index])
        return ddim_step(
            latents,
            epsilon,
            alpha_prod[step_index],
            alpha_prod_prev[step_index],
            eta=eta,
            prev_sample=prev_sample,
            generator=generator,
        )

    def diffusion_loss(self, denoiser, x0, conditioning, step_index, noise):
        r"""
        The UNet's training loss at the rollout's timestep `t`: with `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise`
        (`DDIMScheduler.add_noise`), `||f(x_t, t) - target||^2` with target `noise` (epsilon) or `sqrt(a_t) noise -
        sqrt(1 - a_t) x0` (v-prediction). With `settings.data_loss_weighting == "edm"` it is weighted by EDM's
        `(s^2 + 1) / s^2` on the x0 error (`1 / a_t` on the epsilon MSE, 1 on the v MSE; see
        [`~trl_ddrl.losses.ddpm_edm_weight`]). Returns `[B]`.
        """
        timesteps, alpha_prod, _ = self._schedule()
        x0, noise = x0.float(), noise.float()
        a = broadcast_per_sample(alpha_prod[step_index], x0)
        noisy = torch.sqrt(a) * x0 + torch.sqrt(1 - a) * noise
        output = self.noise_prediction(denoiser, noisy, timesteps[step_index], positive_conditioning(conditioning))
        target = noise if self.prediction_type == "epsilon" else torch.sqrt(a) * noise - torch.sqrt(1 - a) * x0
        loss = mse_per_sample(output, target)
        if self.settings.data_loss_weighting == "edm":
            loss = loss * ddpm_edm_weight(alpha_prod[step_index], self.prediction_type)
        return loss

    # ---- VAE and shapes ----------------------------------------------------------------------------------------

    @property
    def resolution(self) -> tuple[int, int]:
        default = self.denoiser.config.sample_size * self.pipeline.vae_scale_factor
        return self.settings.height or default, self.settings.width or default

    @property
    def resolution_multiple(self) -> int:
        # The UNet itself takes any latent size (it forwards upsampling sizes), so only the VAE constrains it.
        return self.pipeline.vae_scale_factor

    def latent_shape(self) -> tuple[int, ...]:
        height, width = self.resolution
        factor = self.pipeline.vae_scale_factor
        return (self.denoiser.config.in_channels, height // factor, width // factor)

    def _latent_statistics(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The VAE's per-channel latent mean and std (SDXL-style configs), or `(0, 1)`, shaped like `like`."""
        config = self.pipeline.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return 0.0, 1.0
        shape = (1, -1, *([1] * (like.ndim - 2)))
        mean, std = (torch.tensor(values, dtype=like.dtype, device=like.device).view(shape) for values in (mean, std))
        return mean, std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = latents.to(vae.device, vae.dtype)
        mean, std = self._latent_statistics(latents)
        images = vae.decode(latents * std / vae.config.scaling_factor + mean, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_pixels(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None, mode: bool = False
    ) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = posterior_latents(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist, generator, mode)
        mean, std = self._latent_statistics(latents)
        return ((latents - mean) * vae.config.scaling_factor / std).float()


class StableDiffusionAdapter(DDIMAdapter):
    """
    `StableDiffusionPipeline` (SD 1.x / 2.x): one CLIP text encoder whose last hidden states condition the UNet by
    cross-attention. Conditioning: `prompt_embeds` `[B, L, D]` (and `negative_prompt_embeds` with CFG).
    """

    pipeline_class_names = ("StableDiffusionPipeline",)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        use_cfg = self.settings.guidance_scale > 1.0
        embeds, negative_embeds = self.pipeline.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=use_cfg
        )
        conditioning = {"prompt_embeds": embeds}
        if use_cfg:
            conditioning["negative_prompt_embeds"] = negative_embeds
        return conditioning

    def noise_prediction(self, denoiser, latents, timestep, conditioning):
        embeds = conditioning["prompt_embeds"]
        return denoiser(latents.to(embeds.dtype), timestep, encoder_hidden_states=embeds, return_dict=False)[0]


class StableDiffusionXLAdapter(DDIMAdapter):
    """
    `StableDiffusionXLPipeline`: two CLIP text encoders whose penultimate hidden states are concatenated
    (`prompt_embeds` `[B, L, D1 + D2]`); the second one's pooled projection (`pooled_prompt_embeds` `[B, P]`) and the
    size conditioning (`add_time_ids` `[B, 6]`: original size, crop top-left, target size, all the sample's resolution
    with no crop) go to the UNet's `added_cond_kwargs`. With CFG, `negative_*` versions of the three.
    """

    pipeline_class_names = ("StableDiffusionXLPipeline",)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        use_cfg = self.settings.guidance_scale > 1.0
        embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=use_cfg
        )
        encoder_2 = self.pipeline.text_encoder_2
        projection_dim = encoder_2.config.projection_dim if encoder_2 is not None else int(pooled.shape[-1])
        height, width = self.resolution
        time_ids = self.pipeline._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=embeds.dtype, text_encoder_projection_dim=projection_dim
        )
        time_ids = time_ids.to(device).expand(len(prompts), -1)
        conditioning = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "add_time_ids": time_ids}
        if use_cfg:
            conditioning.update(
                negative_prompt_embeds=negative_embeds,
                negative_pooled_prompt_embeds=negative_pooled,
                negative_add_time_ids=time_ids,
            )
        return conditioning

    def noise_prediction(self, denoiser, latents, timestep, conditioning):
        embeds = conditioning["prompt_embeds"]
        return denoiser(
            latents.to(embeds.dtype),
            timestep,
            encoder_hidden_states=embeds,
            added_cond_kwargs={
                "text_embeds": conditioning["pooled_prompt_embeds"],
                "time_ids": conditioning["add_time_ids"],
            },
            return_dict=False,
        )[0]
