"""Native resolution (Qwen2-VL, Qwen2.5-VL): images as variable-length patch sequences, and M-RoPE positions.

* `smart_resize(h, w)`: the size an image is resized to — sides rounded to
  multiples of patch x merge (28), the area brought within [min_pixels,
  max_pixels] keeping the aspect ratio (transformers' `smart_resize`).
* `patchify(image)`: a normalised image [H, W, 3] (already at a smart size)
  -> (patches [h * w, 3 * 2 * 14 * 14], (1, h, w)): 14 px patches, each
  flattened as (channel, frame, row, column) with the still image repeated as
  its 2 frames, listed 2 x 2 merge block by merge block — the layout of
  transformers' `Qwen2VLImageProcessor` `pixel_values`.
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
    image: np.ndarray, patch: int = PATCH, merge: int = MERGE, frames: int = FRAMES
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalised float [H, W, 3] (sides multiples of patch x merge) -> (patches [h*w, 3*frames*patch^2], (1, h, w))."""
    height, width, channels = image.shape
    if height % (patch * merge) or width % (patch * merge):
        raise UserError(f"a {height}x{width} image does not split into {patch * merge} px merge blocks.")
    h, w = height // patch, width // patch
    x = np.moveaxis(np.asarray(image, np.float32), -1, 0)  # [C, H, W]
    x = x.reshape(channels, h // merge, merge, patch, w // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [h/m, w/m, m, m, C, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], frames, patch, patch))
    return x.reshape(h * w, channels * frames * patch * patch), (1, h, w)


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


def mrope_positions(tokens: np.ndarray, grids: list[tuple[int, int, int]], placeholder: int, merge: int = MERGE):
    """int32 [3, L] M-RoPE positions of one example's `tokens`, whose runs of `placeholder` ids are its images'
    merged tokens in order (`grids`: each image's (t, h, w) patch grid)."""
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
        tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
        n = gt * gh * gw
        out[:, i : i + n] = pos + np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])
        i, pos, image = i + n, pos + max(gh, gw), image + 1
    return out.astype(np.int32)


def image_patches(image: np.ndarray, settings: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(patches, (1, h, w)) of one decoded uint8 image under `data.image` settings (`min_pixels`, `max_pixels`,
    `normalization`): resized to its smart size, normalised, patchified."""
    resized = resize(image, min_pixels=int(settings.min_pixels), max_pixels=int(settings.max_pixels))
    return patchify(image_ops.normalize(resized, settings.normalization))


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
        at = 0
        for k, (patches, grid) in enumerate(images):
            span = slice(at, at + len(patches))
            out["patches"][r, span], out["patch_positions"][r, span] = patches, patch_positions(grid)
            out["patch_groups"][r, span], out["patch_segment_ids"][r, span] = k + 1, 1
            at += len(patches)
    return out
