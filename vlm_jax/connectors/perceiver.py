"""Flamingo's Perceiver resampler: a fixed number of learned latents read a variable number of visual features.

Semantics follow the Flamingo paper and open_flamingo's `PerceiverResampler`:
media features x [B, T, F, V, D] (T media, F frames each, V features per
frame) get learned frame embeddings (per frame index) and media-time
embeddings (per media index); each layer lets the latents attend over
concat(norm(x), norm(latents)) — keys and values include the latents — then a
feed-forward block, both residual; a final LayerNorm. Output [B, T, latents, D].
Layers are one `nn.scan`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import sharding
from vlm_jax.nn.activations import activation
from vlm_jax.nn.attention import attend
from vlm_jax.nn.layers import DenseGeneral, Norm


class PerceiverLayer(nn.Module):
    """Latents <- latents + attn(latents, concat(media, latents)); latents <- latents + ff(latents)."""

    num_heads: int
    head_dim: int
    ff_mult: int = 4
    ff_act: str = "gelu"
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    qk_norm: bool = False

    @nn.compact
    def __call__(self, latents: jax.Array, media: jax.Array):
        width = latents.shape[-1]
        m = Norm("layernorm", self.norm_eps, dtype=self.dtype, name="norm_media")(media)
        q_in = Norm("layernorm", self.norm_eps, dtype=self.dtype, name="norm_latents")(latents)
        kv_in = jnp.concatenate([m, q_in], axis=-2)
        proj = dict(kernel_axes=("embed", "heads", "head_dim"), dtype=self.dtype)
        q = DenseGeneral((self.num_heads, self.head_dim), name="query", **proj)(q_in)
        k = DenseGeneral((self.num_heads, self.head_dim), name="key", **proj)(kv_in)
        v = DenseGeneral((self.num_heads, self.head_dim), name="value", **proj)(kv_in)
        if self.qk_norm:
            q = Norm("layernorm", self.norm_eps, ("head_dim",), self.dtype, name="query_norm")(q)
            k = Norm("layernorm", self.norm_eps, ("head_dim",), self.dtype, name="key_norm")(k)
        b, t = q.shape[:2]
        out = attend(q.reshape(b * t, *q.shape[2:]), k.reshape(b * t, *k.shape[2:]), v.reshape(b * t, *v.shape[2:]))
        out = out.reshape(q.shape)
        latents = latents + DenseGeneral(
            width, ("heads", "head_dim", "embed"), in_dims=2, dtype=self.dtype, name="out"
        )(out)
        h = Norm("layernorm", self.norm_eps, dtype=self.dtype, name="ff_norm")(latents)
        h = DenseGeneral(width * self.ff_mult, ("embed", "mlp"), dtype=self.dtype, name="ff_in")(h)
        h = DenseGeneral(width, ("mlp", "embed"), dtype=self.dtype, name="ff_out")(activation(self.ff_act)(h))
        return sharding.constrain(latents + h, ("batch", None, "latents", "embed")), None


class PerceiverResampler(nn.Module):
    """Media features [B, T, F, V, Dm] -> latents [B, T, num_latents, D].

    D is `width`, or the feature width Dm when `width` is 0; a different width
    first maps the features by a learned linear projection (`media_proj`), as
    the Flamingo paper's 1536-wide resampler reads NFNet-F6's 3072-wide features.
    """

    depth: int = 6
    num_heads: int = 8
    head_dim: int = 64
    num_latents: int = 64
    max_num_media: int | None = None
    max_num_frames: int | None = None
    ff_mult: int = 4
    ff_act: str = "gelu"  # exact GELU (open_flamingo), "relu" (IDEFICS) or "sqrelu" (the Flamingo paper)
    norm_eps: float = 1e-5
    dtype: str = "float32"
    qk_norm: bool = False  # LayerNorm of queries and keys per head (IDEFICS option)
    width: int = 0

    @nn.compact
    def __call__(self, media: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        if self.width and self.width != media.shape[-1]:
            media = DenseGeneral(self.width, (None, "embed"), dtype=dtype, name="media_proj")(media)
        b, t, f, v, d = media.shape
        init = nn.initializers.normal(1.0)
        if self.max_num_frames:
            frames = self.param(
                "frame_embs", nn.with_logical_partitioning(init, (None, "embed")), (self.max_num_frames, d)
            )
            media = media + frames[:f][None, None, :, None, :]
        media = media.reshape(b, t, f * v, d)
        if self.max_num_media:
            times = self.param(
                "media_time_embs", nn.with_logical_partitioning(init, (None, "embed")), (self.max_num_media, d)
            )
            media = media + times[:t][None, :, None, :]
        latents = self.param("latents", nn.with_logical_partitioning(init, ("latents", "embed")), (self.num_latents, d))
        latents = jnp.broadcast_to(latents, (b, t, self.num_latents, d)).astype(dtype)
        stack = nn.scan(
            PerceiverLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        latents, _ = stack(
            self.num_heads, self.head_dim, self.ff_mult, self.ff_act, self.norm_eps, dtype, self.qk_norm, name="layers"
        )(latents, media.astype(dtype))
        return Norm("layernorm", self.norm_eps, dtype=dtype, name="norm")(latents)
