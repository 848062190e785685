"""bfloat16 against float32 compute on the peer Flamingo model: step time and the loss over N training steps.

    python benchmarks/bf16_loss.py [--steps 50] [--config.x=y ...]

The model is `peer_flamingo.py`'s: transformers' IDEFICS at Flamingo-small size with random weights,
converted by `convert-hf`, its ViT and LM frozen, AdamW on the resampler and the cross-attention blocks.
Two vlm_jax trainers start from the same converted weights: one with every part's `dtype` float32, one
bfloat16 (parameters, optimizer state, logits, softmaxes and the loss stay float32 in both). Both train
`--steps` steps on the same sequence of batches (`peer_flamingo.batch_arrays(seed=step)`). Reported: the
mean step time of each after the first (compiled) step, their ratio, and the loss difference per step
(largest absolute and relative, and at the last step). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
import peer_flamingo

DTYPE_KEYS = ("model.lm.dtype", "model.resampler.dtype", "model.encoder_kwargs.dtype")


def train(config, params, steps: int) -> tuple[list[float], float]:
    """Losses of `steps` train steps of one device and the mean seconds per step after the first."""
    import jax

    from vlm_jax.train.trainer import Trainer

    trainer = Trainer(config, jax.devices()[:1])
    state = trainer.init(jax.random.key(0))
    state = state.replace(params=jax.device_put(params, trainer.state_shardings.params))
    losses, start = [], 0.0
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()
        batch = trainer.put_batch(peer_flamingo.jax_batch(peer_flamingo.batch_arrays(seed=step)))
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, (time.perf_counter() - start) / max(steps - 1, 1)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    args, overrides = parser.parse_known_args(argv)
    model = peer_flamingo.idefics_model()
    runs = {}
    with tempfile.TemporaryDirectory() as hf_dir:
        model.save_pretrained(hf_dir, safe_serialization=True)
        for dtype in ("float32", "bfloat16"):
            config, params = peer_flamingo.vlm_jax_config(
                hf_dir, overrides + [f"--config.{key}={dtype}" for key in DTYPE_KEYS]
            )
            runs[dtype] = train(config, params, args.steps)
    f32, bf16 = (np.asarray(runs[d][0]) for d in ("float32", "bfloat16"))
    diff = np.abs(bf16 - f32)
    result = {
        "steps": args.steps,
        "float32_step_s": round(runs["float32"][1], 4),
        "bfloat16_step_s": round(runs["bfloat16"][1], 4),
        "speed_ratio": round(runs["bfloat16"][1] / runs["float32"][1], 3),
        "loss_first": [round(float(f32[0]), 4), round(float(bf16[0]), 4)],
        "loss_last": [round(float(f32[-1]), 4), round(float(bf16[-1]), 4)],
        "max_abs_loss_diff": round(float(diff.max()), 5),
        "max_rel_loss_diff": round(float((diff / np.abs(f32)).max()), 6),
        "last_abs_loss_diff": round(float(diff[-1]), 5),
        "overrides": overrides,
    }
    print(f"float32 {result['float32_step_s']:.3f} s/step, bfloat16 {result['bfloat16_step_s']:.3f} s/step")
    print(f"loss {f32[0]:.4f} -> {f32[-1]:.4f} (float32), {bf16[0]:.4f} -> {bf16[-1]:.4f} (bfloat16)")
    print(f"largest |loss difference| over {args.steps} steps: {diff.max():.5f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
