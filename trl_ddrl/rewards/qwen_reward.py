# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
What the Qwen2-VL reward models (VideoAlign's VideoReward, HPSv3) share, on transformers' own `Qwen2VLModel`.

Both releases are a `Qwen2VLForConditionalGeneration` subclass (`Qwen2VLRewardModelBT`) with a head `rm_head` read at
special reward tokens placed in a fixed prompt. Both were trained with transformers 4.45, whose reward `forward` embeds
the vision input itself and then calls the text decoder with `position_ids=None`: the decoder then uses **sequential
positions** (`0 .. L-1`, the same on the three M-RoPE axes), not the multimodal RoPE positions that
`Qwen2VLForConditionalGeneration.forward` would compute. [`hidden_at_tokens`] reproduces that.

Memory: the model's weights live on the reward device in `dtype` (bf16 by default); one forward pass holds the hidden
states `[b, L, D]` of `b` samples; only the rows at the reward tokens `[b, n, D]` are kept.
"""

from typing import Any

import torch


# Qwen2-VL's chat template around one image or video and a text, with its default system turn, split at the vision
# tokens (what `processor.apply_chat_template(..., add_generation_prompt=True)` writes).
CHAT_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
CHAT_SUFFIX = "<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


def to_qwen2vl_model_keys(
    state_dict: dict[str, torch.Tensor], head_prefix: str = "rm_head.", source: str = "the checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """
    Split a reward model's state dict into `Qwen2VLModel` weights and the head's own state dict (keys without
    `head_prefix`, e.g. `{"weight": [out, hidden]}` for VideoAlign, `{"0.weight": ..., "5.bias": ...}` for HPSv3).

    Accepts the layouts of transformers 4.45 (`model.layers.*`, `visual.*`), of transformers >= 4.52
    (`model.language_model.*`, `model.visual.*`) and PEFT's `base_model.model.` prefix; `lm_head` is dropped (the
    reward reads hidden states). Raises, naming `source`, on an unknown key or when no `head_prefix` key is present.
    """
    weights, head = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix("base_model.model.")
        if key.startswith(head_prefix):
            head[key.removeprefix(head_prefix)] = value
        elif key.startswith("lm_head."):
            continue
        elif key.startswith(("model.language_model.", "model.visual.")):
            weights[key.removeprefix("model.")] = value
        elif key.startswith("visual."):
            weights[key] = value
        elif key.startswith("model."):
            weights["language_model." + key.removeprefix("model.")] = value
        else:
            raise ValueError(f"Unexpected key {key!r} in {source}: not a Qwen2-VL weight nor '{head_prefix}*'.")
    if not head:
        raise ValueError(f"{source} has no reward head (no '{head_prefix}*' keys).")
    return weights, head


def build_qwen2vl_model(
    base_model: str,
    weights: dict[str, torch.Tensor],
    token_ids: list[int],
    model_init_kwargs: dict[str, Any] | None = None,
    source: str = "the checkpoint",
):
    """
    A frozen `Qwen2VLModel` in eval mode with `weights` loaded strictly: the architecture from `base_model`'s config,
    the vocabulary size from the checkpoint's embeddings (the releases resized them after adding their reward tokens).
    `token_ids` (the reward tokens) must fall inside that vocabulary, else the tokenizer is not the checkpoint's.
    `model_init_kwargs`: `dtype` (default `torch.bfloat16`) and `attn_implementation`.
    """
    from transformers import Qwen2VLConfig, Qwen2VLModel
    from transformers.initialization import no_init_weights

    config = Qwen2VLConfig.from_pretrained(base_model)
    if "language_model.embed_tokens.weight" not in weights:
        raise ValueError(f"{source} has no token embeddings ('model.embed_tokens.weight' or its newer name).")
    config.text_config.vocab_size = weights["language_model.embed_tokens.weight"].shape[0]
    if max(token_ids) >= config.text_config.vocab_size:
        raise ValueError(
            f"The tokenizer gives the reward tokens ids {token_ids}, beyond the {config.text_config.vocab_size} "
            f"embeddings of {source}: the tokenizer does not belong to this checkpoint."
        )
    with no_init_weights():
        model = Qwen2VLModel._from_config(config, **({"dtype": torch.bfloat16} | (model_init_kwargs or {})))
    model.load_state_dict(weights, strict=True)
    return model.eval().requires_grad_(False)


def chat_token_ids(tokenizer, text: str, vision_token_id: int, num_vision_tokens: int) -> list[int]:
    """Token ids of Qwen2-VL's chat for one user turn: `num_vision_tokens` image or video placeholders, then `text`."""
    prefix = tokenizer(CHAT_PREFIX, add_special_tokens=False).input_ids
    suffix = tokenizer(CHAT_SUFFIX.format(text=text), add_special_tokens=False).input_ids
    return prefix + [vision_token_id] * num_vision_tokens + suffix


def pad_right(rows: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` `[B, L]` and `attention_mask` `[B, L]` of token rows, on `device`."""
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad_token_id] * (length - len(row)) for row in rows], device=device)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows], device=device)
    return input_ids, attention_mask


def reward_token_rows(input_ids: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """
    Positions `[B, n]` of the `n` reward tokens `token_ids` in each row of `input_ids` `[B, L]`; each must appear
    exactly once per row.
    """
    positions = []
    for token_id in token_ids:
        hits = (input_ids == token_id).nonzero()
        if hits.shape[0] != input_ids.shape[0] or not torch.equal(hits[:, 0].cpu(), torch.arange(input_ids.shape[0])):
            raise ValueError(f"Each sequence must hold reward token id {token_id} exactly once.")
        positions.append(hits[:, 1])
    return torch.stack(positions, dim=1)


def hidden_at_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixels: torch.Tensor,
    grid: torch.Tensor,
    token_ids: list[int],
    video: bool,
) -> torch.Tensor:
    """
    The last hidden states `[B, n, D]` (the model's dtype) at the reward tokens `token_ids` of right-padded
    `input_ids` `[B, L]`, with the vision input `pixels` `[N, C * t * p * p]` / `grid` `[B, 3]` scattered into its
    image (`video=False`) or video placeholders. Positions are sequential (`0 .. L-1` on all three RoPE axes), as in
    the releases' reward forward pass (see the module docstring).
    """
    names = ("pixel_values_videos", "video_grid_thw") if video else ("pixel_values", "image_grid_thw")
    vision = dict(zip(names, (pixels.to(model.device, model.dtype), grid.to(model.device)), strict=True))
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(3, *input_ids.shape)
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **vision)
    hidden = output.last_hidden_state
    rows = reward_token_rows(input_ids, token_ids)
    return hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
