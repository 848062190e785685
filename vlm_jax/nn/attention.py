"""`attend`, the attention function of every module, and the decoder's self-attention: grouped KV heads,
segment-aware causal masks, position schemes and a KV cache."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import sharding
from vlm_jax.errors import UserError
from vlm_jax.nn.layers import DenseGeneral, Norm
from vlm_jax.nn.positions import alibi_bias, alibi_slopes, sinusoid
from vlm_jax.nn.rope import apply_rope, mrope_angles, rotate

# The logit of a masked pair: finite in float32, so a fully masked row softmaxes to uniform weights, not NaN.
_MASKED = jnp.finfo(jnp.float32).min


def causal_segment_mask(
    segment_ids: jax.Array,
    kv_segment_ids: jax.Array | None = None,
    offset=0,
    *,
    prefix_mask: jax.Array | None = None,
    kv_prefix_mask: jax.Array | None = None,
    sliding_window: int = 0,
) -> jax.Array:
    """[B, 1, T, S] boolean mask: query i sees key j iff both share a segment and j <= i + offset.

    Keys default to the queries; with a KV cache the keys are the cache slots
    and `offset` is the slot of the first query. Segment 0 (padding) only sees
    padding, so no row is ever fully masked and real tokens never see padding.

    `prefix_mask` [B, T] (and `kv_prefix_mask` [B, S] for the keys) marks a
    bidirectional prefix (prefix-LM: PaLI, PaliGemma): two prefix tokens of
    one segment see each other whatever their order. `sliding_window` = w > 0
    (Mistral) also requires (i + offset) - j < w: the window counts slots,
    which within a segment are its positions shifted by a constant.
    """
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    q_slots = (jnp.arange(segment_ids.shape[-1]) + offset)[:, None]
    kv_slots = jnp.arange(kv_segment_ids.shape[-1])[None, :]
    causal = kv_slots <= q_slots
    if prefix_mask is not None:
        kv_prefix_mask = prefix_mask if kv_prefix_mask is None else kv_prefix_mask
        causal = causal | (prefix_mask[:, :, None] & kv_prefix_mask[:, None, :])
    if sliding_window:
        causal = causal & (q_slots - kv_slots < sliding_window)
    same = segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (same & causal)[:, None, :, :]


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] boolean: query i may see key j iff both lie in one packed segment (no causality: `attend`'s
    `causal` adds it without a materialised [T, T] causal mask)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, :, :]


def attend(q, k, v, mask=None, bias=None, logit_softcap: float = 0.0, *, causal: bool = False, window: int = 0):
    """Softmax attention of q [B, T, H, D] over k, v [B, S, K, D] (K divides H; head h reads KV head h // (H / K)).

    The one attention function of every module (decoder, encoders, connectors,
    gated cross-attention). `mask` [B or 1, 1 or H, T, S] bool (True = may
    attend); `bias` [B or 1, H, T, S] is added to the logits scaled by
    D^-1/2. `causal` lets query i see only keys j <= i, and `window` = w > 0
    only keys with i - j < w (query and key slots both counted from 0: a
    training or prompt pass, not a step against a KV cache); both combine
    with `mask`. Logits and the softmax are float32 whatever the input dtype;
    the weights are cast to v's dtype. A fully masked row gets the uniform
    average of the values (callers that need zero there mask the output).

    Without a soft-cap this is `jax.nn.dot_product_attention` with its default
    implementation (XLA in jax 0.10, which computes the logits with float32
    accumulation and the softmax in float32); `causal` and `window` go to its
    `is_causal` and `local_window_size`, so a fused implementation (cuDNN on
    GPU) applies them without a materialised mask. `logit_softcap` = c > 0
    (Gemma 2) maps the logits (bias included) to c * tanh(logits / c) before
    masking, which `dot_product_attention` cannot do, so that case is an
    explicit einsum with the same float32 semantics.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    if h % kv_heads:
        raise UserError(f"attention has {h} query heads, which {kv_heads} key/value heads do not divide.")
    if window < 0:
        raise UserError(f"attention window={window} must be 0 (off) or a positive number of slots.")
    if not logit_softcap:
        local = (window - 1, 0) if window else None
        return jax.nn.dot_product_attention(q, k, v, bias, mask, is_causal=causal, local_window_size=local)
    grouped = q.reshape(b, t, kv_heads, h // kv_heads, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, h, t, -1) * d**-0.5
    if bias is not None:
        logits = logits + bias
    logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    if causal or window:
        q_slots, kv_slots = jnp.arange(t)[:, None], jnp.arange(k.shape[1])[None, :]
        allowed = (kv_slots <= q_slots) if causal else jnp.ones((t, k.shape[1]), bool)
        if window:
            allowed = allowed & (q_slots - kv_slots < window)
        mask = allowed if mask is None else mask & allowed
    if mask is not None:
        logits = jnp.where(mask, logits, _MASKED)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv_heads, h // kv_heads, t, -1)
    return jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(b, t, h, d)


class SelfAttention(nn.Module):
    """Causal self-attention within packed segments, with grouped-query attention (num_kv_heads divides num_heads).

    `position_embedding` says how positions enter the logits: "rope" rotates
    queries and keys; "alibi" adds -slope_h * distance (MPT slopes,
    `alibi_bias_max`); "relative" is Transformer-XL's (q + u).k + (q + v).(W_R r)
    with sinusoids r of the distance, a learned W_R ('relative') and per-head
    biases u ('content_bias') and v ('position_bias') (Gopher, Chinchilla,
    Flamingo's LM); "learned" and "none" add nothing here. Distances come from
    `positions`, so they are per segment. `rope_scaling` rescales the RoPE
    frequencies (`vlm_jax/nn/rope.py`: "linear", "llama3") and `rope_fraction`
    < 1 rotates only the leading dims of each head; `qk_norm` LayerNorms each
    head's queries and keys before RoPE (Persimmon); `sliding_window`
    = w > 0 lets a query see only keys less than w positions back (Mistral);
    a `prefix_mask` [B, T] makes its tokens a bidirectional prefix of their
    segment (prefix-LM; see `causal_segment_mask`).

    With `decode=True` keys and values go to a "cache" collection
    (`cached_key`, `cached_value` [B, max_len, kv_heads, head_dim],
    `cached_segment_ids`, `cached_positions`, `cached_prefix` [B, max_len],
    `index`). The first call (`init`) only creates the cache, sized by its
    input, and attends within that input; later calls write their T tokens at
    slots index .. index + T - 1 (the caller keeps index + T <= max_len) and
    attend over the whole cache with the same segment, causality, prefix and
    window rules. A bidirectional prefix must be written in one call (the
    prompt): a prefix token only sees the prefix keys cached so far.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    dtype: Any = jnp.float32
    qkv_bias: bool = False  # Qwen2 has biases on the query, key and value projections
    out_bias: bool = False
    position_embedding: str = "rope"
    alibi_bias_max: float = 8.0
    logit_softcap: float = 0.0
    rope_scaling: Any = None  # None or a dict, e.g. {"rope_type": "linear", "factor": 2.0}
    sliding_window: int = 0  # 0 = no window
    # Persimmon / Fuyu: RoPE on the first int(head_dim * rope_fraction) dims of each head (partial rotary).
    rope_fraction: float = 1.0
    # Persimmon / Fuyu: LayerNorm (scale and bias over head_dim, shared by the heads) on each head's query and key,
    # before RoPE ('query_norm', 'key_norm'), with epsilon `qk_norm_eps`.
    qk_norm: bool = False
    qk_norm_eps: float = 1e-5
    # Qwen2-VL: multimodal RoPE; positions are [B, 3, L] (temporal, height, width) and the head_dim / 2
    # frequencies split into these sections, one per axis in turn (`nn/rope.mrope_angles`). () = 1D RoPE.
    mrope_sections: tuple[int, ...] = ()
    decode: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array, prefix_mask: jax.Array | None = None
    ) -> jax.Array:
        embed_dim = x.shape[-1]
        kw = dict(dtype=self.dtype, use_bias=self.qkv_bias)
        q = DenseGeneral((self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), name="query", **kw)(x)
        k = DenseGeneral((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), name="key", **kw)(x)
        v = DenseGeneral((self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), name="value", **kw)(x)
        if self.qk_norm:
            norm = lambda name: Norm("layernorm", self.qk_norm_eps, ("head_dim",), self.dtype, name=name)  # noqa: E731
            q, k = norm("query_norm")(q), norm("key_norm")(k)
        if self.position_embedding == "rope" and self.mrope_sections:
            if self.rope_scaling is not None or self.rope_fraction != 1.0:
                raise UserError("M-RoPE (mrope_sections) does not combine with rope_scaling or rope_fraction < 1.")
            angles = mrope_angles(positions, self.head_dim, self.rope_theta, tuple(self.mrope_sections))
            q, k = rotate(q, angles), rotate(k, angles)
            positions = positions[:, 0]  # [B, L]: the temporal axis, which the KV cache keeps
        elif self.position_embedding == "rope":
            dims = int(self.head_dim * self.rope_fraction)
            rope = lambda a: apply_rope(a, positions, self.rope_theta, self.rope_scaling, dims)  # noqa: E731
            q, k = rope(q), rope(k)
        q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"))
        k = sharding.constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = sharding.constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        kv_segment_ids, kv_positions, kv_prefix, offset = segment_ids, positions, prefix_mask, 0
        if self.decode:
            k, v, kv_segment_ids, kv_positions, kv_prefix, offset = self._cache(
                k, v, segment_ids, positions, prefix_mask
            )
        # Without a cache or a prefix the causal rule and the window go to `attend` as flags (fused paths);
        # otherwise the whole rule is one mask.
        structured = not self.decode and prefix_mask is None
        if structured:
            mask = segment_mask(segment_ids)
        else:
            mask = causal_segment_mask(
                segment_ids,
                kv_segment_ids,
                offset,
                prefix_mask=prefix_mask,
                kv_prefix_mask=kv_prefix,
                sliding_window=self.sliding_window,
            )

        bias = None
        if self.position_embedding == "alibi":
            bias = alibi_bias(positions, kv_positions, alibi_slopes(self.num_heads, self.alibi_bias_max))
        elif self.position_embedding == "relative":
            bias = self._relative_logits(q, positions, kv_positions, embed_dim)
            q = q + self._head_bias("content_bias")  # u
        flags = dict(causal=True, window=self.sliding_window) if structured else {}
        out = attend(q, k, v, mask, bias, self.logit_softcap, **flags)
        out = sharding.constrain(out, ("batch", "length", "heads", "head_dim"))
        return DenseGeneral(
            embed_dim, ("heads", "head_dim", "embed"), in_dims=2, dtype=self.dtype, use_bias=self.out_bias, name="out"
        )(out)

    def _relative_logits(self, q, q_positions, kv_positions, embed_dim):
        """[B, H, T, S] Transformer-XL position logits (q + v).(W_R r_{i-j}), scaled like the content logits.

        W_R r is computed once per distance 0 .. S-1 and gathered by each
        pair's distance (negative distances are masked, so they are clipped).
        """
        span = kv_positions.shape[-1]
        r = sinusoid(jnp.arange(span), embed_dim).astype(self.dtype)  # [S, E]
        rel = DenseGeneral(
            (self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), dtype=self.dtype, name="relative"
        )(r)
        q = q + self._head_bias("position_bias")  # v
        by_distance = jnp.einsum("bthd,shd->bhts", q, rel, preferred_element_type=jnp.float32)
        distance = jnp.clip(q_positions[:, :, None] - kv_positions[:, None, :], 0, span - 1)  # [B, T, S]
        return jnp.take_along_axis(by_distance, distance[:, None], axis=-1) * self.head_dim**-0.5

    def _head_bias(self, name):
        """A learned per-head query bias [heads, head_dim], zero at init (Transformer-XL's u and v)."""
        init = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim"))
        return self.param(name, init, (self.num_heads, self.head_dim)).astype(self.dtype)

    def _cache(self, k, v, segment_ids, positions, prefix_mask):
        """Writes this chunk into the KV cache; returns (keys, values, segment ids, positions, prefix flags,
        first query slot). Without a `prefix_mask` the chunk's tokens are cached as not in a prefix."""
        initialised = self.has_variable("cache", "cached_key")
        prefix = jnp.zeros(segment_ids.shape, bool) if prefix_mask is None else prefix_mask.astype(bool)
        zeros = lambda a: jnp.zeros(a.shape, a.dtype)  # noqa: E731
        cached = {
            "cached_key": self.variable("cache", "cached_key", zeros, k),
            "cached_value": self.variable("cache", "cached_value", zeros, v),
            "cached_segment_ids": self.variable("cache", "cached_segment_ids", zeros, segment_ids),
            "cached_positions": self.variable("cache", "cached_positions", zeros, positions),
            "cached_prefix": self.variable("cache", "cached_prefix", zeros, prefix),
        }
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:  # init: size the cache from the input, write nothing
            return k, v, segment_ids, positions, prefix_mask, 0
        start = index.value
        for var, new in zip(cached.values(), (k, v, segment_ids, positions, prefix)):
            var.value = jax.lax.dynamic_update_slice_in_dim(var.value, new.astype(var.value.dtype), start, axis=1)
        index.value = start + k.shape[1]
        return (*(var.value for var in cached.values()), start)
