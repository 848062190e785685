"""`attend` (jax.nn.dot_product_attention with a segment mask and the causal flag) against a plain einsum
attention with a materialised float32 causal-and-segment mask, forward + backward.

    python benchmarks/attention.py [--repeats 5] [--dtype float32|bfloat16]

Shapes: the peer Flamingo model's self-attention (4 x 128 tokens, 8 heads x 64) and its gated
cross-attention (128 queries over 2 x 64 media latents), and a 50M LM's (8 heads x 64, 4 KV heads) at
512 and 2048 tokens per row (8 rows of 512, 2 rows of 2048: two packed segments per row). Each case is
the gradient of sum(out * cotangent) with respect to q, k and v, jitted, timed over `--repeats` calls
after one warm-up; the last line is JSON with each case's times and ratio (attend / einsum).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.nn.attention import attend, causal_segment_mask

# name: (batch, queries, keys, heads, kv heads, head dim, causal self-attention)
CASES = {
    "peer self-attention 4x128": (4, 128, 128, 8, 8, 64, True),
    "peer cross-attention 4x128 over 128": (4, 128, 128, 8, 8, 64, False),
    "50M LM 8x512": (8, 512, 512, 8, 4, 64, True),
    "50M LM 2x2048": (2, 2048, 2048, 8, 4, 64, True),
}


def einsum_attention(q, k, v, mask):
    """The reference: grouped heads, float32 logits and softmax, `where` on a materialised mask."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    logits = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, kv, h // kv, d), k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, :, None], logits * d**-0.5, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(b, t, h, d)


def case_inputs(batch, t, s, heads, kv_heads, dim, causal, dtype):
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.normal(size=shape), dtype)
        for shape in ((batch, t, heads, dim), (batch, s, kv_heads, dim), (batch, s, kv_heads, dim))
    )
    segments = np.ones((batch, t), np.int32)
    segments[:, t // 2 :] = 2  # two packed segments per row
    if causal:
        full = causal_segment_mask(jnp.asarray(segments))  # [B, 1, T, T]
        segment_only = jnp.asarray(segments[:, :, None] == segments[:, None, :])[:, None]
    else:  # cross-attention: the first half of the queries sees the first image's latents, the rest both
        full = np.zeros((batch, 1, t, s), bool)
        full[:, :, : t // 2, : s // 2] = True
        full[:, :, t // 2 :, :] = True
        full = segment_only = jnp.asarray(full)
    return (q, k, v), full, segment_only


def timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    results = {}
    for name, shape in CASES.items():
        causal = shape[-1]
        qkv, full, segment_only = case_inputs(*shape, jnp.dtype(args.dtype))
        cotangent = jnp.ones_like(qkv[0])

        def loss(fn):
            return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent).astype(jnp.float32), (0, 1, 2)))

        ours = loss(lambda q, k, v: attend(q, k, v, segment_only, causal=causal))
        reference = loss(lambda q, k, v: einsum_attention(q, k, v, full))
        ours_s, reference_s = timed(ours, qkv, args.repeats), timed(reference, qkv, args.repeats)
        results[name] = {"attend_s": round(ours_s, 5), "einsum_s": round(reference_s, 5)}
        results[name]["ratio"] = round(ours_s / reference_s, 3)
        print(
            f"{name:40s} attend {ours_s * 1e3:8.2f} ms  einsum {reference_s * 1e3:8.2f} ms  {ours_s / reference_s:.2f}x"
        )
    out = {"dtype": args.dtype, "backend": jax.default_backend(), "cases": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
