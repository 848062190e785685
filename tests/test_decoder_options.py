"""Decoder options (positions, norms, MLPs, biases, soft-caps, MQA) against NumPy, and KV-cache decoding."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from vlm_jax.errors import UserError
from vlm_jax.lm.decoder import DecoderLM
from vlm_jax.lm.gated_xattn import media_mask
from vlm_jax.nn.positions import alibi_slopes

BASE = dict(vocab_size=37, embed_dim=24, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=40, rope_theta=100.0)


def random_params(model, *args, seed=0, **kwargs):
    """Initialised params with every leaf perturbed (norm scales, biases, u, v and Flamingo gates too)."""
    params = nn.unbox(model.init(jax.random.key(seed), *args, **kwargs))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def mpt_slopes(heads, bias_max):
    """Slopes read off transformers' MPT ALiBi tensor (its last column is -slope * (L - 1) ... at L = 2)."""
    return -build_mpt_alibi_tensor(heads, 2, bias_max)[:, 0, 0].numpy().astype(np.float64)


def numpy_decoder(p, tokens, segment_ids, positions, cfg):
    """The decoder written out per token pair in float64 NumPy from the families' definitions."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    c = {f: getattr(DecoderLM(**cfg), f) for f in DecoderLM.__dataclass_fields__ if f not in ("parent", "name")}
    heads, kv_heads, d = c["num_heads"], c["num_kv_heads"], c["embed_dim"]
    hd = c["head_dim"] or d // heads
    acts = {
        "silu": lambda x: x / (1 + np.exp(-x)),
        "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2))),
        "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    }
    act = acts[c["mlp_act"]]

    def norm(x, n):
        if c["norm"] == "rmsnorm":
            return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c["norm_eps"]) * n["scale"]
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + c["norm_eps"]) * n["scale"]
        return y + n["bias"] if c["norm_bias"] else y

    def dense(x, lp, spec):
        y = np.einsum(spec, x, lp["kernel"])
        return y + lp["bias"] if "bias" in lp else y

    def rope(x):  # pairs (i, i + hd/2)
        inv = c["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
        ang = positions[:, :, None, None] * np.concatenate([inv, inv])
        rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * np.cos(ang) + rot * np.sin(ang)

    def sinusoid(distance):  # Transformer-XL: [sin(p f), cos(p f)], f = 10000^(-2k/d)
        inv = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
        return np.concatenate([np.sin(distance * inv), np.cos(distance * inv)])

    b, length = tokens.shape
    x = p["embed"]["embedding"][tokens]
    if c["embed_scale"]:
        x = x * np.sqrt(d)
    if c["position_embedding"] == "learned":
        x = x + p["pos_embed"]["embedding"][positions]
    slopes = mpt_slopes(heads, c["alibi_bias_max"])
    for layer in range(c["num_layers"]):
        lp = jax.tree.map(lambda a: a[layer], p["layers"])
        a = lp["attn"]
        h = norm(x, lp["attn_norm"])
        q = dense(h, a["query"], "bld,dhk->blhk")
        k = np.repeat(dense(h, a["key"], "bld,dhk->blhk"), heads // kv_heads, axis=2)
        v = np.repeat(dense(h, a["value"], "bld,dhk->blhk"), heads // kv_heads, axis=2)
        if c["position_embedding"] == "rope":
            q, k = rope(q), rope(k)
        out = np.zeros_like(q)
        for bi in range(b):
            for i in range(length):
                for hh in range(heads):
                    js = [j for j in range(i + 1) if segment_ids[bi, j] == segment_ids[bi, i]]
                    s = []
                    for j in js:
                        dist = positions[bi, i] - positions[bi, j]
                        if c["position_embedding"] == "relative":
                            r = sinusoid(dist) @ a["relative"]["kernel"][:, hh]
                            qk = (q[bi, i, hh] + a["content_bias"][hh]) @ k[bi, j, hh]
                            logit = (qk + (q[bi, i, hh] + a["position_bias"][hh]) @ r) / np.sqrt(hd)
                        else:
                            logit = q[bi, i, hh] @ k[bi, j, hh] / np.sqrt(hd)
                        if c["position_embedding"] == "alibi":
                            logit -= slopes[hh] * dist
                        if c["attn_logit_softcap"]:
                            logit = c["attn_logit_softcap"] * np.tanh(logit / c["attn_logit_softcap"])
                        s.append(logit)
                    w = np.exp(np.array(s) - max(s))
                    out[bi, i, hh] = (w / w.sum()) @ v[bi, js, hh]
        x = x + dense(out, a["out"], "blhk,hkd->bld")
        h = norm(x, lp["mlp_norm"])
        m = lp["mlp"]
        if c["mlp"] == "gated":
            h = act(dense(h, m["gate"], "bld,dm->blm")) * dense(h, m["up"], "bld,dm->blm")
        else:
            h = act(dense(h, m["up"], "bld,dm->blm"))
        x = x + dense(h, m["down"], "blm,md->bld")
    x = norm(x, p["final_norm"])
    logits = x @ (p["embed"]["embedding"].T if c["tie_embeddings"] else p["lm_head"]["kernel"])
    if c["final_logit_softcap"]:
        logits = c["final_logit_softcap"] * np.tanh(logits / c["final_logit_softcap"])
    return logits


OPTIONS = {
    # Flamingo's LM (Chinchilla): Transformer-XL relative positions, plain MLP; here with a bias-free LayerNorm.
    "relative": dict(position_embedding="relative", mlp="plain", mlp_act="gelu", norm="layernorm", norm_bias=False),
    # MPT / BLOOM style: ALiBi with 6 heads (not a power of two), multi-query attention, GPT-style biases.
    "alibi_mqa": dict(
        position_embedding="alibi",
        num_heads=6,
        num_kv_heads=1,
        alibi_bias_max=4.0,
        norm="layernorm",
        mlp="plain",
        mlp_act="gelu_tanh",
        mlp_bias=True,
        attn_bias=True,
    ),
    # GPT-2 style learned positions with Gemma 2's soft-caps and a GeGLU MLP, tied head.
    "learned_softcap": dict(
        position_embedding="learned",
        max_positions=16,
        mlp_act="gelu_tanh",
        attn_logit_softcap=0.5,
        final_logit_softcap=2.0,
        tie_embeddings=True,
        embed_scale=True,
    ),
    "none": dict(position_embedding="none", num_kv_heads=4),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_options_match_numpy_reference_on_a_packed_row(option):
    cfg = {**BASE, **OPTIONS[option]}
    model = DecoderLM(**cfg)
    tokens = np.random.default_rng(0).integers(1, BASE["vocab_size"], size=(2, 9)).astype(np.int32)
    segment_ids = np.array([[1] * 5 + [2] * 3 + [0], [0, 0] + [1] * 7], np.int32)  # packed + padded, left-padded
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3, 4, 5, 6]], np.int32)
    params = random_params(model, tokens, segment_ids, positions)
    got = np.asarray(jax.jit(model.apply)({"params": params}, tokens, segment_ids, positions))
    want = numpy_decoder(params, tokens, segment_ids, positions, cfg)
    real = segment_ids > 0
    assert np.max(np.abs(got[real] - want[real])) <= 1e-4


@pytest.mark.parametrize("heads, bias_max", [(8, 8.0), (6, 8.0), (5, 4.0), (12, 8.0)])
def test_alibi_slopes_equal_mpt(heads, bias_max):
    np.testing.assert_allclose(alibi_slopes(heads, bias_max), mpt_slopes(heads, bias_max), rtol=1e-6)


def test_relative_positions_give_flamingo_13_d_squared_per_layer():
    """4d^2 attention + d^2 W_R + 8d^2 MLP (mlp_dim 4d), plus 2d for u, v and 2d for the norm scales."""
    d = 64
    model = DecoderLM(
        vocab_size=10, embed_dim=d, num_layers=3, num_heads=4, num_kv_heads=4, mlp_dim=4 * d,
        position_embedding="relative", mlp="plain", mlp_act="gelu",
    )  # fmt: skip
    row = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), row, row, row))["params"]
    per_layer = sum(a.size for a in jax.tree.leaves(params["layers"])) / 3
    assert per_layer == 13 * d * d + 4 * d


@pytest.mark.parametrize(
    "field, value",
    [("position_embedding", "sinusoidal"), ("norm", "batchnorm"), ("mlp", "moe"), ("mlp_act", "relu6"), ("num_kv_heads", 3)],
)
def test_bad_options_are_one_sentence_errors(field, value):
    row = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(UserError, match=field):
        jax.eval_shape(DecoderLM(**{**BASE, field: value}).init, jax.random.key(0), row, row, row)


def left_padded_batch(rng, lengths, total, vocab):
    """tokens, segment_ids, positions [B, total]: rows of real tokens of `lengths`, right-aligned after padding."""
    b = len(lengths)
    tokens = rng.integers(1, vocab, size=(b, total)).astype(np.int32)
    segment_ids = np.zeros((b, total), np.int32)
    positions = np.zeros((b, total), np.int32)
    for i, n in enumerate(lengths):
        segment_ids[i, total - n :] = 1
        positions[i, total - n :] = np.arange(n)
    tokens[segment_ids == 0] = 0
    return tokens, segment_ids, positions


CACHED = {
    "rope_gqa": dict(),
    "alibi": dict(position_embedding="alibi", num_heads=6, num_kv_heads=3, head_dim=4),
    "relative_mqa": dict(position_embedding="relative", num_kv_heads=1),
    "flamingo_groups": dict(cross_attn_every=2, num_layers=4, cross_attn_heads=2, cross_attn_head_dim=8),
}


@pytest.mark.parametrize("option", sorted(CACHED))
def test_prefill_then_step_decoding_equals_a_full_forward(option):
    """Left-padded prompts of 3 and 6 tokens in one batch, prefilled, then 4 single-token steps with the KV cache."""
    model = DecoderLM(**{**BASE, **CACHED[option]})
    rng = np.random.default_rng(1)
    prompt, total = 6, 10
    tokens, segment_ids, positions = left_padded_batch(rng, [prompt - 3 + 4, prompt + 4], total, BASE["vocab_size"])
    media = ()
    if model.cross_attn_every:
        latents = rng.normal(size=(2, 2, 3, 8)).astype(np.float32)  # [B, M media, n latents, Dv]
        locations = np.zeros((2, total), bool)
        locations[0, [3, 7]] = locations[1, [0, 8]] = True  # an image in each prompt and one while decoding
        mask = np.asarray(media_mask(locations, segment_ids, np.ones((2, 2), np.int32)))
        media = (latents, mask)
    params = random_params(model, tokens, segment_ids, positions, *media)
    full = jax.jit(model.apply)({"params": params}, tokens, segment_ids, positions, *media)

    cache = model.init(jax.random.key(0), tokens, segment_ids, positions, *media, decode=True)["cache"]
    assert all(not np.any(a) for a in jax.tree.leaves(cache)), "init must not write into the cache"

    @jax.jit
    def step(cache, start, stop):
        chunk = lambda a: jax.lax.dynamic_slice_in_dim(a, start, stop - start, axis=1)  # noqa: E731
        return model.apply(
            {"params": params, "cache": cache},
            *map(chunk, (tokens, segment_ids, positions)),
            *((media[0], chunk(media[1])) if media else ()),
            decode=True,
            mutable=["cache"],
        )

    pieces = []
    for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]:
        logits, variables = jax.jit(step, static_argnums=(1, 2))(cache, start, stop)
        cache = variables["cache"]
        pieces.append(logits)
    stepped = np.concatenate(pieces, axis=1)
    real = segment_ids > 0
    assert np.max(np.abs(stepped[real] - np.asarray(full)[real])) <= 1e-5
