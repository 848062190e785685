"""Fuyu-style linear patch embedding: the whole "vision encoder" of Fuyu (Adept, 2023) is one linear layer.

An image [H, W, C] is cut into non-overlapping `patch_size` x `patch_size`
patches in raster order (row by row, left to right); each patch's pixels are
flattened in (row, column, channel) order — exactly what transformers'
`FuyuImageProcessor.patchify_image` gives from a [C, H, W] image — and one
linear map with a bias (`vision_embed_tokens` in transformers' `FuyuModel`,
here `linear`) takes them to the LM width. There is no position embedding,
norm or attention: the LM sees the patches as tokens, with an image-newline
token after each row of patches (`vlm_jax/models/fuyu.py`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.nn.layers import DenseGeneral


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """images [..., H, W, C] -> patches [..., (H / p) * (W / p), p * p * C] in raster order, each patch flattened
    as (row, column, channel), as transformers' `FuyuImageProcessor.patchify_image` does from [..., C, H, W]."""
    *lead, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise UserError(f"images of {h} x {w} pixels do not split into {p} x {p} patches.")
    x = images.reshape(*lead, h // p, p, w // p, p, c)
    x = jnp.moveaxis(x, -4, -3)  # [..., H/p, W/p, p, p, C]
    return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Any, rows: int, cols: int, patch_size: int, channels: int = 3) -> Any:
    """The inverse of `patchify` for one image (NumPy or JAX): patches [rows * cols, p * p * C] -> [H, W, C]."""
    p = patch_size
    x = patches.reshape(rows, cols, p, p, channels)
    return x.transpose(0, 2, 1, 3, 4).reshape(rows * p, cols * p, channels)


class PatchEmbed(nn.Module):
    """images [..., H, W, C] -> patch embeddings [..., (H / p) * (W / p), out_dim]: raster-order patches
    (`patchify`), one linear map with a bias (Fuyu's `vision_embed_tokens`)."""

    out_dim: int
    patch_size: int = 30
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        patches = patchify(images, self.patch_size)
        linear = DenseGeneral(self.out_dim, (None, "embed"), use_bias=True, dtype=jnp.dtype(self.dtype), name="linear")
        return linear(patches)
