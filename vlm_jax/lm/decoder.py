"""A decoder-only language model: by default LLaMA's (RoPE, RMSNorm, SwiGLU, grouped-query attention).

Options by field cover Qwen2 and Gemma (q/k/v biases, GeGLU, embedding
scale, Gemma 2 logit soft-capping), Llama 3.1 and linear RoPE scaling,
Mistral's sliding window, Persimmon (Fuyu's LM: partial rotary, per-head
query/key LayerNorm, squared-ReLU MLP with biases), MPT / GPT style models
(ALiBi or learned absolute positions, LayerNorm, plain GELU MLP, biases) and the Transformer-XL
relative positions of Gopher / Chinchilla, the LM inside Flamingo.
`decode=True` runs with a KV cache for generation. In-sequence VLMs (LLaVA,
PaliGemma) pass image `features` that replace placeholder embeddings, and a
`prefix_mask` for a bidirectional prefix (prefix-LM).

The layer stack is one `nn.scan` (parameters stacked on a leading 'layers'
axis), optionally rematerialised, so compile time does not grow with depth.
Attention is causal within each packed segment (`segment_ids`), and RoPE,
ALiBi, relative and learned positions use each token's position within its
segment (`positions`).

With `cross_attn_every = n > 0` the model is a Flamingo LM: a GATED
XATTN-DENSE block (`vlm_jax/lm/gated_xattn.py`) runs before layers 0, n, 2n,
... (the IDEFICS placement). The stack is then a scan over `num_layers // n`
groups, each a cross-attention block followed by a scan over n decoder layers,
so decoder parameters are stacked [groups, n, ...] under `layer_groups/layers`
(`flamingo_layout` converts a plain LM's [num_layers, ...] stack). When n does
not divide the depth (Flamingo-80B: 80 layers, every 7th), the remaining
layers form one more, shorter group, `layer_groups_tail`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import sharding
from vlm_jax.errors import UserError
from vlm_jax.lm.gated_xattn import GatedCrossAttention
from vlm_jax.nn.activations import ACTIVATIONS
from vlm_jax.nn.attention import SelfAttention
from vlm_jax.nn.layers import MLP, DenseGeneral, LayerNorm, RMSNorm, SwiGLU
from vlm_jax.nn.remat import remat
from vlm_jax.nn.rope import check_scaling


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    `attn` holds the `SelfAttention` settings; norm and MLP follow the DecoderLM fields of the same names.
    """

    attn: dict
    mlp_dim: int
    norm_eps: float
    dtype: Any
    norm: str = "rmsnorm"
    norm_bias: bool = True
    mlp: str = "gated"
    mlp_act: str = "silu"
    mlp_bias: bool = False

    @nn.compact
    def __call__(self, x, segment_ids, positions, prefix_mask=None):
        h = _norm(self, "attn_norm")(x)
        h = SelfAttention(**self.attn, dtype=self.dtype, name="attn")(h, segment_ids, positions, prefix_mask)
        x = sharding.constrain(x + h, ("batch", "length", "embed"))
        h = _norm(self, "mlp_norm")(x)
        mlp = SwiGLU if self.mlp == "gated" else MLP
        h = mlp(self.mlp_dim, self.dtype, self.mlp_act, self.mlp_bias, name="mlp")(h)
        x = sharding.constrain(x + h, ("batch", "length", "embed"))
        return x, None


def _norm(m, name: str) -> nn.Module:
    """The norm `m.norm` names ("rmsnorm" or "layernorm" with an optional bias)."""
    if m.norm == "layernorm":
        return LayerNorm(m.norm_eps, jnp.dtype(m.dtype), m.norm_bias, name=name)
    return RMSNorm(m.norm_eps, jnp.dtype(m.dtype), name=name)


def _scan_layers(block, length: int, num_broadcast: int, unroll: int = 1):
    """`block` scanned `length` times; parameters (and KV caches) stacked on a leading 'layers' axis.

    `unroll` layers run per loop iteration (`jax.lax.scan`'s unroll; >= length: no loop at all)."""
    return nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * num_broadcast,
        length=length,
        unroll=min(max(unroll, 1), length),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class CrossAttentionGroup(nn.Module):
    """One GATED XATTN-DENSE block, then `every` scanned decoder layers."""

    every: int
    block: Any  # the (possibly rematerialised) DecoderBlock class
    block_args: dict
    xattn_args: dict
    unroll: int = 1

    @nn.compact
    def __call__(self, x, segment_ids, positions, media, media_mask, prefix_mask=None):
        x = GatedCrossAttention(**self.xattn_args, name="xattn")(x, media, media_mask)
        layers = _scan_layers(self.block, self.every, 3, self.unroll)(**self.block_args, name="layers")
        x, _ = layers(x, segment_ids, positions, prefix_mask)
        return x, None


def flamingo_layout(layers: Any, every: int) -> Any:
    """A plain LM's decoder stack [num_layers, ...] -> the Flamingo LM's [num_layers / every, every, ...]."""
    depth = jax.tree.leaves(layers)[0].shape[0]
    if depth % every:
        raise UserError(f"flamingo_layout needs cross_attn_every={every} to divide the {depth} layers.")
    return jax.tree.map(lambda a: a.reshape((a.shape[0] // every, every) + a.shape[1:]), layers)


CHOICES = {
    "position_embedding": ("rope", "alibi", "relative", "learned", "none"),
    "norm": ("rmsnorm", "layernorm"),
    "mlp": ("gated", "plain"),
    "mlp_act": tuple(ACTIVATIONS),
}


class DecoderLM(nn.Module):
    """Token ids -> next-token logits [batch, length, vocab] (float32).

    Attributes mirror `config.model` of `configs/lm.py`; the defaults are a
    LLaMA decoder, and the options below cover the other families.
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # = num_heads: multi-head; 1: multi-query; in between: grouped-query attention
    mlp_dim: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"
    remat: str = "none"
    qkv_bias: bool = False  # Qwen2
    mlp_act: str = "silu"  # "silu" (LLaMA, Qwen2), "gelu_tanh" (Gemma's GeGLU, GPT-2), "gelu" (exact: MPT)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(embed_dim)
    # How positions enter: "rope"; "alibi" (MPT, BLOOM); "relative" (Transformer-XL: Gopher, Chinchilla, Flamingo's
    # LM); "learned" (an absolute table of `max_positions` rows added to the embeddings: GPT-2, OPT); "none".
    position_embedding: str = "rope"
    alibi_bias_max: float = 8.0  # ALiBi slopes 2^(-alibi_bias_max * k / heads) (MPT's setting)
    max_positions: int = 2048  # rows of the "learned" table
    norm: str = "rmsnorm"  # or "layernorm" (GPT, MPT)
    norm_bias: bool = True  # LayerNorm with a bias (MPT has none)
    mlp: str = "gated"  # "gated": down(act(gate x) * up x) (SwiGLU / GeGLU); "plain": down(act(up x)) (GPT, MPT)
    mlp_bias: bool = False  # biases in the MLP (GPT-2)
    attn_bias: bool = False  # biases on all attention projections incl. the output (GPT-2)
    attn_logit_softcap: float = 0.0  # Gemma 2: attention logits -> cap * tanh(logits / cap); 0 = off
    final_logit_softcap: float = 0.0  # Gemma 2: the same on the output logits; 0 = off
    # Flamingo: a gated cross-attention block before every `cross_attn_every`-th layer (0 = plain LM).
    cross_attn_every: int = 0
    cross_attn: Any = None  # GatedCrossAttention settings (num_heads, head_dim, ff, norm, ...), a dict
    # RoPE frequency scaling as transformers' `rope_parameters` (without rope_theta), a dict or None:
    # {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1); see `vlm_jax/nn/rope.py`.
    rope_scaling: Any = None
    sliding_window: int = 0  # Mistral: a query sees keys less than this many positions back; 0 = all
    # Layers per iteration of the scanned stack (and groups per iteration of a Flamingo LM's group scan): 1 keeps
    # one loop body, so compile time is flat in depth; >= the depth unrolls the loop (slower to compile, no
    # per-iteration slicing of stacked weights and residuals). The parameter layout is the same either way.
    scan_unroll: int = 1
    # Persimmon (Fuyu's LM): RoPE on the first int(head_dim * rope_fraction) dims of each head (partial rotary;
    # 0.5 there), and a LayerNorm (scale and bias, epsilon norm_eps) on each head's queries and keys before RoPE.
    rope_fraction: float = 1.0
    qk_norm: bool = False
    # Qwen2-VL: multimodal RoPE over positions [B, 3, L] (temporal, height, width), the head_dim / 2 frequencies
    # split into these sections, one per axis in turn (e.g. (16, 24, 24)); () = positions [B, L], 1D RoPE.
    mrope_sections: tuple[int, ...] = ()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    def check(self) -> None:
        """Raises a UserError naming the first setting that cannot work."""
        for field, choices in CHOICES.items():
            if getattr(self, field) not in choices:
                raise UserError(f"{field}={getattr(self, field)!r} is not one of {', '.join(choices)}.")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}.")
        if self.position_embedding == "relative" and self.embed_dim % 2:
            raise UserError(f"relative positions need an even embed_dim, got {self.embed_dim}.")
        if self.cross_attn_every < 0 or self.cross_attn_every > self.num_layers:
            raise UserError(f"cross_attn_every={self.cross_attn_every} must lie in [0, num_layers={self.num_layers}].")
        if self.rope_scaling is not None and self.position_embedding != "rope":
            raise UserError(f"rope_scaling needs position_embedding='rope', not {self.position_embedding!r}.")
        check_scaling(self.rope_scaling)
        if self.scan_unroll < 1:
            raise UserError(f"scan_unroll={self.scan_unroll} must be >= 1 (layers per iteration of the scan).")
        if self.sliding_window < 0:
            raise UserError(f"sliding_window={self.sliding_window} must be 0 (off) or a positive number of positions.")
        rotary = self.resolved_head_dim * self.rope_fraction
        if self.rope_fraction != 1 and (not 0 < self.rope_fraction < 1 or rotary != int(rotary) or int(rotary) % 2):
            raise UserError(
                f"rope_fraction={self.rope_fraction} must lie in (0, 1] and give an even whole number of rotary "
                f"dims of head_dim={self.resolved_head_dim}."
            )
        if self.rope_fraction != 1 and self.position_embedding != "rope":
            raise UserError(f"rope_fraction needs position_embedding='rope', not {self.position_embedding!r}.")
        if self.mrope_sections and (
            self.position_embedding != "rope" or sum(self.mrope_sections) * 2 != self.resolved_head_dim
        ):
            raise UserError(
                f"mrope_sections={tuple(self.mrope_sections)} needs position_embedding='rope' and must add up to "
                f"head_dim / 2 = {self.resolved_head_dim // 2}."
            )

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array,
        positions: jax.Array,
        media: jax.Array | None = None,
        media_mask: jax.Array | None = None,
        *,
        prefix_mask: jax.Array | None = None,
        features: jax.Array | None = None,
        feature_mask: jax.Array | None = None,
        decode: bool = False,
    ) -> jax.Array:
        """tokens, segment_ids, positions [B, L]; for a Flamingo LM also media latents [B, M, n, Dv] and
        media_mask [B, L, M] (`gated_xattn.media_mask`, the rows of these L tokens).

        In-sequence VLMs (LLaVA, PaliGemma) give `features` [B, L, embed_dim]
        with `feature_mask` [B, L] bool: where the mask is True the feature
        replaces the token's embedding after the embedding scale (features are
        not scaled) and before learned positions are added, as transformers'
        PaliGemma and LLaVA place image features among the token embeddings.
        `prefix_mask` [B, L] bool marks each packed segment's bidirectional
        prefix (prefix-LM, PaliGemma): a query sees a key of its segment iff
        the key is not later, or both are in the prefix. None: plain causal.

        `decode=True` runs with a KV cache (the "cache" collection, stacked
        over layers like the params; see `SelfAttention`). `init(rng, ...,
        decode=True)` with [B, max_len] inputs returns an empty cache of
        max_len slots (as does `apply({"params": p}, ..., decode=True,
        mutable=["cache"])`, or zeros of the shapes `jax.eval_shape` gives
        for either). Then each `apply({"params": p, "cache": c}, ...,
        decode=True, mutable=["cache"])` appends its L tokens (a prompt, then
        one token per step) and returns their logits. Padding (segment 0) is
        never attended by real tokens, so prompts of different lengths can be
        left-padded, with positions counting from each row's first real token.
        The prompt call may carry `features` and a `prefix_mask` (the prefix
        flags are cached, so the prompt's prefix stays bidirectional); steps
        without a `prefix_mask` are causal. A Flamingo LM's prompt call caches
        the media keys and values of every cross-attention block, and its steps
        give media=None (and their tokens' media_mask rows) to reuse them.
        """
        self.check()
        if (features is None) != (feature_mask is None):
            raise UserError("features and feature_mask go together: give both (the mask says where) or neither.")
        dtype = jnp.dtype(self.dtype)
        embed = nn.Embed(
            self.vocab_size,
            self.embed_dim,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="embed",
        )
        x = embed(tokens)
        if self.embed_scale:
            x = x * jnp.asarray(self.embed_dim**0.5, dtype)
        if features is not None:
            if features.shape != x.shape or feature_mask.shape != tokens.shape:
                raise UserError(
                    f"features must be [B, L, embed_dim] = {x.shape} and feature_mask [B, L] = {tokens.shape}; "
                    f"got {features.shape} and {feature_mask.shape}."
                )
            x = jnp.where(feature_mask[..., None], features.astype(dtype), x)
        if self.position_embedding == "learned":
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed"))
            x = x + nn.Embed(self.max_positions, self.embed_dim, dtype=dtype, embedding_init=init, name="pos_embed")(
                positions
            )
        x = sharding.constrain(x, ("batch", "length", "embed"))

        block = remat(DecoderBlock, self.remat)
        attn = dict(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.resolved_head_dim,
            rope_theta=self.rope_theta,
            qkv_bias=self.qkv_bias or self.attn_bias,
            out_bias=self.attn_bias,
            position_embedding=self.position_embedding,
            alibi_bias_max=self.alibi_bias_max,
            logit_softcap=self.attn_logit_softcap,
            rope_scaling=self.rope_scaling,
            sliding_window=self.sliding_window,
            rope_fraction=self.rope_fraction,
            qk_norm=self.qk_norm,
            qk_norm_eps=self.norm_eps,
            mrope_sections=tuple(self.mrope_sections),
            decode=decode,
        )
        block_args = dict(
            attn=attn,
            mlp_dim=self.mlp_dim,
            norm_eps=self.norm_eps,
            dtype=dtype,
            norm=self.norm,
            norm_bias=self.norm_bias,
            mlp=self.mlp,
            mlp_act=self.mlp_act,
            mlp_bias=self.mlp_bias,
        )
        if not self.cross_attn_every:
            layers = _scan_layers(block, self.num_layers, 3, self.scan_unroll)(**block_args, name="layers")
            x, _ = layers(x, segment_ids, positions, prefix_mask)
        else:
            if media_mask is None or (media is None and not decode):
                raise UserError("a Flamingo LM (cross_attn_every > 0) needs media latents and a media mask.")
            xattn_args = dict(self.cross_attn or {}, dtype=dtype, decode=decode)
            every, tail = self.cross_attn_every, self.num_layers % self.cross_attn_every
            unroll = self.scan_unroll
            groups = _scan_layers(CrossAttentionGroup, self.num_layers // every, 5, unroll)
            inputs = (x, segment_ids, positions, media, media_mask, prefix_mask)
            x, _ = groups(every, block, block_args, xattn_args, unroll, name="layer_groups")(*inputs)
            if tail:
                inputs = (x,) + inputs[1:]
                tail_group = CrossAttentionGroup(tail, block, block_args, xattn_args, unroll, name="layer_groups_tail")
                x, _ = tail_group(*inputs)
        x = _norm(self, "final_norm")(x)
        if self.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = DenseGeneral(self.vocab_size, ("embed", "vocab"), dtype=dtype, name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if self.final_logit_softcap:
            logits = self.final_logit_softcap * jnp.tanh(logits / self.final_logit_softcap)
        return sharding.constrain(logits, ("batch", "length", "vocab"))
