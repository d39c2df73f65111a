# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Offline stand-ins for the text encoders' tokenizers (no Hub access): character-level CLIP and T5 tokenizers, ByT5's own
byte tokenizer (it needs no file) and a byte-level Qwen2 tokenizer with Qwen's chat tokens. They give every prompt a sequence of the real length (CLIP pads to
77 tokens, T5 to the pipeline's `max_sequence_length`), so memory and compute are those of the real pipeline; the ids
are small, so any vocabulary size fits.
"""

from transformers import ByT5Tokenizer, CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer


CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789"

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Renders the `[{"role", "content": [{"type": "text", "text"}]}]` conversations of Cosmos Predict2.5's prompt encoder.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
)


def character_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges): id 0 is `<|startoftext|>`, id 1 `<|endoftext|>`."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in CHARACTERS:
        vocab[character] = len(vocab)
        vocab[character + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def character_t5_tokenizer(max_length: int = 512) -> T5Tokenizer:
    """A character-level unigram T5 tokenizer: ids 0, 1, 2 are `<pad>`, `</s>`, `<unk>`."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -1.0) for c in CHARACTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def byte_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level `Qwen2Tokenizer` without merges (one token per byte) plus Qwen's chat special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {character: index for index, character in enumerate(bytes_to_unicode().values())}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def byt5_tokenizer(max_length: int = 256) -> ByT5Tokenizer:
    """ByT5's own tokenizer (bytes, no vocabulary file), as HunyuanVideo 1.5's glyph encoder uses."""
    return ByT5Tokenizer(model_max_length=max_length)


TOKENIZERS = {
    "clip": character_clip_tokenizer,
    "t5": character_t5_tokenizer,
    "byt5": byt5_tokenizer,
    "qwen2": byte_qwen_tokenizer,
}
