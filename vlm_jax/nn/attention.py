"""Multi-head self-attention with grouped KV heads and segment-aware masks."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import sharding
from vlm_jax.nn.layers import DenseGeneral
from vlm_jax.nn.rope import apply_rope


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, L, L] boolean mask: token i sees token j iff j <= i and both share a segment.

    Segment 0 (padding) only sees padding, so no row is ever fully masked.
    """
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None, :, :]


class SelfAttention(nn.Module):
    """Self-attention with RoPE and grouped-query attention (num_kv_heads divides num_heads).

    `mask` is a boolean [B, 1, L, L] (True = may attend).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    dtype: Any = jnp.float32
    qkv_bias: bool = False  # Qwen2 has biases on the query, key and value projections

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        embed_dim = x.shape[-1]
        kw = dict(dtype=self.dtype, use_bias=self.qkv_bias)
        q = DenseGeneral((self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), name="query", **kw)(x)
        k = DenseGeneral((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), name="key", **kw)(x)
        v = DenseGeneral((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), name="value", **kw)(x)
        q = sharding.constrain(apply_rope(q, positions, self.rope_theta), ("batch", "length", "heads", "head_dim"))
        k = sharding.constrain(apply_rope(k, positions, self.rope_theta), ("batch", "length", "kv_heads", "head_dim"))
        v = sharding.constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
        out = sharding.constrain(out, ("batch", "length", "heads", "head_dim"))
        return DenseGeneral(embed_dim, ("heads", "head_dim", "embed"), in_dims=2, dtype=self.dtype, name="out")(out)
