"""SAM's image encoder (Kirillov et al. 2023, arXiv:2304.02643): a ViTDet-style ViT with windowed attention,
decomposed relative position biases, a few global-attention layers and a convolutional neck.

    images [B, H, W, 3] -> patch embedding (p x p conv) + absolute positions [1, g, g, D]
      -> depth blocks: LayerNorm, attention (within 14 x 14 windows, zero-padded; the layers in
         `global_layers` over the whole grid) with MViTv2's decomposed relative position bias, residual;
         LayerNorm, MLP (lin1, GELU, lin2), residual
      -> neck: 1 x 1 conv to `out_channels`, LayerNorm over channels, 3 x 3 conv, LayerNorm
      -> dict(tokens [B, g, g, out_channels], taps {i: [B, g, g, D]})

It follows transformers' `SamVisionEncoder` (what `DeepseekVLHybridForConditionalGeneration` runs as its
high-resolution tower): the window padding is zeros added after the block's first LayerNorm, and those padded
tokens are keys like any other (no mask), as in SAM. SAM-B: width 768, 12 layers, 12 heads, global attention
in layers 2, 5, 8, 11; -L: 1024, 24, 16, (5, 11, 17, 23); -H: 1280, 32, 16, (7, 15, 23, 31).

Layers are scanned: the global layers recur with a period k (every k-th layer, k = global_layers[0] + 1), so
the stack is an `nn.scan` over depth / k groups of k - 1 windowed blocks and one global block (the two kinds
have different relative-position tables, so one scan over single blocks cannot hold them). Taps are taken at
group ends, i.e. at global layers (DeepSeek-VL reads the first global layer's output). Parameter layout:

    patch_embed/{kernel [p, p, 3, D], bias}   pos_embed [1, g, g, D]
    layers/window_{j}/..., layers/global/...   (stacked on a leading "layers" axis of depth / k groups)
        each block: norm1, attn/{query,key,value,out, rel_pos_h [2s - 1, hd], rel_pos_w}, norm2, mlp/{fc1, fc2}
    neck/{conv1/kernel, norm1, conv2/kernel, norm2}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import sharding
from vlm_jax.errors import UserError
from vlm_jax.nn.attention import attend
from vlm_jax.nn.layers import DenseGeneral, Mlp, Norm
from vlm_jax.nn.remat import remat as remat_block

# Shapes by size name (segment-anything's build_sam.py): width, depth, heads, global attention layers.
VARIANTS: dict[str, dict[str, Any]] = {
    "B": dict(width=768, depth=12, num_heads=12, global_layers=(2, 5, 8, 11)),
    "L": dict(width=1024, depth=24, num_heads=16, global_layers=(5, 11, 17, 23)),
    "H": dict(width=1280, depth=32, num_heads=16, global_layers=(7, 15, 23, 31)),
}


def relative_table(table: jax.Array, size: int) -> jax.Array:
    """[size, size, head_dim]: entry (i, j) is `table[i - j + size - 1]` (a [2 size - 1, head_dim] table, as SAM's
    `get_rel_pos` when query and key grids share one size, where its interpolation is the identity)."""
    if table.shape[0] != 2 * size - 1:
        raise UserError(f"a SAM relative position table of {table.shape[0]} rows does not fit a {size}-wide grid.")
    index = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
    return table[index]


def conv(features: int, kernel: int, stride: int, padding: int, name: str, dtype: Any) -> nn.Conv:
    """A bias-free 2D convolution (NHWC) with logically named kernel axes (SAM's neck, DeepSeek-VL's
    downsampling), PyTorch padding semantics (`padding` zeros each side)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        stride,
        padding=((padding, padding), (padding, padding)),
        use_bias=False,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")
        ),
        name=name,
    )


class SAMAttention(nn.Module):
    """Self-attention over a [B, h, w, D] grid with decomposed relative position biases (MViTv2): the logit of
    query (i, j) and key (k, l) gains q . Rh[i - k] + q . Rw[j - l] (q unscaled), through `attend`'s bias."""

    num_heads: int
    size: int  # grid side the relative tables are made for: the window, or the whole grid (global attention)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, width = x.shape
        hd = width // self.num_heads
        proj = dict(kernel_axes=("embed", "heads", "head_dim"), use_bias=True, dtype=self.dtype)
        q, k, v = (DenseGeneral((self.num_heads, hd), name=n, **proj)(x) for n in ("query", "key", "value"))
        init = nn.with_logical_partitioning(nn.initializers.zeros, (None, "head_dim"))
        rh = relative_table(self.param("rel_pos_h", init, (2 * self.size - 1, hd)), h).astype(self.dtype)
        rw = relative_table(self.param("rel_pos_w", init, (2 * self.size - 1, hd)), w).astype(self.dtype)
        rel_h = jnp.einsum("bhwnc,hkc->bnhwk", q, rh, preferred_element_type=jnp.float32)
        rel_w = jnp.einsum("bhwnc,wlc->bnhwl", q, rw, preferred_element_type=jnp.float32)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, h * w, h * w)
        flat = lambda t: t.reshape(b, h * w, self.num_heads, hd)  # noqa: E731
        out = attend(flat(q), flat(k), flat(v), bias=bias).reshape(b, h, w, self.num_heads, hd)
        return DenseGeneral(
            width, ("heads", "head_dim", "embed"), in_dims=2, use_bias=True, dtype=self.dtype, name="out"
        )(out)


class SAMBlock(nn.Module):
    """x + attn(norm1(x)) (in zero-padded windows of side `window`, or globally when `window` is 0), then
    x + mlp(norm2(x))."""

    num_heads: int
    mlp_dim: int
    window: int
    grid: int
    norm_eps: float = 1e-6
    mlp_act: str = "gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, d = x.shape
        y = Norm("layernorm", self.norm_eps, dtype=self.dtype, name="norm1")(x)
        s = self.window
        attention = SAMAttention(self.num_heads, s or self.grid, self.dtype, name="attn")
        if s:
            ph, pw = -h % s, -w % s
            y = jnp.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))
            nh, nw = (h + ph) // s, (w + pw) // s
            y = y.reshape(b, nh, s, nw, s, d).transpose(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, s, s, d)
            y = attention(y)
            y = y.reshape(b, nh, nw, s, s, d).transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * s, nw * s, d)[:, :h, :w]
        else:
            y = attention(y)
        x = x + y
        y = Norm("layernorm", self.norm_eps, dtype=self.dtype, name="norm2")(x)
        return x + Mlp(self.mlp_dim, self.mlp_act, self.dtype, name="mlp")(y)


class SAMGroup(nn.Module):
    """`period - 1` windowed blocks, then one global block: the unit the layer scan repeats. Returns (x, x if
    `emit` else None), the body contract of `nn.scan`."""

    period: int
    block: dict
    emit: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None):
        for j in range(self.period - 1):
            x = SAMBlock(**self.block, name=f"window_{j}")(x)
        x = SAMBlock(**{**self.block, "window": 0}, name="global")(x)
        x = sharding.constrain(x, ("batch", None, None, "embed"))
        return x, (x if self.emit else None)


class SAMNeck(nn.Module):
    """[B, g, g, D] -> [B, g, g, out_channels]: 1 x 1 conv, LayerNorm over channels, 3 x 3 conv, LayerNorm
    (SAM's neck; DeepSeek-VL's second neck on the first global layer's output has the same shape)."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv(self.out_channels, 1, 1, 0, "conv1", self.dtype)(x)
        x = Norm("layernorm", 1e-6, dtype=self.dtype, name="norm1")(x)
        x = conv(self.out_channels, 3, 1, 1, "conv2", self.dtype)(x)
        return Norm("layernorm", 1e-6, dtype=self.dtype, name="norm2")(x)


class SAMEncoder(nn.Module):
    """Images [B, H, W, 3] (H = W = `image_size`) -> dict(tokens [B, g, g, out_channels] after the neck,
    taps {i: [B, g, g, width]}: the output of block i, which must be a global layer)."""

    variant: str = "B"
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    global_layers: tuple[int, ...] | None = None
    mlp_dim: int | None = None  # default 4 x width
    patch_size: int = 16
    image_size: int = 1024
    window: int = 14
    out_channels: int = 256
    norm_eps: float = 1e-6
    mlp_act: str = "gelu"
    dtype: str = "float32"
    remat: str = "none"
    taps: tuple[int, ...] = ()

    def shape(self) -> dict[str, Any]:
        """The resolved width, depth, num_heads and global_layers (the variant's, overridden by explicit fields)."""
        if self.variant and self.variant not in VARIANTS:
            raise UserError(f"unknown SAM variant {self.variant!r}; known sizes are {', '.join(VARIANTS)}.")
        base = VARIANTS.get(self.variant, {})
        out = {}
        for key in ("width", "depth", "num_heads", "global_layers"):
            value = getattr(self, key)
            if value is None:
                if key not in base:
                    raise UserError(f"SAMEncoder needs {key}: give a variant such as 'B' or set {key} explicitly.")
                value = base[key]
            out[key] = tuple(int(i) for i in value) if key == "global_layers" else int(value)
        return out

    def period(self) -> int:
        """k: the global layers must be exactly layers k - 1, 2k - 1, ..., depth - 1 (the scanned unit)."""
        s = self.shape()
        depth, layers = s["depth"], s["global_layers"]
        k = layers[0] + 1 if layers else 0
        if not k or depth % k or layers != tuple(range(k - 1, depth, k)):
            raise UserError(
                f"SAM global_layers {list(layers)} must be every k-th layer of the {depth} (k - 1, 2k - 1, ..., "
                f"{depth - 1}): the layer scan repeats k - 1 windowed blocks and one global block."
            )
        return k

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, Any]:
        s, k, p = self.shape(), self.period(), self.patch_size
        width, dtype = s["width"], jnp.dtype(self.dtype)
        b, h, w, _ = images.shape
        if h != self.image_size or w != self.image_size:
            raise UserError(f"SAM takes {self.image_size} x {self.image_size} images; got {h} x {w}.")
        g = h // p
        x = images.astype(dtype).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = DenseGeneral(width, ("patch", "patch", "channels", "embed"), 3, True, dtype, name="patch_embed")(x)
        pos_init = nn.with_logical_partitioning(nn.initializers.zeros, (None, None, None, "embed"))
        x = x + self.param("pos_embed", pos_init, (1, g, g, width)).astype(dtype)
        groups = s["depth"] // k
        taps = tuple(self.taps)
        for t in taps:
            if (t % s["depth"]) % k != k - 1:
                raise UserError(f"SAM tap {t} is not a global layer ({list(s['global_layers'])}).")
        block = dict(
            num_heads=s["num_heads"], mlp_dim=int(self.mlp_dim or 4 * width), window=self.window, grid=g,
            norm_eps=self.norm_eps, mlp_act=self.mlp_act, dtype=dtype,
        )  # fmt: skip
        stack = nn.scan(
            remat_block(SAMGroup, self.remat),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=groups,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(period=k, block=block, emit=bool(taps), name="layers")
        x, stacked = stack(x, None)
        out: dict[str, Any] = {"taps": {t: stacked[(t % s["depth"]) // k] for t in taps}}
        out["tokens"] = SAMNeck(self.out_channels, dtype, name="neck")(x)
        return out
