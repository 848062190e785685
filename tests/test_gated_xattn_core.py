"""GATED XATTN-DENSE on its own (no PyTorch): gates, media masks of packed segments, isolation of packed examples,
and cross-attention decoding from cached media keys and values. tests/test_gated_xattn.py compares the block with
open_flamingo's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.lm.gated_xattn import GatedCrossAttention, media_mask

IMG = 9  # media placeholder id in these tests


def test_zero_gates_make_the_block_the_identity_and_text_before_media_gets_nothing():
    module = GatedCrossAttention(num_heads=2, head_dim=4)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 8)), jnp.float32)
    media = jnp.ones((1, 1, 2, 6))
    tokens = jnp.array([[1, 2, IMG, 3, 4]])
    mask = media_mask(tokens == IMG, jnp.ones((1, 5), jnp.int32), jnp.ones((1, 1), jnp.int32))
    params = module.init(jax.random.key(0), x, media, mask)
    np.testing.assert_array_equal(np.asarray(module.apply(params, x, media, mask)), np.asarray(x))  # bit for bit
    assert not np.asarray(mask)[0, :2].any() and np.asarray(mask)[0, 2:].all()


def test_gate_init_only_changes_the_gates_initial_values():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 8)), jnp.float32)
    media = jnp.asarray(np.random.default_rng(2).normal(size=(1, 1, 2, 6)), jnp.float32)
    mask = media_mask(jnp.array([[1, 2, IMG, 3, 4]]) == IMG, jnp.ones((1, 5), jnp.int32), jnp.ones((1, 1), jnp.int32))
    closed = nn.unbox(GatedCrossAttention(num_heads=2, head_dim=4).init(jax.random.key(0), x, media, mask))["params"]
    module = GatedCrossAttention(num_heads=2, head_dim=4, gate_init=0.7)
    opened = nn.unbox(module.init(jax.random.key(0), x, media, mask))["params"]
    assert float(opened["attn_gate"]) == float(opened["ff_gate"]) == pytest.approx(0.7)
    same = {k: v for k, v in opened.items() if not k.endswith("_gate")}
    assert jax.tree.all(jax.tree.map(np.array_equal, same, {k: closed[k] for k in same}))
    out = np.asarray(module.apply({"params": opened}, x, media, mask))
    assert np.abs(out - np.asarray(x)).min(-1).max() > 0  # the open block changes every token (its ff does)


# A packed row: example a (6 tokens, 2 images), example b (4 tokens, 1 image), 2 padding tokens; media slots
# [a's 1st, a's 2nd, b's 1st, empty].
PACKED_TOKENS = np.array([1, IMG, 2, 3, IMG, 4] + [5, IMG, 6, 7] + [0, 0])
PACKED_SEGMENTS = np.array([1] * 6 + [2] * 4 + [0, 0])
PACKED_SLOTS = np.array([1, 1, 2, 0])


@pytest.mark.parametrize("only_immediate", [True, False])
def test_media_mask_of_a_packed_row_by_hand(only_immediate):
    """Each token sees its own example's latest image (or, without only_immediate, all its example's images so far);
    text before an example's first image, padding and the empty slot see nothing."""
    want = np.zeros((12, 4), bool)
    want[1:4, 0] = True  # a's text after its 1st image
    want[4:6, 1] = True  # a's text after its 2nd image
    want[4:6, 0] = not only_immediate
    want[7:10, 2] = True  # b's 1st image is media slot 2, never a's slots
    got = media_mask(
        jnp.asarray(PACKED_TOKENS == IMG)[None], jnp.asarray(PACKED_SEGMENTS)[None], jnp.asarray(PACKED_SLOTS)[None],
        only_immediate,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got)[0], want)


def test_packed_rows_equal_separate_rows():
    """With open gates and random weights, each example of a packed row gets the outputs it gets alone."""
    module = GatedCrossAttention(num_heads=5, head_dim=8, ff_mult=2)
    rng = np.random.default_rng(2)
    a_tokens, b_tokens = PACKED_TOKENS[:6], PACKED_TOKENS[6:10]
    a_x, b_x = rng.normal(size=(6, 40)).astype(np.float32), rng.normal(size=(4, 40)).astype(np.float32)
    a_media, b_media = rng.normal(size=(2, 3, 24)).astype(np.float32), rng.normal(size=(1, 3, 24)).astype(np.float32)

    def run(tokens, x, media, seg, img_seg):
        mask = media_mask(jnp.asarray(tokens == IMG)[None], jnp.asarray(seg)[None], jnp.asarray(img_seg)[None])
        return np.asarray(module.apply({"params": params}, x[None], media[None], mask))[0]

    shapes = nn.unbox(module.init(jax.random.key(0), a_x[None], a_media[None], np.ones((1, 6, 2), bool)))["params"]
    params = jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape).astype(np.float32), shapes)  # gates open
    packed = run(
        PACKED_TOKENS,
        np.concatenate([a_x, b_x, np.zeros((2, 40), np.float32)]),
        np.concatenate([a_media, b_media, np.zeros((1, 3, 24), np.float32)]),
        PACKED_SEGMENTS,
        PACKED_SLOTS,
    )
    alone_a = run(a_tokens, a_x, a_media, np.ones(6, int), np.ones(2, int))
    alone_b = run(b_tokens, b_x, b_media, np.ones(4, int), np.ones(1, int))
    np.testing.assert_allclose(packed[:6], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[6:10], alone_b, atol=1e-5)
    assert np.abs(alone_b[1:] - b_x[1:]).min() > 1e-3  # b's image changed its text: the check compares something


def test_text_before_media_gets_exactly_zero_cross_attention_with_open_gates():
    module = GatedCrossAttention(num_heads=2, head_dim=4)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 8)), jnp.float32)
    media = jnp.asarray(np.random.default_rng(2).normal(size=(1, 1, 2, 6)), jnp.float32)
    tokens = jnp.array([[1, 2, IMG, 3, 4]])
    mask = media_mask(tokens == IMG, jnp.ones((1, 5), jnp.int32), jnp.ones((1, 1), jnp.int32))
    params = module.init(jax.random.key(0), x, media, mask)
    params = {"params": {**params["params"], "attn_gate": jnp.asarray(1.0)}}  # ff_gate stays 0
    out = np.asarray(module.apply(params, x, media, mask))
    np.testing.assert_array_equal(out[0, :2], np.asarray(x)[0, :2])  # bit for bit: no media, nothing added
    assert np.abs(out[0, 2:] - np.asarray(x)[0, 2:]).min() > 1e-4  # tokens after the image do attend


def test_decode_projects_media_once_and_steps_read_the_cached_keys_and_values():
    module = GatedCrossAttention(num_heads=2, head_dim=4, qk_norm=True, gate_init=1.0)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 5, 8)), jnp.float32)
    media = jnp.asarray(rng.normal(size=(1, 1, 2, 6)), jnp.float32)
    mask = media_mask(jnp.array([[1, IMG, 2, 3, 4]]) == IMG, jnp.ones((1, 5), jnp.int32), jnp.ones((1, 1), jnp.int32))
    params = module.init(jax.random.key(0), x, media, mask)["params"]
    full = np.asarray(module.apply({"params": params}, x, media, mask))
    decoder = module.clone(decode=True)
    prompt = (x[:, :3], media, mask[:, :3])
    empty = decoder.init(jax.random.key(0), *prompt)["cache"]  # zeros of the cache's shapes
    assert empty["media_key"].shape == empty["media_value"].shape == (1, 2, 2, 4) and not empty["media_key"].any()
    _, cache = decoder.apply({"params": params, "cache": empty}, *prompt, mutable=["cache"])
    for t in (3, 4):  # one-token steps: no media, the prompt's keys and values
        out, _ = decoder.apply(
            {"params": params, **cache}, x[:, t : t + 1], None, mask[:, t : t + 1], mutable=["cache"]
        )
        np.testing.assert_allclose(np.asarray(out), full[:, t : t + 1], atol=1e-6)
    for without_cache in (decoder, module):
        with pytest.raises(UserError, match="cross-attention without media needs decode=True"):
            without_cache.apply({"params": params}, x[:, 3:4], None, mask[:, 3:4], mutable=["cache"])
