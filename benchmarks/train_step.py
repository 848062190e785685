"""Train-step speed and MFU of a config on the current devices.

    python benchmarks/train_step.py --config configs/lm.py:variant=tiny [--steps 20] [--config.x=y ...]

Method. The jitted, donated train step is compiled ahead of time (compile time
reported), run `--warmup` times, then `--steps` times back to back on one
device-resident batch (input pipeline excluded) and timed until the last step's
outputs are ready. MFU = the system's analytic training FLOPs per step / step
time / peak, where the peak is a matmul peak measured on the same devices: one
[N, N] x [N, N] matmul per device in the compute dtype, all devices at once,
best of 5 (`vlm_jax.train.metrics.measure_matmul_flops`). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import data_pipelines
from vlm_jax import prerequisites
from vlm_jax.cli import _parse_config_flags
from vlm_jax.train.metrics import measure_matmul_flops
from vlm_jax.train.trainer import Trainer


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--matmul_size", type=int, default=2048)
    args, rest = parser.parse_known_args(argv)
    # data prerequisites are built if missing; runs (a pretrained LM) are not: random weights time the same
    config = prerequisites.resolve(_parse_config_flags(rest, {}).config, train=False)

    trainer = Trainer(config)
    state = trainer.init(jax.random.key(config.seed))
    batch = trainer.put_batch(next(data_pipelines.build(config, "train")))
    start = time.perf_counter()
    step = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / args.steps

    devices = jax.devices()
    peak = measure_matmul_flops(devices, jnp.dtype(config.model.get("dtype", "float32")), args.matmul_size)
    flops = trainer.system.flops_per_example() * config.batch_size
    tokens = int(np.prod(batch["tokens"].shape)) if "tokens" in batch else 0
    result = {
        "config": config.model.name,
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "mesh": dict(trainer.mesh.shape),
        "batch_size": config.batch_size,
        "compile_s": round(compile_s, 2),
        "step_ms": round(step_s * 1e3, 2),
        "examples_per_s": round(config.batch_size / step_s, 1),
        "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_s": round(flops / step_s / 1e12, 4),
        "matmul_peak_tflops_per_s": round(peak / 1e12, 4),
        "mfu": round(flops / step_s / peak, 4),
    }
    for k, v in result.items():
        print(f"{k:>26}: {v}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
