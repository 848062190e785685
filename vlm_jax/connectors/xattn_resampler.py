"""Qwen-VL's position-aware vision-language adapter: one cross-attention layer from learned queries to ViT tokens.

Qwen-VL (Bai et al. 2023, arXiv:2308.12966, sec. 2.1) compresses the ViT's
features to a fixed number of tokens (256) with "a single-layer cross-attention
module randomly initialized", whose queries are learned and which adds 2D
absolute positional encodings to the query-key pairs. As Qwen-VL's
`visual.py` builds it: the ViT tokens x [B, N, Dv] go through a bias-free
`kv_proj` to the adapter width D and a LayerNorm (`ln_kv`); the queries [Q, D]
through `ln_q`; queries get the sin-cos position table of a sqrt(Q) x sqrt(Q)
grid, keys the same table resampled (bicubic) to the ViT's sqrt(N) x sqrt(N)
grid; values are x without positions; one multi-head attention (biases on
q/k/v and the output); then `ln_post` and a bias-free projection `proj`
[D, out_dim]. Output [B, Q, out_dim]. All LayerNorms have eps 1e-6.

The position table is MAE's `get_2d_sincos_pos_embed` (`mae_sincos_2d`): the
first half of the channels encodes the column, the second half the row, each
as [sin, cos] with frequencies 1 / 10000^(i / (D / 4)).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.encoders.vit import resample_posemb
from vlm_jax.errors import UserError
from vlm_jax.nn.attention import attend
from vlm_jax.nn.layers import DenseGeneral, Norm


def mae_sincos_2d(width: int, side: int) -> np.ndarray:
    """[side * side, width] fixed 2D sin-cos positions in MAE's layout (row-major grid)."""
    if width % 4:
        raise UserError(f"2D sin-cos positions need a width divisible by 4, got {width}.")
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")

    def embed(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed(cols), embed(rows)], axis=1).astype(np.float32)


class CrossAttentionResampler(nn.Module):
    """ViT tokens [..., N, Dv] (a square grid) -> [..., queries, out_dim] (Qwen-VL's `attn_pool`, `ln_post`,
    `proj`). Params: `queries` [Q, D] (Qwen-VL's `query`), `kv_proj`, `ln_kv`, `ln_q`, the attention's `query`,
    `key`, `value` and `out`, `ln_post`, `proj`; D = `width` (default out_dim), heads = D / `head_dim`."""

    out_dim: int
    queries: int = 256
    width: int = 0  # the adapter's width D; 0: out_dim (Qwen-VL: 4096)
    head_dim: int = 128
    norm_eps: float = 1e-6
    posemb_resample: str = "bicubic"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        width = self.width or self.out_dim
        dtype = jnp.dtype(self.dtype)
        *lead, n, _ = features.shape
        side, q_side = int(round(n**0.5)), int(round(self.queries**0.5))
        if side * side != n or q_side * q_side != self.queries:
            raise UserError(f"the resampler needs square grids; got {n} ViT tokens and {self.queries} queries.")
        if width % self.head_dim:
            raise UserError(f"resampler width {width} is not a multiple of head_dim {self.head_dim}.")
        heads = width // self.head_dim
        x = features.reshape(-1, n, features.shape[-1]).astype(dtype)
        x = DenseGeneral(width, (None, "embed"), use_bias=False, dtype=dtype, name="kv_proj")(x)
        x = Norm("layernorm", self.norm_eps, dtype=dtype, name="ln_kv")(x)
        init = nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02), ("latents", "embed"))
        query = Norm("layernorm", self.norm_eps, dtype=dtype, name="ln_q")(
            self.param("queries", init, (self.queries, width))
        )
        table = jnp.asarray(mae_sincos_2d(width, q_side))
        key_table = resample_posemb(table[None], (q_side, q_side), (side, side), self.posemb_resample)[0]
        proj = dict(kernel_axes=("embed", "heads", "head_dim"), use_bias=True, dtype=dtype)
        q = DenseGeneral((heads, self.head_dim), name="query", **proj)((query + table.astype(dtype))[None])
        k = DenseGeneral((heads, self.head_dim), name="key", **proj)(x + key_table.astype(dtype))
        v = DenseGeneral((heads, self.head_dim), name="value", **proj)(x)
        out = attend(jnp.broadcast_to(q, (x.shape[0],) + q.shape[1:]), k, v)
        out = DenseGeneral(width, ("heads", "head_dim", "embed"), in_dims=2, use_bias=True, dtype=dtype, name="out")(
            out
        )
        out = Norm("layernorm", self.norm_eps, dtype=dtype, name="ln_post")(out)
        out = DenseGeneral(self.out_dim, ("embed", None), use_bias=False, dtype=dtype, name="proj")(out)
        return out.reshape(*lead, self.queries, self.out_dim)
