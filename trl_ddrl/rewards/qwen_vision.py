# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Qwen2-VL-family video input in torch: frame sampling, resizing and patchifying as Qwen2-VL's processors and
`qwen-vl-utils` do, on tensors that stay on the reward model's device (no PIL or video file round trip).

The math follows `qwen_vl_utils.vision_process` (`smart_nframes`, `smart_resize`) and transformers'
`Qwen2VLVideoProcessor.patchify`; each function says what it reproduces.
"""

import math

import torch
import torch.nn.functional as F


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FRAME_FACTOR = 2  # Qwen2-VL's temporal patch: frames go in pairs
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils' floor on a video frame's area
MAX_ASPECT_RATIO = 200


def sampled_frame_count(
    total_frames: int,
    video_fps: float,
    fps: float | None = 2.0,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
) -> int:
    """
    How many frames a Qwen2-VL model sees of a `total_frames`-frame video (`qwen_vl_utils.smart_nframes`).

    With `num_frames`, that count rounded to an even number; else `total_frames / video_fps * fps` frames (the video's
    duration at `fps`), clamped to `[min_frames, min(max_frames, total_frames)]` and rounded to an even number. Never
    more than `total_frames` (which may make it odd). Raises if the result is below 2 (a video needs at least two
    frames; see [`sample_video_frames`], which repeats a single frame).
    """
    if num_frames is not None:
        count = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        if fps is None or fps <= 0 or video_fps <= 0:
            raise ValueError(f"Sampling by fps needs fps > 0 and video_fps > 0, got fps={fps}, video_fps={video_fps}.")
        low = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
        count = min(max(total_frames / video_fps * fps, low), high)
        count = round(count / FRAME_FACTOR) * FRAME_FACTOR
    count = min(count, total_frames)
    if count < FRAME_FACTOR:
        raise ValueError(
            f"A {total_frames}-frame video gives {count} sampled frames; Qwen2-VL needs at least {FRAME_FACTOR}. "
            "Pass num_frames >= 2 or a longer video."
        )
    return count


def sample_video_frames(
    videos: torch.Tensor,
    video_fps: float,
    fps: float | None = 2.0,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
) -> torch.Tensor:
    """
    Evenly spaced frames of `videos` `[B, F, C, H, W]` (first and last kept), [`sampled_frame_count`] of them.

    An odd count (a short video) gets its last frame repeated, as Qwen2-VL's video processor does; images
    `[B, C, H, W]` and one-frame videos become two identical frames. Returns `[B, T, C, H, W]` with `T` even, on the
    device of `videos`.
    """
    if videos.ndim == 4:
        videos = videos.unsqueeze(1)
    if videos.ndim != 5:
        raise ValueError(f"Expected images [B, C, H, W] or videos [B, F, C, H, W], got shape {tuple(videos.shape)}.")
    total = videos.shape[1]
    if total < FRAME_FACTOR:
        return videos.expand(-1, FRAME_FACTOR, -1, -1, -1)
    count = sampled_frame_count(total, video_fps, fps, num_frames, min_frames, max_frames)
    indices = torch.linspace(0, total - 1, count).round().long()
    if count % FRAME_FACTOR:
        indices = torch.cat([indices, indices[-1:]])
    return videos.index_select(1, indices.to(videos.device))


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = 768 * 28 * 28
) -> tuple[int, int]:
    """
    Qwen2-VL's target size (`qwen_vl_utils.smart_resize`): both sides multiples of `factor` (patch size x merge size),
    the area within `[min_pixels, max_pixels]`, the aspect ratio kept as closely as that allows.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"Aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_ASPECT_RATIO}.")
    new_height = max(factor, round(height / factor) * factor)
    new_width = max(factor, round(width / factor) * factor)
    if new_height * new_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_height = max(factor, math.floor(height / beta / factor) * factor)
        new_width = max(factor, math.floor(width / beta / factor) * factor)
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    return new_height, new_width


def resize_frames_uint8(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """
    `[N, C, H, W]` floats in `[0, 1]` -> `[N, C, h, w]` floats in `[0, 1]` on the 8-bit grid: the frames are quantised
    to uint8 levels, resized bicubic with antialiasing, then rounded and clamped to uint8 levels again, which is what
    resizing decoded uint8 video frames with torchvision (as qwen-vl-utils does) gives.
    """
    levels = (frames.float().clamp(0, 1) * 255).round()
    if tuple(levels.shape[-2:]) != tuple(size):
        levels = F.interpolate(levels, size=size, mode="bicubic", antialias=True, align_corners=False)
        levels = levels.round().clamp(0, 255)
    return levels / 255


def patchify_video(
    frames: torch.Tensor, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Qwen2-VL's flat patch layout of one normalised video (transformers' `Qwen2VLVideoProcessor.patchify`).

    Args:
        frames (`torch.Tensor`): `[T, C, H, W]`, `T` a multiple of `temporal_patch_size` and `H`, `W` multiples of
            `patch_size * merge_size`.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the patches `[t * h * w, C * temporal_patch_size * patch_size**2]`
        (each `merge_size x merge_size` block of patches contiguous) and the grid `[3]` = `(t, h, w)` in patches.
    """
    num_frames, channels, height, width = frames.shape
    grid_t, grid_h, grid_w = num_frames // temporal_patch_size, height // patch_size, width // patch_size
    if num_frames % temporal_patch_size or grid_h % merge_size or grid_w % merge_size:
        raise ValueError(
            f"Cannot patchify frames of shape {tuple(frames.shape)}: T must be a multiple of {temporal_patch_size}, "
            f"H and W of {patch_size * merge_size}."
        )
    patches = frames.reshape(
        grid_t,
        temporal_patch_size,
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return flat, torch.tensor([grid_t, grid_h, grid_w])


def video_pixel_inputs(
    videos: torch.Tensor,
    max_pixels: int,
    min_pixels: int = VIDEO_MIN_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    std: tuple[float, ...] = OPENAI_CLIP_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Sampled videos `[B, T, C, H, W]` in `[0, 1]` -> Qwen2-VL's `pixel_values_videos` `[B * t * h * w, D]` (float32)
    and `video_grid_thw` `[B, 3]`: every frame resized to [`smart_resize`]'s size with [`resize_frames_uint8`],
    normalised with `mean` / `std`, patchified with [`patchify_video`]. Grey frames (`C` = 1) are repeated to RGB.
    """
    batch, num_frames, channels, height, width = videos.shape
    if channels not in (1, 3):
        raise ValueError(f"Expected RGB or grey frames, got {channels} channels (shape {tuple(videos.shape)}).")
    size = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    frames = resize_frames_uint8(videos.flatten(0, 1).expand(-1, 3, -1, -1), size)
    mean_tensor = torch.tensor(mean, device=frames.device).view(1, 3, 1, 1)
    std_tensor = torch.tensor(std, device=frames.device).view(1, 3, 1, 1)
    frames = ((frames - mean_tensor) / std_tensor).view(batch, num_frames, 3, *size)
    patches, grids = zip(
        *(patchify_video(video, patch_size, merge_size, temporal_patch_size) for video in frames), strict=True
    )
    return torch.cat(patches), torch.stack(grids)
