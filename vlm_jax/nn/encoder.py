"""Pre-norm transformer encoder blocks (ViT / CLIP / SigLIP / InternViT style) and their scanned stack.

Shared by the vision tower (`vlm_jax/encoders/vit.py`, incl. its MAP head)
and the text tower (`vlm_jax/encoders/text.py`). Parameters of one block::

    attn_norm/{scale, bias}, mlp_norm/{scale, bias}       (no bias with norm="rmsnorm")
    attn/{query, key, value}/{kernel [D, H, Dh], bias}, attn/out/{kernel [H, Dh, D], bias}
    attn/{query_norm, key_norm}                            (qk_norm)
    mlp/{fc1, fc2}/{kernel, bias}
    ls1, ls2 [D]                                           (layer_scale)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import sharding
from vlm_jax.errors import UserError
from vlm_jax.nn.attention import attend
from vlm_jax.nn.layers import DenseGeneral, Mlp, Norm, SwiGLU
from vlm_jax.nn.remat import remat as remat_block
from vlm_jax.nn.rope import rotate


class MultiHeadAttention(nn.Module):
    """Multi-head attention with biases (ViT/CLIP style); `kv` defaults to `x` (self-attention).

    `mask` is a boolean [B, 1, Lq, Lk] (True = may attend). `qk_norm` normalises
    queries and keys per head ("head") or over all heads jointly ("all", InternViT).
    `out_bias` (default: `use_bias`) sets the output projection's bias apart from
    the q/k/v biases (InternViT-6B: none on q/k/v, one on the output). `rope`
    [B, L, head_dim / 2] turns queries and keys by those angles (`nn/rope.rotate`).
    """

    num_heads: int
    use_bias: bool = True
    out_bias: bool | None = None
    qk_norm: bool = False
    qk_norm_over: str = "head"
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, kv: jax.Array | None = None, mask: jax.Array | None = None, rope: jax.Array | None = None
    ) -> jax.Array:
        kv = x if kv is None else kv
        width = x.shape[-1]
        if width % self.num_heads:
            raise UserError(f"width {width} is not divisible by num_heads {self.num_heads}.")
        head_dim = width // self.num_heads
        proj = dict(kernel_axes=("embed", "heads", "head_dim"), use_bias=self.use_bias, dtype=self.dtype)
        q = DenseGeneral((self.num_heads, head_dim), name="query", **proj)(x)
        k = DenseGeneral((self.num_heads, head_dim), name="key", **proj)(kv)
        v = DenseGeneral((self.num_heads, head_dim), name="value", **proj)(kv)
        if self.qk_norm:
            axes = ("head_dim",) if self.qk_norm_over == "head" else ("heads", "head_dim")
            q = Norm(self.norm, self.norm_eps, axes, self.dtype, name="query_norm")(q)
            k = Norm(self.norm, self.norm_eps, axes, self.dtype, name="key_norm")(k)
        if rope is not None:  # self-attention with rotation angles [B, L, head_dim / 2] (2D RoPE: Qwen2-VL)
            q, k = rotate(q, rope), rotate(k, rope)
        names = ("batch", "length", "heads", "head_dim")
        q, k, v = (sharding.constrain(t, names) for t in (q, k, v))
        out = sharding.constrain(attend(q, k, v, mask), names)
        out_bias = self.use_bias if self.out_bias is None else self.out_bias
        return DenseGeneral(
            width, ("heads", "head_dim", "embed"), in_dims=2, use_bias=out_bias, dtype=self.dtype, name="out"
        )(out)


class EncoderBlock(nn.Module):
    """Pre-norm block: x + ls1 * attn(norm(x)), then x + ls2 * mlp(norm(x)).

    Used as the body of `nn.scan` over (x, mask, rope): returns (x, x if `emit` else None).
    """

    num_heads: int
    mlp_dim: int
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    mlp_act: str = "gelu"
    attn_bias: bool = True
    attn_out_bias: bool | None = None  # default: attn_bias
    qk_norm: bool = False
    qk_norm_over: str = "head"
    layer_scale: float | None = None
    mlp: str = "plain"  # "plain": fc2(act(fc1)); "gated": down(act(gate) * up), with biases (Qwen2.5-VL's ViT)
    emit: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, rope: jax.Array | None = None):
        names = ("batch", "length", "embed")
        h = Norm(self.norm, self.norm_eps, dtype=self.dtype, name="attn_norm")(x)
        h = MultiHeadAttention(
            self.num_heads,
            self.attn_bias,
            self.attn_out_bias,
            self.qk_norm,
            self.qk_norm_over,
            self.norm,
            self.norm_eps,
            self.dtype,
            name="attn",
        )(h, mask=mask, rope=rope)
        x = sharding.constrain(x + self._layer_scale("ls1", h), names)
        h = Norm(self.norm, self.norm_eps, dtype=self.dtype, name="mlp_norm")(x)
        if self.mlp == "gated":
            h = SwiGLU(self.mlp_dim, self.dtype, self.mlp_act, use_bias=True, name="mlp")(h)
        else:
            h = Mlp(self.mlp_dim, self.mlp_act, self.dtype, name="mlp")(h)
        x = sharding.constrain(x + self._layer_scale("ls2", h), names)
        return x, (x if self.emit else None)

    def _layer_scale(self, name: str, h: jax.Array) -> jax.Array:
        """h times the learned per-channel scale `name` (CaiT / InternViT layer scale), or h when layer_scale is None."""
        if self.layer_scale is None:
            return h
        init = nn.with_logical_partitioning(nn.initializers.constant(self.layer_scale), ("embed",))
        return h * self.param(name, init, (h.shape[-1],)).astype(h.dtype)


def encoder_stack(depth: int, remat: str, name: str = "layers", **block_kwargs) -> nn.Module:
    """`depth` EncoderBlocks as one `nn.scan` (params stacked on a leading 'layers' axis), rematerialised
    under the policy `remat` names (`vlm_jax/nn/remat.py`); called as `stack(x, mask, rope)` (mask and rope
    may be None)."""
    stack = nn.scan(
        remat_block(EncoderBlock, remat),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return stack(name=name, **block_kwargs)
