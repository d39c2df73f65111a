# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Context parallelism for diffusers' `CosmosTransformer3DModel` (Cosmos-Predict2 and Cosmos-Predict2.5), which
diffusers 0.42.1 does not give one: a context-parallel plan (`_cp_plan`) and a self-attention processor that hands
diffusers' parallel config to `dispatch_attention_fn`.

[`enable_cosmos_context_parallel`] installs both on one model instance; `trl_ddrl.parallel` calls it, only with
`context_parallel_size > 1`, before `ModelMixin.enable_parallelism`. The class and every other instance stay as
diffusers wrote them.

The plan splits every per-token tensor the blocks see along the token axis, after the patch embedding:

- the rotary embedding `(cos, sin)` (`[S, D]` each) and the learnable extra positional embedding (`[B, S, D]`, when
  the checkpoint has one), at their modules' outputs;
- the hidden states `[B, S, D]`, at the first block's input;
- the timestep embeddings `embedded_timestep` and `temb` at every block's and the output norm's input. With one
  timestep per sample they are `[B, D]` / `[B, 3D]` and stay whole (diffusers skips a tensor whose rank is not the
  plan's, with a one-time warning); with one timestep per latent frame (the conditioning frames of image- and
  video-to-world at their own noise level) the transformer expands them to `[B, S, D]` / `[B, S, 3D]` inside its
  forward, after any module boundary, so each block takes its part of the whole tensor;
- a ControlNet residual `[B, S, D]`, if given, at each block's input;

and gathers the output of `proj_out` (`[B, S, p C]`) before the unpatchify. The padding and condition masks are
concatenated to the latents before the patch embedding, so they are split with them. Cross-attention is not split:
each rank's queries attend to all text tokens (and the text attention mask, `[B, 1, 1, S_text]`, is over those
keys), exactly as in the whole model. Only the self-attention (`attn1`) takes part in the parallel attention, as
Wan's processor does (`parallel_config` only when `encoder_hidden_states is None`).
"""

import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0
from torch import nn


class CosmosContextParallelAttnProcessor(CosmosAttnProcessor2_0):
    """
    Cosmos' self-attention (`CosmosAttnProcessor2_0` on `attn1`) that takes part in diffusers' context parallelism:
    `enable_parallelism` sets `_parallel_config`, `set_attention_backend` sets `_attention_backend`, and both are
    passed to `dispatch_attention_fn`. Without a parallel config it computes what `CosmosAttnProcessor2_0` does.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            # A cross-attention: the keys are the whole text on every rank, the local queries need no exchange.
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        def heads(projection: nn.Module) -> torch.Tensor:  # [B, S, H D] -> [B, H, S, D]
            return projection(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)

        query, key, value = attn.norm_q(heads(attn.to_q)), attn.norm_k(heads(attn.to_k)), heads(attn.to_v)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        # (`CosmosAttnProcessor2_0` repeats keys and values for grouped-query attention by the ratio of the query's
        # and the key's head sizes, which is 1 for every Cosmos attention: nothing to repeat.)
        hidden_states = dispatch_attention_fn(
            query.transpose(1, 2),  # [B, S, H, D], diffusers' layout
            key.transpose(1, 2),
            value.transpose(1, 2),
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def cosmos_context_parallel_plan(model: nn.Module) -> dict:
    """The context-parallel plan of one `CosmosTransformer3DModel` (see the module's docstring)."""
    tokens = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
    rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    plan = {
        "rope": {0: rope, 1: rope},
        "transformer_blocks.0": {"hidden_states": tokens},
        "transformer_blocks.*": {"embedded_timestep": tokens, "temb": tokens, "controlnet_residual": tokens},
        "norm_out": {"embedded_timestep": tokens, "temb": tokens},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    if getattr(model, "learnable_pos_embed", None) is not None:
        plan["learnable_pos_embed"] = {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)}
    return plan


def is_cosmos_transformer(model: nn.Module) -> bool:
    from diffusers import CosmosTransformer3DModel

    return isinstance(model, CosmosTransformer3DModel)


def enable_cosmos_context_parallel(model: nn.Module) -> None:
    """
    Give this `CosmosTransformer3DModel` instance a `_cp_plan` and the [`CosmosContextParallelAttnProcessor`] on
    each block's self-attention, so that `model.enable_parallelism(config=ContextParallelConfig(...))` can split it.
    Idempotent; a model whose class already defines `_cp_plan` (a later diffusers) is left to diffusers.
    """
    if not is_cosmos_transformer(model) or getattr(model, "_cp_plan", None) is not None:
        return
    for block in model.transformer_blocks:
        if type(block.attn1.processor) is not CosmosAttnProcessor2_0:
            raise ValueError(
                f"The self-attention of {type(model).__name__} runs {type(block.attn1.processor).__name__}, not "
                "diffusers' CosmosAttnProcessor2_0, so trl_ddrl cannot make it context-parallel. Use "
                "context_parallel_size=1, or keep the default attention processor."
            )
    for block in model.transformer_blocks:
        block.attn1.set_processor(CosmosContextParallelAttnProcessor())
    model._cp_plan = cosmos_context_parallel_plan(model)
