# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Tiny random diffusers pipelines built from configs, with tokenizers built in memory (no network)."""

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)


CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def tiny_clip_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in CHARACTERS:
        vocab[character] = len(vocab)
        vocab[character + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 16) -> T5Tokenizer:
    """A character-level unigram T5 tokenizer."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -1.0) for c in CHARACTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def tiny_clip_text_encoder(vocab_size: int, hidden_size: int = 16, projection_dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0, **kwargs) -> AutoencoderKL:
    """A VAE with a downsampling factor of 2."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        **kwargs,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True) -> StableDiffusion3Pipeline:
    """A random `StableDiffusion3Pipeline` generating 16x16 images from 8x8x4 latents."""
    clip_tokenizer = tiny_clip_tokenizer()
    vocab_size = len(clip_tokenizer)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=8,
    )
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        torch.manual_seed(seed + 3)
        tokenizer_3 = tiny_t5_tokenizer()
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_3),
                d_model=32,
                d_kv=8,
                d_ff=32,
                num_layers=1,
                num_heads=2,
                decoder_start_token_id=0,
            )
        ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed=seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=tiny_clip_text_encoder(vocab_size, seed=seed + 1),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny_clip_text_encoder(vocab_size, seed=seed + 2),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
