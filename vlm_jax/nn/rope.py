"""Rotary position embeddings (RoPE), driven by explicit per-token positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotates `x` [batch, length, heads, head_dim] by `positions` [batch, length].

    Uses the "rotate half" layout of LLaMA / transformers: dimension i is
    paired with i + head_dim/2. Positions restart in each packed segment, so
    every segment sees the same rotations it would see alone.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise UserError(f"RoPE needs an even head_dim, got {head_dim}.")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, D]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
