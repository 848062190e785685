"""A decoder-only language model: RoPE, RMSNorm, SwiGLU / GeGLU, grouped-query attention (LLaMA, Qwen2, Gemma).

The layer stack is one `nn.scan` (parameters stacked on a leading 'layers'
axis), optionally rematerialised, so compile time does not grow with depth.
Attention is causal within each packed segment (`segment_ids`), and RoPE uses
each token's position within its segment (`positions`).

With `cross_attn_every = n > 0` the model is a Flamingo LM: a GATED
XATTN-DENSE block (`vlm_jax/lm/gated_xattn.py`) runs before layers 0, n, 2n,
... (the IDEFICS placement). The stack is then a scan over `num_layers / n`
groups, each a cross-attention block followed by a scan over n decoder layers,
so decoder parameters are stacked [groups, n, ...] under `layer_groups/layers`
(`flamingo_layout` converts a plain LM's [num_layers, ...] stack).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import sharding
from vlm_jax.errors import UserError
from vlm_jax.lm.gated_xattn import GatedCrossAttention
from vlm_jax.nn.attention import SelfAttention, causal_segment_mask
from vlm_jax.nn.layers import DenseGeneral, RMSNorm, SwiGLU

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float
    norm_eps: float
    dtype: Any
    qkv_bias: bool = False
    mlp_act: str = "silu"

    @nn.compact
    def __call__(self, x, positions, mask):
        h = RMSNorm(self.norm_eps, self.dtype, name="attn_norm")(x)
        h = SelfAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta, self.dtype, self.qkv_bias, name="attn"
        )(h, positions, mask)
        x = sharding.constrain(x + h, ("batch", "length", "embed"))
        h = RMSNorm(self.norm_eps, self.dtype, name="mlp_norm")(x)
        h = SwiGLU(self.mlp_dim, self.dtype, self.mlp_act, name="mlp")(h)
        x = sharding.constrain(x + h, ("batch", "length", "embed"))
        return x, None


def _scan_layers(block, length: int, num_broadcast: int):
    """`block` scanned `length` times; parameters stacked on a leading 'layers' axis."""
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * num_broadcast,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class CrossAttentionGroup(nn.Module):
    """One GATED XATTN-DENSE block, then `every` scanned decoder layers."""

    every: int
    block: Any  # the (possibly rematerialised) DecoderBlock class
    block_args: tuple
    xattn_args: dict

    @nn.compact
    def __call__(self, x, positions, mask, media, media_mask):
        x = GatedCrossAttention(**self.xattn_args, name="xattn")(x, media, media_mask)
        x, _ = _scan_layers(self.block, self.every, 2)(*self.block_args, name="layers")(x, positions, mask)
        return x, None


def flamingo_layout(layers: Any, every: int) -> Any:
    """A plain LM's decoder stack [num_layers, ...] -> the Flamingo LM's [num_layers / every, every, ...]."""
    return jax.tree.map(lambda a: a.reshape((a.shape[0] // every, every) + a.shape[1:]), layers)


class DecoderLM(nn.Module):
    """Token ids -> next-token logits [batch, length, vocab] (float32).

    Attributes mirror `config.model` of `configs/lm.py`.
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"
    remat: str = "none"
    qkv_bias: bool = False  # Qwen2
    mlp_act: str = "silu"  # "silu" (LLaMA, Qwen2) or "gelu_tanh" (Gemma's GeGLU)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(embed_dim)
    # Flamingo: a gated cross-attention block before every `cross_attn_every`-th layer (0 = plain LM).
    cross_attn_every: int = 0
    cross_attn_heads: int = 8
    cross_attn_head_dim: int = 64
    cross_attn_ff_mult: int = 4
    cross_attn_ff_act: str = "gelu"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array,
        positions: jax.Array,
        media: jax.Array | None = None,
        media_mask: jax.Array | None = None,
    ) -> jax.Array:
        """tokens, segment_ids, positions [B, L]; for a Flamingo LM also media latents [B, M, n, Dv] and
        media_mask [B, L, M] (`gated_xattn.media_mask`)."""
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
        x = sharding.constrain(x, ("batch", "length", "embed"))
        mask = causal_segment_mask(segment_ids)

        block = DecoderBlock
        if REMAT_POLICIES[self.remat] is not None:
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        block_args = (
            self.num_heads,
            self.num_kv_heads,
            self.resolved_head_dim,
            self.mlp_dim,
            self.rope_theta,
            self.norm_eps,
            dtype,
            self.qkv_bias,
            self.mlp_act,
        )
        if not self.cross_attn_every:
            x, _ = _scan_layers(block, self.num_layers, 2)(*block_args, name="layers")(x, positions, mask)
        else:
            if self.num_layers % self.cross_attn_every:
                raise UserError(
                    f"cross_attn_every={self.cross_attn_every} does not divide num_layers={self.num_layers}."
                )
            if media is None or media_mask is None:
                raise UserError("a Flamingo LM (cross_attn_every > 0) needs media latents and a media mask.")
            xattn_args = dict(
                num_heads=self.cross_attn_heads,
                head_dim=self.cross_attn_head_dim,
                ff_mult=self.cross_attn_ff_mult,
                ff_act=self.cross_attn_ff_act,
                dtype=dtype,
            )
            groups = _scan_layers(CrossAttentionGroup, self.num_layers // self.cross_attn_every, 4)
            x, _ = groups(self.cross_attn_every, block, block_args, xattn_args, name="layer_groups")(
                x, positions, mask, media, media_mask
            )
        x = RMSNorm(self.norm_eps, dtype, name="final_norm")(x)
        if self.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = DenseGeneral(self.vocab_size, ("embed", "vocab"), dtype=dtype, name="lm_head")(x)
        return sharding.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
