# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the DDRL trainer."""

import math
import warnings
from dataclasses import dataclass, field

import torch
from trl.trainer.base_config import _BaseConfig

from .config_checks import check_output_dir, validate_types, warmup_warning
from .sde_window import SDE_WINDOW_POSITION_CHOICES, resolve_sde_window_range


SCALE_REWARDS_CHOICES = ("group", "batch", "none")
DATA_NOISE_CHOICES = ("rollout", "independent")
MULTI_OBJECTIVE_CHOICES = ("normalize_then_average", "sum_then_normalize", "normalize_then_sum")
REWARD_ERROR_POLICY_CHOICES = ("raise", "drop_group", "group_mean")
DATA_LATENTS_CHOICES = ("sample", "mean")
DATA_SOURCE_CHOICES = ("dataset", "base_model")
LOG_RATIO_FORM_CHOICES = ("edm_squared_distance", "gaussian")
KL_FORM_CHOICES = ("edm_squared_distance", "gaussian")
DATA_LOSS_WEIGHTING_CHOICES = ("edm", "uniform")
TRAIN_TIMESTEP_SELECTION_CHOICES = ("fixed", "random")
SAMPLER_CHOICES = ("auto", "flow_sde", "churn", "cps", "ddim")
TRAIN_EXPERTS_CHOICES = ("all", "high_noise", "low_noise")
GUIDANCE_UNCONDITIONAL_CHOICES = ("negative_prompt", "zeros")
CONTEXT_PARALLEL_METHOD_CHOICES = ("ulysses", "ring")


def resolve_train_timesteps(num_inference_steps: int, fraction: float, explicit: list[int] | None) -> list[int]:
    """
    Indices of the sampling steps whose transitions are trained on.

    The last step (index `num_inference_steps - 1`) lands on sigma = 0 and is sampled deterministically, so its
    transition has no likelihood and is never trained. With `explicit` unset, `ceil(fraction * (num_inference_steps -
    1))` indices are spread evenly over `[0, num_inference_steps - 2]`: `fraction=0.5` with 20 steps gives
    `[0, 2, 4, ..., 18]`, the authors' "every other step".

    Args:
        num_inference_steps (`int`): Number of sampling steps of a rollout.
        fraction (`float`): Fraction of the stochastic steps to train on, in `(0, 1]`.
        explicit (`list[int]` or `None`): Explicit step indices; overrides `fraction`.

    Returns:
        `list[int]`: Sorted, unique step indices.
    """
    last_trainable = num_inference_steps - 2
    if explicit:
        indices = sorted(set(int(i) for i in explicit))
        bad = [i for i in indices if i < 0 or i > last_trainable]
        if bad:
            raise ValueError(
                f"train_timesteps={explicit} contains {bad}, outside [0, {last_trainable}]: with "
                f"num_inference_steps={num_inference_steps} the final step {num_inference_steps - 1} is deterministic "
                "(variance 0) and cannot be trained. Use step indices between 0 and num_inference_steps - 2."
            )
        return indices
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_timestep_fraction={fraction} must be in (0, 1]; 0.5 trains every other step.")
    num_trainable = last_trainable + 1
    count = min(num_trainable, math.ceil(round(fraction * num_trainable, 6)))
    if count == 1:
        return [0]
    return sorted({round(i * last_trainable / (count - 1)) for i in range(count)})


@dataclass
class DDRLConfig(_BaseConfig):
    r"""
    Configuration class for the [`DDRLTrainer`].

    DDRL (Data-regularized Diffusion Reinforcement Learning, [arXiv 2512.04332](https://huggingface.co/papers/2512.04332))
    maximises a reward with a clipped policy-gradient objective over the Gaussian transitions of a stochastic sampler,
    regularised by the ordinary diffusion (flow-matching) loss on off-policy data instead of a reverse KL on the
    policy's own samples. Setting `data_beta=0` and `kl_beta>0` gives the Flow-GRPO / DanceGRPO baseline from the same
    code.

    Only the parameters specific to DDRL are listed here; see [`~transformers.TrainingArguments`] for the rest.

    One RL iteration draws `prompts_per_step` prompts (across all processes), rolls each out `num_generations` times,
    scores the samples and turns every (sample, trained step) pair into a *transition*. The transitions are shuffled
    and split into micro-batches of `per_device_train_batch_size` transitions; `gradient_accumulation_steps` micro-batches
    make one optimizer step (by default one optimizer step per iteration).

    Parameters:
        > Parameters that control the model

        model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments for [`~diffusers.DiffusionPipeline.from_pretrained`], used when the `model` argument of
            the [`DDRLTrainer`] is a string (for example `{"torch_dtype": "bfloat16"}`).
        train_experts (`str`, *optional*, defaults to `"all"`):
            Which experts of a two-expert denoiser train (Wan 2.2 A14B: `transformer` computes the steps with
            timestep `>= boundary_ratio * num_train_timesteps`, `transformer_2` the others). `"all"`: both (and the
            single denoiser of every other model). `"high_noise"` / `"low_noise"`: only `transformer` /
            `transformer_2`; the other expert is frozen (it still samples its steps), and only the sampling steps of
            the trained expert are trained: `train_timesteps` outside its range are dropped (an error if none is
            left) and an unset `sde_window_range` becomes its range. Needs `train_timestep_selection="fixed"`.
        activation_checkpointing (`bool`, *optional*, defaults to `True`):
            Recompute each denoiser block's activations during the backward pass instead of storing them (diffusers'
            gradient checkpointing), as TRL's trainers do by default. At the recipe settings the replay's stored
            activations are the largest memory term (SD3.5-Medium, 512 px, 8 transitions per micro-batch: ~54 GiB
            without, ~8 GiB with); the cost is ~20-30% more replay compute. Unset means on, unless the deprecated
            alias `gradient_checkpointing` is set; set `False` for small models (the digits job does). Estimate the
            memory of a configuration before launching with `trl-ddrl estimate-memory` (see docs/memory.md).

        > Parameters that control the rollouts

        num_generations (`int`, *optional*, defaults to `8`):
            Group size: number of samples drawn for each prompt. Advantages are computed within each group.
        prompts_per_step (`int`, *optional*, defaults to `4`):
            Number of distinct prompts per RL iteration, across all processes.
        rollout_batch_size (`int`, *optional*):
            Number of samples denoised at once on each process. Defaults to half of the iteration's samples on that
            process when a reward model (an `nn.Module`) or a reward server client is among the rewards and
            `async_rewards` is on, so that the first half is scored while the second is sampled; to all of them
            otherwise (cheap reward functions have nothing worth overlapping).
        num_inference_steps (`int`, *optional*, defaults to `20`):
            Number of sampling steps of a rollout.
        train_timesteps (`list[int]`, *optional*):
            Explicit indices of the sampling steps to train on (0 is the noisiest). Overrides
            `train_timestep_fraction`. The final step is deterministic and can never be trained. After
            initialisation it holds the resolved indices, or `None` with `sde_window_size` (the window is trained);
            `num_trained_steps` holds their number in both cases.
        train_timestep_fraction (`float`, *optional*, defaults to `0.5`):
            Fraction of the stochastic sampling steps to train on, evenly spread: `0.5` trains every other step.
        sampler (`str`, *optional*, defaults to `"auto"`):
            The stochastic sampler of the rollouts. `"churn"`: the authors' EDM sampler with churn around a
            second-order Adams-Bashforth solver, every step stochastic but the final one to the clean sample
            ([`~trl_ddrl.sampling.edm_churn_step`]; flow-matching families). `"flow_sde"`: Euler-Maruyama steps of the
            reverse SDE (Flow-GRPO's `sde`, [`~trl_ddrl.sampling.flow_sde_step`]). `"cps"`: coefficients-preserving
            sampling (Flow-GRPO's `sde_type="cps"`, arXiv 2509.05952): each step keeps the flow's signal and noise
            coefficients exactly and replaces a `sin(eta * pi / 2)` share of the noise with fresh noise; needs `eta <=
            1` (Flow-GRPO uses 0.8). `"ddim"`: DDIM with `eta > 0` (epsilon / v-prediction UNets, their only choice).
            `"auto"` takes the family's default: `"churn"` for Cosmos Predict2 / Predict2.5 (the authors' model),
            `"flow_sde"` for the other flow families, `"ddim"` for the UNets. The trainer writes the resolved name
            back into this field.
        eta (`float`, *optional*):
            Noise level of the sampler; must be positive (a deterministic sampler has no likelihood to optimise).
            Unset, the sampler's default, written back by the trainer: the authors' churn `min(1 /
            (num_inference_steps + 1), sqrt(1.2) - 1)` (1/21 for 20 steps) for `"churn"`, Flow-GRPO's `0.7` for
            `"flow_sde"` and `"cps"`, DDPO's `1.0` for `"ddim"`.
        guidance_scale (`float`, *optional*, defaults to `1.0`):
            Classifier-free guidance scale during rollouts. `1.0` disables CFG, as in the authors' release.
        guidance_scale_2 (`float`, *optional*):
            CFG scale of the low-noise expert's steps of a two-expert denoiser (Wan 2.2 A14B, the pipeline's
            `guidance_scale_2`; its examples use 4.0 / 3.0). Unset: `guidance_scale`, as in the pipeline. Only used
            when `guidance_scale > 1` (CFG on).
        guidance_unconditional (`str`, *optional*, defaults to `"negative_prompt"`):
            The unconditional branch of classifier-free guidance, wherever CFG runs (rollouts with `guidance_scale >
            1`, evaluation with `eval_guidance_scale > 1`). `"negative_prompt"`: the pipeline's default negative
            prompt. `"zeros"`: the prompt embeddings zeroed (the way `data_text_dropout` zeroes them; other
            conditioning such as given frames is kept), the authors' unconditional branch for Cosmos (cosmos-rl's
            text conditioner at dropout rate 1, `use_negative_prompt = false`); the Cosmos families only, others refuse
            it when the adapter is built.
        height (`int`, *optional*):
            Height of the samples in pixels. Defaults to the pipeline's default.
        width (`int`, *optional*):
            Width of the samples in pixels. Defaults to the pipeline's default.
        num_frames (`int`, *optional*):
            Number of frames for video pipelines. Ignored by image pipelines.
        max_sequence_length (`int`, *optional*):
            Maximum prompt length in tokens for the pipeline's text encoders. Defaults to the pipeline's default.
        num_conditioning_frames (`int`, *optional*):
            Ground-truth frames each video continues, taken from each row's `image_column` (an image or a clip), for
            pipelines with several modes. Cosmos Predict2.5: `0` text-to-world (the default), `1` image-to-world, `5`
            video-to-world (two latent frames). Defaults to the family's own (Cosmos Predict2 Video2World: 1).
        num_conditioning_frames_choices (`list[int]`, *optional*):
            Mix the modes: each group (the `num_generations` rollouts of a prompt, whose advantages are normalised
            together) draws its `num_conditioning_frames` uniformly among these values, from a generator seeded by
            `seed` and the iteration (the same after a resume); its data-term rows are conditioned the same way, on
            the first frames of their own videos. The authors' Cosmos-Predict2.5 recipe: `[0, 1]`, text- or
            image-to-world (cosmos-rl's `min/max_num_conditional_frames = 0, 1` in latent frames; 5 frames are two
            latent frames). Only for families with several modes (Cosmos Predict2.5); excludes
            `num_conditioning_frames`. Evaluation draws one mode per held-out prompt, seeded by `eval_seed`.

        > Parameters that control the SDE window

        sde_window_size (`int`, *optional*):
            Make only this many consecutive sampling steps stochastic and train on exactly those (Flow-GRPO-Fast,
            MixGRPO); the other steps use the deterministic sampler (`eta = 0`). Replaces `train_timesteps` and
            `train_timestep_fraction`, which must then stay unset / default. Unset: every step but the last is
            stochastic and `train_timesteps` are trained.
        sde_window_position (`str`, *optional*, defaults to `"random"`):
            Where the window lies in each RL iteration: `"random"` draws its first step per iteration, seeded by
            `seed` and the iteration (Flow-GRPO-Fast); `"sliding"` starts at the range's first step and moves one step
            later every `sde_window_shift_every` iterations, wrapping around (MixGRPO). Both resume exactly.
        sde_window_range (`list[int]`, *optional*):
            Half-open range `[first, end)` of the steps the window may cover. Defaults to every stochastic step,
            `[0, num_inference_steps - 1)`; Flow-GRPO-Fast uses `[0, num_inference_steps // 2]`.
        sde_window_shift_every (`int`, *optional*, defaults to `1`):
            Iterations between two moves of a `"sliding"` window.
        sde_window_share_prefix (`bool`, *optional*, defaults to `False`):
            Start all samples of a group from the same initial noise, so that the deterministic steps before the
            window are identical within the group and are computed once per prompt instead of `num_generations`
            times. The group's samples then differ only by the window's noise. Needs `sde_window_size`.

        > Parameters that control the loss

        data_beta (`float`, *optional*, defaults to `0.01`):
            Weight of the diffusion loss on data (the forward-KL regulariser of DDRL). `0` disables it.
        kl_beta (`float`, *optional*, defaults to `0.0`):
            Weight of the reverse-KL penalty to the reference model, measured on the policy's own transitions
            (Flow-GRPO style). A reference model is created only when this is positive.
        clip_range (`float`, *optional*, defaults to `1e-4`):
            PPO clipping range of the per-step likelihood ratio. Log-likelihoods are averaged over dimensions, so the
            ratio moves little and the range is small.
        advantage_clip (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to `[-advantage_clip, advantage_clip]`.
        exp_advantage (`bool`, *optional*, defaults to `False`):
            Apply the transform `A -> -exp(-A)` to the normalised advantages before clipping. It weighs bad samples
            more than good ones.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            How to scale the centred rewards: `"group"` divides by the group's standard deviation, `"batch"` by the
            whole batch's, `"none"` does not scale.
        multi_objective_aggregation (`str`, *optional*, defaults to `"normalize_then_average"`):
            With several reward functions: `"normalize_then_average"` normalises each reward within its group and
            takes the weighted mean of these advantages (with unit weights, the authors' mean of per-reward
            advantages); `"normalize_then_sum"` takes their weighted sum; `"sum_then_normalize"` normalises the
            weighted sum of rewards (TRL's GRPO default).
        reward_weights (`list[float]`, *optional*):
            Weight of each reward function. Defaults to `1.0` for every function.
        async_rewards (`bool`, *optional*, defaults to `True`):
            Score each rollout chunk (`rollout_batch_size` samples) in a background thread while the next chunk is
            being sampled, so reward computation (a reward model, or a remote reward server) overlaps the rollouts.
            Reward functions are still called one at a time. No effect when one chunk holds all the samples (see
            `rollout_batch_size`).
        reward_device (`str`, *optional*):
            Device of the reward models (`nn.Module` rewards and evaluation judges), such as `"cuda:1"` to keep them
            off the sampling GPU; the training device by default. Each rollout chunk's images are copied there. On the
            training GPU itself, reward models run on a CUDA stream of their own (with `async_rewards`), so their
            kernels overlap the sampler's.
        reward_error_policy (`str`, *optional*, defaults to `"raise"`):
            What to do when a reward function raises, times out or returns NaN, None or a wrong number of values:
            `"raise"` stops with an error naming the function and prompt; `"drop_group"` gives the failing group's
            samples a zero advantage, counts them in the `reward/dropped_groups` metric, logs which groups and why,
            and goes on (see `max_dropped_rollouts`); `"group_mean"` (the authors', cosmos-rl `t2v_model.py`
            `_sync_rewards_across_rollouts`) replaces each failed sample's reward by the mean of its group's valid
            ones (a group with none gets zero advantages, as with `"drop_group"`).
        reward_clip (`float`, *optional*):
            Clamp every reward to `[-reward_clip, reward_clip]` before the advantages. The authors clamp their reward
            server's scores to `[-5, 5]` (`RemoteRewardConfig.reward_clip_min/max`). Unset: no clamping.
        max_dropped_rollouts (`int`, *optional*, defaults to `1`):
            With `reward_error_policy="drop_group"` or `"group_mean"`: the run fails with the reward errors once this
            many rollouts in a row had every group dropped (with 1, the first such rollout fails it), instead of
            training on nothing.
        reward_timeout (`float`, *optional*, defaults to `1800.0`):
            Seconds one call of a reward function may run before it fails with an error naming the function (then
            handled by `reward_error_policy`); a call running longer than a minute is reported every minute. `None`
            waits for ever. The default lets a `RemoteReward` exhaust its own retries (4 x 300 s) first.
        num_iterations (`int`, *optional*, defaults to `1`):
            Number of passes over the transitions of one iteration (the PPO epochs, GRPO's mu).

        > Parameters that follow the authors' recipe (see docs/fidelity.md; each default is the released DDRL
        > recipe, the alternative is Flow-GRPO's form)

        log_ratio_form (`str`, *optional*, defaults to `"edm_squared_distance"`):
            The per-step log-likelihood whose difference gives the policy ratio. `"edm_squared_distance"` (the
            authors'): `-mean((x_next - mu)^2)` in EDM coordinates (`x_edm = x_t / (1 - t_next)` for flow models,
            `x / sqrt(alpha_bar_next)` for DDIM models), so `log r = -mean((x - mu_theta)^2) + mean((x -
            mu_old)^2)`. `"gaussian"` (Flow-GRPO's): the Gaussian log-density, i.e. the squared distance divided by
            `2 std^2` in the sampler's own coordinates.
        kl_form (`str`, *optional*, defaults to `"edm_squared_distance"`):
            The reverse-KL penalty of `kl_beta`: `"edm_squared_distance"` (the authors') is `mean((mu_ref - mu)^2)`
            in EDM coordinates; `"gaussian"` (Flow-GRPO's) is `mean((mu_ref - mu)^2) / (2 std^2)`.
        data_loss_weighting (`str`, *optional*, defaults to `"edm"`):
            Weighting of the data term over noise levels. `"edm"` (the authors'): EDM's `(sigma^2 + 1) / sigma^2` on
            the x0 error, which is `(1 - t)^2 + t^2` times the velocity MSE of flow models, `1 / alpha_bar` times
            the epsilon MSE and exactly the v MSE of DDIM models. `"uniform"`: the family's plain training loss.
        loss_scale (`float`, *optional*, defaults to `10.0`):
            The loss is multiplied by this before the backward pass, so gradient clipping at `max_grad_norm` acts on
            the scaled gradient (the authors' `loss_scale=10` with `clip_norm=1`). The Trainer's logged `loss` is the
            scaled one; `loss/policy`, `loss/data` and `kl` are logged unscaled. With AdamW the scale changes nothing
            else (the update is invariant to it, up to `adam_epsilon`).
        train_timestep_selection (`str`, *optional*, defaults to `"fixed"`):
            `"fixed"`: train the steps of `train_timesteps` every iteration (the authors' DDRL recipe). `"random"`:
            each iteration trains a fresh random subset of the stochastic steps of the same size, seeded by `seed`
            and the iteration (so a resumed run draws the same subsets); the authors' `-1` entries of `train_on`.
        same_initial_noise (`bool`, *optional*, defaults to `False`):
            All samples of a group start from the same initial noise (the authors' `use_same_seed`, Flow-GRPO's
            `same_latent`), so that they differ only by the sampler's noise. The released DDRL recipe sets it off.
        karras_sigmas (`list[float]`, *optional*):
            `[sigma_max, sigma_min, rho]`: sample flow-matching models on EDM's Karras noise levels instead of the
            pipeline scheduler's: `num_inference_steps - 1` steps between `num_inference_steps` Karras levels (EDM
            sigmas, flow `t = s / (1 + s)`), then a last, deterministic step from `sigma_min` to the clean sample. The
            authors' Cosmos Predict2.5 recipe is `[200, 0.01, 7]` with `num_inference_steps=21` (their 20 churned
            steps and `sample_clean`; `SDEConfig`, `Sampler.forward`); the default churn `eta` is then `1 /
            num_inference_steps`. Unset: the scheduler's levels.

        > Parameters that control the data term

        data_source (`str`, *optional*, defaults to `"dataset"`):
            Where the data term's clean samples come from. `"dataset"`: images or videos of `data_dataset` or of
            `train_dataset`'s `image_column`. `"base_model"`: synthetic samples of the base model for the iteration's
            own prompts (deterministic sampler, one per prompt, cached), the paper's choice when no real data is at
            hand. They are drawn with the reference model: under LoRA the adapter-disabled denoiser, otherwise a
            frozen copy of the denoiser (one more copy in memory).
        data_noise (`str`, *optional*, defaults to `"rollout"`):
            Noise of the data term. `"rollout"` noises the data sample to the sigma of the trained transition with the
            rollout's own initial noise; `"independent"` draws fresh noise.
        data_on_first_step_only (`bool`, *optional*, defaults to `False`):
            Compute the data term only on the first trained step of each sample, which saves one forward pass per
            trained step.
        separate_data_backward (`bool`, *optional*, defaults to `True`):
            In a micro-batch with data rows, run the data term's forward and backward before the policy term's
            forward: the two forwards' activations never coexist, and autograd does not hold the data term's gradient
            of every trained weight until the policy term's backward reaches that weight (a whole unsharded copy of
            the trained weights' gradients: `2 x` parameters bytes per GPU under FSDP2, `4 x` with float32 master
            weights). The gradients are the same sum (up to the order of floating-point additions); the cost is a
            second backward pass per such micro-batch (a second gradient reduce-scatter under FSDP2). `False`: one
            backward of the summed loss, as cosmos-rl does. Under DeepSpeed, whose engine steps inside its backward,
            the backward is always one.
        data_text_dropout (`float`, *optional*, defaults to `0.0`):
            Probability that a data-term sample loses its prompt: its prompt embeddings (every conditioning tensor
            whose name holds `embeds`, masks kept) are zeroed, so that the unconditional branch that CFG evaluates
            also gets the data regularisation. The authors' Cosmos recipe drops 20% (`dropout_rate = 0.2` of the text
            conditioner, whose dropout zeroes the embedding).
        data_latents (`str`, *optional*, defaults to `"sample"`):
            Latents of the data term's images/videos: `"sample"` draws from the VAE posterior, `"mean"` takes its
            mean (the authors': their tokenizer encodes to the mean). Conditioning frames always use the mean.
        image_column (`str`, *optional*, defaults to `"image"`):
            Column holding the data images (PIL images, arrays, tensors or file paths) or videos of the data term, in
            `train_dataset` or `data_dataset`.
        caption_column (`str`, *optional*, defaults to `"prompt"`):
            Column of `data_dataset` holding the captions of the data term.
        source_image_column (`str`, *optional*, defaults to `"source_image"`):
            Image editing (Qwen-Image-Edit): column holding each row's source image, in `train_dataset` (rollouts edit
            it; reward functions receive it as a keyword argument) and in the data rows, whose `image_column` then
            holds the edited target image.

        > Parameters that control the reference model

        update_ref_every (`int`, *optional*):
            Copy the policy into the reference model every this many optimizer steps. Only meaningful with
            `kl_beta > 0`.

        > Parameters that control the EMA of the weights

        use_ema (`bool`, *optional*, defaults to `True`):
            Keep an exponential moving average (EMA) of the trained weights (the LoRA weights under LoRA), updated
            after every optimizer step, as in the authors' release. It costs one float32 copy of the trained weights
            per process (`1 / world_size` of it under FSDP2 or ZeRO-3, where each process keeps its own shard).
        ema_sigma_rel (`float`, *optional*, defaults to `0.1`):
            Relative width of the power-function EMA profile of EDM2 (the authors' `ema.rate`): the EMA averages
            roughly the last `ema_sigma_rel` fraction of training, with decay `(1 - 1/t) ** (gamma + 1)` at optimizer
            step `t`. In `(0, 0.28]`.
        ema_iteration_shift (`int`, *optional*, defaults to `0`):
            Added to the optimizer step count in the decay formula (the authors' `ema.iteration_shift`); a larger
            shift makes the early EMA average longer.
        ema_decay (`float`, *optional*):
            A constant decay in `[0, 1)` (for example `0.999`) instead of the power-function schedule.
        ema_device (`str`, *optional*):
            Where the EMA lives: unset, on the trained weights' device; `"cpu"`, in host memory (as DanceGRPO and
            Flow-GRPO keep theirs), which frees `4 x trained parameters` bytes on each GPU (`/ world_size` under FSDP2
            or ZeRO-3) at the cost of copying the weights to the host after every optimizer step. Updates and swaps
            go one chunk / one parameter at a time either way (no second copy of the model).
        export_ema_weights (`bool`, *optional*, defaults to `True`):
            `save_model`, `push_to_hub` and the Hub pushes of checkpoints write the EMA weights, as the authors
            release theirs. Checkpoints always keep the raw weights (to resume training) and the EMA state next to
            them. `False` exports the raw weights.

        > Parameters that control context parallelism

        context_parallel_size (`int`, *optional*, defaults to `1`):
            Number of processes that split the token sequence of each sample (diffusers' context parallelism). The
            processes form a (data-parallel x context-parallel) grid: each group of `context_parallel_size`
            consecutive ranks holds the same samples, so `prompts_per_step * num_generations` must be divisible by
            `world_size / context_parallel_size`. Rewards are computed once per sample. Needs a denoiser that
            diffusers can parallelise (one with a `_cp_plan`: Wan, FLUX, ...), or Cosmos Predict2 / Predict2.5, whose
            plan trl_ddrl supplies. See `docs/context_parallel.md`.
        context_parallel_method (`str`, *optional*, defaults to `"ulysses"`):
            `"ulysses"` (all-to-all over attention heads; the head count must be divisible by
            `context_parallel_size`; runs on every attention backend, CPU included) or `"ring"` (key/value blocks
            passed around the group; needs a CUDA backend that returns the log-sum-exp, such as `"flash"` or
            `"_native_cudnn"`).
        attention_backend (`str`, *optional*):
            diffusers attention backend of the denoiser (`set_attention_backend`), for example `"flash"`,
            `"_native_cudnn"` or `"native"`. Defaults to diffusers' active backend (PyTorch SDPA).

        > Parameters that control memory placement

        prompt_embedding_cache_size (`int`, *optional*, defaults to `0`):
            Prompts whose embeddings are kept, on the CPU, in an LRU cache across iterations (keyed by the prompt,
            the source image when editing, and the autocast state), so that a prompt seen again skips the text
            encoders; training is bit-identical to no cache. Host memory: this many times one prompt's conditioning
            (SD3, 256 tokens, no CFG: ~2.6 MiB). `0` caches nothing. See [`~trl_ddrl.prompt_embeddings`].
        offload_text_encoders (`bool`, *optional*, defaults to `False`):
            Keep the text encoders on the CPU and move them to the accelerator only to encode prompts the cache does
            not hold, freeing their weights (T5-XXL: ~9.5 GiB in bfloat16) for the rest of the iteration, at the
            cost of a host-to-device copy of them per encoding. They stay on the CPU after training: move the
            pipeline (`trainer.pipeline.to("cuda")`) before sampling with it directly.
        precompute_prompt_embeddings (`bool`, *optional*, defaults to `False`):
            Encode every prompt of `train_dataset` and `eval_dataset` (and the captions of `data_dataset` for the
            data term) once before training and keep them for the run, as DanceGRPO does; the text encoders are then
            offloaded (as with `offload_text_encoders`) and run only for a prompt outside the datasets. Host memory:
            the datasets' distinct prompts times one prompt's conditioning. Not for image editing (its conditioning
            depends on each row's source image: use `prompt_embedding_cache_size`).

        offload_trajectories (`bool`, *optional*, defaults to `False`):
            Move each rollout chunk's trained transitions (states before and after each trained step, their means,
            the initial noise, and the churn sampler's previous estimates: `(3 K + 1)` or `(4 K + 1)` float32 latents
            per sample, `K` trained steps) to the CPU, pinned when CUDA is available, as soon as the chunk is
            sampled; each micro-batch's rows are copied back for its replay. Frees the buffer on the accelerator
            (Wan 2.1 at 480p, 81 frames: 8 MiB a latent, 32 samples x 10 trained steps on one GPU: ~7.7 GiB) at the
            cost of a host-to-device copy per micro-batch. Training is unchanged.
        precompute_reference_means (`bool`, *optional*, defaults to `False`):
            With `kl_beta > 0`: compute the reference model's mean of every trained transition once, right after the
            rollout, micro-batch by micro-batch as the replay would (the KL term is bit-identical), instead of a
            reference forward inside every replayed micro-batch, as cosmos-rl does "to reduce memory peak": the
            reference model then runs before the replay, not beside its activations and gradients. Costs
            `S x K x latent bytes` (float32) for the means. Not with `update_ref_every` when one rollout serves
            several optimizer steps (the reference changes between them).
        offload_reference_model (`bool`, *optional*, defaults to `False`):
            Full fine-tuning with `kl_beta > 0` or `data_source="base_model"`: keep the frozen reference copy of the
            denoiser on the CPU and move it to the accelerator only while it runs (once per rollout with
            `precompute_reference_means`, else once per micro-batch), freeing `2 x denoiser parameters` bytes
            (bf16) for the replay. Not with DeepSpeed or FSDP, which shard the reference instead. Under LoRA the
            reference is the adapter-free policy and costs nothing.

        > Parameters that control saving

        save_full_pipeline (`bool`, *optional*, defaults to `True`):
            `save_model` writes the whole diffusers pipeline (loadable with `DiffusionPipeline.from_pretrained`).
            Intermediate checkpoints always hold only the trained weights.

        > Parameters that control evaluation and sample logging

        eval_num_generations (`int`, *optional*, defaults to `4`):
            Samples per prompt of `eval_dataset`, each from its own fixed noise and with the deterministic sampler
            (eta 0), so that evaluations are comparable across steps and runs. `eval_diversity` needs at least 2.
            `per_device_eval_batch_size` is the number of samples denoised at once during evaluation.
        eval_seed (`int`, *optional*, defaults to `0`):
            Seed of the evaluation noise (per prompt and sample) and of the held-out data loss's noise. Independent of
            `seed`, so that runs with different seeds are evaluated on the same noise.
        eval_use_ema (`bool`, *optional*, defaults to `True`):
            Evaluate with the EMA weights (swapped in for the evaluation, then the trained weights restored) when the
            trainer keeps an EMA (`use_ema`), as the authors validate under their EMA. `False` evaluates the trained
            weights. No effect without an EMA, or before training.
        eval_guidance_scale (`float`, *optional*):
            Classifier-free guidance scale of the evaluation's samples (also the evaluation samples sent to the
            trackers), in diffusers' convention `uncond + g (cond - uncond)`; unset: `guidance_scale`. Rollouts keep
            `guidance_scale`. The authors sample Cosmos-Predict2.5 with guidance 7 (2B) / 3 (14B) in their convention
            `cond + g (cond - uncond)`, that is `eval_guidance_scale` 8 / 4. Replaces `guidance_scale` only (a Wan 2.2
            A14B run keeps `guidance_scale_2` for its low-noise expert).
        log_samples_steps (`int`, *optional*, defaults to `50`):
            Every this many optimizer steps, send a grid of the latest training samples and a table of their prompts
            and rewards to every `report_to` tracker that takes media (wandb, tensorboard, trackio, mlflow, comet).
            Evaluation samples are sent with every evaluation. `0` sends none.
        num_samples_to_log (`int`, *optional*, defaults to `16`):
            Samples in each logged grid and table.
    """

    _VALID_DICT_FIELDS = _BaseConfig._VALID_DICT_FIELDS + ["model_init_kwargs"]

    # Overrides of TrainingArguments defaults, following the authors' reference settings.
    learning_rate: float = field(default=1e-5, metadata={"help": "Initial learning rate of AdamW."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (the authors' 1e-4)."})
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW beta2 (the authors' 0.99)."})
    lr_scheduler_type: str = field(
        default="constant_with_warmup",
        metadata={"help": "Learning-rate schedule: the authors warm up linearly, then keep the rate constant."},
    )
    warmup_steps: float = field(
        default=50, metadata={"help": "Linear warm-up optimizer steps (the authors' 50); a float < 1 is a ratio."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every X optimizer steps."})
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute the denoiser's activations in the backward pass (diffusers' gradient checkpointing)."
        },
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute each denoiser block's activations in the backward pass instead of storing them "
            "(diffusers' gradient checkpointing). Unset: on (replay memory ~7x lower at ~20-30 percent more replay compute); "
            "set False for small models.",
            "nargs": "?",
            "const": True,
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing` (diffusers' gradient checkpointing)."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "Train in bf16 mixed precision. Defaults to True on a GPU that supports it, else False."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the prompt and image columns, and any extra column, go to rewards."},
    )
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches per optimizer step. Defaults to all micro-batches of one iteration (one optimizer "
            "step per iteration)."
        },
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Number of transitions (sample, trained step) per micro-batch on each process."}
    )

    # Model
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `DiffusionPipeline.from_pretrained` when `model` is a string."},
    )
    train_experts: str = field(
        default="all",
        metadata={
            "help": "Experts of a two-expert denoiser (Wan 2.2 A14B) that train: 'all', 'high_noise' (transformer) or "
            "'low_noise' (transformer_2); the other is frozen and its sampling steps are not trained."
        },
    )

    # Rollouts
    num_generations: int = field(default=8, metadata={"help": "Group size: samples per prompt."})
    prompts_per_step: int = field(default=4, metadata={"help": "Distinct prompts per RL iteration, all processes."})
    rollout_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Samples denoised at once on each process. Defaults to half of them when a reward model or "
            "server is scored beside the sampling (async_rewards), else to all of them."
        },
    )
    num_inference_steps: int = field(default=20, metadata={"help": "Sampling steps of a rollout."})
    train_timesteps: list[int] | None = field(
        default=None,
        metadata={"help": "Explicit indices of the sampling steps to train on; overrides train_timestep_fraction."},
    )
    train_timestep_fraction: float = field(
        default=0.5, metadata={"help": "Fraction of the stochastic steps to train on; 0.5 = every other step."}
    )
    sampler: str = field(
        default="auto",
        metadata={
            "help": "'churn' (the authors'), 'flow_sde' / 'cps' (Flow-GRPO's), 'ddim', or 'auto' (the family's)."
        },
    )
    eta: float | None = field(
        default=None,
        metadata={
            "help": "Sampler noise level, > 0; unset: 1/(steps+1) for churn, 0.7 for flow_sde/cps, 1.0 for ddim."
        },
    )
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale during rollouts; 1.0 disables CFG."})
    guidance_scale_2: float | None = field(
        default=None,
        metadata={"help": "CFG scale of the low-noise expert's steps (Wan 2.2 A14B); unset: guidance_scale."},
    )
    guidance_unconditional: str = field(
        default="negative_prompt",
        metadata={
            "help": "CFG's unconditional branch: 'negative_prompt' (the pipeline's default) or 'zeros' (zeroed prompt "
            "embeddings, the authors' Cosmos evaluation; Cosmos families only)."
        },
    )
    height: int | None = field(default=None, metadata={"help": "Sample height in pixels (pipeline default)."})
    width: int | None = field(default=None, metadata={"help": "Sample width in pixels (pipeline default)."})
    num_frames: int | None = field(default=None, metadata={"help": "Frames per sample for video pipelines."})
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "Maximum prompt length in tokens (pipeline default)."}
    )

    # Model families
    num_conditioning_frames: int | None = field(
        default=None,
        metadata={
            "help": "Given frames each video continues (Cosmos Predict2.5: 0 text-, 1 image-, 5 video-to-world); "
            "family default."
        },
    )
    num_conditioning_frames_choices: list[int] | None = field(
        default=None,
        metadata={
            "help": "Each group draws num_conditioning_frames uniformly among these (Cosmos Predict2.5; the authors' "
            "recipe: [0, 1], text- or image-to-world per group). Unset: one mode per run."
        },
    )

    # SDE window
    sde_window_size: int | None = field(
        default=None,
        metadata={"help": "Only this many consecutive steps are stochastic and trained (Flow-GRPO-Fast). Unset: all."},
    )
    sde_window_position: str = field(
        default="random",
        metadata={"help": "'random': window drawn per iteration (seeded); 'sliding': moves one step at a time."},
    )
    sde_window_range: list[int] | None = field(
        default=None,
        metadata={"help": "Half-open [first, end) range of steps the window may cover (default: all stochastic)."},
    )
    sde_window_shift_every: int = field(
        default=1, metadata={"help": "Iterations between two moves of a 'sliding' window."}
    )
    sde_window_share_prefix: bool = field(
        default=False,
        metadata={"help": "One initial noise per group: the steps before the window are computed once per prompt."},
    )

    # Loss
    data_beta: float = field(default=0.01, metadata={"help": "Weight of the diffusion loss on data; 0 disables it."})
    kl_beta: float = field(default=0.0, metadata={"help": "Weight of the reverse KL to the reference model."})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clipping range of the likelihood ratio."})
    advantage_clip: float = field(
        default=5.0, metadata={"help": "Clip advantages to [-advantage_clip, advantage_clip]."}
    )
    exp_advantage: bool = field(default=False, metadata={"help": "Transform advantages with A -> -exp(-A)."})
    scale_rewards: str = field(
        default="group", metadata={"help": "Scale centred rewards by the std of the group, the batch, or none."}
    )
    multi_objective_aggregation: str = field(
        default="normalize_then_average",
        metadata={
            "help": "With several rewards: 'normalize_then_average' (the authors'), 'normalize_then_sum' or "
            "'sum_then_normalize'."
        },
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each reward function (defaults to 1.0 each)."}
    )
    async_rewards: bool = field(
        default=True,
        metadata={"help": "Score each rollout chunk in a background thread while the next chunk is sampled."},
    )
    reward_device: str | None = field(
        default=None,
        metadata={"help": "Device of the reward models, such as 'cuda:1'; the training device by default."},
    )
    reward_error_policy: str = field(
        default="raise",
        metadata={
            "help": "On a failing reward: 'raise' (default), 'drop_group' (zero advantage, counted) or 'group_mean' "
            "(the group's mean valid reward, the authors')."
        },
    )
    reward_clip: float | None = field(
        default=None,
        metadata={"help": "Clamp every reward to [-reward_clip, reward_clip] (the authors' reward server: 5)."},
    )
    max_dropped_rollouts: int = field(
        default=1,
        metadata={"help": "With drop_group: fail after this many rollouts in a row with every group dropped."},
    )
    reward_timeout: float | None = field(
        default=1800.0,
        metadata={"help": "Seconds one reward call may run before it fails naming the reward; None for no limit."},
    )
    num_iterations: int = field(default=1, metadata={"help": "Passes over the transitions of one iteration."})

    # Fidelity to the authors' recipe (docs/fidelity.md)
    log_ratio_form: str = field(
        default="edm_squared_distance",
        metadata={"help": "Policy log-ratio: 'edm_squared_distance' (the authors') or 'gaussian' (Flow-GRPO's)."},
    )
    kl_form: str = field(
        default="edm_squared_distance",
        metadata={"help": "Reverse KL: 'edm_squared_distance' (the authors') or 'gaussian' (Flow-GRPO's)."},
    )
    data_loss_weighting: str = field(
        default="edm", metadata={"help": "Data-term weighting: 'edm' (the authors') or 'uniform'."}
    )
    loss_scale: float = field(
        default=10.0, metadata={"help": "Multiply the loss by this before backward and gradient clipping."}
    )
    train_timestep_selection: str = field(
        default="fixed",
        metadata={"help": "'fixed': train_timesteps every iteration; 'random': a seeded random subset of that size."},
    )
    same_initial_noise: bool = field(
        default=False, metadata={"help": "All samples of a group start from the same initial noise."}
    )
    karras_sigmas: list[float] | None = field(
        default=None,
        metadata={
            "help": "[sigma_max, sigma_min, rho]: sample on EDM Karras levels then denoise (authors' Cosmos: [200, "
            "0.01, 7] with num_inference_steps=21). Unset: the scheduler's levels."
        },
    )

    # Data term
    data_source: str = field(
        default="dataset",
        metadata={"help": "'dataset': real images/videos; 'base_model': cached synthetic samples of the base model."},
    )
    data_noise: str = field(
        default="rollout",
        metadata={"help": "'rollout': data noised at the rollout's sigma with its initial noise; 'independent'."},
    )
    data_on_first_step_only: bool = field(
        default=False, metadata={"help": "Compute the data term only on each sample's first trained step."}
    )
    separate_data_backward: bool = field(
        default=True,
        metadata={
            "help": "Backpropagate the data term before the policy term's forward (two backward passes per micro-batch "
            "with data rows): less memory, same gradients. False: one backward of the summed loss (cosmos-rl)."
        },
    )
    data_text_dropout: float = field(
        default=0.0,
        metadata={"help": "Probability of zeroing a data-term sample's prompt embeddings (the authors' Cosmos: 0.2)."},
    )
    data_latents: str = field(
        default="sample", metadata={"help": "Data latents: 'sample' of the VAE posterior or its 'mean' (authors')."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the data images or videos."})
    caption_column: str = field(default="prompt", metadata={"help": "Column of data_dataset holding the captions."})

    # Image editing
    source_image_column: str = field(
        default="source_image",
        metadata={"help": "Image editing: column of each row's source image (the data rows' targets: image_column)."},
    )

    # Reference model
    update_ref_every: int | None = field(
        default=None, metadata={"help": "Copy the policy into the reference model every N optimizer steps."}
    )

    # EMA of the weights
    use_ema: bool = field(
        default=True,
        metadata={"help": "Keep an EMA of the trained weights (as the authors); exports use it by default."},
    )
    ema_sigma_rel: float = field(
        default=0.1, metadata={"help": "Relative width of the power-function EMA (the authors' ema.rate), (0, 0.28]."}
    )
    ema_iteration_shift: int = field(
        default=0, metadata={"help": "Added to the optimizer step count in the EMA decay (ema.iteration_shift)."}
    )
    ema_decay: float | None = field(
        default=None, metadata={"help": "Constant EMA decay in [0, 1) instead of the power-function schedule."}
    )
    ema_device: str | None = field(
        default=None,
        metadata={
            "help": "Where the EMA lives: unset = the weights' device; 'cpu' = host memory (frees the GPU copy)."
        },
    )
    export_ema_weights: bool = field(
        default=True,
        metadata={"help": "save_model / push_to_hub write the EMA weights; False writes the raw trained weights."},
    )

    # Context parallelism
    context_parallel_size: int = field(
        default=1, metadata={"help": "Processes that split the token sequence of each sample (diffusers CP)."}
    )
    context_parallel_method: str = field(
        default="ulysses", metadata={"help": "'ulysses' (all-to-all over heads) or 'ring' (needs a flash backend)."}
    )
    attention_backend: str | None = field(
        default=None, metadata={"help": "diffusers attention backend of the denoiser, e.g. 'flash', '_native_cudnn'."}
    )

    # Memory placement
    prompt_embedding_cache_size: int = field(
        default=0,
        metadata={"help": "Prompts whose embeddings are cached on the CPU across iterations (LRU); 0 = no cache."},
    )
    offload_text_encoders: bool = field(
        default=False,
        metadata={"help": "Keep the text encoders on the CPU; move them to the GPU only to encode uncached prompts."},
    )
    precompute_prompt_embeddings: bool = field(
        default=False,
        metadata={"help": "Encode every dataset prompt once before training, then offload the text encoders."},
    )
    offload_trajectories: bool = field(
        default=False,
        metadata={
            "help": "Keep the rollout's trained transitions in (pinned) CPU memory; copy each micro-batch back."
        },
    )
    precompute_reference_means: bool = field(
        default=False,
        metadata={"help": "kl_beta > 0: reference means computed once after the rollout, not in every replay."},
    )
    offload_reference_model: bool = field(
        default=False,
        metadata={"help": "Keep the frozen reference denoiser on the CPU; on the GPU only while it runs."},
    )

    # Saving
    save_full_pipeline: bool = field(
        default=True, metadata={"help": "save_model writes the whole diffusers pipeline, not only the denoiser."}
    )

    # Evaluation and sample logging
    eval_num_generations: int = field(
        default=4, metadata={"help": "Samples per eval prompt, each from fixed noise with the deterministic sampler."}
    )
    eval_seed: int = field(default=0, metadata={"help": "Seed of the evaluation noise, independent of `seed`."})
    eval_use_ema: bool = field(
        default=True,
        metadata={
            "help": "Evaluate with the EMA weights when there is an EMA (the authors validate under their EMA)."
        },
    )
    eval_guidance_scale: float | None = field(
        default=None,
        metadata={"help": "CFG scale of evaluation samples (diffusers' convention); unset: guidance_scale."},
    )
    log_samples_steps: int = field(
        default=50,
        metadata={"help": "Send a sample grid and table to the media trackers every N optimizer steps; 0 = never."},
    )
    num_samples_to_log: int = field(default=16, metadata={"help": "Samples in each logged grid and table."})

    def __post_init__(self):
        validate_types(self)  # wrong types and NaNs first, naming the field (trl_ddrl/config_checks.py)
        check_output_dir(self.output_dir)
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.fp16
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # as TRL's trainers: the replay's activations dominate memory
        derive_gradient_accumulation = self.gradient_accumulation_steps is None
        if derive_gradient_accumulation:
            self.gradient_accumulation_steps = 1
        super().__post_init__()
        if self.activation_checkpointing is None:
            # transformers < 5.2x has no `activation_checkpointing` of its own to resolve from the alias.
            self.activation_checkpointing = bool(self.gradient_checkpointing)

        self._check_choice("scale_rewards", SCALE_REWARDS_CHOICES)
        self._check_choice("data_noise", DATA_NOISE_CHOICES)
        self._check_choice("data_source", DATA_SOURCE_CHOICES)
        self._check_choice("multi_objective_aggregation", MULTI_OBJECTIVE_CHOICES)
        self._check_choice("reward_error_policy", REWARD_ERROR_POLICY_CHOICES)
        self._check_choice("sampler", SAMPLER_CHOICES)
        self._check_choice("sde_window_position", SDE_WINDOW_POSITION_CHOICES)
        self._check_choice("log_ratio_form", LOG_RATIO_FORM_CHOICES)
        self._check_choice("kl_form", KL_FORM_CHOICES)
        self._check_choice("data_loss_weighting", DATA_LOSS_WEIGHTING_CHOICES)
        self._check_choice("train_timestep_selection", TRAIN_TIMESTEP_SELECTION_CHOICES)
        self._check_choice("train_experts", TRAIN_EXPERTS_CHOICES)
        self._check_choice("guidance_unconditional", GUIDANCE_UNCONDITIONAL_CHOICES)
        self._check_choice("data_latents", DATA_LATENTS_CHOICES)
        self._check_recipe_options()
        if not self.loss_scale > 0:
            raise ValueError(f"loss_scale={self.loss_scale} must be > 0 (the authors use 10; 1 disables scaling).")
        self._check_positive("num_generations", minimum=2, why="advantages compare samples within a group")
        self._check_positive("prompts_per_step")
        self._check_positive("num_inference_steps", minimum=2, why="the last step is deterministic")
        self._check_positive("num_iterations")
        self._check_positive("per_device_train_batch_size")
        if self.eta is not None and self.eta <= 0:
            raise ValueError(
                f"eta={self.eta} must be > 0: a deterministic sampler has no likelihood ratio to optimise. "
                "Flow-GRPO uses 0.7 for its flow-matching SDE; DDPO uses 1.0 for DDIM."
            )
        if self.sampler == "cps" and self.eta is not None and self.eta > 1:
            raise ValueError(
                f"eta={self.eta} with sampler='cps' must be in (0, 1]: it is the fresh-noise share sin(eta * pi / 2) "
                "of each step's noise level (Flow-GRPO uses 0.8)."
            )
        if self.clip_range <= 0:
            raise ValueError(f"clip_range={self.clip_range} must be > 0 (the authors use 1e-4).")
        if self.advantage_clip <= 0:
            raise ValueError(f"advantage_clip={self.advantage_clip} must be > 0 (the authors use 5).")
        if self.data_beta < 0 or self.kl_beta < 0:
            raise ValueError(f"data_beta={self.data_beta} and kl_beta={self.kl_beta} must both be >= 0.")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be >= 1.0 (1.0 disables CFG).")
        if self.guidance_scale_2 is not None and self.guidance_scale_2 < 1.0:
            raise ValueError(f"guidance_scale_2={self.guidance_scale_2} must be >= 1.0, or unset for guidance_scale.")
        if self.eval_guidance_scale is not None and self.eval_guidance_scale < 1.0:
            raise ValueError(
                f"eval_guidance_scale={self.eval_guidance_scale} must be >= 1.0 (1.0 disables CFG), or unset for "
                "guidance_scale."
            )
        guided = self.guidance_scale > 1 or (self.eval_guidance_scale or 1.0) > 1
        if self.guidance_unconditional == "zeros" and not guided:
            warnings.warn(
                "guidance_unconditional='zeros' has no effect: no step runs classifier-free guidance (guidance_scale=1"
                " and eval_guidance_scale unset or 1). Set eval_guidance_scale (the Cosmos recipes evaluate with 8 / 4)"
                " or guidance_scale > 1, or leave guidance_unconditional at 'negative_prompt'.",
                UserWarning,
                stacklevel=3,
            )
        if self.update_ref_every is not None and self.kl_beta == 0:
            raise ValueError(
                f"update_ref_every={self.update_ref_every} is set but kl_beta=0, so there is no reference model to "
                "update. Set kl_beta > 0 or leave update_ref_every unset."
            )
        if self.update_ref_every is not None and self.update_ref_every < 1:
            raise ValueError(f"update_ref_every={self.update_ref_every} must be >= 1 optimizer steps.")
        if self.use_ema:
            from .ema import power_ema_exponent

            power_ema_exponent(self.ema_sigma_rel)  # raises on a value without a power-function profile
            if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
                raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1), or None for the power schedule.")
            if self.ema_iteration_shift < 0:
                raise ValueError(f"ema_iteration_shift={self.ema_iteration_shift} must be >= 0.")
            if self.ema_device not in (None, "cpu"):
                raise ValueError(
                    f"ema_device={self.ema_device!r} must be 'cpu' (host memory) or unset (the weights' device)."
                )
        if self.reward_weights is not None and any(w < 0 for w in self.reward_weights):
            # Negative weights are legal in GRPO but almost always a sign error with image rewards: say so loudly.
            raise ValueError(
                f"reward_weights={self.reward_weights} has a negative weight. Use the reward's opposite (for example "
                "jpeg_compressibility instead of jpeg_incompressibility) so that higher is always better."
            )
        if self.reward_weights is not None and self.reward_weights and not any(self.reward_weights):
            warnings.warn(
                f"reward_weights={self.reward_weights} are all 0: every advantage is 0, so the policy-gradient term "
                "trains nothing (only the data term and the KL term act). Give the rewards to optimise a positive "
                "weight.",
                UserWarning,
                stacklevel=3,
            )
        self._check_positive("max_dropped_rollouts")
        if self.reward_timeout is not None and not self.reward_timeout > 0:
            raise ValueError(
                f"reward_timeout={self.reward_timeout} must be > 0 seconds, or None to wait for ever (the default, "
                "1800, lets a slow reward model finish)."
            )
        if self.auto_find_batch_size:
            raise ValueError(
                "auto_find_batch_size is not supported: micro-batches are cut from whole rollout groups. Set "
                "auto_find_batch_size=False and lower per_device_train_batch_size instead."
            )
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop the prompt and image columns that DDRL needs. Set it to False."
            )

        warning = warmup_warning(self.warmup_steps, self.max_steps, self.learning_rate)
        if warning:
            warnings.warn(warning, UserWarning, stacklevel=3)
        self._check_sde_window()
        self._derive_gradient_accumulation = derive_gradient_accumulation
        self._derive_micro_batches()
        serves_several_steps = self.steps_per_generation * self.num_iterations > self.gradient_accumulation_steps
        if self.precompute_reference_means and self.update_ref_every is not None and serves_several_steps:
            raise ValueError(
                f"precompute_reference_means=True with update_ref_every={self.update_ref_every}: one rollout serves "
                f"{self.steps_per_generation * self.num_iterations // self.gradient_accumulation_steps} optimizer "
                "steps, and the reference may change between them. Set precompute_reference_means=False, or make "
                "each rollout one optimizer step."
            )
        if self.rollout_batch_size is not None and self.rollout_batch_size < 1:
            raise ValueError(f"rollout_batch_size={self.rollout_batch_size} must be >= 1 or unset.")
        if self.reward_device is not None:
            try:
                torch.device(self.reward_device)
            except RuntimeError as error:
                raise ValueError(
                    f"reward_device={self.reward_device!r} is not a device ({error}); use a name such as 'cuda:1', "
                    "'cuda' or 'cpu', or leave it unset for the training device."
                ) from None

        self._check_positive("prompt_embedding_cache_size", minimum=0, why="0 caches nothing")

        # Evaluation and sample logging
        self._check_positive("eval_num_generations")
        self._check_positive("log_samples_steps", minimum=0, why="0 logs no samples")
        self._check_positive("num_samples_to_log", minimum=0, why="0 logs no samples")

    def _check_recipe_options(self) -> None:
        """
        `karras_sigmas`, `data_text_dropout`, `reward_clip` and `num_conditioning_frames_choices` (options of the
        authors' Cosmos recipe).
        """
        if self.karras_sigmas is not None:
            if len(self.karras_sigmas) != 3:
                raise ValueError(
                    f"karras_sigmas={self.karras_sigmas} must be [sigma_max, sigma_min, rho] (the authors' Cosmos "
                    "recipe: [200, 0.01, 7])."
                )
            sigma_max, sigma_min, rho = (float(value) for value in self.karras_sigmas)
            if not (sigma_max > sigma_min > 0 and rho > 0):
                raise ValueError(
                    f"karras_sigmas={self.karras_sigmas} needs sigma_max > sigma_min > 0 and rho > 0 (EDM sigmas, for "
                    "example [200, 0.01, 7])."
                )
            self.karras_sigmas = [sigma_max, sigma_min, rho]
        if not 0.0 <= self.data_text_dropout < 1.0:
            raise ValueError(
                f"data_text_dropout={self.data_text_dropout} must be in [0, 1) (the authors' Cosmos recipe: 0.2)."
            )
        if self.reward_clip is not None and not self.reward_clip > 0:
            raise ValueError(f"reward_clip={self.reward_clip} must be > 0, or unset for no clamping.")
        choices = self.num_conditioning_frames_choices
        if choices is not None:
            if self.num_conditioning_frames is not None:
                raise ValueError(
                    f"num_conditioning_frames={self.num_conditioning_frames} and num_conditioning_frames_choices="
                    f"{choices} are both set: the choices draw each group's mode. Set only one of them."
                )
            if len(choices) < 2 or len(set(choices)) != len(choices) or min(choices) < 0:
                raise ValueError(
                    f"num_conditioning_frames_choices={choices} must be at least two distinct frame counts >= 0 (the "
                    "authors' Cosmos-Predict2.5 recipe: [0, 1]); for a single mode set num_conditioning_frames."
                )

    def _derive_micro_batches(self) -> None:
        """Samples and transitions per process and iteration, the micro-batches they make, the gradient accumulation."""
        num_processes = self._data_parallel_size()
        samples_per_step = self.prompts_per_step * self.num_generations
        if samples_per_step % num_processes:
            raise ValueError(
                f"prompts_per_step * num_generations = {samples_per_step} samples per iteration must be divisible by "
                f"the number of data-parallel processes ({num_processes}). Change prompts_per_step."
            )
        self.samples_per_process = samples_per_step // num_processes
        transitions = self.samples_per_process * self.num_trained_steps
        if transitions % self.per_device_train_batch_size:
            raise ValueError(
                f"Each process trains on {transitions} transitions per iteration ({self.samples_per_process} samples x "
                f"{self.num_trained_steps} trained steps), which per_device_train_batch_size="
                f"{self.per_device_train_batch_size} does not divide. Pick a divisor of {transitions}."
            )
        self.steps_per_generation = transitions // self.per_device_train_batch_size
        if self._derive_gradient_accumulation:
            self.gradient_accumulation_steps = self.steps_per_generation
        elif self.steps_per_generation % self.gradient_accumulation_steps:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} must divide the "
                f"{self.steps_per_generation} micro-batches of one iteration, so that optimizer steps do not straddle "
                "iterations. Leave it unset for one optimizer step per iteration."
            )

    def restrict_trained_steps(self, allowed: list[int] | None, reason: str) -> None:
        """
        Train only the sampling steps in `allowed` (ascending and contiguous; `None`: every step), for example those
        of the trained expert of a two-expert model: drop the other `train_timesteps`, or with an SDE window turn an
        unset `sde_window_range` into them, then derive the micro-batches again. Called by the trainer, which knows
        the model's noise levels, before training. `reason` names the setting, for the errors.

        Raises:
            `ValueError`: when no step is left to train, for `train_timestep_selection="random"` (it draws from every
                step), or for an `sde_window_range` outside `allowed`.
        """
        if allowed is None or allowed == list(range(self.num_inference_steps - 1)):
            return
        if not allowed:
            raise ValueError(
                f"{reason} computes none of the {self.num_inference_steps - 1} stochastic sampling steps, so nothing "
                "would train. Train the other expert, or change num_inference_steps."
            )
        span = [allowed[0], allowed[-1] + 1]
        if self.train_timestep_selection != "fixed":
            raise ValueError(
                f"train_timestep_selection={self.train_timestep_selection!r} draws from every sampling step, but "
                f"{reason} trains only steps {span[0]} .. {span[1] - 1}. Use train_timestep_selection='fixed' with "
                "train_timesteps among those steps."
            )
        if self.sde_window_size is None:
            kept = [step for step in self.train_timesteps if step in allowed]
            if not kept:
                raise ValueError(
                    f"None of train_timesteps={self.train_timesteps} is a step that {reason} trains (steps {span[0]} "
                    f".. {span[1] - 1}). Set train_timesteps among those steps."
                )
            self.train_timesteps = kept
            self.num_trained_steps = len(kept)
        elif self.sde_window_range is None:
            resolve_sde_window_range(self.num_inference_steps, self.sde_window_size, span)
            self.sde_window_range = span
        elif not span[0] <= self.sde_window_range[0] < self.sde_window_range[1] <= span[1]:
            raise ValueError(
                f"sde_window_range={self.sde_window_range} reaches outside steps {span[0]} .. {span[1] - 1}, which "
                f"{reason} trains. Set sde_window_range within {span}, or leave it unset."
            )
        self._derive_micro_batches()

    def _check_sde_window(self) -> None:
        """
        Resolve the trained steps: the fixed `train_timesteps`, or with an SDE window `train_timesteps=None` (the
        window, drawn per iteration, is trained) and `num_trained_steps = sde_window_size`.
        """
        if self.sde_window_size is None:
            if self.sde_window_share_prefix:
                raise ValueError(
                    "sde_window_share_prefix=True needs sde_window_size: without a window every step is stochastic, "
                    "so no step before it is shared by a group. Set sde_window_size (for example 2) or leave "
                    "sde_window_share_prefix=False."
                )
            self.train_timesteps = resolve_train_timesteps(
                self.num_inference_steps, self.train_timestep_fraction, self.train_timesteps
            )
            self.num_trained_steps = len(self.train_timesteps)
            return
        if self.sampler == "churn" or self.train_timestep_selection != "fixed":
            raise ValueError(
                f"sde_window_size={self.sde_window_size} does not combine with sampler={self.sampler!r} / "
                f"train_timestep_selection={self.train_timestep_selection!r}: the authors' churn sampler makes every "
                "step stochastic, and the window already picks the trained steps per iteration. Use sampler='flow_sde' "
                "or 'cps' with train_timestep_selection='fixed', or unset sde_window_size."
            )
        if self.train_timesteps or self.train_timestep_fraction != 0.5:
            raise ValueError(
                f"sde_window_size={self.sde_window_size} trains exactly the window's steps, so train_timesteps="
                f"{self.train_timesteps} and train_timestep_fraction={self.train_timestep_fraction} would be ignored. "
                "Leave them unset, or unset sde_window_size."
            )
        self._check_positive("sde_window_shift_every")
        resolve_sde_window_range(self.num_inference_steps, self.sde_window_size, self.sde_window_range)
        self.train_timesteps = None
        self.num_trained_steps = self.sde_window_size

    def _data_parallel_size(self) -> int:
        """Processes holding different samples: `world_size / context_parallel_size` (validated here)."""
        self._check_positive("context_parallel_size")
        self._check_choice("context_parallel_method", CONTEXT_PARALLEL_METHOD_CHOICES)
        size = self.context_parallel_size
        if size > 1 and self.deepspeed:
            raise ValueError(
                f"context_parallel_size={size} is not supported with DeepSpeed. Use FSDP2 (the accelerate config "
                "trl_ddrl/accelerate_configs/context_parallel.yaml) or DDP, or set context_parallel_size=1."
            )
        # A single process may be the launcher of a multi-process run (`trl-ddrl --num_processes 8` parses the
        # config before `accelerate launch`): the trainer checks the grid again in each process (`ProcessMesh`).
        if self.world_size == 1:
            return 1
        if self.world_size % size:
            raise ValueError(
                f"context_parallel_size={size} must divide the number of processes ({self.world_size}). Launch a "
                f"multiple of {size} processes (accelerate launch --num_processes), or change context_parallel_size."
            )
        return self.world_size // size

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")

    def _check_positive(self, name: str, minimum: int = 1, why: str = "") -> None:
        value = getattr(self, name)
        if value < minimum:
            reason = f" ({why})" if why else ""
            raise ValueError(f"{name}={value} must be >= {minimum}{reason}.")
