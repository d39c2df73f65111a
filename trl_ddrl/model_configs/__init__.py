# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
The real architectures of the documented model families, as small JSON files of their public `config.json` values
(no weights), and a builder of random-weight pipelines from them.

They serve what must know a real model's size without downloading it: the memory estimator (built on the meta device
or under a fake-tensor mode) and the GPU check (`benchmarks/gpu_check.py`, random bf16 weights built on the GPU).

Each `<name>.json` holds `name`, `hub_id`, `source` (where the values come from), `pipeline_class`,
`default_resolution` (`[H, W]`), optionally `default_num_frames` and `pipeline_kwargs` (pipeline arguments that are
not components, e.g. Wan 2.2's `boundary_ratio`), and `components`: for each pipeline component either a model
(`library`, `class`, `config`, and for transformers models `config_class`), a scheduler or guider (`library`, `class`,
`config`), an offline tokenizer (`{"tokenizer": "clip" | "t5" | "byt5" | "qwen2", "max_length": N}`, see
`tokenizers.py`), or a weightless stand-in (`{"stand_in": NAME}`, see `STAND_INS`; Cosmos' guardrail).
"""

import contextlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .tokenizers import TOKENIZERS


CONFIG_DIR = Path(__file__).parent


def list_models() -> list[str]:
    """The names of the shipped architectures (the JSON files' stems), sorted."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


@cache
def _read(name: str) -> str:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"Unknown model config {name!r}: choose one of {', '.join(list_models())}.")
    return path.read_text()


def load_model_config(name: str) -> dict[str, Any]:
    """The JSON spec of the architecture `name` (a fresh copy: callers may edit it)."""
    return json.loads(_read(name))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _pass_through_safety_checker():
    """
    A stand-in for Cosmos' guardrail (`cosmos_guardrail.CosmosSafetyChecker`, not a dependency) that lets every
    prompt and video through and holds no weights: the shipped Cosmos architectures do not model the guardrail.
    """
    from diffusers import ConfigMixin, ModelMixin

    class PassThroughSafetyChecker(ModelMixin, ConfigMixin):
        def check_text_safety(self, prompt: str) -> bool:
            return True

        def check_video_safety(self, frames):
            return frames

    return PassThroughSafetyChecker()


STAND_INS = {"pass_through_safety_checker": _pass_through_safety_checker}


def _build_component(spec: dict[str, Any], torch_dtype: torch.dtype, tokenizer_ids: dict[str, int] | None):
    if "stand_in" in spec:
        return STAND_INS[spec["stand_in"]]()
    if "tokenizer" in spec:
        builder = TOKENIZERS[spec["tokenizer"]]
        return builder(spec["max_length"]) if "max_length" in spec else builder()
    if spec["library"] == "diffusers":
        import diffusers

        cls = getattr(diffusers, spec["class"])
        if issubclass(cls, diffusers.ConfigMixin) and not issubclass(cls, torch.nn.Module):  # a scheduler, a guider
            with torch.device("cpu"):  # their tables are host-side values, also when the models go to "meta"
                return cls.from_config(spec["config"])
        with _default_dtype(torch_dtype):
            return cls.from_config(spec["config"]).eval()
    import transformers

    config = getattr(transformers, spec["config_class"])(**spec["config"], **(tokenizer_ids or {}))
    model_cls = getattr(transformers, spec["class"])
    with _default_dtype(torch_dtype):
        return model_cls._from_config(config, dtype=torch_dtype).eval()


def _tokenizer_ids(tokenizer) -> dict[str, int]:
    """Special-token ids a text encoder's config must share with its (offline) tokenizer."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids["eos_token_id"]
    return {key: value for key, value in ids.items() if value is not None}


def build_random_pipeline(
    name: str,
    torch_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    extra_components: dict[str, Any] | None = None,
):
    """
    A diffusers pipeline of the architecture `name` with random weights in `torch_dtype`, built directly on `device`
    (`"cuda"` initialises the weights on the GPU, in seconds even for a 12B transformer; `"meta"` allocates nothing).
    CLIP text encoders take their special-token ids from the offline tokenizer (the real vocabulary sizes are kept).
    `extra_components` are passed to the pipeline as they are (e.g. a Cosmos safety checker).
    """
    return build_pipeline_from_spec(load_model_config(name), torch_dtype, device, extra_components)


def build_pipeline_from_spec(
    spec: dict[str, Any],
    torch_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    extra_components: dict[str, Any] | None = None,
):
    """[`build_random_pipeline`] from a spec (a [`load_model_config`] result, possibly edited, e.g. made shallower)."""
    import diffusers

    components: dict[str, Any] = {}
    with torch.device(device):
        for component, component_spec in spec["components"].items():
            if "tokenizer" in component_spec:
                components[component] = _build_component(component_spec, torch_dtype, None)
        for component, component_spec in spec["components"].items():
            if "tokenizer" in component_spec:
                continue
            tokenizer = components.get(component.replace("text_encoder", "tokenizer"))
            ids = (
                _tokenizer_ids(tokenizer)
                if tokenizer is not None and component_spec.get("config_class") == "CLIPTextConfig"
                else None
            )
            components[component] = _build_component(component_spec, torch_dtype, ids)
    components.update(extra_components or {})
    return getattr(diffusers, spec["pipeline_class"])(**components, **spec.get("pipeline_kwargs", {}))


def parameter_count(name: str, component: str) -> int:
    """Parameters of one component of the architecture `name`, counted on the meta device (no memory)."""
    spec = load_model_config(name)["components"][component]
    with torch.device("meta"):
        module = _build_component(spec, torch.bfloat16, None)
    return sum(parameter.numel() for parameter in module.parameters())
