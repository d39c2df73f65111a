# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Pixel helpers shared by the reward modules (a leaf: it imports no other reward module)."""

import numpy as np
import torch


def to_uint8_frames(images: torch.Tensor) -> np.ndarray:
    """`[B, C, H, W]` or `[B, F, C, H, W]` floats in [0, 1] -> `[N, H, W, C]` uint8 frames (videos flattened)."""
    if images.ndim == 5:
        images = images.flatten(0, 1)
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return array.permute(0, 2, 3, 1).numpy()
