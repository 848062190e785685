"""Dense projections, norms and MLPs whose parameters carry logical axis names."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import sharding

Dtype = Any


class DenseGeneral(nn.Module):
    """A linear map over the trailing `in_dims` dims of x, with a named kernel.

    The kernel has shape `x.shape[-in_dims:] + features`, and `kernel_axes`
    names each of its dims (inputs first, then outputs). Parameters are float32;
    the matmul runs in `dtype`.
    """

    features: int | Sequence[int]
    kernel_axes: tuple[str | None, ...]
    in_dims: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    kernel_init: Any = None  # default: truncated normal with variance 1/fan_in

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.in_dims :]
        init = self.kernel_init or nn.initializers.variance_scaling(
            1.0,
            "fan_in",
            "truncated_normal",
            in_axis=tuple(range(self.in_dims)),
            out_axis=tuple(range(self.in_dims, self.in_dims + len(features))),
        )
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, self.kernel_axes), in_shape + features, jnp.float32
        )
        contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[self.in_dims :]), features
            )
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale over the 'embed' axis (LLaMA style).

    Statistics are computed in float32; the result is cast to `dtype`.
    """

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (normed * scale).astype(self.dtype)


GATED_ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True)}


class SwiGLU(nn.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))`; act "silu" is LLaMA's SwiGLU, "gelu_tanh" Gemma's GeGLU."""

    hidden_dim: int
    dtype: Dtype = jnp.float32
    act: str = "silu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        embed_dim = x.shape[-1]
        gate = DenseGeneral(self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, name="gate")(x)
        up = DenseGeneral(self.hidden_dim, ("embed", "mlp"), dtype=self.dtype, name="up")(x)
        h = sharding.constrain(GATED_ACTIVATIONS[self.act](gate) * up, ("batch", "length", "mlp"))
        return DenseGeneral(embed_dim, ("mlp", "embed"), dtype=self.dtype, name="down")(h)
