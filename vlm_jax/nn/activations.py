"""The MLP nonlinearities by name, one table for every tower (ViT, text, decoder, connectors, cross-attention)."""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _x_sigmoid(x: jax.Array, slope: float = 1.0) -> jax.Array:
    """x * sigmoid(slope * x), computed in float32 as x * (1 + tanh(slope * x / 2)) / 2 and cast back: the same
    function as `jax.nn.silu`, whose logistic derivative XLA's CPU backend runs ~4x slower than tanh's. Its
    derivative is one expression, so the backward pass keeps one array of x's size (autodiff of the tanh form
    would keep four per layer, which a scanned stack then stores and reads back)."""
    y = x.astype(jnp.float32)
    return (y * (0.5 + 0.5 * jnp.tanh((0.5 * slope) * y))).astype(x.dtype)


@_x_sigmoid.defjvp
def _x_sigmoid_jvp(slope: float, primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (x,), (tangent,) = primals, tangents
    y = x.astype(jnp.float32)
    s = 0.5 + 0.5 * jnp.tanh((0.5 * slope) * y)  # sigmoid(slope * x)
    derivative = (s + slope * y * s * (1.0 - s)).astype(x.dtype)
    return (y * s).astype(x.dtype), tangent * derivative


# "silu": LLaMA's SwiGLU; "gelu": exact GELU (ViT, MPT, GPT-NeoX, open_flamingo); "gelu_tanh": tanh-approximated
# GELU (Gemma's GeGLU, GPT-2, SigLIP); "quick_gelu": CLIP's x * sigmoid(1.702 x); "relu" (IDEFICS's resampler);
# "sqrelu": squared ReLU (the Flamingo paper's feed-forward blocks); the rest are the NFNet nonlinearities
# (Haiku's `base.nonlinearities`, timm's `_nonlin_gamma`), which `vlm_jax/encoders/nfnet.py` scales by its gammas.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": _x_sigmoid,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: _x_sigmoid(x, 1.702),
    "relu": jax.nn.relu,
    "sqrelu": lambda x: jnp.square(jax.nn.relu(x)),
    "identity": lambda x: x,
    "celu": jax.nn.celu,
    "elu": jax.nn.elu,
    "leaky_relu": jax.nn.leaky_relu,
    "log_sigmoid": jax.nn.log_sigmoid,
    "relu6": jax.nn.relu6,
    "selu": jax.nn.selu,
    "sigmoid": jax.nn.sigmoid,
    "softsign": jax.nn.soft_sign,
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The nonlinearity called `name` in `ACTIVATIONS`; an unknown name is a UserError listing the known ones."""
    if name not in ACTIVATIONS:
        raise UserError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]
