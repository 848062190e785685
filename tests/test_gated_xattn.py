"""GATED XATTN-DENSE against open_flamingo's block, its media masks, and isolation of packed segments."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import open_flamingo_helpers
from vlm_jax.errors import UserError
from vlm_jax.interop.open_flamingo import gated_xattn_params
from vlm_jax.lm.gated_xattn import GatedCrossAttention, media_mask

IMG = 9  # media placeholder id in these tests


def reference(only_immediate, seed=0):
    helpers = open_flamingo_helpers()
    torch.manual_seed(seed)
    block = helpers.GatedCrossAttentionBlock(
        dim=40, dim_visual=24, dim_head=8, heads=5, ff_mult=2, only_attend_immediate_media=only_immediate
    )
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn(p.shape))  # non-zero gates, random norms
    return block.eval()


@pytest.mark.parametrize("only_immediate", [True, False])
def test_block_matches_open_flamingo(only_immediate):
    block = reference(only_immediate)
    rng = np.random.default_rng(0)
    tokens = np.array(
        [[1, 2, IMG, 3, 4, IMG, 5, 6], [IMG, 1, 2, 3, IMG, 4, 5, 6]]
    )  # text before the 1st image in row 0
    x = rng.normal(size=(2, 8, 40)).astype(np.float32)
    media = rng.normal(size=(2, 2, 3, 24)).astype(np.float32)  # 2 media x 3 latents
    with torch.no_grad():
        want = block(
            torch.from_numpy(x), torch.from_numpy(media), media_locations=torch.from_numpy(tokens == IMG)
        ).numpy()
    params = gated_xattn_params({k: v.numpy() for k, v in block.state_dict().items()}, num_heads=5)
    mask = media_mask(
        jnp.asarray(tokens == IMG), jnp.ones((2, 8), jnp.int32), jnp.ones((2, 2), jnp.int32), only_immediate
    )
    module = GatedCrossAttention(num_heads=5, head_dim=8, ff_mult=2)
    got = np.asarray(jax.jit(module.apply)({"params": params}, x, media, mask))
    if only_immediate:
        np.testing.assert_allclose(got, want, atol=1e-4)
    else:
        # open_flamingo's "all previous media" mode lets text before the first image attend uniformly to
        # every image; Flamingo (and this block) give it zero cross-attention. Compare the rest.
        np.testing.assert_allclose(got[0, 2:], want[0, 2:], atol=1e-4)
        np.testing.assert_allclose(got[1], want[1], atol=1e-4)


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


def test_masks_are_per_segment_and_packed_rows_equal_separate_rows():
    block = reference(True, seed=1)
    params = gated_xattn_params({k: v.numpy() for k, v in block.state_dict().items()}, num_heads=5)
    module = GatedCrossAttention(num_heads=5, head_dim=8, ff_mult=2)
    rng = np.random.default_rng(2)
    a_tokens, b_tokens = np.array([1, IMG, 2, 3, IMG, 4]), np.array([5, IMG, 6, 7])
    a_x, b_x = rng.normal(size=(6, 40)).astype(np.float32), rng.normal(size=(4, 40)).astype(np.float32)
    a_media, b_media = rng.normal(size=(2, 3, 24)).astype(np.float32), rng.normal(size=(1, 3, 24)).astype(np.float32)

    def run(tokens, x, media, seg, img_seg):
        mask = media_mask(jnp.asarray(tokens == IMG)[None], jnp.asarray(seg)[None], jnp.asarray(img_seg)[None])
        return np.asarray(module.apply({"params": params}, x[None], media[None], mask))[0], np.asarray(mask)[0]

    packed, mask = run(
        np.concatenate([a_tokens, b_tokens, [0, 0]]),
        np.concatenate([a_x, b_x, np.zeros((2, 40), np.float32)]),
        np.concatenate([a_media, b_media, np.zeros((1, 3, 24), np.float32)]),
        np.array([1] * 6 + [2] * 4 + [0, 0]),
        np.array([1, 1, 2, 0]),
    )
    # Example b's first image is media slot 2 and is its own "first image"; b never sees a's slots.
    assert mask[7, 2] and not mask[7, :2].any() and not mask[10:].any()
    alone_a, _ = run(a_tokens, a_x, a_media, np.ones(6, int), np.ones(2, int))
    alone_b, _ = run(b_tokens, b_x, b_media, np.ones(4, int), np.ones(1, int))
    np.testing.assert_allclose(packed[:6], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[6:10], alone_b, atol=1e-5)


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
