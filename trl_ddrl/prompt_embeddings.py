# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Prompt embeddings without the text encoders resident on the accelerator.

The text encoders are frozen, so a prompt's embeddings never change during training, yet every rollout, data batch
and evaluation encodes its prompts again, and the encoders (T5-XXL: ~9.5 GiB in bfloat16; Qwen2.5-VL-7B: ~16 GiB) stay
on every GPU for it. [`PromptEncoder`] wraps the adapter's `encode_prompts` with three options:

- an LRU cache of `cache_size` prompts (`prompt_embedding_cache_size`): each prompt's rows of the conditioning
  (`prompt_embeds`, pooled embeddings, masks, the negative prompt's twins), on the CPU, keyed by the prompt, the
  source image's bytes (image editing) and the autocast state the encoding ran under. A hit returns the very values
  the encoders gave, so training with the cache is bit-identical to training without it (as long as an encoding does
  not depend on the other prompts of its batch, which holds for the padded-to-max-length encoders of every family).
- `offload_text_encoders`: the text encoders live on the CPU and visit the accelerator only while encoding a miss.
- [`PromptEncoder.precompute`] (`precompute_prompt_embeddings`, DanceGRPO's way): encode every prompt of the datasets
  once before training, kept for the whole run (outside the LRU bound), with the encoders offloaded after it.

Memory: the cache holds `bytes_per_prompt` x its entries on the host, where `bytes_per_prompt` is the sum over the
conditioning's tensors of one row's bytes (SD3 at `max_sequence_length=256`: `(77 + 256) x 4096 x 2` bytes of
`prompt_embeds` + 2048 x 2 pooled, about 2.6 MiB; doubled with CFG's negative prompt). Offloading frees the encoders'
weights on the accelerator (`text_encoders` in the memory estimate) for the whole run but the encoding of a miss.
"""

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from .pipelines import Conditioning, DiffusionAdapter


def text_encoders(adapter: DiffusionAdapter) -> list[nn.Module]:
    """The pipeline's text encoders: its `nn.Module` components whose name holds `text_encoder`."""
    return [
        module
        for name, module in adapter.pipeline.components.items()
        if "text_encoder" in name and isinstance(module, nn.Module)
    ]


def _autocast_key(device: torch.device) -> tuple:
    """What of the autocast state changes an encoding: on or off, and its dtype, for `device`'s type."""
    device_type = torch.device(device).type
    if not torch.is_autocast_enabled(device_type):
        return (device_type, None)
    return (device_type, torch.get_autocast_dtype(device_type))


class PromptEncoder:
    """
    The adapter's `encode_prompts(prompts, device, **kwargs)` with a bounded LRU cache and offloadable text encoders.

    Args:
        adapter ([`~trl_ddrl.pipelines.DiffusionAdapter`]): Encodes the misses.
        cache_size (`int`, *optional*, defaults to `0`): Prompts kept in the LRU cache; `0` caches nothing.
        offload_text_encoders (`bool`, *optional*, defaults to `False`): Keep the text encoders on the CPU and move
            them to the encoding device only for the encoding of the misses.

    Calling it returns the same conditioning as `adapter.encode_prompts`: a dict of `[B, ...]` tensors on `device`.
    """

    def __init__(self, adapter: DiffusionAdapter, cache_size: int = 0, offload_text_encoders: bool = False):
        self.adapter = adapter
        self.cache_size = cache_size
        self.offload_text_encoders = offload_text_encoders
        self.cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()  # LRU: key -> one row per tensor, CPU
        self.precomputed: dict[tuple, dict[str, torch.Tensor]] = {}  # never evicted
        self.hits = self.misses = 0
        if offload_text_encoders:
            for module in text_encoders(adapter):
                module.to("cpu")

    @property
    def offloaded(self) -> list[nn.Module]:
        """The text encoders kept on the CPU between encodings (none unless `offload_text_encoders`)."""
        return text_encoders(self.adapter) if self.offload_text_encoders else []

    @contextlib.contextmanager
    def encoders_on(self, device: torch.device) -> Iterator[None]:
        """The text encoders on `device` for the block, and back on the CPU after it when they are offloaded."""
        if not self.offload_text_encoders:
            yield
            return
        modules = text_encoders(self.adapter)
        for module in modules:
            module.to(device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")

    def keys(self, prompts: list[str], device: torch.device, source_images: torch.Tensor | None = None) -> list[tuple]:
        """One cache key per prompt: the prompt, a digest of its source image's bytes (editing) and the autocast."""
        autocast = _autocast_key(device)
        if source_images is None:
            return [(prompt, None, autocast) for prompt in prompts]
        digests = [
            hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for image in source_images
        ]
        return [(prompt, digest, autocast) for prompt, digest in zip(prompts, digests, strict=True)]

    def __call__(self, prompts: list[str], device: torch.device, **kwargs) -> Conditioning:
        """
        The conditioning of `prompts` (`[B, ...]` per key, on `device`); `kwargs` (`source_images` `[B, C, H, W]` for
        image editing) go to the adapter with the misses' rows.
        """
        if not self.cache_size and not self.precomputed:
            with self.encoders_on(device):
                return self.adapter.encode_prompts(prompts, device, **kwargs)
        keys = self.keys(prompts, device, kwargs.get("source_images"))
        missing = [i for i, key in enumerate(keys) if self._lookup(key) is None]
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        rows: dict[tuple, dict[str, torch.Tensor]] = {}
        if missing:
            encoded = self._encode([prompts[i] for i in missing], device, kwargs, missing)
            for position, i in enumerate(missing):
                row = {key: value[position].detach().to("cpu", copy=True) for key, value in encoded.items()}
                rows[keys[i]] = row
                self._store(keys[i], row)
        # Rows encoded by this call come from `rows`: a cache smaller than the batch may have evicted them already.
        found = [rows.get(key) or self._lookup(key) for key in keys]
        return {name: torch.stack([row[name] for row in found]).to(device) for name in found[0]}

    def precompute(self, prompts: list[str], device: torch.device, batch_size: int) -> None:
        """
        Encode each distinct prompt of `prompts` once, `batch_size` at a time, and keep them for the whole run (they
        do not count against `cache_size`).
        """
        distinct = list(dict.fromkeys(prompts))
        for start in range(0, len(distinct), batch_size):
            batch = distinct[start : start + batch_size]
            keys = self.keys(batch, device)
            with self.encoders_on(device):
                encoded = self.adapter.encode_prompts(batch, device)
            for position, key in enumerate(keys):
                self.precomputed[key] = {
                    name: value[position].detach().to("cpu", copy=True) for name, value in encoded.items()
                }

    def _encode(self, prompts: list[str], device: torch.device, kwargs: dict, rows: list[int]) -> Conditioning:
        kwargs = {key: value[rows] if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
        with self.encoders_on(device):
            return self.adapter.encode_prompts(prompts, device, **kwargs)

    def _lookup(self, key: tuple) -> dict[str, torch.Tensor] | None:
        if key in self.precomputed:
            return self.precomputed[key]
        row = self.cache.get(key)
        if row is not None:
            self.cache.move_to_end(key)
        return row

    def _store(self, key: tuple, row: dict[str, torch.Tensor]) -> None:
        if not self.cache_size:
            return
        self.cache[key] = row
        self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
