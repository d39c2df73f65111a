# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Reward models: CLIP score, PickScore, HPSv2-style score, the LAION aesthetic predictor and an ImageReward hook.

Every model is an `nn.Module` with the reward signature `(prompts, images, **kwargs) -> list[float]`, images float in
`[0, 1]` of shape `[B, C, H, W]` (videos `[B, F, C, H, W]` are scored per frame and averaged). Images are resized,
centre-cropped and normalised with torch (no torchvision, no PIL round trip), as CLIP's image processor does.
"""

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, CLIPModel

from .frames import to_uint8_frames
from .video import score_per_frame


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_AESTHETIC_MLP = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_MLP_FILENAMES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth", "aesthetic-model.safetensors")


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> torch.Tensor:
    """
    CLIP's image preprocessing in torch: resize the shortest side to `size` (bicubic, antialiased), centre-crop to
    `size x size`, normalise with `mean` and `std`.

    Args:
        images (`torch.Tensor`): `[N, C, H, W]` floats in `[0, 1]`, with `C` = 3 (RGB) or 1 (grey, repeated to RGB).
        size (`int`): the model's input resolution, `config.vision_config.image_size`.

    Returns:
        `torch.Tensor`: `[N, 3, size, size]` float32 pixel values.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"CLIP preprocessing expects images of shape [N, 3, H, W] or [N, 1, H, W], got {tuple(images.shape)}."
        )
    images = images.float().expand(-1, 3, -1, -1)
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if height <= width else (new_long, new_short)
    if new_size != (height, width):
        images = F.interpolate(images, size=new_size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    images = images[..., top : top + size, left : left + size]
    mean_tensor = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_tensor = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images - mean_tensor) / std_tensor


def load_clip_model(model_name_or_path: str, owner: str, model_init_kwargs: dict[str, Any] | None = None) -> CLIPModel:
    """`CLIPModel.from_pretrained` with an error that names the reward (`owner`) and the expected checkpoint format."""
    try:
        return CLIPModel.from_pretrained(model_name_or_path, **(model_init_kwargs or {})).eval()
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{owner} could not load a transformers CLIPModel from {model_name_or_path!r}: {error}. Pass a hub id or "
            "a local directory saved with CLIPModel.save_pretrained (config.json + weights)."
        ) from error


class CLIPScore(nn.Module):
    """
    Prompt-image alignment: `scale * cos(image_embedding, text_embedding)` of a transformers `CLIPModel`.

    With `scale=1` this is the plain cosine similarity, in `[-1, 1]` (about 0.2-0.35 for matching pairs with OpenAI's
    CLIP). Hessel et al.'s CLIPScore is `2.5 * max(cos, 0)`; the clipping is left out because it flattens the reward
    that the policy gradient needs.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`):
            Hub id or local directory of any transformers `CLIPModel` checkpoint.
        processor_name_or_path (`str`, *optional*):
            Where to load the tokenizer from, if not from `model_name_or_path`.
        scale (`float`, *optional*, defaults to `1.0`):
            Multiplies the cosine similarity.
        batch_size (`int`, *optional*, defaults to `32`):
            Images (or video frames) encoded per forward pass.
        image_mean, image_std (`tuple[float, float, float]`, *optional*):
            Normalisation of the image encoder; defaults to OpenAI CLIP's, which OpenCLIP's LAION models also use.
        model_init_kwargs (`dict`, *optional*):
            Keyword arguments for `CLIPModel.from_pretrained`, such as `{"dtype": torch.float16}`.
    """

    name = "clip_score"
    default_model: str | None = "openai/clip-vit-large-patch14"
    default_processor: str | None = None

    def __init__(
        self,
        model_name_or_path: str | None = None,
        processor_name_or_path: str | None = None,
        *,
        scale: float = 1.0,
        batch_size: int = 32,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
        model_init_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        model_name_or_path = model_name_or_path or self.default_model
        if model_name_or_path is None:
            raise ValueError(f"{type(self).__name__} needs model_name_or_path: {self._missing_model_hint()}")
        processor_name_or_path = processor_name_or_path or self.default_processor or model_name_or_path
        self.model = load_clip_model(model_name_or_path, type(self).__name__, model_init_kwargs)
        hint = (
            "Pass processor_name_or_path= the hub id or directory of the base CLIP model the checkpoint was trained "
            "from (for example 'openai/clip-vit-large-patch14')."
        )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(processor_name_or_path)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(
                f"{type(self).__name__} found no tokenizer at {processor_name_or_path!r}: {error}. {hint}"
            ) from error
        # Without tokenizer files, transformers builds a tokenizer holding only the special tokens.
        vocab_size = self.model.config.text_config.vocab_size
        if len(self.tokenizer) <= len(self.tokenizer.all_special_tokens) or len(self.tokenizer) > vocab_size:
            raise ValueError(
                f"{type(self).__name__} found no usable tokenizer at {processor_name_or_path!r} (it has "
                f"{len(self.tokenizer)} tokens, the text model {vocab_size}). {hint}"
            )
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.image_size = self.model.config.vision_config.image_size
        self.scale = scale
        self.batch_size = batch_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def _missing_model_hint(self) -> str:
        return "a hub id or local directory of a transformers CLIPModel checkpoint."

    def _scores(self, cosine: torch.Tensor) -> torch.Tensor:
        """Rewards `[N]` from cosine similarities `[N]`."""
        return self.scale * cosine

    def _text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings `[N, D]`, each distinct prompt encoded once."""
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(
            unique, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        embeddings = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
        position = {prompt: index for index, prompt in enumerate(unique)}
        return embeddings[[position[prompt] for prompt in prompts]]

    def _image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings `[N, D]` of `[N, C, H, W]` images in `[0, 1]`."""
        pixels = clip_preprocess(images.to(self.model.device), self.image_size, self.image_mean, self.image_std)
        pooled = self.model.vision_model(pixel_values=pixels.to(self.model.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def forward(self, prompts: list[str], images: torch.Tensor, **kwargs: Any) -> list[float]:
        """One reward per sample for `images` `[B, C, H, W]` (or videos `[B, F, C, H, W]`) in `[0, 1]`."""
        if images.ndim == 5:
            return score_per_frame(self, prompts, images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{type(self).__name__} got {len(prompts)} prompts for {images.shape[0]} images.")
        rewards = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            cosine = (self._image_embeddings(images[chunk]) * self._text_embeddings(prompts[chunk])).sum(dim=-1)
            rewards.extend(self._scores(cosine).tolist())
        return rewards


class PickScore(CLIPScore):
    """
    PickScore (Kirstain et al., 2023): `logit_scale.exp() * cos(image, text)` of a CLIP ViT-H/14 fine-tuned on
    Pick-a-Pic preferences. About 18-23 for typical generations.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"yuvalkirstain/PickScore_v1"`):
            The PickScore checkpoint (a transformers `CLIPModel`), or any CLIP model to score with its own logit scale.
        processor_name_or_path (`str`, *optional*, defaults to `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`):
            Where to load the tokenizer from; PickScore's checkpoint has none.
        **kwargs:
            `batch_size`, `image_mean`, `image_std` and `model_init_kwargs` as in [`CLIPScore`].
    """

    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(
        self, model_name_or_path: str | None = None, processor_name_or_path: str | None = None, **kwargs: Any
    ):
        if "scale" in kwargs:
            raise ValueError("PickScore uses the model's own logit_scale; use CLIPScore(scale=...) for a fixed scale.")
        super().__init__(model_name_or_path, processor_name_or_path, **kwargs)

    def _scores(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.model.logit_scale.exp().float() * cosine


class HPSv2Score(CLIPScore):
    """
    HPSv2-style human-preference score: `scale * cos(image, text)` of an HPSv2 checkpoint converted to a transformers
    `CLIPModel`.

    The released HPSv2/HPSv2.1 weights (`xswu/HPSv2`, `HPS_v2.1_compressed.pt`) are OpenCLIP ViT-H/14 state dicts, not
    transformers checkpoints, and this class does not convert them: load them into OpenCLIP's
    `create_model_and_transforms("ViT-H-14")`, convert the state dict to a transformers `CLIPModel` (same architecture
    as `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`) and save it with `save_pretrained`; pass that directory here. Or serve
    the original OpenCLIP model behind `trl-ddrl-reward-server` and use a [`RemoteReward`].

    HPSv2's `score.py` reports the raw cosine (about 0.25-0.30); the default `scale=100` gives the percent-like numbers
    (about 25-30). Only the scale differs, which matters only for `reward_weights` with several rewards.

    Args:
        model_name_or_path (`str`):
            Directory or hub id of the converted checkpoint (required).
        processor_name_or_path (`str`, *optional*):
            Where to load the tokenizer from if the checkpoint has none, such as
            `"laion/CLIP-ViT-H-14-laion2B-s32B-b79K"`.
        scale (`float`, *optional*, defaults to `100.0`):
            Multiplies the cosine similarity.
        **kwargs:
            `batch_size`, `image_mean`, `image_std` and `model_init_kwargs` as in [`CLIPScore`].
    """

    name = "hpsv2"
    default_model = None

    def __init__(
        self,
        model_name_or_path: str | None = None,
        processor_name_or_path: str | None = None,
        *,
        scale: float = 100.0,
        **kwargs: Any,
    ):
        super().__init__(model_name_or_path, processor_name_or_path, scale=scale, **kwargs)

    def _missing_model_hint(self) -> str:
        return (
            "the HPSv2 weights are OpenCLIP checkpoints; convert them to a transformers CLIPModel directory and pass "
            "its path (reward spec 'hpsv2:<path>'), or serve the OpenCLIP model with trl-ddrl-reward-server."
        )


class AestheticMLP(nn.Module):
    """
    The head of LAION's improved aesthetic predictor (`sac+logos+ava1-l14-linearMSE.pth`): five linear layers
    `input_size -> 1024 -> 128 -> 64 -> 16 -> 1` with dropout in between and no nonlinearity, exactly as the original,
    so its state dict (`layers.0.weight`, `layers.2.weight`, `layers.4.weight`, `layers.6.weight`, `layers.7.weight`
    and biases) loads unchanged.

    Args:
        input_size (`int`, *optional*, defaults to `768`): the CLIP projection size (768 for ViT-L/14).
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores `[N, 1]` of unit-norm CLIP image embeddings `[N, input_size]`."""
        return self.layers(embeddings)

    @classmethod
    def from_file(cls, path: str | Path) -> "AestheticMLP":
        """Load from a `.pth`/`.pt` (torch) or `.safetensors` state dict with the original key layout."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict) or "layers.0.weight" not in state_dict:
            found = sorted(state_dict)[:6] if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"{path} is not an aesthetic-predictor state dict: expected the keys of the original MLP "
                f"(layers.0.weight, layers.2.weight, ..., layers.7.bias), found {found}."
            )
        mlp = cls(input_size=state_dict["layers.0.weight"].shape[1])
        missing, unexpected = mlp.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the aesthetic-predictor MLP (768-1024-128-64-16-1 linear layers): missing "
                f"keys {missing}, unexpected keys {unexpected}."
            )
        return mlp.eval()


def resolve_aesthetic_mlp(name_or_path: str, filename: str | None = None) -> Path:
    """
    Find the aesthetic MLP weights: a file, a directory holding `filename` (or one of the known file names), or a hub
    repository (downloading `filename`, default `"aesthetic-model.pth"`).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        candidates = [filename] if filename else AESTHETIC_MLP_FILENAMES
        for candidate in candidates:
            if (path / candidate).is_file():
                return path / candidate
        raise FileNotFoundError(
            f"No aesthetic MLP weights in {path}: looked for {', '.join(candidates)}. Pass the file itself, or "
            "mlp_filename=."
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name_or_path, filename or "aesthetic-model.pth"))
    except Exception as error:
        raise ValueError(
            f"Could not load the aesthetic MLP from {name_or_path!r}: it is not a local file or directory, and the "
            f"hub download failed ({type(error).__name__}: {error}). Pass a local path to "
            "sac+logos+ava1-l14-linearMSE.pth (or a .safetensors file with the same keys)."
        ) from error


class AestheticScore(nn.Module):
    """
    LAION aesthetic score (about 1-10): the improved aesthetic predictor's MLP on the unit-norm CLIP ViT-L/14 image
    embedding. Ignores the prompts.

    Args:
        mlp_name_or_path (`str`, *optional*, defaults to `"trl-lib/ddpo-aesthetic-predictor"`):
            The MLP weights: a `.pth` or `.safetensors` file with the original key layout
            (`sac+logos+ava1-l14-linearMSE.pth`), a directory holding one, or a hub repository.
        clip_model_name_or_path (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`):
            The CLIP model whose image embeddings the MLP was trained on.
        mlp_filename (`str`, *optional*):
            File name inside a directory or hub repository.
        batch_size (`int`, *optional*, defaults to `32`):
            Images encoded per forward pass.
        image_mean, image_std (`tuple[float, float, float]`, *optional*):
            Normalisation of the image encoder; defaults to OpenAI CLIP's.
        model_init_kwargs (`dict`, *optional*):
            Keyword arguments for `CLIPModel.from_pretrained`.
    """

    name = "aesthetic"

    def __init__(
        self,
        mlp_name_or_path: str = DEFAULT_AESTHETIC_MLP,
        clip_model_name_or_path: str = "openai/clip-vit-large-patch14",
        *,
        mlp_filename: str | None = None,
        batch_size: int = 32,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
        model_init_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.mlp = AestheticMLP.from_file(resolve_aesthetic_mlp(mlp_name_or_path, mlp_filename))
        self.model = load_clip_model(clip_model_name_or_path, "AestheticScore", model_init_kwargs)
        projection_dim = self.model.config.projection_dim
        input_size = self.mlp.layers[0].in_features
        if projection_dim != input_size:
            raise ValueError(
                f"The aesthetic MLP takes {input_size}-dim embeddings but {clip_model_name_or_path!r} projects to "
                f"{projection_dim}. Use the CLIP model it was trained on (openai/clip-vit-large-patch14 for "
                "sac+logos+ava1-l14-linearMSE)."
            )
        self.image_size = self.model.config.vision_config.image_size
        self.batch_size = batch_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    @torch.no_grad()
    def forward(self, prompts: list[str], images: torch.Tensor, **kwargs: Any) -> list[float]:
        """One aesthetic score per sample for `images` `[B, C, H, W]` (or videos `[B, F, C, H, W]`) in `[0, 1]`."""
        if images.ndim == 5:
            return score_per_frame(self, prompts, images)
        rewards = []
        weight = self.mlp.layers[0].weight
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size].to(self.model.device)
            pixels = clip_preprocess(chunk, self.image_size, self.image_mean, self.image_std)
            pooled = self.model.vision_model(pixel_values=pixels.to(self.model.dtype)).pooler_output
            embeddings = F.normalize(self.model.visual_projection(pooled).float(), dim=-1)
            rewards.extend(self.mlp(embeddings.to(weight.device, weight.dtype)).squeeze(-1).tolist())
        return rewards


class ImageRewardScore(nn.Module):
    """
    ImageReward (Xu et al., 2023) through the `image-reward` package (`pip install image-reward`, version 1.5 or
    later, which scores PIL images). This is a thin hook: the package's own BLIP model and preprocessing do the work.

    Args:
        model_name (`str`, *optional*, defaults to `"ImageReward-v1.0"`):
            Name or checkpoint path understood by `ImageReward.load`.
    """

    name = "image_reward"

    def __init__(self, model_name: str = "ImageReward-v1.0"):
        super().__init__()
        try:
            import ImageReward
        except ImportError as error:
            raise ImportError(
                "ImageRewardScore needs the ImageReward package, which is not installed: pip install image-reward"
            ) from error
        self.model = ImageReward.load(model_name, device="cpu").eval()

    @torch.no_grad()
    def forward(self, prompts: list[str], images: torch.Tensor, **kwargs: Any) -> list[float]:
        """One ImageReward score per sample for `images` `[B, C, H, W]` (or videos `[B, F, C, H, W]`) in `[0, 1]`."""
        if images.ndim == 5:
            return score_per_frame(self, prompts, images)
        # ImageReward moves its inputs to `self.device`, which `nn.Module.to` does not update.
        self.model.device = next(self.model.parameters()).device
        frames = [Image.fromarray(frame) for frame in to_uint8_frames(images)]
        return [float(self.model.score(prompt, frame)) for prompt, frame in zip(prompts, frames, strict=True)]
