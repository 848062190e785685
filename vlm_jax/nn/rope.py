"""Rotary position embeddings (RoPE), driven by explicit per-token positions, with optional frequency scaling."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError

# The settings each `rope_scaling["rope_type"]` reads (the keys of transformers' `rope_parameters`).
SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_scaling(scaling: Mapping | None) -> None:
    """Raises a UserError if `scaling` (None or a dict with "rope_type" and its settings) is not one we implement."""
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind not in SCALING_KEYS:
        raise UserError(f"rope_scaling type {kind!r} is not one of {', '.join(SCALING_KEYS)}.")
    missing = [key for key in SCALING_KEYS[kind] if scaling.get(key) is None]
    if missing:
        raise UserError(f"rope_scaling of type {kind!r} needs {', '.join(missing)}.")


def inverse_frequencies(head_dim: int, theta: float, scaling: Mapping | None = None) -> jax.Array:
    """[head_dim / 2] float32 rotation frequencies theta^(-2i / head_dim), rescaled as transformers'
    `modeling_rope_utils` does for `scaling`:

    * None: unchanged;
    * {"rope_type": "linear", "factor": f}: all divided by f (position interpolation);
    * {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"}: wavelengths 2 pi / freq above
      original / low_freq_factor are divided by factor, those below
      original / high_freq_factor kept, and those between interpolated smoothly (Llama 3.1).
    """
    check_scaling(scaling)
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) & ~(wavelen > context / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0, scaling: Mapping | None = None) -> jax.Array:
    """Rotates `x` [batch, length, heads, head_dim] by `positions` [batch, length].

    Uses the "rotate half" layout of LLaMA / transformers: dimension i is
    paired with i + head_dim/2. Positions restart in each packed segment, so
    every segment sees the same rotations it would see alone. `scaling`
    rescales the frequencies (`inverse_frequencies`).
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise UserError(f"RoPE needs an even head_dim, got {head_dim}.")
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, D]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
