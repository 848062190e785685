"""Relative position terms for decoder self-attention: ALiBi biases and Transformer-XL sinusoids.

Both work from explicit per-token positions (restarting in each packed
segment), so a query-key distance is `positions[i] - positions[j]` and packing
or left padding changes nothing within a segment.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> np.ndarray:
    """Per-head ALiBi slopes [num_heads], as MPT's `build_mpt_alibi_tensor` computes them.

    For a power-of-two head count h the slopes are 2^(-bias_max * k / h),
    k = 1..h (with bias_max = 8 these are the ALiBi paper's / BLOOM's). Otherwise
    they are taken from the next power of two, odd entries first, then even ones.
    """
    padded = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / 2.0 ** (np.arange(1, padded + 1) * (bias_max / padded))
    if padded != num_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes.astype(np.float32)


def alibi_bias(q_positions: jax.Array, k_positions: jax.Array, slopes: np.ndarray) -> jax.Array:
    """[B, H, T, S] float32 ALiBi bias -slope_h * (q_position - k_position)."""
    distance = (q_positions[:, :, None] - k_positions[:, None, :]).astype(jnp.float32)
    return -jnp.asarray(slopes)[None, :, None, None] * distance[:, None]


def sinusoid(positions: jax.Array, dim: int) -> jax.Array:
    """Transformer-XL position embeddings [..., dim]: [sin(p * f), cos(p * f)], f_k = 10000^(-2k / dim)."""
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
