# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Pipeline adapters, one per diffusers family, chosen from the pipeline's class."""

from .base import (
    Conditioning,
    DiffusionAdapter,
    FlowMatchingAdapter,
    SamplingSettings,
    Trajectory,
    VideoFlowMatchingAdapter,
)
from .cosmos import Cosmos2TextToImageAdapter, Cosmos2VideoToWorldAdapter
from .cosmos2_5 import Cosmos2_5PredictAdapter
from .digits import DigitsFlowAdapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter
from .hunyuan_video15 import HunyuanVideo15Adapter
from .qwenimage import QwenImageAdapter
from .qwenimage_edit import QwenImageEditAdapter
from .sd3 import StableDiffusion3Adapter
from .stable_diffusion import DDIMAdapter, StableDiffusionAdapter, StableDiffusionXLAdapter
from .wan import WanAdapter, WanImageToVideoAdapter


ADAPTERS: tuple[type[DiffusionAdapter], ...] = (
    StableDiffusion3Adapter,
    StableDiffusionAdapter,
    StableDiffusionXLAdapter,
    FluxAdapter,
    Flux2Adapter,
    QwenImageAdapter,
    QwenImageEditAdapter,
    WanAdapter,
    WanImageToVideoAdapter,
    HunyuanVideo15Adapter,
    Cosmos2TextToImageAdapter,
    Cosmos2VideoToWorldAdapter,
    Cosmos2_5PredictAdapter,
    DigitsFlowAdapter,
)


def get_adapter(pipeline, settings: SamplingSettings) -> DiffusionAdapter:
    """
    The adapter serving `pipeline`'s class (or one of its base classes).

    Raises:
        `ValueError`: naming the supported pipeline classes, for any other pipeline.
    """
    for cls in type(pipeline).__mro__:
        for adapter_cls in ADAPTERS:
            if cls.__name__ in adapter_cls.pipeline_class_names:
                return adapter_cls(pipeline, settings)
    supported = sorted(name for adapter_cls in ADAPTERS for name in adapter_cls.pipeline_class_names)
    raise ValueError(
        f"DDRLTrainer does not support {type(pipeline).__name__}. Supported pipeline classes: {', '.join(supported)}. "
        "Load one of these, or write a DiffusionAdapter subclass for your family and add it to "
        "trl_ddrl.pipelines.ADAPTERS."
    )


__all__ = [
    "ADAPTERS",
    "Conditioning",
    "Cosmos2TextToImageAdapter",
    "Cosmos2VideoToWorldAdapter",
    "Cosmos2_5PredictAdapter",
    "DDIMAdapter",
    "DigitsFlowAdapter",
    "DiffusionAdapter",
    "FlowMatchingAdapter",
    "Flux2Adapter",
    "FluxAdapter",
    "HunyuanVideo15Adapter",
    "QwenImageAdapter",
    "QwenImageEditAdapter",
    "SamplingSettings",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "Trajectory",
    "VideoFlowMatchingAdapter",
    "WanAdapter",
    "WanImageToVideoAdapter",
    "get_adapter",
]
