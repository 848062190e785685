"""Projectors: vision features -> language-model embeddings, token by token.

* `LinearProjector`: one linear map with a bias (LLaVA v1, PaliGemma). Its
  param is `linear`, PaliGemma's `multi_modal_projector.linear`.
* `MLPProjector`: `depth` linear maps with an activation between them; depth 2
  with exact GELU is LLaVA-1.5's `mlp2x_gelu`. Its params are `linear_1` ..
  `linear_{depth}`, LLaVA's `multi_modal_projector.linear_1` / `linear_2`
  (a torch weight [out, in] is the transposed `kernel`); every layer has the
  LM width `out_dim`.

Features [..., Dv] -> [..., out_dim]. Kernels are named (None, "embed") for a
single map; in the MLP the hidden width is the "mlp" axis (first layer
(None, "mlp"), last ("mlp", "embed")), so tensor parallelism splits it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.nn.activations import activation
from vlm_jax.nn.layers import DenseGeneral


class LinearProjector(nn.Module):
    """features [..., Dv] -> `linear(features)` [..., out_dim]."""

    out_dim: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        linear = DenseGeneral(
            self.out_dim, (None, "embed"), use_bias=self.use_bias, dtype=jnp.dtype(self.dtype), name="linear"
        )
        return linear(features)


class MLPProjector(nn.Module):
    """features [..., Dv] -> linear_depth(act(... act(linear_1(features)))) [..., out_dim], with biases."""

    out_dim: int
    depth: int = 2
    act: str = "gelu"  # a name in vlm_jax.nn.activations.ACTIVATIONS: "gelu" (exact), "gelu_tanh", "silu", ...
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        if self.depth < 1:
            raise UserError(f"an MLP projector needs depth >= 1, not {self.depth}.")
        act = activation(self.act)
        h = features
        for i in range(1, self.depth + 1):
            axes = (None if i == 1 else "mlp", "embed" if i == self.depth else "mlp")
            h = DenseGeneral(self.out_dim, axes, use_bias=True, dtype=jnp.dtype(self.dtype), name=f"linear_{i}")(h)
            if i < self.depth:
                h = act(h)
        return h
