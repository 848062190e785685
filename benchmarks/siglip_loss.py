"""Peak memory of the dense vs the chunked (ring) SigLIP loss, forward + backward.

    python benchmarks/siglip_loss.py [--per_device 512] [--dim 256]

Method: on n = 1, 2, 4, 8 emulated CPU devices (a 1-D "data" mesh), with a fixed
per-device batch b (so the global batch is B = n * b, as when a run adds
devices to grow its batch), compile `value_and_grad` of each loss and read
XLA's own buffer accounting (`compiled.memory_analysis()`: temporaries +
arguments + outputs of one device's program). Total = n x per device. The dense
loss holds a [b, B] block of the logits per device (B^2 over the mesh); the
ring holds [b, b] (B * b over the mesh): quadratic vs linear in B. The last
line is JSON.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vlm_jax import losses  # noqa: E402


def peak_bytes(fn, *args) -> int:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes)


def main(argv: list[str]) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per_device", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args(argv)
    rows = []
    for n in (1, 2, 4, 8):
        mesh = jax.sharding.Mesh(jax.devices()[:n], ("data",))
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        batch = n * args.per_device
        emb = jax.device_put(jnp.ones((batch, args.dim), jnp.float32), spec)

        def dense(img, txt):
            return losses.sigmoid_loss(img, txt, 10.0, -10.0)

        def chunked(img, txt):
            return losses.chunked_sigmoid_loss(img, txt, 10.0, -10.0, mesh, ("data",))

        grad = lambda f: jax.value_and_grad(f, argnums=(0, 1))  # noqa: E731
        d, c = peak_bytes(grad(dense), emb, emb), peak_bytes(grad(chunked), emb, emb)
        rows.append(
            {
                "devices": n,
                "global_batch": batch,
                "dense_mb_per_device": round(d / 2**20, 2),
                "chunked_mb_per_device": round(c / 2**20, 2),
                "dense_mb_total": round(n * d / 2**20, 2),
                "chunked_mb_total": round(n * c / 2**20, 2),
            }
        )
    print(f"{'devices':>8} {'B':>6} {'dense/dev MB':>13} {'ring/dev MB':>12} {'dense total':>12} {'ring total':>11}")
    for r in rows:
        print(
            f"{r['devices']:>8} {r['global_batch']:>6} {r['dense_mb_per_device']:>13} {r['chunked_mb_per_device']:>12}"
            f" {r['dense_mb_total']:>12} {r['chunked_mb_total']:>11}"
        )
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
