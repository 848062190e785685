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
