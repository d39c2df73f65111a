# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
HPSv3 (Ma et al., ICCV 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score") on transformers' own
`Qwen2VLModel`.

The released reward model is Qwen2-VL-7B-Instruct fine-tuned in full (no LoRA) with one added special token
`<|Reward|>` placed at the end of a fixed instruction, and an MLP head (`rm_head`, the release's "ranknet" head:
`Linear(3584, 1024) -> ReLU -> Dropout -> Linear(1024, 16) -> ReLU -> Linear(16, 2)`, kept in float32) read at that
token's last hidden state. The two outputs are the mean `mu` and the log standard deviation of a Gaussian over the
preference score (trained with an uncertainty-aware Bradley-Terry loss on `mu_a - mu_b` with variance
`exp(s_a)**2 + exp(s_b)**2`); the score is `mu`, higher is preferred, on no fixed scale (not normalised).

The image is resized to about 256 x 28 x 28 = 200 704 pixels (`min_pixels = max_pixels`; both sides multiples of 28,
so the area lands near the target: 448 x 448 for a square image, 532 x 392 for 512 x 384), normalised with CLIP's mean and standard deviation and patchified as
a two-frame still video, as Qwen2-VL's image processor does. As in VideoAlign (whose reward class HPSv3 reuses), the
text decoder runs under sequential positions (see [`~trl_ddrl.rewards.qwen_reward`]).

What was read from the release (the `hpsv3` 1.0.0 package on PyPI and github.com/MizzenAI/HPSv3: `inference.py`,
`train.py`, `model/qwen2vl_trainer.py`, `dataset/data_collator_qwen.py`, `config/HPSv3_7B.yaml`) is re-implemented
here on tensors; none of its code is used.

Checkpoint layout loaded: one file, `HPSv3.safetensors` of the Hub repository `MizzenAI/HPSv3` (or a `.pth` file of
the same state dict, optionally under a `"model"` key): the whole `Qwen2VLRewardModelBT` state dict, Qwen2-VL weights
in the transformers 4.45 (`model.layers.*`, `visual.*`) or >= 4.52 (`model.language_model.*`, `model.visual.*`) layout,
`lm_head.weight` (unused) and `rm_head.{0,3,5}.{weight,bias}`. The token embeddings have the base tokenizer's size
plus one (the release resized them after adding `<|Reward|>`).
"""

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .qwen_reward import (
    IMAGE_TOKEN,
    build_qwen2vl_model,
    chat_token_ids,
    hidden_at_tokens,
    pad_right,
    to_qwen2vl_model_keys,
)
from .qwen_vision import FRAME_FACTOR, video_pixel_inputs
from .registry import register_reward, split_spec_argument


DEFAULT_CHECKPOINT = "MizzenAI/HPSv3"
CHECKPOINT_FILE = "HPSv3.safetensors"
DEFAULT_BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PIXELS = 256 * 28 * 28
"""The release's image area: `min_pixels = max_pixels = 200704` (448 x 448 for a square image)."""
HEAD_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias")
"""The `rm_head.*` keys of the release's MLP head (`nn.Sequential` indices of its three linear layers)."""

# The release's instruction (`INSTRUCTION` + `prompt_with_special_token` of `dataset/data_collator_qwen.py`), line by
# line to keep its trailing spaces; `{text_prompt}` is the generation prompt.
HPSV3_PROMPT = "\n".join(
    (
        "",
        "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. ",
        "",
        "**Visual Quality:**  ",
        "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
        "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.",
        "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.",
        "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).",
        "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.",
        "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. ",
        "",
        "**Text Alignment:**  ",
        "Assess how well the image matches the textual prompt across the following sub-dimensions:",
        "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.",
        "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.",
        "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.",
        "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.",
        "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.",
        "Textual prompt - {text_prompt}",
        "",
        "",
        "",
        "Please provide the overall ratings of this image: <|Reward|>",
        "",
        "END",
        "",
    )
)


def resolve_checkpoint(model_name_or_path: str) -> Path:
    """A checkpoint file, a folder holding `HPSv3.safetensors` (or `model.pth`), or the file downloaded from the Hub."""
    path = Path(model_name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in (CHECKPOINT_FILE, "model.pth"):
            if (path / name).is_file():
                return path / name
        raise ValueError(f"{path} holds neither {CHECKPOINT_FILE} nor model.pth; pass the HPSv3 checkpoint file.")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model_name_or_path, CHECKPOINT_FILE))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a `.safetensors` file or a torch file (unwrapping a `{"model": state_dict}` checkpoint)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state_dict["model"] if "model" in state_dict and isinstance(state_dict["model"], dict) else state_dict


def ranknet_head(head_state: dict[str, torch.Tensor], source: str) -> nn.Sequential:
    """
    The release's MLP head `Linear -> ReLU -> Dropout -> Linear -> ReLU -> Linear` in float32, sized by and loaded
    from `head_state` (`rm_head.*` keys without the prefix); raises, naming `source` and the expected keys, when the
    keys differ (another head type, or a head trained with `rm_head_kwargs`).
    """
    if set(head_state) != set(HEAD_KEYS):
        raise ValueError(
            f"The reward head of {source} has keys {sorted('rm_head.' + key for key in head_state)}; HPSv3's head needs "
            f"exactly {['rm_head.' + key for key in HEAD_KEYS]} (the release's 'ranknet' MLP). Pass the released "
            f"{CHECKPOINT_FILE}."
        )
    first, second, last = (head_state[f"{index}.weight"] for index in (0, 3, 5))
    head = nn.Sequential(
        nn.Linear(first.shape[1], first.shape[0]),
        nn.ReLU(),
        nn.Dropout(0.05),
        nn.Linear(second.shape[1], second.shape[0]),
        nn.ReLU(),
        nn.Linear(last.shape[1], last.shape[0]),
    )
    head.load_state_dict({key: value.float() for key, value in head_state.items()}, strict=True)
    return head.eval().requires_grad_(False)


class HPSv3Reward(nn.Module):
    """
    HPSv3: a Qwen2-VL-7B reward model of human preference between generated images. The reward is the predicted mean
    preference score `mu` (higher is preferred, unnormalised); [`mu_sigma`] also returns the predicted standard
    deviation. Videos `[B, F, C, H, W]` get the mean of their frames' scores.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"MizzenAI/HPSv3"`):
            Hub id (the file `HPSv3.safetensors` is downloaded), a local checkpoint file (`.safetensors` or `.pth`),
            or a folder holding `HPSv3.safetensors`.
        base_model_name_or_path (`str`, *optional*, defaults to `"Qwen/Qwen2-VL-7B-Instruct"`):
            The base Qwen2-VL: its config (the architecture) and tokenizer (`<|Reward|>` is added to it).
        max_pixels (`int`, *optional*, defaults to `200704`):
            Largest image area after resizing; the release uses 256 x 28 x 28 for both bounds.
        min_pixels (`int`, *optional*, defaults to `200704`):
            Smallest image area after resizing (smaller images are upscaled).
        batch_size (`int`, *optional*, defaults to `8`):
            Images per forward pass.
        model_init_kwargs (`dict`, *optional*):
            `dtype` (default `torch.bfloat16`) and `attn_implementation` for the `Qwen2VLModel`; the head stays float32.

    Example:

    ```python
    >>> from trl_ddrl.rewards import HPSv3Reward

    >>> reward = HPSv3Reward().to("cuda")
    >>> reward(prompts=["a cat surfing"], images=images)  # images [1, 3, H, W] in [0, 1]
    ```
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_CHECKPOINT,
        *,
        base_model_name_or_path: str = DEFAULT_BASE_MODEL,
        max_pixels: int = IMAGE_PIXELS,
        min_pixels: int = IMAGE_PIXELS,
        batch_size: int = 8,
        model_init_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        from transformers import AutoTokenizer

        checkpoint = resolve_checkpoint(model_name_or_path)
        source = f"the HPSv3 checkpoint {checkpoint}"
        weights, head_state = to_qwen2vl_model_keys(load_state_dict(checkpoint), source=source)
        self.tokenizer = AutoTokenizer.from_pretrained(base_model_name_or_path)
        self.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_token_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.model = build_qwen2vl_model(
            base_model_name_or_path, weights, [self.reward_token_id], model_init_kwargs, source
        )
        self.head = ranknet_head(head_state, source)
        if self.head[0].in_features != self.model.config.text_config.hidden_size:
            raise ValueError(
                f"The reward head of {source} reads {self.head[0].in_features} features, but the base model "
                f"{base_model_name_or_path!r} has hidden size {self.model.config.text_config.hidden_size}: pass the "
                f"base model HPSv3 was trained from ({DEFAULT_BASE_MODEL!r})."
            )
        self.max_pixels, self.min_pixels, self.batch_size = max_pixels, min_pixels, batch_size
        self.prompt_template = HPSV3_PROMPT  # `{text_prompt}` and one `<|Reward|>`
        self.name = "hpsv3"

    def _text_ids(self, prompt: str, num_image_tokens: int) -> list[int]:
        """Token ids of the chat for one prompt after `num_image_tokens` image placeholders."""
        text = self.prompt_template.format(text_prompt=prompt.replace(REWARD_TOKEN, ""))
        return chat_token_ids(self.tokenizer, text, self.image_token_id, num_image_tokens)

    @torch.no_grad()
    def mu_sigma(self, prompts: list[str], images: torch.Tensor) -> torch.Tensor:
        """
        The predicted preference mean and standard deviation `[B, 2]` (float32, on CPU) of `images` `[B, C, H, W]` in
        `[0, 1]`, `batch_size` images per forward pass.
        """
        if images.ndim != 4 or len(prompts) != images.shape[0]:
            raise ValueError(
                f"HPSv3 needs one prompt per image [B, C, H, W]; got {len(prompts)} prompts for shape "
                f"{tuple(images.shape)}."
            )
        device, vision = self.model.device, self.model.config.vision_config
        outputs = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = images[start : start + self.batch_size].to(device)
            still = chunk.unsqueeze(1).expand(-1, FRAME_FACTOR, -1, -1, -1)  # an image is a two-frame still video
            pixels, grid = video_pixel_inputs(
                still,
                self.max_pixels,
                self.min_pixels,
                vision.patch_size,
                vision.spatial_merge_size,
                vision.temporal_patch_size,
            )
            num_image_tokens = int(grid[0].prod()) // vision.spatial_merge_size**2
            rows = [self._text_ids(prompt, num_image_tokens) for prompt in prompts[start : start + self.batch_size]]
            input_ids, attention_mask = pad_right(rows, self.tokenizer.pad_token_id, device)
            hidden = hidden_at_tokens(
                self.model, input_ids, attention_mask, pixels, grid, [self.reward_token_id], video=False
            )
            outputs.append(self.head(hidden[:, 0].float()))  # [b, 2]: mu, log sigma
        mu, log_sigma = torch.cat(outputs).cpu().unbind(1)
        return torch.stack([mu, log_sigma.exp()], dim=1)

    def forward(self, prompts: list[str], images: torch.Tensor, **kwargs: Any) -> list[float]:
        """HPSv3's `mu` per sample of `images` `[B, C, H, W]`, or the mean over frames of videos `[B, F, C, H, W]`."""
        if images.ndim == 5:
            frames = images.shape[1]
            scores = self.mu_sigma([prompt for prompt in prompts for _ in range(frames)], images.flatten(0, 1))
            return scores[:, 0].view(-1, frames).mean(dim=1).tolist()
        return self.mu_sigma(prompts, images)[:, 0].tolist()


HPSV3_OPTIONS = {"max_pixels": int, "min_pixels": int, "batch_size": int}


@register_reward("hpsv3")
def hpsv3(argument: str = "") -> HPSv3Reward:
    """
    `hpsv3[:<checkpoint>[,<base model>]][,<option>=<value>...]`: [`HPSv3Reward`]; checkpoint `MizzenAI/HPSv3` and
    base model `Qwen/Qwen2-VL-7B-Instruct` by default; options `max_pixels`, `min_pixels`, `batch_size`.
    """
    positional, options = split_spec_argument(argument, "hpsv3", HPSV3_OPTIONS)
    if len(positional) > 2:
        raise ValueError(f"hpsv3:{argument}: expected at most <checkpoint>,<base model> before options.")
    checkpoint, base = (positional + [DEFAULT_CHECKPOINT, DEFAULT_BASE_MODEL][len(positional) :])[:2]
    return HPSv3Reward(checkpoint, base_model_name_or_path=base, **options)
