# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The DDRL trainer: policy-gradient RL on diffusers pipelines, regularised by the diffusion loss on data."""

import contextlib
import copy
import glob
import json
import math
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from diffusers import DiffusionPipeline
from diffusers.loaders.lora_base import LoraBaseMixin
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils import logging
from trl.models.utils import prepare_deepspeed, prepare_fsdp
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler

from .config import DDRLConfig
from .data import (
    DiffusionDataCollator,
    check_data_columns,
    check_data_term_columns,
    check_prompt_datasets,
)
from .ema import EMA_FOLDER, EMACallback, ParameterEMA
from .evaluation import Evaluator
from .fault_handling import (
    DiskFullError,
    DivergenceGuard,
    PreemptionCallback,
    cancel_pending_rewards,
    check_finite_state,
    check_fresh_start,
    check_lora_load,
    check_lora_target_modules,
    check_resume_settings,
    out_of_memory_note,
    resolve_resume_checkpoint,
    same_architecture,
    staged_checkpoint,
)
from .losses import clipped_policy_loss, reverse_kl
from .model_card import hub_base_model, save_model_card
from .parallel import prepare_parallelism
from .pipelines import ADAPTERS, SamplingSettings, get_adapter
from .pipelines.experts import denoiser_parts, lora_load_arguments, lora_weight_name, trained_components
from .pipelines.latents import enable_vae_slicing
from .precision import autocast_in_load_dtype, in_dtype, upcast_trained_parameters
from .preflight import check_hub_token, check_model_path, check_optimizer, check_trainer_args
from .progress import samples_per_second, use_ddrl_progress
from .prompt_embeddings import PromptEncoder
from .reward_calls import check_reward_signatures
from .rewards import resolve_reward_funcs
from .rollout import (
    RolloutBuffer,
    RolloutEngine,
    data_term_loss,
    generation_policy,
    read_prompt_rows,
    transition_step,
)
from .sampling import transition_log_ratio
from .tracking import SampleLoggingCallback, expose_config_to_trackers
from .utils import image_grid, labelled_grid, save_denoiser, save_video_grid_gif, saved_separately


logger = logging.get_logger(__name__)


RewardFunc = str | nn.Module | Callable[..., list[float | None]]

SAMPLES_NAME = "samples.png"
SAMPLES_GIF_NAME = "samples.gif"
# The training configuration in readable form, next to `training_args.bin` (a pickle).
CONFIG_JSON_NAME = "ddrl_config.json"

_PAPER = {
    "title": "Data-regularized Reinforcement Learning for Diffusion Models at Scale",
    "id": "2512.04332",
    "citation": """\
@article{ye2025ddrl,
    title         = {{Data-regularized Reinforcement Learning for Diffusion Models at Scale}},
    author        = {Haotian Ye and Kaiwen Zheng and Jiashu Xu and Puheng Li and Huayu Chen and Jiaqi Han and Sheng Liu and Qinsheng Zhang and Hanzi Mao and Zekun Hao and Prithvijit Chattopadhyay and Dinghao Yang and Liang Feng and Maosheng Liao and Junjie Bai and Ming-Yu Liu and James Zou and Stefano Ermon},
    year          = 2025,
    eprint        = {arXiv:2512.04332},
}""",
}


@contextlib.contextmanager
def _without_zero3_init():
    """
    Load models unpartitioned even when a DeepSpeed ZeRO-3 config is active.

    `DDRLConfig(deepspeed=...)` registers a global config that makes transformers' `from_pretrained` build models
    under `deepspeed.zero.Init`, which would leave the frozen text encoders as empty shards; only the trained denoiser
    is partitioned, by `accelerator.prepare`.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = reference


class EpochSeededRepeatSampler(RepeatSampler):
    """
    TRL's `RepeatSampler` with the shuffle order a pure function of `(seed, epoch)`.

    The Trainer calls `set_epoch` before every epoch, also when resuming, so a resumed run walks the prompts in the
    same order as an uninterrupted one (the parent's generator would restart from the first epoch's order).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + self.epoch)
        return super().__iter__()


class _Positions(torch.utils.data.Dataset):
    """The positions `0 .. size - 1` of a dataset: what the train dataloader yields (see `get_train_dataloader`)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, position: int) -> int:
        return position


class _ReferenceSyncCallback(TrainerCallback):
    """Copy the policy into the reference model every `update_ref_every` optimizer steps."""

    def __init__(self, trainer: "DDRLTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.update_ref_every == 0:
            self.trainer.sync_reference_model()


class DDRLTrainer(_BaseTrainer):
    """
    Trainer for DDRL (Data-regularized Diffusion Reinforcement Learning), from the paper [Data-regularized
    Reinforcement Learning for Diffusion Models at Scale](https://huggingface.co/papers/2512.04332).

    Each iteration rolls out `num_generations` samples per prompt with a stochastic sampler, scores them with the
    reward functions, turns group-normalised rewards into advantages, and trains the denoiser on the recorded
    transitions with a clipped policy-gradient loss plus `data_beta` times the diffusion loss on data. With
    `data_beta=0` and `kl_beta>0` it is the Flow-GRPO baseline.

    Example:
    ```python
    from datasets import Dataset
    from trl_ddrl import DDRLConfig, DDRLTrainer

    def brightness(prompts, images, **kwargs):
        return images.mean(dim=(1, 2, 3)).tolist()

    trainer = DDRLTrainer(
        model="stabilityai/stable-diffusion-3.5-medium",
        reward_funcs=brightness,
        args=DDRLConfig(output_dir="sd35-ddrl", data_beta=0.0),
        train_dataset=Dataset.from_dict({"prompt": ["a cat", "a dog"]}),
    )
    trainer.train()
    ```

    Args:
        model (`str` or `DiffusionPipeline`):
            A hub id or local path of a diffusers pipeline (loaded with `DiffusionPipeline.from_pretrained(model,
            **args.model_init_kwargs)`), or a loaded pipeline. Its denoiser (`transformer` or `unet`) is trained; the
            VAE and text encoders are frozen and stay outside the optimizer.
        reward_funcs (`RewardFunc` or `list[RewardFunc]`):
            Callables `(prompts: list[str], images: Tensor, **columns) -> list[float | None]` where `images` is float
            in `[0, 1]`, `[B, C, H, W]` (videos: `[B, F, C, H, W]`) and `columns` holds the dataset's other columns;
            `nn.Module` reward models with the same call signature; or names/specs understood by
            [`~trl_ddrl.rewards.get_reward_function`] (`"jpeg_compressibility"`, `"clip_score:<path>"`, an URL, ...).
        args ([`DDRLConfig`], *optional*):
            Configuration. Defaults to `DDRLConfig("<model name>-DDRL")`.
        train_dataset ([`~datasets.Dataset`]):
            Prompts in a `prompt` column. An `args.image_column` column, if present, serves the data term (each
            rollout group uses its own prompt's image).
        data_dataset ([`~datasets.Dataset`], *optional*):
            Separate data for the data term, with `args.image_column` and `args.caption_column` columns. Takes
            precedence over images in `train_dataset`.
        peft_config ([`~peft.PeftConfig`], *optional*):
            Train a LoRA adapter on the denoiser instead of all its weights.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Held-out prompts in a `prompt` column, evaluated by [`~DDRLTrainer.evaluate`] (and during training with
            `eval_strategy`); with an `args.image_column` column also the held-out diffusion loss. See
            [`trl_ddrl.evaluation`] for the metrics.
        eval_reward_funcs (`RewardFunc` or `list[RewardFunc]`, *optional*):
            Extra judges scored at evaluation only, never trained on (same forms as `reward_funcs`).
        callbacks, optimizers: As in [`~transformers.Trainer`].
    """

    _tag_names = ["trl", "ddrl", "diffusers", "text-to-image"]
    _name = "DDRL"
    # `compute_loss` returns the micro-batch's mean loss: `training_step` divides it by the accumulation steps.
    loss_is_scaled_for_ga = False
    _paper = _PAPER
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: "str | DiffusionPipeline",
        reward_funcs: RewardFunc | list[RewardFunc],
        args: DDRLConfig | None = None,
        train_dataset: Dataset | None = None,
        data_dataset: Dataset | None = None,
        peft_config: Any | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        eval_reward_funcs: RewardFunc | list[RewardFunc] | None = None,
    ):
        if isinstance(model, str):
            model_id = model
            check_model_path(model)
        elif isinstance(model, DiffusionPipeline):
            model_id = model.name_or_path or type(model).__name__
        else:
            raise TypeError(
                f"model must be a hub id, a local path or a diffusers DiffusionPipeline; got {type(model).__name__}."
            )
        # Everything that needs no model is checked before loading it (minutes for large pipelines).
        args = check_trainer_args(args, model_id)
        check_hub_token(args)
        check_optimizer(args)
        train_dataset, data_dataset = check_prompt_datasets(train_dataset, data_dataset, args.prompts_per_step)
        check_data_term_columns(args, train_dataset, data_dataset)
        self.reward_funcs, self.reward_func_names = resolve_reward_funcs(reward_funcs)
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(args.reward_weights)} values but there are {len(self.reward_funcs)} reward "
                f"functions ({', '.join(self.reward_func_names)}). Give one weight per function."
            )
        check_reward_signatures(self.reward_funcs, self.reward_func_names, train_dataset.column_names)
        pipeline = self._load_pipeline(model, args) if isinstance(model, str) else model

        self.pipeline = pipeline
        self.model_id = str(model_id)
        self.adapter = get_adapter(pipeline, SamplingSettings.from_config(args))
        # Two experts, one trained: only the sampling steps it computes train.
        args.restrict_trained_steps(self.adapter.trainable_steps(), f"train_experts={args.train_experts!r}")
        # The family's sampler and eta, resolved from "auto" / None, so that the saved config shows what ran.
        args.sampler, args.eta = self.adapter.settings.sampler, self.adapter.settings.eta
        for module in self.adapter.frozen_modules():
            module.requires_grad_(False)
            module.eval()
        enable_vae_slicing(pipeline)  # the VAE decodes a rollout chunk one sample at a time
        denoiser = self.adapter.denoiser
        if peft_config is not None:
            check_lora_target_modules(denoiser, peft_config)
            denoiser.requires_grad_(False)
            denoiser.add_adapter(peft_config)
        else:
            denoiser.requires_grad_(True)
        if args.activation_checkpointing:
            # diffusers models have their own switch; the Trainer's `gradient_checkpointing_enable` is transformers'.
            if getattr(denoiser, "_supports_gradient_checkpointing", True):
                denoiser.enable_gradient_checkpointing()
            else:
                logger.warning(f"{type(denoiser).__name__} has no activation checkpointing; training without it.")
            args.activation_checkpointing = args.gradient_checkpointing = False
        self.is_peft = peft_config is not None
        # float32 master weights; the forwards autocast to the load dtype, saved models go back to it (precision.py).
        self.load_dtype = upcast_trained_parameters(denoiser)
        autocast_in_load_dtype(args, self.load_dtype)

        self.reward_weights = torch.tensor(args.reward_weights or [1.0] * len(self.reward_funcs), dtype=torch.float32)
        self.evaluator = Evaluator(self, args, eval_reward_funcs, eval_dataset)

        self.data_dataset = data_dataset
        if args.precompute_prompt_embeddings and self.adapter.conditioned_on_source_image:
            raise ValueError(
                f"precompute_prompt_embeddings=True: {type(pipeline).__name__} conditions each prompt on its row's "
                "source image, so there is no per-prompt embedding to precompute. Set it to False and cache the "
                "embeddings with prompt_embedding_cache_size instead."
            )
        check_data_columns(self.adapter, args, train_dataset, data_dataset)
        # Prompt embeddings: cached, precomputed, and the text encoders kept on the CPU (`prompt_embeddings.py`).
        self.prompt_encoder = PromptEncoder(
            self.adapter,
            cache_size=args.prompt_embedding_cache_size,
            offload_text_encoders=args.offload_text_encoders or args.precompute_prompt_embeddings,
        )
        self.data_collator_for_loss = DiffusionDataCollator(
            self.adapter,
            args.image_column,
            args.caption_column,
            args.source_image_column,
            text_dropout=args.data_text_dropout,
            posterior_mean=args.data_latents == "mean",
            prompt_encoder=self.prompt_encoder,
        )

        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._loss_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._buffer: RolloutBuffer | None = None
        self._step = 0
        # Save-time switches: whether this save is the final one (whole pipeline), whether `push_to_hub` is running,
        # and whether the frozen components were already exported for checkpoint pushes.
        self._saving_final_model = False
        self._pushing_final_model = False
        self._hub_pipeline_exported = False
        # Atomic saves (`staged_checkpoint`): the staging folder while a checkpoint is written, a push waiting for it,
        # and the checkpoints this trainer wrote.
        self._checkpoint_staging: str | None = None
        self._deferred_push: str | None = None
        self._checkpoints_written: set[str] = set()

        super().__init__(
            model=denoiser,
            args=args,
            data_collator=lambda rows: rows,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.add_callback(SampleLoggingCallback(self))
        use_ddrl_progress(self)  # the phase of each iteration, compact console lines

        device = self.accelerator.device
        for module in self.adapter.frozen_modules():
            if module not in self.prompt_encoder.offloaded:
                module.to(device)
        for reward_func in self.evaluator.reward_funcs:
            if isinstance(reward_func, nn.Module):
                reward_func.to(args.reward_device or device).eval().requires_grad_(False)

        if args.precompute_prompt_embeddings:
            self._precompute_prompt_embeddings()

        self.ref_model = None
        self._reference_on_device = False  # offload_reference_model: inside `_reference_denoiser`
        needs_reference = args.kl_beta > 0 or (args.data_beta > 0 and args.data_source == "base_model")
        if needs_reference and not self.is_peft:
            if args.offload_reference_model and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
                raise ValueError(
                    "offload_reference_model=True keeps a whole reference model on the CPU, but DeepSpeed / FSDP "
                    "shard it across the processes instead. Set offload_reference_model=False (the shards are "
                    "already 1 / world_size of it)."
                )
            self.ref_model = copy.deepcopy(denoiser).requires_grad_(False).eval().to(self.load_dtype)
            if self.is_deepspeed_enabled:
                self.ref_model = prepare_deepspeed(self.ref_model, self.accelerator)
            elif self.is_fsdp_enabled:
                self.ref_model = prepare_fsdp(self.ref_model, self.accelerator)
            else:
                self.ref_model = self.ref_model.to("cpu" if args.offload_reference_model else device)
        # The (data-parallel x context-parallel) grid; context parallelism hooks into the models here.
        self.mesh = prepare_parallelism(self)
        if args.update_ref_every is not None:
            self.add_callback(_ReferenceSyncCallback(self))
        self._preemption, self._divergence = PreemptionCallback(self), DivergenceGuard(self)
        self.add_callback(self._preemption)
        self.add_callback(self._divergence)
        self.rollout = RolloutEngine(
            args,
            self.adapter,
            self.data_collator_for_loss,
            self.reward_funcs,
            self.reward_func_names,
            self.reward_weights,
            self.accelerator,
            self.mesh,
            data_dataset,
            self._metrics,
            policy=lambda: generation_policy(self.model, self.model_wrapped, self.accelerator),
            reference=self._reference_denoiser,
            check_samples=self._divergence.check_samples,
        )
        self._ema_callback = EMACallback(self) if args.use_ema else None
        if self._ema_callback is not None:
            self.add_callback(self._ema_callback)

    # ---- set-up helpers ---------------------------------------------------------------------------------------------

    @staticmethod
    def _load_pipeline(model: str, args: DDRLConfig | None) -> DiffusionPipeline:
        kwargs = dict(args.model_init_kwargs or {}) if args is not None else {}
        # diffusers >= 0.42 names it `dtype` and warns on `torch_dtype`; both are accepted here.
        key = "torch_dtype" if "torch_dtype" in kwargs else "dtype"
        dtype = kwargs.pop(key, None)
        if isinstance(dtype, str) and dtype != "auto":
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(
                    f"model_init_kwargs.{key}={dtype!r} is not a torch dtype; use 'bfloat16', 'float16' or 'float32'."
                )
            dtype = getattr(torch, dtype)
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            # diffusers resolves only its own pipeline classes from `model_index.json`; ours (the digits pipeline)
            # are looked up among the adapters.
            class_name = DiffusionPipeline.load_config(model).get("_class_name")
            pipeline_class = next(
                (
                    adapter.pipeline_class
                    for adapter in ADAPTERS
                    if getattr(adapter, "pipeline_class", None) is not None
                    and adapter.pipeline_class.__name__ == class_name
                ),
                DiffusionPipeline,
            )
            with _without_zero3_init():
                return pipeline_class.from_pretrained(model, **kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not load a diffusers pipeline from model={model!r}: {str(error).rstrip('. ')}. Pass a hub id or a local directory "
                "saved with pipeline.save_pretrained (it holds a model_index.json)."
            ) from error

    def _precompute_prompt_embeddings(self) -> None:
        """
        Encode the prompts of `train_dataset` and `eval_dataset` under the rollouts' autocast, and the data term's
        captions (encoded outside it, see `RolloutEngine.generate`), once (`precompute_prompt_embeddings`).
        """
        args, device = self.args, self.accelerator.device
        eval_datasets = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        prompts = list(self.train_dataset["prompt"])
        for dataset in eval_datasets:
            if dataset is not None:
                prompts += list(dataset["prompt"])
        batch_size = args.per_device_eval_batch_size
        with self.accelerator.autocast():
            self.prompt_encoder.precompute(prompts, device, batch_size)
        if args.data_beta > 0 and args.data_source == "dataset":
            captions = self.data_dataset[args.caption_column] if self.data_dataset is not None else prompts
            self.prompt_encoder.precompute(list(captions), device, batch_size)

    def _send_telemetry(self):
        # TRL's telemetry reads `model.config.model_type`, which diffusers models do not have, and reports TRL's own
        # trainers only. This extension sends none.
        return

    # ---- data ---------------------------------------------------------------------------------------------------------

    def get_train_dataloader(self):
        # The dataloader yields dataset positions, not rows. The Trainer fetches one batch per micro-batch but only an
        # iteration's first micro-batch uses its rows, and accelerate walks every fetched batch element by element to
        # move it to the device: for an image column that is ~10^5 Python objects per row, per micro-batch.
        return self._get_dataloader(
            dataset=_Positions(len(self.train_dataset)),
            description="Training",
            batch_size=self.args.samples_per_process,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset: Dataset | None = None):
        # Every process walks the same seeded order; each takes its slice of every iteration's prompts, and each
        # iteration's rows are yielded `steps_per_generation * num_iterations` times, one per micro-batch.
        sampler = EpochSeededRepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=self.args.prompts_per_step,
            repeat_count=self.args.steps_per_generation * self.args.num_iterations,
            shuffle=True,
            seed=self.args.seed,
        )
        # Prompts are sharded by data-parallel rank: a context-parallel group shares its samples.
        return self.mesh.shard_sampler(sampler, self.args.samples_per_process)

    # ---- rollouts ---------------------------------------------------------------------------------------------------

    def _prepare_inputs(self, inputs: list[int]) -> dict[str, Any]:
        micro_batches_per_iteration = self.args.steps_per_generation * self.args.num_iterations
        if self._buffer is None:
            # (Re)start: count the micro-batches already trained, so that a resumed run stays in step.
            self._step = self.state.global_step * self.args.gradient_accumulation_steps
        if self._step % micro_batches_per_iteration == 0 or self._buffer is None:
            iteration = self.state.global_step * self.args.gradient_accumulation_steps // micro_batches_per_iteration
            rows = read_prompt_rows(self.train_dataset, inputs)
            self._buffer = self.rollout.generate(rows, iteration, self.state)
            if self.args.kl_beta > 0 and self.args.precompute_reference_means:
                self._buffer.reference_means = self._reference_means(self._buffer)
        index = self._step % self.args.steps_per_generation
        self._step += 1
        return self._buffer.micro_batch(index, self.args.per_device_train_batch_size)

    # ---- loss -------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("DDRLTrainer.compute_loss does not return model outputs.")
        args = self.args
        data_term = None
        if args.data_beta > 0:
            data_loss = self._data_loss(model, inputs)
            self._loss_metrics["loss/data"].append(data_loss.detach())
            data_term = args.data_beta * data_loss
            if args.separate_data_backward and data_term.requires_grad and not self.is_deepspeed_enabled:
                # Its gradients go into `.grad` now, and its activations are freed before the policy forward.
                self._backward_now(self.mesh.scale_gradients(data_term * args.loss_scale))
                data_term = data_term.detach()

        step = transition_step(self.adapter, model, inputs)
        log_ratio = transition_log_ratio(step, inputs["old_means"], args.log_ratio_form)
        policy_loss, ratio, is_clipped = clipped_policy_loss(log_ratio, inputs["advantages"], args.clip_range)
        loss = policy_loss.mean()
        # Kept on the device and gathered once per logging step: no host sync or collective per micro-batch.
        self._loss_metrics["loss/policy"].append(loss.detach())
        self._loss_metrics["ratio/mean"].append(ratio.detach().mean())
        self._loss_metrics["clip_ratio"].append(is_clipped.float().mean())
        if data_term is not None:
            loss = loss + data_term

        if args.kl_beta > 0:
            if "reference_means" in inputs:  # precompute_reference_means: computed after the rollout
                reference_mean = inputs["reference_means"]
            else:
                with torch.no_grad():
                    reference_mean = self._reference_step(inputs).mean
            kl = reverse_kl(step.mean, reference_mean, step.std, step.edm_scale, args.kl_form).mean()
            loss = loss + args.kl_beta * kl
            self._loss_metrics["kl"].append(kl.detach())
        loss = loss * args.loss_scale
        self._divergence.track_loss(loss)  # checked with the gradients, once per optimizer step
        return self.mesh.scale_gradients(loss)

    def _backward_now(self, loss: torch.Tensor) -> None:
        """
        Backpropagate `loss`, a part of this micro-batch's loss, now, scaled as `training_step` scales the loss that
        `compute_loss` returns (divided by the gradient accumulation steps: `loss_is_scaled_for_ga = False`).
        """
        self.accelerator.backward(loss / self.current_gradient_accumulation_steps)

    def _data_loss(self, model, inputs) -> torch.Tensor:
        """The data term of a micro-batch ([`~trl_ddrl.rollout.data_term_loss`])."""
        return data_term_loss(self.adapter, model, inputs, self.args.data_noise)

    @torch.no_grad()
    def _reference_means(self, buffer: RolloutBuffer) -> torch.Tensor:
        """
        The reference model's mean of every transition of `buffer`, `[S, K, ...]` (on the CPU with
        `offload_trajectories`), computed micro-batch by micro-batch exactly as the replay would (same rows, same
        batches, same call), so that the KL term is bit-identical; the reference model is entered once.
        """
        size = self.args.per_device_train_batch_size
        means = torch.empty_like(buffer.old_means)
        num_steps = buffer.states.shape[1]
        with self._reference_denoiser():  # entered once: an offloaded reference moves to the device once
            for index in range(math.ceil(len(buffer.order) / size)):
                flat = buffer.order[index * size : (index + 1) * size].to(means.device)
                mean = self._reference_step(buffer.micro_batch(index, size)).mean
                if buffer.shard is not None:  # kept split as the other transitions
                    mean = buffer.shard.split(mean)
                means[flat // num_steps, flat % num_steps] = mean.to(means.device)
        return means

    @contextlib.contextmanager
    def _reference_denoiser(self):
        """
        The reference model: the adapter-disabled denoiser under LoRA, the frozen copy otherwise; with
        `offload_reference_model` the copy comes from the CPU for the block and goes back after it (a nested entry
        moves nothing).
        """
        if not self.is_peft:
            offload = self.args.offload_reference_model and not self._reference_on_device
            if offload:
                self.ref_model.to(self.accelerator.device)
                self._reference_on_device = True
            try:
                yield self.ref_model
            finally:
                if offload:
                    self.ref_model.to("cpu")
                    self._reference_on_device = False
            return
        policy = self.accelerator.unwrap_model(self.model)
        policy.disable_adapters()
        try:
            yield policy
        finally:
            policy.enable_adapters()

    def _reference_step(self, inputs):
        with self._reference_denoiser() as reference:
            return transition_step(self.adapter, reference, inputs)

    def sync_reference_model(self) -> None:
        """Copy the current policy weights into the reference model (full fine-tuning only)."""
        if self.ref_model is not None:
            self.ref_model.load_state_dict(self.accelerator.unwrap_model(self.model).state_dict())

    # ---- EMA ------------------------------------------------------------------------------------------------------

    @property
    def ema(self) -> ParameterEMA | None:
        """The EMA of the trained weights (`use_ema`), built when training starts; `None` before or without it."""
        return self._ema_callback.ema if self._ema_callback is not None else None

    @contextlib.contextmanager
    def ema_weights(self):
        """
        Run a block (evaluation, sampling, export) with the EMA weights in the denoiser, then restore the trained
        weights bit for bit. Does nothing without an EMA (`use_ema=False`, or before training). In a multi-process
        run every process must enter it (under ZeRO-3 it re-gathers the persistent parameters); enter it before
        `unwrap_model_for_generation`, so that gathered weights are the EMA's.
        """
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            yield

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self._ema_callback is not None:
            # Once the model is wrapped (sharded) and the checkpoint's weights are loaded.
            self._ema_callback.start(resume_from_checkpoint)
        return model, train_dataloader

    # ---- training -------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        # Resume only from a complete checkpoint with compatible settings; never start over on another run's.
        resume_from_checkpoint = resolve_resume_checkpoint(self, resume_from_checkpoint)
        if resume_from_checkpoint is None:
            check_fresh_start(self)
        else:
            check_resume_settings(resume_from_checkpoint, self.args)
        # Every call starts from a fresh rollout, also a resume on this same trainer after a failure.
        self._buffer = None
        self.rollout.reward_caller.reset()
        expose_config_to_trackers(self.model)
        # A resumed run had its start evaluated already (the checkpoint's log history holds it): no second one.
        eval_on_start = self.args.eval_on_start
        self.args.eval_on_start = eval_on_start and resume_from_checkpoint is None
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        except (Exception, KeyboardInterrupt) as error:
            if isinstance(error, torch.OutOfMemoryError):
                note = out_of_memory_note(error, self.args, self.model_id)
                if hasattr(error, "add_note"):  # Python 3.11+: printed under the traceback
                    error.add_note(note)
                else:
                    logger.error(note)
            cancel_pending_rewards(self.rollout.pending_rewards, self.rollout.reward_caller)
            self._save_checkpoint_after_failure()
            raise
        finally:
            self.args.eval_on_start = eval_on_start
            # A run that raised never reaches on_train_end: give SIGTERM back to whoever had it.
            self._preemption.restore_signal_handler()
        self._preemption.exit_if_stopped()
        return output

    def _save_checkpoint_after_failure(self) -> None:
        """
        When training stops on an error or Ctrl-C, save the last completed optimizer step as a regular checkpoint, so
        that `train(resume_from_checkpoint=True)` continues from it and no finished step is lost.

        Only in single-process runs (after one process fails, a save with collectives could hang the others), only
        when checkpoints are saved at all (`save_strategy != "no"`), and not when this trainer already saved this
        step. A failing save is logged and does not hide the original error.
        """
        step = self.state.global_step
        folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        saved = os.path.abspath(folder) in self._checkpoints_written
        disk_full = isinstance(sys.exc_info()[1], DiskFullError)  # a second save would fail the same way
        if step == 0 or self.args.save_strategy == "no" or self.accelerator.num_processes > 1 or saved or disk_full:
            return
        try:
            self._save_checkpoint(self.model, trial=None)
        except Exception as error:
            logger.error(f"Training stopped at step {step}, and saving {folder} failed as well: {error!r}")
        else:
            logger.warning(
                f"Training stopped at step {step}; saved {folder}. Fix the cause and resume with "
                f"trainer.train(resume_from_checkpoint=True), or --resume_from_checkpoint {folder} on the command line."
            )

    # ---- logging and saving ---------------------------------------------------------------------------------------

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """
        Sample every prompt of `eval_dataset` (default: the trainer's) from fixed noise with the deterministic
        sampler, score the samples and, when the rows carry images or videos, compute the held-out diffusion loss;
        log the metrics and return them. See [`trl_ddrl.evaluation`] for each metric. `ignore_keys` is unused.
        """
        return self.evaluator.run(eval_dataset if eval_dataset is not None else self.eval_dataset, metric_key_prefix)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if any(key.startswith("eval_") for key in logs):
            # Evaluation metrics go alone; the training metrics wait for the next training log.
            return super().log(logs, start_time)
        metrics = {}
        for key, values in self._metrics.items():
            valid = [value for value in values if not math.isnan(value)]
            metrics[key] = sum(valid) / len(valid) if valid else None
        if "reward/errors" in self._metrics:
            metrics["reward/errors"] = float(sum(self._metrics["reward/errors"]))
        # Every process logs the same micro-batches, so these keys match across processes.
        for key, values in sorted(self._loss_metrics.items()):
            metrics[key] = self.accelerator.gather(torch.stack(values)).float().mean().item()
        logs.update(metrics)
        logs.update(samples_per_second(logs, self.args.num_trained_steps))
        super().log(logs, start_time)
        self._metrics.clear()
        self._loss_metrics.clear()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._saving_final_model = not _internal_call or self._pushing_final_model
        export_ema = self._saving_final_model and self.args.export_ema_weights
        with self.ema_weights() if export_ema else contextlib.nullcontext():
            super().save_model(output_dir, _internal_call)
        if not self._saving_final_model and self.ema is not None:
            # A checkpoint: the raw weights (above) resume training; the EMA state goes next to them, and the EMA
            # weights in diffusers format too when checkpoints are pushed to the Hub.
            self._ema_callback.save(output_dir)
            if self.args.push_to_hub and self.args.hub_strategy != HubStrategy.END and self.args.export_ema_weights:
                with self.ema_weights():
                    super().save_model(os.path.join(output_dir, EMA_FOLDER), _internal_call=True)
        if not _internal_call:
            self._write_model_card(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial):
        # As TRL's trainers do: keep the output directory's model card current with every checkpoint.
        self.create_model_card()
        with staged_checkpoint(self):  # written aside, renamed into place when complete
            super()._save_checkpoint(model, trial)

    def _get_output_dir(self, trial) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        # The Trainer saves with `_internal_call=True` before uploading `output_dir`; make that save write the whole
        # pipeline, as `save_model()` does, so the pushed repo loads with `DiffusionPipeline.from_pretrained`.
        self._pushing_final_model = True
        try:
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        finally:
            self._pushing_final_model = False

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer copies transformers' files (config.json, model.safetensors, adapter_model.*) from the checkpoint
        # into `output_dir`, then uploads `output_dir`. DDRL checkpoints use the diffusers layout: copy that instead,
        # under the same condition as the Trainer (never while the previous upload is still reading `output_dir`).
        if self._checkpoint_staging is not None:
            self._deferred_push = checkpoint_folder  # pushed by `staged_checkpoint` once renamed into place
            return
        if (
            self.is_world_process_zero()
            and self.args.hub_strategy != HubStrategy.END
            and (self.args.hub_always_push or self.push_in_progress is None or self.push_in_progress.is_done())
        ):
            self._export_checkpoint_for_hub(checkpoint_folder, self.args.output_dir)
        super()._push_from_checkpoint(checkpoint_folder)

    def _export_checkpoint_for_hub(self, checkpoint_folder: str, output_dir: str) -> None:
        """
        Make `output_dir` a loadable repo holding the checkpoint's weights: the denoiser's folder (with the frozen
        components and `model_index.json`, written once, when `save_full_pipeline`) or the LoRA file, plus the sample
        grid, the JSON config and a model card that shows the grid. With the EMA exported, the weights are the EMA's,
        which `save_model` wrote in diffusers format into the checkpoint's `ema/` for this push.
        """
        export_ema = self.ema is not None and self.args.export_ema_weights
        weights_folder = os.path.join(checkpoint_folder, EMA_FOLDER) if export_ema else checkpoint_folder
        for component in trained_components(self.adapter.denoiser, self.adapter.denoiser_name):
            denoiser_folder = os.path.join(weights_folder, component)
            if os.path.isdir(denoiser_folder):
                if self.args.save_full_pipeline and not self._hub_pipeline_exported:
                    self.pipeline.save_pretrained(output_dir)
                    self._hub_pipeline_exported = True
                target = os.path.join(output_dir, component)
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(denoiser_folder, target)
            lora_file = lora_weight_name(component)
            if os.path.isfile(os.path.join(weights_folder, lora_file)):
                shutil.copy(os.path.join(weights_folder, lora_file), os.path.join(output_dir, lora_file))
        for name in (SAMPLES_NAME, SAMPLES_GIF_NAME, CONFIG_JSON_NAME):
            if os.path.isfile(os.path.join(checkpoint_folder, name)):
                shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        self._write_model_card(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # transformers >= 5.2x calls `_save` on every process (the gathers happen before it): only the writer writes.
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        denoiser = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            state_dict = denoiser.state_dict()
        check_finite_state(state_dict, f"the weights to {output_dir}")
        if not state_dict:
            # DeepSpeed ZeRO-3 without `stage3_gather_16bit_weights_on_model_save`: the Trainer writes a DeepSpeed
            # checkpoint instead, from which resume works; there are no full weights to write here.
            self._save_config(output_dir)
            return
        full_pipeline = not self.is_peft and self._saving_final_model and self.args.save_full_pipeline
        # The denoiser, or each trained expert of a two-expert one (every expert in a whole pipeline), in its own
        # folder / LoRA file, from the (possibly gathered) state dict: under ZeRO-3 the only place the full weights
        # exist (a frozen expert's too).
        if self._saving_final_model:  # checkpoints keep the float32 master weights, to resume from them exactly
            state_dict = in_dtype(state_dict, self.load_dtype)
        parts = denoiser_parts(denoiser, self.adapter.denoiser_name, state_dict, frozen_too=full_pipeline)
        if full_pipeline:
            with saved_separately(self.pipeline, parts):  # the other components
                self.pipeline.save_pretrained(output_dir)
        for component, (module, state) in parts.items():
            if self.is_peft:
                self._save_lora(module, state, output_dir, lora_weight_name(component))
            else:
                save_denoiser(module, state, os.path.join(output_dir, component))
        if self.rollout.last_images is not None:
            samples = self.rollout.last_samples
            grid = (
                labelled_grid(samples.images, samples.captions()) if samples else image_grid(self.rollout.last_images)
            )
            grid.save(os.path.join(output_dir, SAMPLES_NAME))
            if self.rollout.last_images.ndim == 5:
                save_video_grid_gif(self.rollout.last_images, os.path.join(output_dir, SAMPLES_GIF_NAME))
        self._save_config(output_dir)

    def _save_config(self, output_dir: str) -> None:
        """Write the configuration as `training_args.bin` (what the Trainer reloads) and `ddrl_config.json`."""
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        with open(os.path.join(output_dir, CONFIG_JSON_NAME), "w", encoding="utf-8") as file:
            # `to_dict` hides tokens; `default=str` covers values JSON lacks (a torch dtype in `model_init_kwargs`).
            json.dump(self.args.to_dict(), file, indent=2, sort_keys=True, default=str)

    def _save_lora(self, denoiser: nn.Module, state_dict: dict, output_dir: str, weight_name: str) -> None:
        """
        Write the adapter in diffusers format (`weight_name`, alpha kept in the metadata, keys under the denoiser's
        name), with the pipeline's `save_lora_weights`; for pipelines without a LoRA loader (HunyuanVideo 1.5) the same
        file, which `pipeline.<denoiser>.load_lora_adapter(output_dir, weight_name=weight_name)` loads. The low-noise
        expert of Wan 2.2 A14B gets its own file (see [`~trl_ddrl.pipelines.experts.lora_weight_name`]).
        """
        name = self.adapter.denoiser_name
        layers = get_peft_model_state_dict(denoiser, state_dict=state_dict)
        metadata = denoiser.peft_config["default"].to_dict()
        if not hasattr(type(self.pipeline), "save_lora_weights"):
            LoraBaseMixin._save_lora_weights(
                output_dir, lora_layers={name: layers}, lora_metadata={name: metadata}, weight_name=weight_name
            )
            return
        type(self.pipeline).save_lora_weights(
            output_dir,
            **{f"{name}_lora_layers": layers, f"{name}_lora_adapter_metadata": metadata},
            weight_name=weight_name,
            safe_serialization=True,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the trained weights written by `_save` (diffusers format) back into the denoiser."""
        denoiser = self.accelerator.unwrap_model(model if model is not None else self.model)
        for component, module in trained_components(denoiser, self.adapter.denoiser_name).items():
            if self.is_peft:
                path = os.path.join(resume_from_checkpoint, lora_weight_name(component))
                if not os.path.isfile(path):
                    raise ValueError(
                        f"resume_from_checkpoint={resume_from_checkpoint!r} holds no {lora_weight_name(component)}."
                    )
                prefix = f"{self.adapter.denoiser_name}."
                state = {key.removeprefix(prefix): value for key, value in load_file(path).items()}
                with same_architecture(resume_from_checkpoint, component):
                    result = set_peft_model_state_dict(module, state)
                check_lora_load(resume_from_checkpoint, result, len(state))
                continue
            files = sorted(glob.glob(os.path.join(resume_from_checkpoint, component, "*.safetensors")))
            if not files:
                raise ValueError(
                    f"resume_from_checkpoint={resume_from_checkpoint!r} has no {component}/*.safetensors; pass a "
                    "checkpoint directory written by DDRLTrainer."
                )
            state = {}
            for file in files:
                state.update(load_file(file))
            with same_architecture(resume_from_checkpoint, component):
                module.load_state_dict(state)

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        self._write_model_card(self.args.output_dir, model_name, dataset_name, tags)

    def _write_model_card(
        self,
        output_dir: str,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> None:
        if not self.is_world_process_zero():
            return
        if isinstance(tags, str):
            tags = [tags]
        if model_name is None:
            model_name = (self.args.hub_model_id or os.path.basename(os.path.normpath(output_dir))).split("/")[-1]
        save_model_card(
            output_dir=output_dir,
            base_model=hub_base_model(self.model_id),
            model_name=model_name,
            hub_model_id=self.hub_model_id,
            dataset_name=dataset_name,
            tags=[*self._tag_names, *(tags or [])],
            reward_names=self.reward_func_names,
            config=self.args,
            is_lora=self.is_peft,
            paper=self._paper,
            has_samples=os.path.exists(os.path.join(output_dir, SAMPLES_NAME)),
            example_prompt=self.train_dataset[0]["prompt"],
            pipeline_class=type(self.pipeline),
            is_video=self.adapter.num_frames is not None,
            lora_load_arguments=[
                lora_load_arguments(component)
                for component in trained_components(self.adapter.denoiser, self.adapter.denoiser_name)
            ],
            base_model_path=self.model_id if os.path.exists(self.model_id) else None,
            steps=self.state.global_step,
            num_prompts=len(self.train_dataset),
            log_history=self.state.log_history,
        )
