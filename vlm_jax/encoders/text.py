"""Text transformer of a two-tower model (CLIP: causal, EOS-pooled; SigLIP: bidirectional, last-token + head)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import sharding
from vlm_jax.errors import UserError
from vlm_jax.nn.encoder import encoder_stack
from vlm_jax.nn.layers import DenseGeneral, Norm


class TextTransformer(nn.Module):
    """Token ids [B, L] -> dict(pooled [B, head or width], tokens [B, L, width] (final-normed)).

    `pool="eos"` takes the hidden state at the first position of `eos_token_id`
    (or, for legacy CLIP configs with `eos_token_id == 2`, at the argmax of the
    ids, as transformers does); "last" and "first" take a fixed position.
    `head` adds a linear projection with bias on the pooled state (SigLIP).
    `attention_mask` [B, L] (1 = real token) masks padded keys.

    Params: token_embed/embedding [V, D], pos_embedding [max_len, D],
    layers/... (stacked), final_norm/{scale, bias}, head/{kernel, bias}.
    """

    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    max_len: int = 77
    causal: bool = True
    pool: str = "eos"
    eos_token_id: int = 49407
    mlp_act: str = "quick_gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    attn_bias: bool = True
    head: int | None = None
    dtype: str = "float32"
    remat: str = "none"

    @nn.compact
    def __call__(self, ids: jax.Array, attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        dtype = jnp.dtype(self.dtype)
        b, length = ids.shape
        if length > self.max_len:
            raise UserError(f"text of length {length} exceeds the text tower's max_len {self.max_len}.")
        embed = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embed",
        )
        pos = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), ("length", "embed")),
            (self.max_len, self.width),
        )
        x = embed(ids) + pos[None, :length].astype(dtype)
        x = sharding.constrain(x, ("batch", "length", "embed"))

        mask = jnp.ones((b, 1, length, length), bool)
        if self.causal:
            mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]

        x, _ = encoder_stack(
            self.depth,
            self.remat,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            norm=self.norm,
            norm_eps=self.norm_eps,
            mlp_act=self.mlp_act,
            attn_bias=self.attn_bias,
            dtype=dtype,
        )(x, mask, None)
        x = Norm(self.norm, self.norm_eps, dtype=dtype, name="final_norm")(x)

        if self.pool == "eos":
            if self.eos_token_id == 2:
                index = jnp.argmax(ids, axis=-1)
            else:
                index = jnp.argmax(ids == self.eos_token_id, axis=-1)
            pooled = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
        elif self.pool == "last":
            pooled = x[:, -1]
        elif self.pool == "first":
            pooled = x[:, 0]
        else:
            raise UserError(f"unknown text pool {self.pool!r}; use 'eos', 'last' or 'first'.")
        if self.head:
            pooled = DenseGeneral(self.head, ("embed", None), use_bias=True, dtype=dtype, name="head")(pooled)
        return {"pooled": sharding.constrain(pooled, ("batch", None)), "tokens": x}
