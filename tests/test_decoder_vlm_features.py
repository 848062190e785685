"""What in-sequence VLMs need from the decoder LM: input features, a prefix-LM mask, sliding windows (with the cache).

References are a float64 NumPy LLaMA run with a visibility mask built pair by pair from the rules' wording.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.lm.decoder import DecoderLM

BASE = dict(vocab_size=37, embed_dim=24, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=40, rope_theta=100.0)


def random_params(model, *args, **kwargs):
    """Random params of the shapes `model.init` gives (norm scales near 1), drawn with NumPy (nothing compiled)."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs))["params"]
    rng = np.random.default_rng(0)
    draw = lambda path, a: ("scale" in str(path[-1])) + 0.2 * rng.normal(size=a.shape).astype(np.float32)  # noqa: E731
    return jax.tree_util.tree_map_with_path(draw, shapes)


def hand_built_mask(segment_ids, positions, prefix, window):
    """[B, L, L]: i sees j iff same segment, (j <= i or both in the prefix), (no window or p_i - p_j < window)."""
    b, n = segment_ids.shape
    allowed = np.zeros((b, n, n), bool)
    for r in range(b):
        for i in range(n):
            for j in range(n):
                same = segment_ids[r, i] == segment_ids[r, j]
                seen = j <= i or (prefix[r, i] and prefix[r, j])
                near = window == 0 or positions[r, i] - positions[r, j] < window
                allowed[r, i, j] = same and seen and near
    return allowed


def numpy_llama(p, x, positions, allowed, cfg):
    """LLaMA (RMSNorm, RoPE, GQA, SwiGLU, untied head) in float64 from input embeddings x [B, L, D] and a mask."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    heads, kv_heads = cfg["num_heads"], cfg["num_kv_heads"]
    hd = cfg["embed_dim"] // heads

    def norm(x, n):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * n["scale"]

    def rope(x):
        inv = cfg["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
        ang = positions[:, :, None, None] * np.concatenate([inv, inv])
        return x * np.cos(ang) + np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1) * np.sin(ang)

    for layer in range(cfg["num_layers"]):
        lp = jax.tree.map(lambda a: a[layer], p["layers"])
        a, m = lp["attn"], lp["mlp"]
        h = norm(x, lp["attn_norm"])
        q = rope(np.einsum("bld,dhk->blhk", h, a["query"]["kernel"]))
        k = np.repeat(rope(np.einsum("bld,dhk->blhk", h, a["key"]["kernel"])), heads // kv_heads, axis=2)
        v = np.repeat(np.einsum("bld,dhk->blhk", h, a["value"]["kernel"]), heads // kv_heads, axis=2)
        logits = np.where(allowed[:, None], np.einsum("bihk,bjhk->bhij", q, k) / np.sqrt(hd), -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        out = np.einsum("bhij,bjhk->bihk", w / w.sum(-1, keepdims=True), v)
        x = x + np.einsum("bihk,hkd->bid", out, a["out"]["kernel"])
        h = norm(x, lp["mlp_norm"])
        gate = h @ m["gate"]["kernel"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ m["up"]["kernel"])) @ m["down"]["kernel"]
    return norm(x, p["final_norm"]) @ p["lm_head"]["kernel"]


def packed_rows():
    """tokens, segment_ids, positions, prefix_mask [2, 12]: row 0 packs two examples with their own prefixes and
    right padding; row 1 is one left-padded example. Prefixes are 3, 2 and 4 tokens long."""
    tokens = np.random.default_rng(0).integers(1, BASE["vocab_size"], size=(2, 12)).astype(np.int32)
    segment_ids = np.array([[1] * 6 + [2] * 4 + [0] * 2, [0] * 3 + [1] * 9], np.int32)
    positions = np.array([list(range(6)) + list(range(4)) + [0, 0], [0] * 3 + list(range(9))], np.int32)
    prefix = np.zeros((2, 12), bool)
    prefix[0, 0:3] = prefix[0, 6:8] = prefix[1, 3:7] = True
    return tokens, segment_ids, positions, prefix


@pytest.mark.parametrize("window", [0, 3])
def test_prefix_lm_features_and_window_match_a_hand_built_mask(window):
    """Features on the prefix tokens (image tokens, as PaliGemma); only token embeddings get Gemma's sqrt(d)."""
    cfg = {**BASE, "embed_scale": True, "sliding_window": window}
    model = DecoderLM(**cfg)
    tokens, segment_ids, positions, prefix = packed_rows()
    features = np.random.default_rng(1).normal(size=(2, 12, BASE["embed_dim"])).astype(np.float32)
    kw = dict(prefix_mask=prefix, features=features, feature_mask=prefix)
    params = random_params(model, tokens, segment_ids, positions, **kw)
    got = np.asarray(jax.jit(model.apply)({"params": params}, tokens, segment_ids, positions, **kw))

    x = np.where(prefix[..., None], features, np.asarray(params["embed"]["embedding"])[tokens] * np.sqrt(24))
    allowed = hand_built_mask(segment_ids, positions, prefix, window)
    want = numpy_llama(params, x.astype(np.float64), positions, allowed, cfg)
    real = segment_ids > 0
    assert np.max(np.abs(got[real] - want[real])) <= 1e-4


def test_prefix_tokens_see_later_prefix_tokens_and_nothing_crosses_segments():
    model = DecoderLM(**BASE)
    tokens, segment_ids, positions, prefix = packed_rows()
    params = random_params(model, tokens, segment_ids, positions)
    run = jax.jit(lambda t: model.apply({"params": params}, t, segment_ids, positions, prefix_mask=prefix))
    base = np.asarray(run(tokens))

    def changed(slot):
        """Which tokens' logits change when the token at (row, column) `slot` changes."""
        other = tokens.copy()
        other[slot] = 1 + other[slot] % (BASE["vocab_size"] - 1)  # another real token id
        return np.max(np.abs(np.asarray(run(other)) - base), axis=-1) > 1e-6

    # The last prefix token of segment 1 reaches every token of segment 1 (also the earlier prefix), nothing else.
    assert np.array_equal(changed((0, 2))[0], np.arange(12) < 6)
    # A suffix token (segment 1, column 4) reaches only itself and later tokens of its segment.
    assert np.array_equal(changed((0, 4))[0], (np.arange(12) >= 4) & (np.arange(12) < 6))
    # Segment 2's prefix (columns 6, 7): its last prefix token reaches all of segment 2 and no token of segment 1.
    assert np.array_equal(changed((0, 7))[0], (np.arange(12) >= 6) & (np.arange(12) < 10))
    # Row 1: a prefix token after left padding reaches the whole example and no padding.
    assert np.array_equal(changed((1, 6))[1], np.arange(12) >= 3)


def test_features_equal_to_the_scaled_embeddings_change_nothing():
    """So features enter after the embedding scale (unscaled, as in transformers) and before learned positions."""
    model = DecoderLM(**BASE, embed_scale=True, position_embedding="learned", max_positions=16)
    tokens, segment_ids, positions, prefix = packed_rows()
    params = random_params(model, tokens, segment_ids, positions)
    embeddings = np.asarray(params["embed"]["embedding"])[tokens] * np.float32(np.sqrt(24))
    plain = jax.jit(model.apply)({"params": params}, tokens, segment_ids, positions)
    everywhere = np.ones_like(prefix)
    fed = jax.jit(model.apply)(
        {"params": params}, tokens * 0, segment_ids, positions, features=embeddings, feature_mask=everywhere
    )
    assert np.max(np.abs(np.asarray(plain) - np.asarray(fed))) <= 1e-5


@pytest.mark.parametrize(
    "settings, inputs, match",
    [
        ({}, dict(features=np.zeros((1, 4, 24), np.float32)), "feature_mask"),
        ({}, dict(feature_mask=np.ones((1, 4), bool)), "features"),
        ({}, dict(features=np.zeros((1, 4, 8), np.float32), feature_mask=np.ones((1, 4), bool)), "embed_dim"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), {}, "linear, llama3"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), {}, "low_freq_factor"),
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, position_embedding="alibi"), {}, "rope_scaling"),
        (dict(sliding_window=-1), {}, "sliding_window"),
    ],
)
def test_inconsistent_inputs_and_settings_are_one_sentence_errors(settings, inputs, match):
    row = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(UserError, match=match):
        jax.eval_shape(DecoderLM(**BASE, **settings).init, jax.random.key(0), row, row, row, **inputs)


def test_prefill_with_features_and_prefix_then_steps_equal_a_full_forward():
    """Prefix-LM + sliding window + linear RoPE scaling: a left-padded prompt row and a full one, prefilled with
    features on their prefixes, then 3 single-token steps (no prefix, no features) with the KV cache."""
    model = DecoderLM(**BASE, sliding_window=4, rope_scaling={"rope_type": "linear", "factor": 2.0})
    prompt, total = 7, 10
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, BASE["vocab_size"], size=(2, total)).astype(np.int32)
    segment_ids = np.array([[0] * 2 + [1] * 8, [1] * 10], np.int32)
    positions = np.array([[0] * 2 + list(range(8)), list(range(10))], np.int32)
    prefix = np.zeros((2, total), bool)
    prefix[0, 2:5] = prefix[1, 0:4] = True  # prefixes of 3 and 4 tokens, longer than the window
    features = rng.normal(size=(2, total, BASE["embed_dim"])).astype(np.float32)
    kw = dict(prefix_mask=prefix, features=features, feature_mask=prefix)
    params = random_params(model, tokens, segment_ids, positions, **kw)
    full = np.asarray(jax.jit(model.apply)({"params": params}, tokens, segment_ids, positions, **kw))

    create = lambda *a: model.apply({"params": params}, *a, decode=True, mutable=["cache"])[1]["cache"]  # noqa: E731
    cache = jax.jit(create)(tokens, segment_ids, positions)

    @jax.jit
    def step(cache, tokens, segment_ids, positions, kw):
        variables = {"params": params, "cache": cache}
        return model.apply(variables, tokens, segment_ids, positions, **kw, decode=True, mutable=["cache"])

    cut = lambda a, start, stop: a[:, start:stop]  # noqa: E731
    pieces = []
    for start, stop in [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]:
        chunk_kw = {k: cut(v, start, stop) for k, v in kw.items()} if start == 0 else {}
        logits, variables = step(cache, *(cut(a, start, stop) for a in (tokens, segment_ids, positions)), chunk_kw)
        cache = variables["cache"]
        pieces.append(np.asarray(logits))
    stepped = np.concatenate(pieces, axis=1)
    real = segment_ids > 0
    assert np.max(np.abs(stepped[real] - full[real])) <= 1e-5
