"""Flamingo's GATED XATTN-DENSE block, with media masks computed per packed segment.

x <- x + tanh(attn_gate) * cross_attn(norm(x), media)
x <- x + tanh(ff_gate) * ff(x)                     (ff = LayerNorm, Linear, act, Linear; no biases)

The feed-forward activation is exact GELU as in open_flamingo, or squared
ReLU as in the Flamingo paper (`ff_act="sqrelu"`). IDEFICS's variant is
`norm="rmsnorm", ff="gated"` (an RMSNorm + SwiGLU of width `ff_dim`), with
optional per-channel gates (`gate_shape="vector"`) and RMSNorms of queries and
keys per head (`qk_norm`).

Both gates start at 0 (`gate_init`), so at initialisation the block is the
identity and a Flamingo model's logits equal its frozen LM's. A model trained
from scratch has no LM to preserve: there a gate that starts at 0 also stalls
learning (the cross-attention weights get gradients only in proportion to
tanh(gate)), and `gate_init` opens the gates from the start.

Media masking follows the Flamingo paper and open_flamingo: a text token's
"time" is the number of media placeholders at or before it; with
`only_attend_immediate_media` it sees only the latest media (time equal),
otherwise every earlier one (time greater or equal). Here times count within the token's own packed segment and
a token only ever sees media slots of its segment (`image_segment_ids`), so no
example reaches another example's images. A token with no visible media (text
before the first image) gets exactly zero cross-attention output.

For generation (`decode=True`) the block caches the media keys and values, so
the media are projected once per prompt rather than at every new token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.nn.activations import activation
from vlm_jax.nn.attention import attend
from vlm_jax.nn.layers import DenseGeneral, Norm, SwiGLU


def media_mask(
    media_locations: jax.Array,
    segment_ids: jax.Array,
    image_segment_ids: jax.Array,
    only_attend_immediate_media: bool = True,
) -> jax.Array:
    """[B, L, M] boolean: may text token i attend to media slot j.

    media_locations [B, L] bool (True at each media placeholder token),
    segment_ids [B, L], image_segment_ids [B, M] (0 = empty slot).
    """
    is_media = media_locations.astype(jnp.int32)
    count = jnp.cumsum(is_media, axis=1)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    # Placeholders before this segment began; nondecreasing, so a running max carries it along the segment.
    before = jax.lax.cummax(jnp.where(starts, count - is_media, 0), axis=1)
    text_time = count - before  # [B, L]
    same = image_segment_ids[:, :, None] == image_segment_ids[:, None, :]  # [B, M, M]
    media_time = jnp.sum(same & jnp.tril(jnp.ones(same.shape[1:], bool)), axis=-1)  # 1-based index in its segment
    op = jnp.equal if only_attend_immediate_media else jnp.greater_equal
    return (
        (segment_ids[:, :, None] == image_segment_ids[:, None, :])
        & (image_segment_ids[:, None, :] > 0)
        & op(text_time[:, :, None], media_time[:, None, :])
    )


class GatedCrossAttention(nn.Module):
    """Tanh-gated cross-attention from text to media latents plus a tanh-gated feed-forward block."""

    num_heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    ff_act: str = "gelu"
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    norm: str = "layernorm"  # or "rmsnorm" (IDEFICS)
    ff: str = "plain"  # Linear-act-Linear; "gated": SwiGLU (IDEFICS)
    ff_dim: int = 0  # feed-forward width; 0 = ff_mult * width
    gate_shape: str = "scalar"  # or "vector": one gate per channel
    qk_norm: bool = False
    gate_init: float = 0.0  # both gates' initial value (before tanh); 0 = Flamingo's identity at init
    decode: bool = False  # generation: media keys and values in the "cache" collection (see __call__)

    @nn.compact
    def __call__(self, x: jax.Array, media: jax.Array | None, mask: jax.Array) -> jax.Array:
        """x [B, L, D], media [B, M, n, Dv] latents, mask [B, L, M] from `media_mask`.

        With `decode=True` the media keys and values [B, M*n, heads, head_dim]
        are kept in the "cache" collection (`media_key`, `media_value`; the
        call that creates the cache, `init`, stores zeros of their shapes): a
        later call with media (the prompt pass) projects and stores them, a
        call with media=None (each one-token step) reads them.
        """
        width = x.shape[-1]
        if self.gate_shape not in ("scalar", "vector"):
            raise UserError(f"gate_shape {self.gate_shape!r} is not 'scalar' or 'vector'.")
        gate_dims, gate_axes = ((), ()) if self.gate_shape == "scalar" else ((width,), ("embed",))
        init = nn.with_logical_partitioning(nn.initializers.constant(self.gate_init), gate_axes)
        attn_gate, ff_gate = (self.param(name, init, gate_dims) for name in ("attn_gate", "ff_gate"))
        h = Norm(self.norm, self.norm_eps, dtype=self.dtype, name="norm")(x)
        proj = dict(kernel_axes=("embed", "heads", "head_dim"), dtype=self.dtype)
        q = DenseGeneral((self.num_heads, self.head_dim), name="query", **proj)(h)
        if self.qk_norm:
            q = Norm("rmsnorm", self.norm_eps, ("head_dim",), self.dtype, name="query_norm")(q)
        if media is None:
            k, v = self._cached_media_keys_values()
        else:
            b, m, n, dv = media.shape
            kv = media.reshape(b, m * n, dv).astype(self.dtype)
            k = DenseGeneral((self.num_heads, self.head_dim), name="key", **proj)(kv)
            v = DenseGeneral((self.num_heads, self.head_dim), name="value", **proj)(kv)
            if self.qk_norm:
                k = Norm("rmsnorm", self.norm_eps, ("head_dim",), self.dtype, name="key_norm")(k)
            if self.decode:  # the call that creates the cache (`init`) only sizes it, like the self-attention's
                creating = not self.has_variable("cache", "media_key")
                self.put_variable("cache", "media_key", jnp.zeros_like(k) if creating else k)
                self.put_variable("cache", "media_value", jnp.zeros_like(v) if creating else v)
        latents = k.shape[1] // mask.shape[-1]  # per media slot
        out = attend(q, k, v, jnp.repeat(mask, latents, axis=-1)[:, None])  # mask [B, 1, L, M*n]
        out = jnp.where(mask.any(-1)[:, :, None, None], out, 0)  # a token with no media: exactly zero
        out = DenseGeneral(width, ("heads", "head_dim", "embed"), in_dims=2, dtype=self.dtype, name="out")(out)
        x = x + jnp.tanh(attn_gate).astype(self.dtype) * out
        h = Norm(self.norm, self.norm_eps, dtype=self.dtype, name="ff_norm")(x)
        hidden = self.ff_dim or width * self.ff_mult
        if self.ff == "gated":
            h = SwiGLU(hidden, self.dtype, name="ff")(h)
        elif self.ff == "plain":
            h = DenseGeneral(hidden, ("embed", "mlp"), dtype=self.dtype, name="ff_in")(h)
            h = DenseGeneral(width, ("mlp", "embed"), dtype=self.dtype, name="ff_out")(activation(self.ff_act)(h))
        else:
            raise UserError(f"cross-attention ff {self.ff!r} is not 'plain' or 'gated'.")
        return x + jnp.tanh(ff_gate).astype(self.dtype) * h

    def _cached_media_keys_values(self) -> tuple[jax.Array, jax.Array]:
        """The media keys and values a decode call with media stored (UserError when there are none)."""
        if not (self.decode and self.has_variable("cache", "media_key")):
            raise UserError(
                "cross-attention without media needs decode=True and the media keys and values of an earlier "
                "decode call with media (the prompt pass) in the cache."
            )
        return self.get_variable("cache", "media_key"), self.get_variable("cache", "media_value")
