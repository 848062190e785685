"""Generation speed of a config with random weights: compile time, prefill + decode time, new tokens/s.

    python benchmarks/generate.py --config configs/flamingo.py:variant=tiny [--batch 8 --prompt_len 32
        --new_tokens 64 --images 2] [--config.x=y ...]
    python benchmarks/generate.py --config configs/lm.py:variant=50m      (a ~50M-parameter LM)

Method. Prompts of `prompt_len` random tokens (each with `images` `<image>`
tokens and random images for a system with media) go through
`vlm_jax.generate.generate` greedily, never stopping early. The first call
compiles (reported as compile_s, including that call's run); the next
`--repeats` calls are timed to the end. tokens/s counts new tokens of the
whole batch; `params` counts the system's parameters. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from vlm_jax import generate, models, prerequisites
from vlm_jax.cli import _parse_config_flags


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args, rest = parser.parse_known_args(argv)
    config = prerequisites.resolve(_parse_config_flags(rest, {}).config, train=False)  # random weights: no runs
    system = models.build(config)
    params = nn.unbox(jax.jit(system.init)(jax.random.key(0), system.dummy_batch(1)))

    rng = np.random.default_rng(0)
    vocab = int(config.model.get("vocab_size") or config.model.lm.vocab_size)
    prompts = rng.integers(4, vocab, (args.batch, args.prompt_len))
    batch = generate.left_pad(prompts.tolist())
    size = int(config.model.get("image_size", 0))
    if size:
        image_positions = np.linspace(0, args.prompt_len - 2, args.images).astype(int)
        batch["tokens"][:, image_positions] = config.model.media_token_id
        images = rng.normal(size=(args.batch, args.images, size, size, 3)).astype(np.float32)
        batch.update(generate.pad_images(list(images), size))
    settings = generate.Sampling(max_new_tokens=args.new_tokens)

    start = time.perf_counter()
    generate.generate(system, params, batch, settings)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.repeats):
        out = generate.generate(system, params, batch, settings)
    run_s = (time.perf_counter() - start) / args.repeats
    assert out.shape == (args.batch, args.new_tokens) and (out >= 0).all()
    result = {
        "config": config.model.name,
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "images_per_prompt": args.images if size else 0,
        "compile_and_first_run_s": round(compile_s, 2),
        "generate_s": round(run_s, 3),
        "ms_per_step": round(1000 * run_s / args.new_tokens, 2),
        "new_tokens_per_s": round(args.batch * args.new_tokens / run_s, 1),
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
