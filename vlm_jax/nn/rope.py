"""Rotary position embeddings (RoPE), driven by explicit per-token positions, with optional frequency scaling:
1D (`apply_rope`), Qwen2-VL's multimodal RoPE over (temporal, height, width) positions (`mrope_angles`) and the
2D axial RoPE of native-resolution vision transformers (`axial_angles`), the last two turned by `rotate`."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

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


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    theta: float = 10000.0,
    scaling: Mapping | None = None,
    rotary_dims: int | None = None,
) -> jax.Array:
    """Rotates `x` [batch, length, heads, head_dim] by `positions` [batch, length].

    Uses the "rotate half" layout of LLaMA / transformers: dimension i is
    paired with i + head_dim/2. Positions restart in each packed segment, so
    every segment sees the same rotations it would see alone. `scaling`
    rescales the frequencies (`inverse_frequencies`). `rotary_dims` < head_dim
    is partial rotary (Persimmon / Fuyu, GPT-NeoX): only the first
    `rotary_dims` dimensions rotate, as a RoPE of that width, the rest pass.
    """
    if rotary_dims is not None and rotary_dims != x.shape[-1]:
        if not 0 < rotary_dims < x.shape[-1]:
            raise UserError(f"rotary_dims={rotary_dims} must lie in (0, head_dim={x.shape[-1]}].")
        rotated = apply_rope(x[..., :rotary_dims], positions, theta, scaling)
        return jnp.concatenate([rotated, x[..., rotary_dims:]], axis=-1)
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


def rotate(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotates `x` [..., length, heads, head_dim] by `angles` [..., length, head_dim / 2] in the "rotate half"
    layout (dimension i paired with i + head_dim/2, both turned by angles[i]); the multi-axis RoPEs build their
    angles and rotate here."""
    if 2 * angles.shape[-1] != x.shape[-1]:
        raise UserError(f"{angles.shape[-1]} rotation angles for a head of {x.shape[-1]} dims; it needs half.")
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def mrope_angles(positions: jax.Array, head_dim: int, theta: float, sections: tuple[int, ...]) -> jax.Array:
    """Qwen2-VL's multimodal RoPE: positions [B, 3, L] (temporal, height, width) -> angles [B, L, head_dim / 2].

    The head_dim / 2 frequencies are split into `sections` (e.g. (16, 24, 24) of 64): the first section turns
    by the temporal position, the next by the height, the next by the width (section i by axis i % 3), as
    transformers' `Qwen2VLRotaryEmbedding`. Text tokens carry the same position on all three axes, which makes
    this plain RoPE for them."""
    if sum(sections) != head_dim // 2:
        raise UserError(f"M-RoPE sections {tuple(sections)} must add up to head_dim / 2 = {head_dim // 2}.")
    if positions.ndim != 3 or positions.shape[1] != 3:
        raise UserError(f"M-RoPE needs positions [batch, 3, length]; got shape {positions.shape}.")
    inv_freq = inverse_frequencies(head_dim, theta)
    per_axis = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, 3, L, D/2]
    axis = np.concatenate([np.full(n, i % 3) for i, n in enumerate(sections)])  # which axis turns each frequency
    return jnp.take_along_axis(per_axis, jnp.asarray(axis)[None, None, None, :], axis=1)[:, 0]


def axial_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0) -> jax.Array:
    """2D RoPE of a vision transformer over image patches: positions [..., 2] (row, column) -> angles
    [..., head_dim / 2], the first half of the frequencies turned by the row and the second by the column, each
    a RoPE of head_dim / 2 dims (transformers' `Qwen2VLVisionRotaryEmbedding`: "axial")."""
    if head_dim % 4:
        raise UserError(f"2D RoPE needs a head_dim divisible by 4, got {head_dim}.")
    inv_freq = inverse_frequencies(head_dim // 2, theta)  # [head_dim / 4]
    rows, cols = positions[..., 0:1].astype(jnp.float32), positions[..., 1:2].astype(jnp.float32)
    return jnp.concatenate([rows * inv_freq, cols * inv_freq], axis=-1)
