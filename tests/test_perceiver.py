"""The Perceiver resampler against open_flamingo's PyTorch `PerceiverResampler` on the same random weights."""

import jax
import numpy as np

from conftest import open_flamingo_helpers, require_open_flamingo
from vlm_jax.connectors.perceiver import PerceiverResampler
from vlm_jax.interop.open_flamingo import perceiver_params

torch = require_open_flamingo("open_flamingo's resampler")


def test_perceiver_matches_open_flamingo():
    helpers = open_flamingo_helpers()
    torch.manual_seed(0)
    # Odd sizes: width 40 = 5 heads x 8 (inner 40), 7 latents, 3 media x 2 frames x 9 features.
    ref = helpers.PerceiverResampler(
        dim=40, depth=3, dim_head=8, heads=5, num_latents=7, max_num_media=4, max_num_frames=3
    )
    with torch.no_grad():
        for p in ref.parameters():  # random LayerNorm scales and biases too
            p.add_(0.2 * torch.randn(p.shape))
    x = np.random.default_rng(0).normal(size=(2, 3, 2, 9, 40)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = perceiver_params(state, num_heads=5)
    model = PerceiverResampler(depth=3, num_heads=5, head_dim=8, num_latents=7, max_num_media=4, max_num_frames=3)
    got = jax.jit(model.apply)({"params": params}, x)
    assert got.shape == (2, 3, 7, 40)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
