"""Decoder options (positions, norms, MLPs, biases, soft-caps, MQA) against NumPy, and KV-cache decoding."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from vlm_jax.errors import UserError
from vlm_jax.lm.decoder import DecoderLM
from vlm_jax.lm.gated_xattn import media_mask
from vlm_jax.models.lm import LanguageModel
from vlm_jax.nn.positions import alibi_slopes

BASE = dict(vocab_size=37, embed_dim=24, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=40, rope_theta=100.0)


def random_params(model, *args, seed=0):
    """Random params of the shapes `model.init` gives (norm scales near 1; biases, u, v and gates nonzero too).

    Drawn with NumPy from `jax.eval_shape`, so no initialiser is compiled.
    """
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))["params"]
    rng = np.random.default_rng(seed)
    draw = lambda path, a: ("scale" in str(path[-1])) + 0.2 * rng.normal(size=a.shape).astype(np.float32)  # noqa: E731
    return jax.tree_util.tree_map_with_path(draw, shapes)


def mpt_slopes(heads, bias_max):
    """MPT's ALiBi slopes by `build_mpt_alibi_tensor`'s formula: 2^-(i * bias_max / n) for i = 1..n, n the next
    power of two; for other head counts the odd-indexed then the even-indexed ones, the first `heads`."""
    n = 2 ** math.ceil(math.log2(heads))
    slopes = 2.0 ** -(np.arange(1, n + 1) * bias_max / n)
    return np.concatenate([slopes[1::2], slopes[::2]])[:heads] if n != heads else slopes


def numpy_decoder(p, tokens, segment_ids, positions, c):
    """The decoder in float64 NumPy from the families' definitions (relative and ALiBi terms per token pair).

    `c` holds every setting this reads (`REFERENCE` and an option), none taken from `DecoderLM`.
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    heads, kv_heads, d = c["num_heads"], c["num_kv_heads"], c["embed_dim"]
    hd = c["head_dim"] or d // heads
    acts = {
        "silu": lambda x: x / (1 + np.exp(-x)),
        "gelu": lambda x: 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2))),
        "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    }
    act = acts[c["mlp_act"]]

    def norm(x, n):
        if c["norm"] == "rmsnorm":
            return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c["norm_eps"]) * n["scale"]
        y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + c["norm_eps"]) * n["scale"]
        return y + n["bias"] if c["norm_bias"] else y

    def dense(x, lp, spec, bias):
        y = np.einsum(spec, x, lp["kernel"])
        return y + lp["bias"] if bias else y

    def rope(x):  # pairs (i, i + hd/2)
        inv = c["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
        ang = positions[:, :, None, None] * np.concatenate([inv, inv])
        rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * np.cos(ang) + rot * np.sin(ang)

    def sinusoid(distance):  # Transformer-XL: [sin(p f), cos(p f)], f = 10000^(-2k/d)
        angle = distance[..., None] * (1.0 / 10000 ** (np.arange(0, d, 2) / d))
        return np.concatenate([np.sin(angle), np.cos(angle)], -1)

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
        qkv_bias = c["attn_bias"] or c["qkv_bias"]
        q = dense(h, a["query"], "bld,dhk->blhk", qkv_bias)
        k = np.repeat(dense(h, a["key"], "bld,dhk->blhk", qkv_bias), heads // kv_heads, axis=2)
        v = np.repeat(dense(h, a["value"], "bld,dhk->blhk", qkv_bias), heads // kv_heads, axis=2)
        if c["position_embedding"] == "rope":
            q, k = rope(q), rope(k)
        distance = positions[:, :, None] - positions[:, None, :]  # [B, i, j]
        logits = np.einsum("bihk,bjhk->bhij", q, k)
        if c["position_embedding"] == "relative":  # (q + u).k + (q + v).(W_R r_{i-j})
            r = np.einsum("bije,ehk->bijhk", sinusoid(distance), a["relative"]["kernel"])
            logits = logits + np.einsum("hk,bjhk->bhj", a["content_bias"], k)[:, :, None, :]
            logits = logits + np.einsum("bihk,bijhk->bhij", q + a["position_bias"][None, None], r)
        logits = logits / np.sqrt(hd)
        if c["position_embedding"] == "alibi":
            logits = logits - slopes[None, :, None, None] * distance[:, None]
        if c["attn_logit_softcap"]:
            logits = c["attn_logit_softcap"] * np.tanh(logits / c["attn_logit_softcap"])
        allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & np.tril(np.ones((length, length), bool))
        logits = np.where(allowed[:, None], logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        out = np.einsum("bhij,bjhk->bihk", w / w.sum(-1, keepdims=True), v)
        x = x + dense(out, a["out"], "blhk,hkd->bld", c["attn_bias"])
        h = norm(x, lp["mlp_norm"])
        m = lp["mlp"]
        if c["mlp"] == "gated":
            h = act(dense(h, m["gate"], "bld,dm->blm", c["mlp_bias"])) * dense(h, m["up"], "bld,dm->blm", c["mlp_bias"])
        else:
            h = act(dense(h, m["up"], "bld,dm->blm", c["mlp_bias"]))
        x = x + dense(h, m["down"], "blm,md->bld", c["mlp_bias"])
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

# Every setting `numpy_decoder` reads, for BASE; the options above override some. Written out here rather than read
# from DecoderLM, whose defaults the model under test gets for everything BASE and an option leave out: a changed
# default then fails the comparison instead of moving the reference along. The reference has no sliding window, RoPE
# scaling, partial RoPE, q/k norms or multimodal RoPE, so defaults that turned one on would fail it too.
REFERENCE = dict(
    BASE,
    head_dim=None,  # embed_dim / num_heads
    norm="rmsnorm",
    norm_eps=1e-6,
    norm_bias=True,
    mlp="gated",
    mlp_act="silu",
    mlp_bias=False,
    attn_bias=False,
    qkv_bias=False,
    embed_scale=False,
    position_embedding="rope",
    alibi_bias_max=8.0,
    attn_logit_softcap=0.0,
    final_logit_softcap=0.0,
    tie_embeddings=False,
)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_options_match_numpy_reference_on_a_packed_row(option):
    model = DecoderLM(**{**BASE, **OPTIONS[option]})
    tokens = np.random.default_rng(0).integers(1, BASE["vocab_size"], size=(2, 9)).astype(np.int32)
    segment_ids = np.array([[1] * 5 + [2] * 3 + [0], [0, 0] + [1] * 7], np.int32)  # packed + padded, left-padded
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3, 4, 5, 6]], np.int32)
    params = random_params(model, tokens, segment_ids, positions)
    got = np.asarray(jax.jit(model.apply)({"params": params}, tokens, segment_ids, positions))
    want = numpy_decoder(params, tokens, segment_ids, positions, {**REFERENCE, **OPTIONS[option]})
    real = segment_ids > 0
    assert np.max(np.abs(got[real] - want[real])) <= 1e-4


@pytest.mark.parametrize("heads, bias_max", [(8, 8.0), (6, 8.0), (5, 4.0), (12, 8.0)])
def test_alibi_slopes_equal_mpt(heads, bias_max):
    mpt = pytest.importorskip("transformers.models.mpt.modeling_mpt", reason="the reference is transformers' MPT")
    want = -mpt.build_mpt_alibi_tensor(heads, 2, bias_max)[:, 0, 0].numpy()
    np.testing.assert_allclose(alibi_slopes(heads, bias_max), want, rtol=1e-6)
    np.testing.assert_allclose(mpt_slopes(heads, bias_max), want, rtol=1e-6)


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
    [
        ("position_embedding", "sinusoidal"),
        ("norm", "batchnorm"),
        ("mlp", "moe"),
        ("mlp_act", "swish_beta"),  # not in nn/activations.py
        ("num_kv_heads", 3),
    ],
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
    "flamingo_groups": dict(cross_attn_every=2, num_layers=4, cross_attn=dict(num_heads=2, head_dim=8, ff_mult=2)),
}


@pytest.mark.parametrize("option", sorted(CACHED))
def test_prefill_then_step_decoding_equals_a_full_forward(option):
    """Left-padded prompts of 3 and 6 tokens in one batch, prefilled, then 4 single-token steps with the KV cache."""
    model = DecoderLM(**{**BASE, **CACHED[option]})
    rng = np.random.default_rng(1)
    prompt, total = 6, 10
    # Rows of 3 + 4 and 6 + 4 real tokens: prompts of 3 (left-padded) and 6, then 4 decoded tokens.
    tokens, segment_ids, positions = left_padded_batch(rng, [7, 10], total, BASE["vocab_size"])
    media = ()
    if model.cross_attn_every:
        latents = rng.normal(size=(2, 2, 3, 8)).astype(np.float32)  # [B, M media, n latents, Dv]
        locations = np.zeros((2, total), bool)
        locations[0, [3, 7]] = locations[1, [0, 8]] = True  # an image in each prompt and one while decoding
        mask = np.asarray(media_mask(locations, segment_ids, np.ones((2, 2), np.int32)))
        media = (latents, mask)
    params = random_params(model, tokens, segment_ids, positions, *media)
    full = jax.jit(model.apply)({"params": params}, tokens, segment_ids, positions, *media)

    if option == "rope_gqa":  # the documented way: init with [B, max_len] inputs (also makes params; slow to compile)
        cache = jax.jit(lambda *a: model.init(jax.random.key(0), *a, decode=True)["cache"])(
            tokens, segment_ids, positions, *media
        )
    else:  # the same without params: apply with max_len inputs creates an empty cache
        create = lambda *a: model.apply({"params": params}, *a, decode=True, mutable=["cache"])[1]["cache"]  # noqa: E731
        cache = jax.jit(create)(tokens, segment_ids, positions, *media)
    assert all(not np.any(a) for a in jax.tree.leaves(cache)), "creating the cache must not write into it"

    @jax.jit
    def step(cache, tokens, segment_ids, positions, *media):
        variables = {"params": params, "cache": cache}
        return model.apply(variables, tokens, segment_ids, positions, *media, decode=True, mutable=["cache"])

    pieces = []
    for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]:
        chunk = [a[:, start:stop] for a in (tokens, segment_ids, positions)]
        logits, variables = step(cache, *chunk, *((media[0], media[1][:, start:stop]) if media else ()))
        cache = variables["cache"]
        pieces.append(logits)
    stepped = np.concatenate(pieces, axis=1)
    real = segment_ids > 0
    assert np.max(np.abs(stepped[real] - np.asarray(full)[real])) <= 1e-5


def test_flop_count_of_relative_positions_and_plain_mlp_matches_xla_cost_analysis(tiny_lm_config):
    """As tests/test_lm_model.py's check of the default decoder: one layer, analytic <= XLA <= 1.15 x analytic."""
    tiny_lm_config.model.update(num_layers=1, position_embedding="relative", mlp="plain", mlp_act="gelu")
    system = LanguageModel(tiny_lm_config)
    batch = system.dummy_batch(2)
    params = jax.eval_shape(lambda: nn.unbox(system.init(jax.random.key(0), batch)))
    xla_flops = jax.jit(system.logits).lower(params, batch).compile().cost_analysis()["flops"]
    analytic_forward = system.flops_per_example() / 3 * 2
    assert analytic_forward <= xla_flops <= 1.15 * analytic_forward, (analytic_forward, xla_flops)


@pytest.mark.parametrize("option", ["plain", "flamingo_groups"])
def test_unrolled_layer_scan_gives_the_same_logits_without_a_loop(option):
    """`scan_unroll` >= the depth: the same parameters give the same logits, and the program has no loop left."""
    extra = {} if option == "plain" else CACHED["flamingo_groups"]
    rolled, unrolled = DecoderLM(**{**BASE, **extra}), DecoderLM(**{**BASE, **extra, "scan_unroll": 4})
    rng = np.random.default_rng(2)
    tokens, segment_ids, positions = left_padded_batch(rng, [5, 8], 8, BASE["vocab_size"])
    media = ()
    if rolled.cross_attn_every:
        locations = np.zeros((2, 8), bool)
        locations[:, 3] = True
        mask = np.asarray(media_mask(locations, segment_ids, np.ones((2, 1), np.int32)))
        media = (rng.normal(size=(2, 1, 3, 8)).astype(np.float32), mask)
    inputs = (tokens, segment_ids, positions, *media)
    params = random_params(rolled, *inputs)
    want, got = (jax.jit(m.apply)({"params": params}, *inputs) for m in (rolled, unrolled))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    loops = [
        jax.jit(m.apply).lower({"params": params}, *inputs).as_text().count("stablehlo.while")
        for m in (rolled, unrolled)
    ]
    assert loops[0] >= 1 and loops[1] == 0, loops
