"""Projectors and token merges of `vlm_jax/connectors/` against NumPy and hand computation (no PyTorch; their
parity with transformers' modules is in tests/test_connectors.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.connectors.projector import LinearProjector, MLPProjector
from vlm_jax.connectors.token_merge import concat_tokens, pixel_shuffle
from vlm_jax.errors import UserError

VISION = 12


def _features(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _apply(module, params, x):
    return np.asarray(module.apply({"params": params}, jnp.asarray(x)))


def test_deeper_mlp_projector_matches_numpy_and_names_its_axes():
    model = MLPProjector(6, depth=3, act="silu")
    x = _features((4, VISION), seed=2)
    boxed = model.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    assert sorted(boxed) == ["linear_1", "linear_2", "linear_3"]
    assert [boxed[f"linear_{i}"]["kernel"].names for i in (1, 2, 3)] == [
        (None, "mlp"),
        ("mlp", "mlp"),
        ("mlp", "embed"),
    ]
    params = jax.tree.map(np.asarray, nn.meta.unbox(boxed))
    params = jax.tree.map(lambda p: p + _features(p.shape, seed=p.size), params)  # non-zero biases
    h = x
    for i in (1, 2, 3):
        h = h @ params[f"linear_{i}"]["kernel"] + params[f"linear_{i}"]["bias"]
        if i < 3:
            h = h / (1 + np.exp(-h))  # silu
    np.testing.assert_allclose(_apply(model, params, x), h, atol=1e-5)
    assert LinearProjector(6).init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]["linear"]["kernel"].names == (
        None,
        "embed",
    )


def test_projector_options_are_checked():
    x = jnp.zeros((2, VISION))
    with pytest.raises(UserError, match="unknown activation 'swish_beta'"):
        MLPProjector(4, act="swish_beta").init(jax.random.PRNGKey(0), x)
    with pytest.raises(UserError, match="depth >= 1"):
        MLPProjector(4, depth=0).init(jax.random.PRNGKey(0), x)
    params = LinearProjector(4, use_bias=False).init(jax.random.PRNGKey(0), x)["params"]
    assert set(params["linear"]) == {"kernel"}


def test_concat_tokens_merges_runs_of_consecutive_tokens_as_minigpt_v2():
    tokens = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2, 8, 3)  # token t of row b = [t*3, t*3+1, t*3+2] + 24b
    merged = np.asarray(concat_tokens(jnp.asarray(tokens)))
    assert merged.shape == (2, 2, 12)
    np.testing.assert_array_equal(
        merged[0, 0], np.concatenate([tokens[0, 0], tokens[0, 1], tokens[0, 2], tokens[0, 3]])
    )
    np.testing.assert_array_equal(
        merged[1, 1], np.concatenate([tokens[1, 4], tokens[1, 5], tokens[1, 6], tokens[1, 7]])
    )
    with pytest.raises(UserError, match="9 visual tokens cannot be merged in groups of 4"):
        concat_tokens(jnp.zeros((1, 9, 3)))


def test_pixel_shuffle_by_hand():
    """Output token (i, j) is the 2x2 block at rows 2i, 2i+1 and columns 2j, 2j+1 of the grid, row-major."""
    x = _features((2, 6, 4, 5), seed=5)  # non-square grid: rows and columns cannot be confused
    got = np.asarray(pixel_shuffle(jnp.asarray(x)))
    assert got.shape == (2, 3, 2, 20)
    for b, i, j in [(0, 0, 0), (1, 1, 1), (1, 2, 0)]:
        block = [x[b, 2 * i, 2 * j], x[b, 2 * i, 2 * j + 1], x[b, 2 * i + 1, 2 * j], x[b, 2 * i + 1, 2 * j + 1]]
        np.testing.assert_array_equal(got[b, i, j], np.concatenate(block))


def _internvl_v1_reference(x: np.ndarray) -> np.ndarray:
    """InternVL's first pixel shuffle (scale 0.5), step by step in NumPy: v2 without the final transpose."""
    n, a, b, c = x.shape
    y = x.reshape(n, a, b // 2, 2 * c).transpose(0, 2, 1, 3)  # split columns into pairs, then rows outer
    return y.reshape(n, b // 2, a // 2, 4 * c)  # pair rows: each token holds a 2x2 block; grid is [cols, rows]


def test_pixel_shuffle_v1_keeps_internvls_transposed_grid():
    x = _features((1, 4, 6, 3), seed=6)
    got = np.asarray(pixel_shuffle(jnp.asarray(x), version="v1"))
    np.testing.assert_array_equal(got, _internvl_v1_reference(x))
    assert got.shape == (1, 3, 2, 12)
    with pytest.raises(UserError, match="a 5x6 feature grid cannot be pixel-shuffled by 2"):
        pixel_shuffle(jnp.zeros((1, 5, 6, 3)))
    with pytest.raises(UserError, match="version 'v3'"):
        pixel_shuffle(jnp.asarray(x), version="v3")
