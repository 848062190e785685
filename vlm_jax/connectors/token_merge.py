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
* `PixelShuffleMLP(out_dim)`: InternVL 1.5's connector (`mlp1`, transformers'
  `InternVLMultiModalProjector`): a square grid of N tokens pixel-shuffled to
  N / 4 tokens of 4 D channels, then LayerNorm (eps 1e-5), a linear map to the
  LM width, GELU, a second linear map (params `layer_norm`, `linear_1`,
  `linear_2`). A 448 px tile's 1024 InternViT tokens become 256.
* `PatchMerger(out_dim, merge=2)`: Qwen2-VL's merger: LayerNorm (eps 1e-6) on
  each ViT token, each run of merge^2 consecutive tokens (one 2 x 2 block: the
  native-resolution ViT's tokens come block by block) concatenated, then
  linear (4 D -> 4 D), GELU, linear to the LM width (params `norm`,
  `linear_1`, `linear_2`: transformers' `merger.ln_q`, `mlp.0`, `mlp.2`).
* `PixelShuffleLinear(out_dim, factor=2)`: Idefics3's connector: the pixel
  shuffle above, then one bias-free linear map to the LM width (param `proj`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.nn.activations import activation
from vlm_jax.nn.layers import DenseGeneral, Norm


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


class PixelShuffleMLP(nn.Module):
    """InternVL's connector: features [..., N, D] (a square grid, row-major) -> [..., N / f^2, out_dim] by
    `linear_2(act(linear_1(layer_norm(pixel_shuffle(grid, f)))))`, the MLP as wide as the LM."""

    out_dim: int
    factor: int = 2  # InternVL's downsample_ratio 0.5
    version: str = "v2"  # InternVL's ps_version
    act: str = "gelu"  # exact GELU (torch nn.GELU())
    norm_eps: float = 1e-5  # torch nn.LayerNorm's default, which InternVL's mlp1 keeps
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        *lead, n, d = features.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise UserError(f"pixel shuffle needs a square grid of visual tokens; got {n} tokens.")
        grid = pixel_shuffle(features.reshape(*lead, side, side, d), self.factor, self.version)
        h = grid.reshape(*lead, -1, grid.shape[-1])
        dtype = jnp.dtype(self.dtype)
        h = Norm("layernorm", self.norm_eps, (None,), dtype, name="layer_norm")(h)
        h = DenseGeneral(self.out_dim, (None, "mlp"), use_bias=True, dtype=dtype, name="linear_1")(h)
        h = activation(self.act)(h)
        return DenseGeneral(self.out_dim, ("mlp", "embed"), use_bias=True, dtype=dtype, name="linear_2")(h)


class PatchMerger(nn.Module):
    """Qwen2-VL's merger: tokens [..., N, D] in merge blocks -> [..., N / merge^2, out_dim] by
    `linear_2(gelu(linear_1(concat_tokens(layer_norm(tokens), merge^2))))`."""

    out_dim: int
    merge: int = 2
    norm: str = "layernorm"  # Qwen2.5-VL: "rmsnorm"
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        h = concat_tokens(Norm(self.norm, self.norm_eps, dtype=dtype, name="norm")(tokens), self.merge**2)
        h = DenseGeneral(h.shape[-1], (None, "mlp"), use_bias=True, dtype=dtype, name="linear_1")(h)
        h = activation("gelu")(h)
        return DenseGeneral(self.out_dim, ("mlp", "embed"), use_bias=True, dtype=dtype, name="linear_2")(h)


class PixelShuffleLinear(nn.Module):
    """Idefics3's connector (transformers' `Idefics3Connector`): features [..., N, D] (a square grid, row-major)
    -> [..., N / f^2, out_dim] by one bias-free linear map (`modality_projection.proj`, param `proj`) of
    `pixel_shuffle(grid, f)`. Idefics3's own pixel shuffle orders each f x f block's channels row-major and the
    output grid row-major, as `pixel_shuffle(..., version="v2")` does (tests/test_hf_idefics3.py checks it against
    `Idefics3Connector.pixel_shuffle`). A 364 px tile's 26 x 26 SigLIP tokens become 169 for f = 2."""

    out_dim: int
    factor: int = 2  # Idefics3's scale_factor
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        *lead, n, d = features.shape
        side = int(round(n**0.5))
        if side * side != n:
            raise UserError(f"pixel shuffle needs a square grid of visual tokens; got {n} tokens.")
        grid = pixel_shuffle(features.reshape(*lead, side, side, d), self.factor, "v2")
        merged = grid.reshape(*lead, -1, grid.shape[-1])
        proj = DenseGeneral(self.out_dim, (None, "embed"), use_bias=False, dtype=jnp.dtype(self.dtype), name="proj")
        return proj(merged)
