"""The decoder LM against an independent NumPy implementation of the LLaMA architecture."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.lm.decoder import DecoderLM
from vlm_jax.models.lm import LanguageModel

CFG = dict(vocab_size=50, embed_dim=24, num_layers=2, num_heads=6, num_kv_heads=2, mlp_dim=40, rope_theta=500.0)


def numpy_decoder(p, tokens, segment_ids, positions, cfg):
    """LLaMA forward written from the paper/transformers definitions, in float64 NumPy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    heads, kv_heads = cfg["num_heads"], cfg["num_kv_heads"]
    head_dim = cfg["embed_dim"] // heads

    def rmsnorm(x, w, eps=1e-6):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

    def rope(x):  # x [B, L, H, D]; pairs (i, i + D/2)
        inv = cfg["rope_theta"] ** (-np.arange(0, head_dim, 2) / head_dim)
        ang = positions[:, :, None, None] * np.concatenate([inv, inv])[None, None, None, :]
        half = head_dim // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * np.cos(ang) + rot * np.sin(ang)

    x = p["embed"]["embedding"][tokens]
    length = tokens.shape[1]
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & np.tril(np.ones((length, length), bool))
    for i in range(cfg["num_layers"]):
        lp = jax.tree.map(lambda a: a[i], p["layers"])
        h = rmsnorm(x, lp["attn_norm"]["scale"])
        q = rope(np.einsum("bld,dhk->blhk", h, lp["attn"]["query"]["kernel"]))
        k = rope(np.einsum("bld,dhk->blhk", h, lp["attn"]["key"]["kernel"]))
        v = np.einsum("bld,dhk->blhk", h, lp["attn"]["value"]["kernel"])
        k, v = np.repeat(k, heads // kv_heads, axis=2), np.repeat(v, heads // kv_heads, axis=2)
        s = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(head_dim)
        s = np.where(allowed[:, None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bhqs,bshk->bqhk", w, v)
        x = x + np.einsum("bqhk,hkd->bqd", o, lp["attn"]["out"]["kernel"])
        h = rmsnorm(x, lp["mlp_norm"]["scale"])
        g = h @ lp["mlp"]["gate"]["kernel"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ lp["mlp"]["up"]["kernel"])) @ lp["mlp"]["down"]["kernel"]
    x = rmsnorm(x, p["final_norm"]["scale"])
    return x @ p["lm_head"]["kernel"]


@pytest.fixture(scope="module")
def model_and_params():
    model = DecoderLM(**CFG)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(1), tokens, tokens, tokens))["params"]
    # Random norm scales, so the test also sees them.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a + 0.3 * jax.random.normal(jax.random.key(len(path)), a.shape) if "scale" in str(path[-1]) else a
        ),
        params,
    )
    return model, params


def test_matches_numpy_reference_on_a_packed_row(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG["vocab_size"], size=(2, 12)).astype(np.int32)
    segment_ids = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], np.int32)
    positions = np.array([list(range(5)) + list(range(4)) + [0, 0, 0], list(range(12))], np.int32)
    got = model.apply({"params": params}, tokens, segment_ids, positions)
    want = numpy_decoder(params, tokens, segment_ids, positions, CFG)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


def test_packed_segments_equal_separate_sequences(model_and_params):
    model, params = model_and_params
    a, b = np.array([[3, 4, 5, 6, 7]], np.int32), np.array([[9, 8, 7]], np.int32)
    packed = np.concatenate([a, b], 1)
    logits = model.apply(
        {"params": params}, packed, np.array([[1] * 5 + [2] * 3]), np.array([[0, 1, 2, 3, 4, 0, 1, 2]])
    )
    alone_a = model.apply({"params": params}, a, np.ones_like(a), np.arange(5)[None])
    alone_b = model.apply({"params": params}, b, np.ones_like(b), np.arange(3)[None])
    np.testing.assert_allclose(np.asarray(logits[:, :5]), np.asarray(alone_a), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[:, 5:]), np.asarray(alone_b), atol=1e-5)


def test_flop_count_matches_xla_cost_analysis(tiny_lm_config):
    """The analytic FLOPs used for MFU against XLA's own count of the compiled forward pass.

    One layer: XLA's cost analysis counts a scanned loop body once, not per iteration.
    """
    tiny_lm_config.model.num_layers = 1
    system = LanguageModel(tiny_lm_config)
    batch = system.dummy_batch(2)
    params = jax.eval_shape(lambda: nn.unbox(system.init(jax.random.key(0), batch)))
    compiled = jax.jit(system.logits).lower(params, batch).compile()
    xla_flops = compiled.cost_analysis()["flops"]
    analytic_forward = system.flops_per_example() / 3 * 2
    # XLA also counts softmax, norms and elementwise ops, which the matmul count leaves out.
    assert analytic_forward <= xla_flops <= 1.15 * analytic_forward, (analytic_forward, xla_flops)


def test_next_token_loss_against_numpy():
    """The summed masked cross-entropy, its weight, and the top-1 correct count of `next_token_loss` against a
    float64 NumPy log-softmax and argmax on random logits (one row's target is made the top logit)."""
    from vlm_jax.models.lm import next_token_loss

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5))
    logits[0, :, :] -= 10.0
    logits[0, np.arange(5), targets[0]] += 20.0  # row 0: every target is the top logit
    mask = np.array([[1, 1, 1, 1, 0], [1, 0, 1, 1, 1]], np.float32)
    batch = {"targets": jnp.asarray(targets, jnp.int32), "loss_mask": jnp.asarray(mask)}
    loss, weight, metrics = next_token_loss(jnp.asarray(logits), batch)
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    correct = (np.argmax(x, -1) == targets).astype(np.float64)
    np.testing.assert_allclose(float(loss), (ce * mask).sum(), rtol=1e-5)
    assert float(weight) == mask.sum()
    assert float(metrics["accuracy"]) == (correct * mask).sum() and (correct * mask).sum() >= 4
