# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""The prompt-embedding cache, the offloaded text encoders and the precomputed embeddings (trl_ddrl/prompt_embeddings.py)."""

import pytest
import torch
from test_trainer import brightness, make_args, prompt_dataset, state_of
from tiny_models import tiny_sd3_pipeline

from trl_ddrl import DDRLTrainer
from trl_ddrl.pipelines import SamplingSettings, get_adapter
from trl_ddrl.prompt_embeddings import PromptEncoder, text_encoders


class CountingAdapter:
    """An adapter whose `encode_prompts` counts the prompts it encodes and records where the text encoders were."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.pipeline = adapter.pipeline
        self.encoded: list[str] = []
        self.devices: list[set] = []

    def encode_prompts(self, prompts, device, **kwargs):
        self.encoded += prompts
        self.devices.append({next(module.parameters()).device.type for module in text_encoders(self.adapter)})
        return self.adapter.encode_prompts(prompts, device, **kwargs)


@pytest.fixture(scope="module")
def adapter():
    return get_adapter(tiny_sd3_pipeline(), SamplingSettings(num_inference_steps=4, eta=1.0, max_sequence_length=16))


def test_cached_embeddings_are_the_encoders_and_the_lru_keeps_its_bound(adapter):
    counting = CountingAdapter(adapter)
    encoder = PromptEncoder(counting, cache_size=2)
    first = encoder(["a cat", "a dog"], torch.device("cpu"))
    again = encoder(["a dog", "a cat"], torch.device("cpu"))
    direct = adapter.encode_prompts(["a dog", "a cat"], torch.device("cpu"))
    assert counting.encoded == ["a cat", "a dog"]  # the second call encoded nothing
    for key, value in direct.items():
        assert torch.equal(again[key], value), key
        assert torch.equal(first[key], value.flip(0)), key
    encoder(["a tree"], torch.device("cpu"))  # evicts the least recently used: "a dog" (then "a cat" was used)
    assert len(encoder.cache) == 2
    encoder(["a cat", "a dog"], torch.device("cpu"))
    assert counting.encoded == ["a cat", "a dog", "a tree", "a dog"]
    assert (encoder.hits, encoder.misses) == (3, 4)
    # A cache smaller than one call's batch still returns every row.
    tiny = PromptEncoder(counting, cache_size=1)
    assert tiny(["x", "y", "z"], torch.device("cpu"))["prompt_embeds"].shape[0] == 3


def test_the_autocast_state_is_part_of_the_key(adapter):
    counting = CountingAdapter(adapter)
    encoder = PromptEncoder(counting, cache_size=4)
    encoder(["a cat"], torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = encoder(["a cat"], torch.device("cpu"))
        assert torch.equal(mixed["prompt_embeds"], adapter.encode_prompts(["a cat"], "cpu")["prompt_embeds"])
    assert counting.encoded == ["a cat", "a cat"]


def test_offloaded_text_encoders_visit_the_device_only_to_encode(adapter, monkeypatch):
    """On a CPU-only machine the "device" is the CPU too: the moves are checked by recording every `.to`."""
    moves = []
    for module in text_encoders(adapter):
        original = module.to
        monkeypatch.setattr(
            module, "to", lambda device, original=original: moves.append(str(device)) or original(device)
        )
    encoder = PromptEncoder(adapter, cache_size=4, offload_text_encoders=True)
    assert moves == ["cpu"] * 3  # the three SD3 encoders, offloaded on construction
    moves.clear()
    encoder(["a cat"], torch.device("cpu"))
    assert moves == ["cpu"] * 3 + ["cpu"] * 3  # to the device for the miss, back after it
    moves.clear()
    encoder(["a cat"], torch.device("cpu"))
    assert moves == []  # a hit never moves them
    assert encoder.offloaded == text_encoders(adapter)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_cache_and_precomputed_embeddings_train_bit_identically(tiny_sd3_path, tmp_path, dtype):
    """
    Same seed: the weights after 4 steps (each prompt seen twice, data term on) are torch.equal with or without. In
    bfloat16 the rollout encodes under autocast and the data term without: two cache entries per prompt.
    """

    def run(name, **options):
        kwargs = {"torch_dtype": dtype}
        args = make_args(tmp_path / name, max_steps=4, data_beta=0.1, model_init_kwargs=kwargs, **options)
        trainer = DDRLTrainer(tiny_sd3_path, brightness, args=args, train_dataset=prompt_dataset(True))
        counting = CountingAdapter(trainer.adapter)
        trainer.prompt_encoder.adapter = counting
        trainer.train()
        return state_of(trainer.pipeline.transformer), counting, trainer.prompt_encoder

    expected, plain, _ = run("plain")
    cached, counting, encoder = run("cached", prompt_embedding_cache_size=8)
    precomputed, counting_pre, encoder_pre = run("precomputed", precompute_prompt_embeddings=True)
    for key, value in expected.items():
        assert torch.equal(cached[key], value), key
        assert torch.equal(precomputed[key], value), key
    # Without the cache every rollout and data batch encodes its 2 prompts; with it each of the 4 prompts once (per
    # autocast state).
    autocast_states = 2 if dtype == "bfloat16" else 1
    assert len(plain.encoded) == 16 and len(counting.encoded) == 4 * autocast_states
    assert (encoder.misses, encoder.hits) == (4 * autocast_states, 16 - 4 * autocast_states)
    assert counting_pre.encoded == [] and encoder_pre.misses == 0  # precomputed before training: no encoding
    assert encoder_pre.offloaded == text_encoders(counting_pre.adapter)


def test_precompute_refuses_image_editing(monkeypatch, tiny_sd3_path, tmp_path):
    from trl_ddrl.pipelines import DiffusionAdapter

    monkeypatch.setattr(DiffusionAdapter, "conditioned_on_source_image", True)
    with pytest.raises(ValueError, match="precompute_prompt_embeddings=True.*prompt_embedding_cache_size"):
        DDRLTrainer(
            tiny_sd3_path,
            brightness,
            args=make_args(tmp_path, precompute_prompt_embeddings=True),
            train_dataset=prompt_dataset(),
        )
