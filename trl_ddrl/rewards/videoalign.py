# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
VideoAlign's VideoReward (Liu et al., 2025, arXiv 2501.13918) on transformers' own `Qwen2VLModel`.

The released reward model is Qwen2-VL-2B-Instruct fine-tuned with LoRA, with three special tokens
`<|VQ_reward|>`, `<|MQ_reward|>`, `<|TA_reward|>` placed in a fixed evaluation prompt and a linear head (`rm_head`,
no bias) read at each of them: visual quality, motion quality and text alignment. Scores are normalised per dimension
with the mean and standard deviation of the release's `inference_config`; "overall" is the sum of the three normalised
scores. The video is seen at 2 frames per second (at least 4, an even count), each frame resized to at most 448 x 448
pixels (`max_frame_pixels = 200704`), as the release's `model_config.json` says.

What was read from the release (github.com/KwaiVGI/VideoAlign, `inference.py`, `trainer.py`, `prompt_template.py`,
`vision_process.py`, `utils.py`) is re-implemented here on tensors; none of its code is used.

Checkpoint layout loaded (the Hub repository `KwaiVGI/VideoReward`, or a local copy of it):

- `model_config.json`: `data_config` (`fps`, `num_frames`, `max_frame_pixels`, `prompt_template_type`), `model_config`
  (`model_name_or_path` of the base Qwen2-VL, `output_dim`), `peft_lora_config` (`lora_r`, `lora_alpha`,
  `use_rslora`), `inference_config` (`VQ_mean`, `VQ_std`, ...);
- `checkpoint-<step>/model.pth`: the whole (PEFT-wrapped) model's state dict, or `adapter_model.safetensors` plus
  `non_lora_state_dict.pth`; LoRA weights are merged into the base weights on load;
- `checkpoint-<step>/tokenizer/` (optional): the tokenizer with the three reward tokens; else the base model's
  tokenizer with the tokens added.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .qwen_reward import (
    VIDEO_TOKEN,
    build_qwen2vl_model,
    chat_token_ids,
    hidden_at_tokens,
    pad_right,
    to_qwen2vl_model_keys,
)
from .qwen_vision import VIDEO_MIN_PIXELS, sample_video_frames, video_pixel_inputs
from .registry import register_reward, split_spec_argument


DIMENSIONS = ("vq", "mq", "ta")
"""VideoAlign's dimensions in the order of its reward tokens: visual quality, motion quality, text alignment."""
OVERALL = "overall"
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DEFAULT_CHECKPOINT = "KwaiVGI/VideoReward"
DEFAULT_BASE_MODEL = "Qwen/Qwen2-VL-2B-Instruct"

# The release's `detailed_special` evaluation prompt (`prompt_template.py`), the one the reward model was trained on,
# line by line to keep its trailing spaces.
VIDEOALIGN_PROMPT = "\n".join(
    (
        "",
        "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.",
        "",
        "**Visual Quality:**  ",
        "Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:",
        "- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.",
        "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.",
        "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).",
        "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.",
        "- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. ",
        "",
        "Please provide the ratings of Visual Quality: <|VQ_reward|>",
        "END",
        "",
        "**Motion Quality:**  ",
        "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:",
        "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).",
        "- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).",
        "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.",
        "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.",
        "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.",
        "- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.",
        "",
        "Please provide the ratings of Motion Quality: <|MQ_reward|>",
        "END",
        "",
        "**Text Alignment:**  ",
        "Assess how well the video matches the textual prompt across the following sub-dimensions:",
        "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.",
        "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.",
        "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  ",
        "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.",
        "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.",
        "",
        "Textual prompt - {text_prompt}",
        "Please provide the ratings of Text Alignment: <|TA_reward|>",
        "END",
        "",
    )
)


@dataclass
class VideoAlignSettings:
    """What `model_config.json` of a VideoAlign release fixes; the defaults are those of `KwaiVGI/VideoReward`."""

    base_model: str = field(default=DEFAULT_BASE_MODEL, metadata={"help": "Hub id or path of the base Qwen2-VL."})
    fps: float | None = field(default=2.0, metadata={"help": "Frames per second of video the model sees."})
    num_frames: int | None = field(default=None, metadata={"help": "Fixed frame count instead of `fps`."})
    max_pixels: int = field(default=200704, metadata={"help": "Largest frame area after resizing (448 x 448)."})
    min_pixels: int = field(default=VIDEO_MIN_PIXELS, metadata={"help": "Smallest frame area after resizing."})
    prompt_template: str = field(default="detailed_special", metadata={"help": "Only `detailed_special` is known."})
    lora_scale: float = field(default=2.0, metadata={"help": "LoRA alpha / r (rsLoRA: alpha / sqrt(r))."})
    mean: tuple[float, float, float] = field(
        default=(3.6757, 1.1646, 2.8105), metadata={"help": "Raw score means of VQ, MQ, TA (normalisation)."}
    )
    std: tuple[float, float, float] = field(
        default=(2.2476, 1.3811, 2.5121), metadata={"help": "Raw score standard deviations of VQ, MQ, TA."}
    )

    @classmethod
    def from_model_config(cls, path: Path) -> "VideoAlignSettings":
        """Settings from a release's `model_config.json`; a missing `inference_config` means no normalisation."""
        config = json.loads(path.read_text())
        data, model = config.get("data_config", {}), config.get("model_config", {})
        lora, inference = config.get("peft_lora_config", {}), config.get("inference_config")
        template = data.get("prompt_template_type", "detailed_special")
        if template != "detailed_special":
            raise ValueError(
                f"{path} uses prompt_template_type={template!r}; only VideoAlign's 'detailed_special' prompt (reward "
                "tokens in the prompt, as in KwaiVGI/VideoReward) is supported."
            )
        rank, alpha = lora.get("lora_r", 64), lora.get("lora_alpha", 128)
        scale = alpha / rank**0.5 if lora.get("use_rslora") else alpha / rank
        names = ("VQ", "MQ", "TA")
        return cls(
            base_model=model.get("model_name_or_path") or DEFAULT_BASE_MODEL,
            fps=data.get("fps", 2.0) if data.get("num_frames") is None else None,
            num_frames=None if data.get("num_frames") is None else int(data["num_frames"]),
            max_pixels=int(data.get("max_frame_pixels", 200704)),
            prompt_template=template,
            lora_scale=scale,
            mean=tuple(float(inference[f"{name}_mean"]) for name in names) if inference else (0.0, 0.0, 0.0),
            std=tuple(float(inference[f"{name}_std"]) for name in names) if inference else (1.0, 1.0, 1.0),
        )


def merge_lora(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """
    Fold PEFT LoRA weights into their base weights: `W = W_base + scale * B @ A` for every
    `<module>.base_layer.weight` with `<module>.lora_A.<adapter>.weight` and `<module>.lora_B.<adapter>.weight`; the
    merged weight is stored as `<module>.weight` (and `base_layer.bias` as `<module>.bias`). `modules_to_save` copies
    replace their module's weights; `original_module` copies are dropped. Other keys pass unchanged.
    """
    merged: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if match := re.fullmatch(r"(.+)\.lora_([AB])\.[^.]+\.weight", key):
            lora.setdefault(match.group(1), {})[match.group(2)] = value
        elif ".original_module." in key:
            continue
        elif match := re.fullmatch(r"(.+)\.modules_to_save\.[^.]+\.(.+)", key):
            merged[f"{match.group(1)}.{match.group(2)}"] = value
        else:
            merged[key.replace(".base_layer.", ".")] = value
    for module, pair in lora.items():
        if set(pair) != {"A", "B"} or f"{module}.weight" not in merged:
            raise ValueError(f"LoRA weights of {module!r} are incomplete (found {sorted(pair)} and no base weight).")
        base = merged[f"{module}.weight"]
        delta = pair["B"].float() @ pair["A"].float()
        merged[f"{module}.weight"] = (base.float() + scale * delta).to(base.dtype)
    return merged


def latest_checkpoint(directory: Path, step: int | None = None) -> Path:
    """`directory/checkpoint-<step>`, the highest step if `step` is None."""
    found = {int(path.name.split("-")[-1]): path for path in directory.glob("checkpoint-*") if path.is_dir()}
    if not found:
        raise ValueError(f"{directory} has no checkpoint-<step> folder; pass the folder of a VideoAlign release.")
    if step is not None and step not in found:
        raise ValueError(f"{directory} has no checkpoint-{step}; found steps {sorted(found)}.")
    return found[max(found) if step is None else step]


def load_release_state_dict(checkpoint: Path, lora_scale: float) -> dict[str, torch.Tensor]:
    """The merged state dict of a `checkpoint-<step>` folder (`model.pth`, or the adapter and non-LoRA weights)."""
    if (checkpoint / "model.pth").exists():
        state_dict = torch.load(checkpoint / "model.pth", map_location="cpu", weights_only=True, mmap=True)
    elif (checkpoint / "adapter_model.safetensors").exists():
        from safetensors.torch import load_file

        state_dict = torch.load(checkpoint / "non_lora_state_dict.pth", map_location="cpu", weights_only=True)
        state_dict.update(load_file(checkpoint / "adapter_model.safetensors"))
    else:
        raise ValueError(f"{checkpoint} holds neither model.pth nor adapter_model.safetensors.")
    return merge_lora(state_dict, lora_scale)


def resolve_release(model_name_or_path: str) -> Path:
    """A local release folder, or the Hub repository downloaded (its config, checkpoints and tokenizer)."""
    path = Path(model_name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_name_or_path, allow_patterns=["model_config.json", "checkpoint-*"]))


class VideoAlignReward(nn.Module):
    """
    VideoAlign's VideoReward: a Qwen2-VL reward model scoring a video's visual quality (`vq`), motion quality (`mq`)
    and text alignment (`ta`) against its prompt; `overall` (the default) is their sum. Scores are normalised by the
    release's statistics (about zero mean and unit variance per dimension on its data) unless `normalize=False`.

    The model is transformers' `Qwen2VLModel`; frames are sampled, resized and patchified in torch on its device
    (see [`~trl_ddrl.rewards.qwen_vision`]). Images `[B, C, H, W]` are scored as two-frame still videos.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"KwaiVGI/VideoReward"`):
            Hub id or local folder of a VideoAlign release (`model_config.json` and `checkpoint-<step>/`).
        dimension (`str`, *optional*, defaults to `"overall"`):
            `"overall"`, `"vq"`, `"mq"` or `"ta"`.
        base_model_name_or_path (`str`, *optional*):
            The base Qwen2-VL (its config and, if the release has none, its tokenizer); defaults to the release's
            `model_config.model_name_or_path` (`Qwen/Qwen2-VL-2B-Instruct`).
        video_fps (`float`, *optional*, defaults to `16.0`):
            Frame rate of the generated videos (16 for Wan 2.x, 24 for HunyuanVideo and Cosmos); with the model's
            `fps` it sets how many frames are scored.
        num_frames (`int`, *optional*):
            Score this many evenly spaced frames (rounded to even) instead of sampling at the model's fps.
        max_pixels (`int`, *optional*):
            Largest frame area after resizing; defaults to the release's `max_frame_pixels`.
        min_pixels (`int`, *optional*):
            Smallest frame area after resizing (smaller frames are upscaled); defaults to qwen-vl-utils' 128 x 28 x 28.
        normalize (`bool`, *optional*, defaults to `True`):
            Normalise each dimension with the release's mean and standard deviation.
        batch_size (`int`, *optional*, defaults to `4`):
            Videos per forward pass.
        checkpoint_step (`int`, *optional*):
            Which `checkpoint-<step>` to load; the highest by default.
        model_init_kwargs (`dict`, *optional*):
            `dtype` (default `torch.bfloat16`) and `attn_implementation` for the `Qwen2VLModel`.

    Example:

    ```python
    >>> from trl_ddrl.rewards import VideoAlignReward

    >>> reward = VideoAlignReward("KwaiVGI/VideoReward", dimension="mq", video_fps=16).to("cuda")
    >>> reward(prompts=["a cat surfing"], images=videos)  # videos [1, F, 3, H, W] in [0, 1]
    ```
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_CHECKPOINT,
        dimension: str = OVERALL,
        *,
        base_model_name_or_path: str | None = None,
        video_fps: float = 16.0,
        num_frames: int | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        normalize: bool = True,
        batch_size: int = 4,
        checkpoint_step: int | None = None,
        model_init_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        from transformers import AutoTokenizer

        if dimension not in (*DIMENSIONS, OVERALL):
            raise ValueError(f"VideoAlign dimension={dimension!r}: choose one of {', '.join((OVERALL, *DIMENSIONS))}.")
        release = resolve_release(model_name_or_path)
        config_file = release / "model_config.json"
        if not config_file.exists():
            raise ValueError(
                f"{model_name_or_path!r} is not a VideoAlign release: it has no model_config.json. Pass the Hub id "
                f"{DEFAULT_CHECKPOINT!r} or a local copy of it."
            )
        settings = VideoAlignSettings.from_model_config(config_file)
        settings.base_model = base_model_name_or_path or settings.base_model
        if num_frames is not None:
            settings.fps, settings.num_frames = None, num_frames
        settings.max_pixels = max_pixels or settings.max_pixels
        settings.min_pixels = min_pixels or settings.min_pixels
        self.settings, self.dimension, self.normalize = settings, dimension, normalize
        self.video_fps, self.batch_size = video_fps, batch_size
        self.name = f"videoalign_{dimension}"
        self.prompt_template = VIDEOALIGN_PROMPT  # `{text_prompt}` and the three reward tokens, in order

        checkpoint = latest_checkpoint(release, checkpoint_step)
        weights, head_state = to_qwen2vl_model_keys(
            load_release_state_dict(checkpoint, settings.lora_scale), source=f"the VideoAlign checkpoint {checkpoint}"
        )
        if set(head_state) != {"weight"}:
            raise ValueError(
                f"The VideoAlign checkpoint {checkpoint} has reward head keys {sorted(head_state)}; expected "
                "'rm_head.weight' alone (a bias-free linear head)."
            )
        head = head_state["weight"]
        tokenizer_path = checkpoint / "tokenizer"
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path if tokenizer_path.is_dir() else settings.base_model
        )
        self.tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        self.reward_token_ids = self.tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)

        self.model = build_qwen2vl_model(
            settings.base_model,
            weights,
            self.reward_token_ids,
            model_init_kwargs,
            f"the VideoAlign checkpoint {checkpoint}",
        )
        self.head = nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=self.model.dtype)
        self.head.weight.data.copy_(head)
        self.head.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(settings.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(settings.std, dtype=torch.float32), persistent=False)

    def _text_ids(self, prompt: str, num_video_tokens: int) -> list[int]:
        """Token ids of the chat for one prompt around `num_video_tokens` video placeholders."""
        for token in REWARD_TOKENS:  # a prompt must not add reward tokens of its own
            prompt = prompt.replace(token, "")
        text = self.prompt_template.format(text_prompt=prompt)
        return chat_token_ids(self.tokenizer, text, self.video_token_id, num_video_tokens)

    @torch.no_grad()
    def raw_scores(self, prompts: list[str], videos: torch.Tensor) -> torch.Tensor:
        """
        Unnormalised VQ, MQ, TA scores `[B, 3]` (float32, on CPU) of `videos` `[B, F, C, H, W]` (or images
        `[B, C, H, W]`) in `[0, 1]`, `batch_size` videos per forward pass.
        """
        device = self.model.device
        vision = self.model.config.vision_config
        frames = sample_video_frames(videos, self.video_fps, self.settings.fps, self.settings.num_frames)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = frames[start : start + self.batch_size].to(device)
            pixels, grid = video_pixel_inputs(
                chunk,
                self.settings.max_pixels,
                self.settings.min_pixels,
                vision.patch_size,
                vision.spatial_merge_size,
                vision.temporal_patch_size,
            )
            num_video_tokens = int(grid[0].prod()) // vision.spatial_merge_size**2
            rows = [self._text_ids(prompt, num_video_tokens) for prompt in prompts[start : start + self.batch_size]]
            input_ids, attention_mask = pad_right(rows, self.tokenizer.pad_token_id, device)
            at_tokens = hidden_at_tokens(
                self.model, input_ids, attention_mask, pixels, grid, self.reward_token_ids, video=True
            )
            logits = self.head(at_tokens).float()  # [b, 3, out_dim]
            scores.append(logits[..., 0] if logits.shape[-1] == 1 else logits.diagonal(dim1=1, dim2=2))
        return torch.cat(scores).cpu()

    def scores(self, prompts: list[str], videos: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every dimension `[B]` (`vq`, `mq`, `ta`, `overall`), normalised unless `normalize=False`."""
        raw = self.raw_scores(prompts, videos)
        values = (raw - self.mean.cpu()) / self.std.cpu() if self.normalize else raw
        return dict(zip(DIMENSIONS, values.unbind(1), strict=True)) | {OVERALL: values.sum(dim=1)}

    def forward(self, prompts: list[str], images: torch.Tensor, **kwargs: Any) -> list[float]:
        """One reward per video (the chosen dimension) for `images` `[B, F, C, H, W]` or `[B, C, H, W]` in `[0, 1]`."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"VideoAlignReward got {len(prompts)} prompts for {images.shape[0]} videos.")
        return self.scores(prompts, images)[self.dimension].tolist()


VIDEOALIGN_OPTIONS = {
    "video_fps": float,
    "num_frames": int,
    "max_pixels": int,
    "min_pixels": int,
    "batch_size": int,
    "normalize": lambda value: value.lower() in ("1", "true", "yes"),
}


@register_reward("videoalign")
def videoalign(argument: str = "") -> VideoAlignReward:
    """
    `videoalign[:<dimension>][,<release>[,<base model>]][,<option>=<value>...]`: [`VideoAlignReward`], dimension
    `overall` (default), `vq`, `mq` or `ta`; release `KwaiVGI/VideoReward` by default; options `video_fps`,
    `num_frames`, `max_pixels`, `min_pixels`, `batch_size`, `normalize`. A first part that is not a dimension is the
    release (`videoalign:/path/to/VideoReward`).
    """
    positional, options = split_spec_argument(argument, "videoalign", VIDEOALIGN_OPTIONS)
    dimension = positional.pop(0) if positional and positional[0] in (*DIMENSIONS, OVERALL) else OVERALL
    if len(positional) > 2:
        raise ValueError(f"videoalign:{argument}: expected at most <dimension>,<release>,<base model> before options.")
    release, base = (positional + [DEFAULT_CHECKPOINT, None][len(positional) :])[:2]
    return VideoAlignReward(release, dimension, base_model_name_or_path=base, **options)
