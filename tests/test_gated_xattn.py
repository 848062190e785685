"""GATED XATTN-DENSE against open_flamingo's `GatedCrossAttentionBlock` (PyTorch), weights imported by
`vlm_jax.interop.open_flamingo`. The block's own invariants (gates, masks, packing, decoding) are in
tests/test_gated_xattn_core.py, which needs no PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import open_flamingo_helpers, require_open_flamingo
from vlm_jax.interop.open_flamingo import gated_xattn_params
from vlm_jax.lm.gated_xattn import GatedCrossAttention, media_mask

torch = require_open_flamingo("open_flamingo's block")

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
