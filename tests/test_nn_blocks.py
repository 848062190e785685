"""The shared activation and remat-policy tables of `vlm_jax/nn/`: values against NumPy, unknown names rejected."""

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.encoders.nfnet import GAMMA
from vlm_jax.errors import UserError
from vlm_jax.nn.activations import activation
from vlm_jax.nn.remat import remat

X = np.linspace(-4, 4, 81)
ERF = np.vectorize(math.erf)
SIGMOID = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
REFERENCE = {
    "silu": X * SIGMOID(X),
    "gelu": 0.5 * X * (1 + ERF(X / np.sqrt(2))),
    "gelu_tanh": 0.5 * X * (1 + np.tanh(np.sqrt(2 / np.pi) * (X + 0.044715 * X**3))),
    "quick_gelu": X * SIGMOID(1.702 * X),
    "relu": np.maximum(X, 0),
    "sqrelu": np.maximum(X, 0) ** 2,
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_activation_matches_numpy(name):
    got = np.asarray(activation(name)(jnp.asarray(X, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, REFERENCE[name], rtol=1e-5, atol=1e-5)


def test_every_nfnet_activation_is_in_the_table():
    for name in GAMMA:
        activation(name)


def test_unknown_names_are_user_errors():
    with pytest.raises(UserError, match=r"unknown activation 'swish'; known: silu, gelu, gelu_tanh, quick_gelu"):
        activation("swish")
    with pytest.raises(UserError, match=r"unknown remat policy 'dot'; use one of none, full, dots, dots_no_batch"):
        remat(nn.Dense, "dot")


def test_remat_none_keeps_the_block_and_a_policy_wraps_it():
    assert remat(nn.Dense, "none") is nn.Dense
    assert remat(nn.Dense, "full") is not nn.Dense


def test_bfloat16_matmul_accumulates_in_float32_both_ways():
    """`matmul` in bfloat16: the forward product and both backward products (the input's and the kernel's
    gradients) multiply bfloat16 operands into a float32 result, and match float64 einsums of the same
    bfloat16-rounded numbers to bfloat16 rounding of the result."""
    import jax

    from vlm_jax.nn.layers import matmul

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    kernel = rng.normal(size=(4, 5, 6)).astype(np.float32)
    cotangent = rng.normal(size=(2, 3, 6)).astype(np.float32)
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # noqa: E731
    y, vjp = jax.vjp(lambda x, k: matmul(x, k, 2, jnp.bfloat16), x, kernel)
    dx, dkernel = vjp(jnp.asarray(cotangent, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.float32 and dkernel.dtype == jnp.float32
    want_y = np.einsum("abij,ijc->abc", bf(x), bf(kernel))
    want_dx = np.einsum("abc,ijc->abij", bf(cotangent), bf(kernel))
    want_dk = np.einsum("abij,abc->ijc", bf(x), bf(cotangent))
    for got, want in ((y, want_y), (dx, want_dx), (dkernel, want_dk)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=8e-3, atol=8e-3 * np.abs(want).max())
    # every product is bfloat16 x bfloat16 -> float32 (no float32 operand: XLA's CPU fast kernels need this)
    from jax.extend.core import jaxprs_in_params

    def dot_products(jaxpr):
        for eqn in jaxpr.eqns:
            yield from [eqn] if eqn.primitive.name == "dot_general" else []
            for sub in jaxprs_in_params(eqn.params):
                yield from dot_products(sub)

    loss = lambda x, k: matmul(x, k, 2, jnp.bfloat16).astype(jnp.float32).sum()  # noqa: E731
    dots = list(dot_products(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, kernel).jaxpr))
    assert len(dots) == 3
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
        assert eqn.outvars[0].aval.dtype == jnp.float32, eqn
