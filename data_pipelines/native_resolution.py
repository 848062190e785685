"""Native resolution (Qwen2-VL, Qwen2.5-VL): images as variable-length patch sequences, and M-RoPE positions.

* `smart_resize(h, w)`: the size an image is resized to — sides rounded to
  multiples of patch x merge (28), the area brought within [min_pixels,
  max_pixels] keeping the aspect ratio (transformers' `smart_resize`).
* `patchify(image)`: a normalised image [H, W, 3] (already at a smart size)
  -> (patches [h * w, 3 * 2 * 14 * 14], (1, h, w)): 14 px patches, each
  flattened as (channel, frame, row, column) with the still image repeated as
  its 2 frames, listed 2 x 2 merge block by merge block — the layout of
  transformers' `Qwen2VLImageProcessor` `pixel_values`; a video [T, H, W, 3]
  -> (t = T / 2 temporal patches) x h x w patches, as its video processor
  lays out `pixel_values_videos` (`video_patches` resizes and normalises the
  frames first).
* `patch_positions(grid)`: each patch's (row, column) in that order (the 2D
  RoPE positions of the ViT).
* `mrope_positions(tokens, grids, placeholder)`: the [3, L] (temporal,
  height, width) positions of one example's tokens: text counts up on all
  three axes; an image's run of placeholders (one per merged token) starts at
  the next position p and takes (p + frame, p + row, p + column) over its
  merged grid, and the text after it resumes at p + max(rows, columns)
  (transformers' `Qwen2VLModel.get_rope_index`). Computed per packed
  example, so a packed row carries exactly the positions each example has
  alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from data_pipelines import image_ops
from vlm_jax.errors import UserError

PATCH, MERGE, FRAMES = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # transformers' Qwen2VLImageProcessor defaults


def smart_resize(
    height: int, width: int, factor: int = PATCH * MERGE, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) with both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise image_ops.BadImage(
            "absurd_aspect_ratio", f"a {height}x{width} image's aspect ratio is over 200 (Qwen2-VL's limit)."
        )
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize(image: np.ndarray, patch: int = PATCH, merge: int = MERGE, **pixels) -> np.ndarray:
    """uint8 `image` resized (PIL bicubic) to its `smart_resize` size; `pixels` = min_pixels / max_pixels."""
    height, width = smart_resize(image.shape[0], image.shape[1], patch * merge, **pixels)
    return image_ops.resize(image, height, width, "bicubic")


def patchify(
    pixels: np.ndarray, patch: int = PATCH, merge: int = MERGE, frames: int = FRAMES
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A normalised image [H, W, 3] or video [T, H, W, 3] (sides multiples of patch x merge) -> (patches
    [t*h*w, 3*frames*patch^2], (t, h, w)). An image is its own `frames` frames (t = 1); a video's frames go in
    groups of `frames` (the last frame repeated to fill the last group), each group one temporal patch."""
    x = np.asarray(pixels, np.float32)
    if x.ndim == 3:
        x = np.broadcast_to(x[None], (frames, *x.shape))
    count, height, width, channels = x.shape
    if height % (patch * merge) or width % (patch * merge):
        raise UserError(f"a {height}x{width} image does not split into {patch * merge} px merge blocks.")
    if count % frames:
        x = np.concatenate([x, np.repeat(x[-1:], frames - count % frames, axis=0)])
    t, h, w = len(x) // frames, height // patch, width // patch
    x = np.moveaxis(x, -1, 1)  # [T, C, H, W]
    x = x.reshape(t, frames, channels, h // merge, merge, patch, w // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, h/m, w/m, m, m, C, frames, p, p]
    return x.reshape(t * h * w, channels * frames * patch * patch), (t, h, w)


def patch_positions(grid: tuple[int, int, int], merge: int = MERGE) -> np.ndarray:
    """int32 [t*h*w, 2]: each patch's (row, column) in `patchify`'s merge-block order, repeated per frame."""
    t, h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int32)


def merged_tokens(grid: tuple[int, int, int], merge: int = MERGE) -> int:
    """LM tokens (placeholders) of an image or video of patch grid (t, h, w) after the merge."""
    t, h, w = grid
    return t * (h // merge) * (w // merge)


def mrope_positions(
    tokens: np.ndarray,
    grids: list[tuple[int, int, int]],
    placeholder: int,
    merge: int = MERGE,
    time_intervals: list[float] | None = None,
):
    """int32 [3, L] M-RoPE positions of one example's `tokens`, whose runs of `placeholder` ids are its images'
    (and videos') merged tokens in order (`grids`: each one's (t, h, w) patch grid). A video's temporal
    patches step the temporal axis by its `time_intervals` entry (default 1: Qwen2-VL; Qwen2.5-VL: seconds
    per temporal patch x tokens_per_second), floored to integers."""
    tokens = np.asarray(tokens)
    out = np.zeros((3, len(tokens)), np.int64)
    is_image = tokens == placeholder
    want = sum(merged_tokens(g, merge) for g in grids)
    if int(is_image.sum()) != want:
        raise UserError(f"{int(is_image.sum())} image placeholders for images of {want} merged tokens.")
    i, pos, image = 0, 0, 0
    while i < len(tokens):
        if not is_image[i]:
            out[:, i] = pos
            i, pos = i + 1, pos + 1
            continue
        t, h, w = grids[image]
        gt, gh, gw = t, h // merge, w // merge
        interval = 1.0 if time_intervals is None else float(time_intervals[image])
        steps = (np.arange(gt) * interval).astype(np.int64)
        tt, hh, ww = np.meshgrid(steps, np.arange(gh), np.arange(gw), indexing="ij")
        n = gt * gh * gw
        out[:, i : i + n] = pos + np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])
        i, pos, image = i + n, pos + max(gh, gw), image + 1
    return out.astype(np.int32)


def image_patches(image: np.ndarray, settings: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(patches, (1, h, w)) of one decoded uint8 image under `data.image` settings (`min_pixels`, `max_pixels`,
    `normalization`): resized to its smart size, normalised, patchified."""
    resized = resize(image, min_pixels=int(settings.min_pixels), max_pixels=int(settings.max_pixels))
    return patchify(image_ops.normalize(resized, settings.normalization))


def video_patches(frames: list[np.ndarray], settings: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(patches, (t, h, w)) of decoded uint8 video frames under `data.image` settings: every frame resized to the
    first frame's smart size within [`video_min_pixels`, `video_max_pixels`] (transformers' Qwen2-VL video
    defaults 128 x 28^2 and 768 x 28^2), normalised, patchified two frames per temporal patch."""
    lo, hi = int(settings.get("video_min_pixels", 128 * 28 * 28)), int(settings.get("video_max_pixels", 768 * 28 * 28))
    height, width = smart_resize(frames[0].shape[0], frames[0].shape[1], PATCH * MERGE, lo, hi)
    resized = [
        image_ops.normalize(image_ops.resize(f, height, width, "bicubic"), settings.normalization) for f in frames
    ]
    return patchify(np.stack(resized))


def attention_groups(grids: list[tuple[int, int, int]]) -> np.ndarray:
    """int32 per patch: 1, 2, ... one attention group per image and per temporal patch of a video (transformers'
    cu_seqlens: a video frame group attends only within itself)."""
    groups, first = [], 1
    for t, h, w in grids:
        groups.append(first + np.repeat(np.arange(t), h * w))
        first += t
    return np.concatenate(groups).astype(np.int32) if groups else np.zeros((0,), np.int32)


def row_inputs(
    examples: list[tuple[np.ndarray, list[tuple[np.ndarray, tuple[int, int, int]]]]], max_patches: int | None = None
) -> dict[str, np.ndarray]:
    """The patch inputs of rows, one row per (tokens, images) with images [(patches, grid), ...] in the order
    of the row's placeholder runs: patches [B, P, D], patch_positions [B, P, 2], patch_groups [B, P] (1, 2, ...
    per image) and patch_segment_ids [B, P] (1: each row one example); P = `max_patches` or the most a row has,
    rounded up to whole merge blocks."""
    counts = [sum(len(p) for p, _ in images) for _, images in examples]
    most = max([MERGE * MERGE] + counts)
    width = -(-most // (MERGE * MERGE)) * MERGE * MERGE if max_patches is None else max_patches
    if most > width:
        raise UserError(f"a prompt's images have {most} patches, more than the {width} a row takes (data.max_patches).")
    dim = 3 * FRAMES * PATCH * PATCH
    out = {
        "patches": np.zeros((len(examples), width, dim), np.float32),
        "patch_positions": np.zeros((len(examples), width, 2), np.int32),
        "patch_groups": np.zeros((len(examples), width), np.int32),
        "patch_segment_ids": np.zeros((len(examples), width), np.int32),
    }
    for r, (_, images) in enumerate(examples):
        at, groups = 0, attention_groups([grid for _, grid in images])
        for patches, grid in images:
            span = slice(at, at + len(patches))
            out["patches"][r, span], out["patch_positions"][r, span] = patches, patch_positions(grid)
            out["patch_groups"][r, span], out["patch_segment_ids"][r, span] = groups[span], 1
            at += len(patches)
    return out
