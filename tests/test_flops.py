"""`vlm_jax.flops.matmul_flops`: XLA's count where XLA is right, and per-iteration counts of scanned loops."""

import jax
import jax.numpy as jnp

from vlm_jax.flops import matmul_flops
from vlm_jax.lm.decoder import DecoderLM


def xla_flops(fn, *args):
    return jax.jit(fn).lower(*args).cost_analysis()["flops"]


def test_matmuls_and_convolutions_count_as_xla_does():
    a, b = jax.ShapeDtypeStruct((3, 64, 128), jnp.float32), jax.ShapeDtypeStruct((3, 128, 32), jnp.float32)
    einsum = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)  # noqa: E731
    assert matmul_flops(einsum, a, b) == xla_flops(einsum, a, b) == 2 * 3 * 64 * 128 * 32
    x, w = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32), jax.ShapeDtypeStruct((3, 3, 4, 12), jnp.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    assert matmul_flops(conv, x, w) == xla_flops(conv, x, w) == 2 * (2 * 7 * 7 * 12) * 4 * 9


def test_scanned_layers_count_once_per_layer():
    row = jax.ShapeDtypeStruct((1, 32), jnp.int32)

    def count(layers):
        m = DecoderLM(vocab_size=128, embed_dim=32, num_layers=layers, num_heads=4, num_kv_heads=2, mlp_dim=64)
        params = jax.eval_shape(m.init, jax.random.key(0), row, row, row)
        return matmul_flops(m.apply, params, row, row, row), xla_flops(m.apply, params, row, row, row)

    (one, xla_one), (five, xla_five) = count(1), count(5)
    assert xla_one == xla_five  # XLA counts the scan body once, whatever its length
    per_layer = 32 * 2 * (32 * 8 * (4 + 2 + 2 + 4) + 3 * 32 * 64) + 2 * 2 * 4 * 8 * 32 * 32  # projections, MLP, scores
    assert five - one == 4 * per_layer
    assert one <= xla_one <= 1.15 * one  # XLA adds the elementwise work
