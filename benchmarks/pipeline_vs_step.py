"""Does the input pipeline keep ahead of the train step? Every tiny system config on the built-in data.

    python benchmarks/pipeline_vs_step.py [--systems flamingo,llava,...] [--batches 20] [--steps 10] [--scale 0.25]
                                          [--workers N]

For each tiny config that trains on the built-in dataset (`data=builtin`, its own row length, image size,
template and batch size; the LM on the built-in data's text), the jitted, donated train step is timed on one
device-resident batch of that pipeline (compiled ahead of time, random weights: prerequisite runs are not
trained), then the pipeline alone is timed producing `--batches` batches after one warm-up batch, with the
config's own `data.worker_count` Grain worker processes (`--workers` overrides it for every config). The
ratio is batches/s of the pipeline over steps/s of the train step: 3 or more means the pipeline keeps three
times ahead. The two are timed apart (on a 2-core machine, worker processes running beside the step share its
cores). `--scale` sets the built-in dataset's size (record counts) where the config takes it. The last line is
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CONFIGS = {  # system: config argument of a tiny config on the built-in data
    "lm": "lm.py:variant=tiny,data=prerequisite:builtin/recall/train,tokenizer=prerequisite:builtin/spm.model",
    "flamingo": "flamingo.py:variant=tiny,data=builtin,scale={scale}",
    "llava": "llava.py:variant=tiny,data=builtin,scale={scale}",
    "llava-next": "llava.py:variant=tiny-next,data=builtin,scale={scale}",
    "paligemma": "paligemma.py:variant=tiny,data=builtin,scale={scale}",
    "minigpt_v2": "minigpt_v2.py:variant=tiny,data=builtin,scale={scale}",
    "clip": "clip.py:variant=tiny,data=builtin",
    "siglip": "siglip.py:variant=tiny,data=builtin",
}


def load(system: str, scale: float):
    from vlm_jax import prerequisites
    from vlm_jax.config_lib import load_config

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", CONFIGS[system].format(scale=scale)))
    if system == "lm":  # the LM config names its data by path: borrow the Flamingo main job's built-in data entry
        flamingo = load_config(
            os.path.join(os.path.dirname(__file__), "..", "configs", CONFIGS["flamingo"].format(scale=scale))
        )
        config.prerequisites = {"builtin": flamingo.prerequisites.builtin}
    return prerequisites.resolve(config, train=False)


def measure(system: str, batches: int, steps: int, scale: float, workers: int | None) -> dict:
    import jax
    import numpy as np

    import data_pipelines
    from vlm_jax.train.trainer import Trainer

    config = load(system, scale)
    if workers is not None:
        config.data.worker_count = workers
    trainer = Trainer(config, jax.devices()[:1])
    state = trainer.init(jax.random.key(0))
    iterator = iter(data_pipelines.build(config, "train"))
    first = next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    pipeline_s = (time.perf_counter() - start) / batches

    batch = trainer.put_batch(first)
    step = trainer.train_step.lower(state, batch).compile()
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / steps
    length = first["tokens"].shape[1] if "tokens" in first else 0
    return {
        "batch": f"{config.batch_size} x {length} tokens" if length else f"{config.batch_size} pairs",
        "images": list(np.shape(first["images"])) if "images" in first else None,
        "workers": int(config.data.get("worker_count", 0)),
        "step_ms": round(step_s * 1e3, 1),
        "pipeline_batch_ms": round(pipeline_s * 1e3, 1),
        "ratio": round(step_s / pipeline_s, 2),
    }


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(CONFIGS))
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    unknown = set(args.systems.split(",")) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; known: {', '.join(CONFIGS)}.")
    results = {}
    print(f"{'system':12s} {'batch':>20s} {'workers':>7s} {'step ms':>8s} {'pipeline ms':>11s} {'ahead':>6s}")
    for system in args.systems.split(","):
        r = results[system] = measure(system, args.batches, args.steps, args.scale, args.workers)
        print(
            f"{system:12s} {r['batch']:>20s} {r['workers']:7d} {r['step_ms']:8.1f} {r['pipeline_batch_ms']:11.1f} "
            f"{r['ratio']:5.1f}x",
            flush=True,
        )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
