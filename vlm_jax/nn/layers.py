"""Dense projections, norms and MLPs whose parameters carry logical axis names."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import sharding
from vlm_jax.errors import UserError
from vlm_jax.nn.activations import activation

Dtype = Any


def matmul(x: jax.Array, kernel: jax.Array, in_dims: int, dtype: Dtype) -> jax.Array:
    """x's trailing `in_dims` dims contracted with kernel's leading ones, both cast to `dtype`, the result in `dtype`.

    Products always accumulate in float32. In float32 this is one 2-D matmul, [rows, inputs] x [inputs,
    outputs], between reshapes (free in row-major layout): the kernel's gradient then contracts one
    dimension, the rows, which XLA's CPU backend hands to its matmul kernels as it is, where a contraction
    over several batch dims (batch, length) makes it copy the float32 cotangent into a transposed layout
    first (measured: a scanned 8-layer SwiGLU stack's forward + backward at the 50M LM's shapes, 1.80 s with
    the 3-D products, 1.09 s with 2-D ones). In a lower precision (bfloat16) the forward and both backward
    products are `dot_general`s of `dtype` operands with a float32 result cast to `dtype`
    (`_low_precision_matmul`): what TPUs and GPUs do with a bfloat16 matmul, and on CPUs the form XLA hands
    to its fast (AMX / AVX512-BF16) kernels, where a bfloat16-result product, or the float32 cotangent
    autodiff would give the backward products, runs several times slower. These keep the batch dims: the
    bfloat16 kernel gradient over (batch, length) runs at ~990 GFLOP/s, over one flattened dim at ~235
    (a [4, 128, 512] input, a [512, 2048] kernel).
    """
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if jnp.dtype(dtype) != jnp.float32:
        return _low_precision_matmul(x, kernel, in_dims)
    rows, inputs, outputs = x.shape[: x.ndim - in_dims], kernel.shape[:in_dims], kernel.shape[in_dims:]
    flat = jnp.dot(x.reshape(math.prod(rows), math.prod(inputs)), kernel.reshape(math.prod(inputs), -1))
    return flat.reshape(rows + outputs)


def _contraction(x_ndim: int, in_dims: int):
    return (tuple(range(x_ndim - in_dims, x_ndim)), tuple(range(in_dims))), ((), ())


def _accumulated(a: jax.Array, b: jax.Array, dims, dtype: Dtype) -> jax.Array:
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_matmul(x: jax.Array, kernel: jax.Array, in_dims: int) -> jax.Array:
    return _accumulated(x, kernel, _contraction(x.ndim, in_dims), x.dtype)


def _low_precision_forward(x, kernel, in_dims):
    return _low_precision_matmul(x, kernel, in_dims), (x, kernel)


def _low_precision_backward(in_dims, residuals, grad):
    """dx = grad . kernel over the output dims; dkernel = x . grad over the leading (batch) dims."""
    x, kernel = residuals
    grad = grad.astype(x.dtype)
    batch, out_dims = x.ndim - in_dims, kernel.ndim - in_dims
    over_outputs = tuple(range(grad.ndim - out_dims, grad.ndim)), tuple(range(in_dims, kernel.ndim))
    over_batch = tuple(range(batch)), tuple(range(batch))
    dx = _accumulated(grad, kernel, (over_outputs, ((), ())), x.dtype)
    dkernel = _accumulated(x, grad, (over_batch, ((), ())), kernel.dtype)
    return dx, dkernel


_low_precision_matmul.defvjp(_low_precision_forward, _low_precision_backward)


class DenseGeneral(nn.Module):
    """A linear map over the trailing `in_dims` dims of x, with a named kernel.

    The kernel has shape `x.shape[-in_dims:] + features`, and `kernel_axes`
    names each of its dims (inputs first, then outputs). Parameters are float32;
    the matmul runs in `dtype` with float32 accumulation (`matmul`).
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
        y = matmul(x, kernel, self.in_dims, self.dtype)
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


class LayerNorm(nn.Module):
    """LayerNorm over the 'embed' axis (GPT / MPT style), optionally without a bias (MPT).

    Statistics are computed in float32; the result is cast to `dtype`.
    """

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(jnp.var(x32, axis=-1, keepdims=True) + self.epsilon) * scale
        if self.use_bias:
            y = y + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (x.shape[-1],))
        return y.astype(self.dtype)


class Norm(nn.Module):
    """LayerNorm (scale + bias) or RMSNorm (scale) over the trailing `len(axes)` dims, in float32.

    The encoders', connectors' and cross-attention's norm: `axes` names the
    normalised dims, so it also normalises queries and keys per head
    (("head_dim",)) or over all heads (("heads", "head_dim"), InternViT).
    """

    kind: str = "layernorm"
    epsilon: float = 1e-6
    axes: tuple[str, ...] = ("embed",)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.axes)
        shape = x.shape[x.ndim - n :]
        red = tuple(range(x.ndim - n, x.ndim))
        x32 = x.astype(jnp.float32)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes), shape)
        if self.kind == "layernorm":
            mean = jnp.mean(x32, axis=red, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=red, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes), shape)
            y = y + bias
        elif self.kind == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=red, keepdims=True) + self.epsilon) * scale
        else:
            raise UserError(f"unknown norm {self.kind!r}; use 'layernorm' or 'rmsnorm'.")
        return y.astype(self.dtype)


class SwiGLU(nn.Module):
    """Gated MLP: `down(act(gate(x)) * up(x))`; act "silu" is LLaMA's SwiGLU, "gelu_tanh" Gemma's GeGLU."""

    hidden_dim: int
    dtype: Dtype = jnp.float32
    act: str = "silu"
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        embed_dim = x.shape[-1]
        kw = dict(dtype=self.dtype, use_bias=self.use_bias)
        gate = DenseGeneral(self.hidden_dim, ("embed", "mlp"), name="gate", **kw)(x)
        up = DenseGeneral(self.hidden_dim, ("embed", "mlp"), name="up", **kw)(x)
        h = sharding.constrain(activation(self.act)(gate) * up, ("batch", "length", "mlp"))
        return DenseGeneral(embed_dim, ("mlp", "embed"), name="down", **kw)(h)


class MLP(nn.Module):
    """Plain two-matrix MLP: `down(act(up(x)))` (GPT, MPT, the Chinchilla / Flamingo LM)."""

    hidden_dim: int
    dtype: Dtype = jnp.float32
    act: str = "gelu"
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        embed_dim = x.shape[-1]
        kw = dict(dtype=self.dtype, use_bias=self.use_bias)
        h = DenseGeneral(self.hidden_dim, ("embed", "mlp"), name="up", **kw)(x)
        h = sharding.constrain(activation(self.act)(h), ("batch", "length", "mlp"))
        return DenseGeneral(embed_dim, ("mlp", "embed"), name="down", **kw)(h)


class Mlp(nn.Module):
    """fc2(act(fc1(x))) with biases (the ViT / CLIP / SigLIP encoder MLP; parameters `fc1`, `fc2`)."""

    mlp_dim: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = DenseGeneral(self.mlp_dim, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="fc1")(x)
        h = sharding.constrain(activation(self.act)(h), ("batch", "length", "mlp"))
        return DenseGeneral(x.shape[-1], ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="fc2")(h)
