"""`vlm_jax.nn.attention.attend` against an independent NumPy softmax attention."""

import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.nn.attention import attend

B, T, S, H, K, D = 2, 5, 7, 4, 2, 8


def reference(q, k, v, mask=None, bias=None, cap=0.0):
    """Float64 softmax attention, one head at a time; head h reads KV head h // (H / K); a fully masked row
    averages all values (uniform weights)."""
    out = np.zeros(q.shape, np.float64)
    group = q.shape[2] // k.shape[2]
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            logits = q[b, :, h] @ k[b, :, h // group].T / np.sqrt(q.shape[-1])  # [T, S]
            if bias is not None:
                logits = logits + bias[b, h]
            if cap:
                logits = cap * np.tanh(logits / cap)
            if mask is not None:
                allowed = mask[b, 0]
                logits = np.where(allowed, logits, -np.inf)
                logits[~allowed.any(-1)] = 0.0  # fully masked: uniform weights
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            out[b, :, h] = weights @ v[b, :, h // group]
    return out


def inputs(scale=1.0):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, H, D)) * scale
    k = rng.normal(size=(B, S, K, D)) * scale
    v = rng.normal(size=(B, S, K, D))
    mask = rng.random((B, 1, T, S)) < 0.6
    mask[:, :, :, 0] = True
    mask[1, 0, 2] = False  # one query row sees nothing
    bias = rng.normal(size=(B, H, T, S))
    return q, k, v, mask, bias


@pytest.mark.parametrize("cap", [0.0, 2.0], ids=["plain", "softcap"])
def test_matches_numpy_with_gqa_mask_bias_and_softcap(cap):
    q, k, v, mask, bias = inputs()
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = np.asarray(attend(f32(q), f32(k), f32(v), jnp.asarray(mask), f32(bias), cap))
    want = reference(q, k, v, mask, bias, cap)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-6)
    # the fully masked row is the mean of its KV head's values, not NaN
    np.testing.assert_allclose(got[1, 2], v[1].mean(0).repeat(H // K, axis=0), atol=2e-6)


def test_without_mask_or_bias():
    q, k, v, _, _ = inputs()
    got = np.asarray(attend(*(jnp.asarray(a, jnp.float32) for a in (q, k, v))))
    np.testing.assert_allclose(got, reference(q, k, v), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("cap", [0.0, 50.0], ids=["plain", "softcap"])
def test_bfloat16_inputs_get_float32_logits(cap):
    # Large logits (|q.k| / sqrt(D) up to ~70): rounded to bfloat16 (steps of 0.25-0.5 there) they move the
    # output by ~0.03-0.04; with float32 logits only the weights and the output are rounded (~0.006).
    q, k, v, mask, _ = inputs(scale=4.0)
    q, k, v = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in (q, k, v))
    got = attend(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), jnp.asarray(mask), None, cap)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), reference(q, k, v, mask, None, cap), atol=1.2e-2)


def test_kv_heads_must_divide_query_heads():
    q = jnp.zeros((1, 2, 3, 4))
    kv = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(UserError, match="3 query heads, which 2 key/value heads do not divide"):
        attend(q, kv, kv)


@pytest.mark.parametrize("cap", [0.0, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("window", [0, 3], ids=["causal", "causal_window3"])
def test_causal_and_window_flags_equal_the_same_rule_as_a_mask(cap, window):
    # `causal` / `window` (dot_product_attention's is_causal / local_window_size, or the einsum's own rule)
    # against the reference given the rule j <= i (and i - j < window) as part of an explicit mask.
    q, k, v, mask, bias = inputs()
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    rule = (j <= i) & ((i - j < window) if window else True)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = attend(f32(q), f32(k), f32(v), jnp.asarray(mask), f32(bias), cap, causal=True, window=window)
    want = reference(q, k, v, mask & rule, bias, cap)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=2e-6)
    if window:  # the window matters here: without it query 4 also sees keys 0 and 1
        assert not np.allclose(want, reference(q, k, v, mask & (j <= i), bias, cap), atol=1e-3)
