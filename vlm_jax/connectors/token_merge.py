"""Token merges: fewer, wider visual tokens before the projection into the LM.

* `concat_tokens(x, group)`: MiniGPT-v2's merge. Features [..., N, D] ->
  [..., N / group, group * D] by concatenating each run of `group`
  consecutive tokens in raster (row-major) order — MiniGPT-v2 does
  `image_embeds.view(bs, pn / 4, hs * 4)` on the ViT's patch tokens, so the
  4 tokens merged are 4 neighbours of one patch row (1x4), not a 2x2 block.
* `ConcatProjector(out_dim, group=4)`: that merge followed by MiniGPT-v2's
  linear map (`llama_proj`, with bias; param `linear`) to the LM width.
* `pixel_shuffle(x, factor=2)`: InternVL's pixel shuffle (scale 0.5):
  a feature grid [..., h, w, D] -> [..., h / 2, w / 2, 4 D], each output
  token the channels of one 2x2 block in row-major order (top-left,
  top-right, bottom-left, bottom-right), as InternVL's `pixel_shuffle` with
  `ps_version="v2"` (and transformers' `InternVLModel.pixel_shuffle`)
  computes; `version="v1"` keeps InternVL's first version, whose output grid
  is transposed ([..., w / 2, h / 2, 4 D]).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.nn.layers import DenseGeneral


def concat_tokens(x: jax.Array, group: int = 4) -> jax.Array:
    """[..., N, D] -> [..., N / group, group * D]: each run of `group` consecutive tokens concatenated."""
    *lead, n, d = x.shape
    if group < 1 or n % group:
        raise UserError(f"{n} visual tokens cannot be merged in groups of {group}; the count must be a multiple.")
    return x.reshape(*lead, n // group, group * d)


def pixel_shuffle(x: jax.Array, factor: int = 2, version: str = "v2") -> jax.Array:
    """[..., h, w, D] -> [..., h / f, w / f, f * f * D]: each f x f block's tokens concatenated in row-major order."""
    if version not in ("v1", "v2"):
        raise UserError(f"pixel_shuffle version {version!r} is unknown; InternVL has 'v1' and 'v2'.")
    *lead, h, w, d = x.shape
    if factor < 1 or h % factor or w % factor:
        raise UserError(f"a {h}x{w} feature grid cannot be pixel-shuffled by {factor}; both sides must divide by it.")
    k = len(lead)
    blocks = x.reshape(*lead, h // factor, factor, w // factor, factor, d)
    # [..., h/f, f (row in block), w/f, f (column in block), D] -> [..., h/f, w/f, row, column, D]
    blocks = jnp.moveaxis(blocks, k + 1, k + 2)
    out = blocks.reshape(*lead, h // factor, w // factor, factor * factor * d)
    return jnp.swapaxes(out, -3, -2) if version == "v1" else out


class ConcatProjector(nn.Module):
    """MiniGPT-v2's connector: features [..., N, D] -> `linear(concat_tokens(features, group))` [..., N / group, out_dim]."""

    out_dim: int
    group: int = 4
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        merged = concat_tokens(features, self.group)
        linear = DenseGeneral(
            self.out_dim, (None, "embed"), use_bias=self.use_bias, dtype=jnp.dtype(self.dtype), name="linear"
        )
        return linear(merged)
