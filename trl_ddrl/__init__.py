# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""DDRL (Data-regularized Diffusion Reinforcement Learning) for diffusers pipelines, on top of TRL."""

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0.dev0"

# Public names and the submodule that defines each. Importing them lazily keeps `import trl_ddrl.sampling` and the
# CLI's start-up free of torch-heavy imports they do not need.
_LAZY_IMPORTS = {
    "DDRLConfig": "config",
    "DDRLTrainer": "trainer",
    "DiffusionDataCollator": "data",
}

if TYPE_CHECKING:
    from .config import DDRLConfig
    from .data import DiffusionDataCollator
    from .trainer import DDRLTrainer


def __getattr__(name: str):
    if name in _LAZY_IMPORTS:
        return getattr(importlib.import_module(f".{_LAZY_IMPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_LAZY_IMPORTS, "__version__"]
