"""vlm_jax's 50M LM train step against transformers' LLaMA on the same model, with MFU, in one run.

    python benchmarks/peer_lm.py [--batch 4] [--steps 2] [--warmup 1] [--rounds 2] [--threads 2] [--config.x=y ...]

The model is `configs/lm.py:variant=50m`'s shape as a transformers `LlamaForCausalLM`: vocab 32,000, width 512,
8 layers, 8 query / 4 key-value heads, SwiGLU MLP 1,536, RMSNorm, RoPE, untied embeddings (57.9M parameters).
It is built with random weights (nothing is downloaded), saved with `save_pretrained`, and imported by the
`convert-hf` converter, so both sides train the same weights on the same rows (`--batch` x 512 tokens, one
document per row) with AdamW; nothing is frozen. The first step's loss of both sides is printed as a check
that they compute the same thing.

Method. As `peer_flamingo.py`: torch runs `--threads` intra-op threads; vlm_jax runs its jitted, donated
`Trainer.train_step` (compiled ahead of time) on one device; the sides alternate `--rounds` times and the best
round of each is kept. The matmul peak of the same run is measured on both sides ([2048, 2048] x [2048, 2048]
in float32, best of 5: `measure_matmul_flops` for XLA, `torch.mm` for torch), and both steps' MFU use
vlm_jax's analytic training FLOPs (`system.flops_per_example`, 3x the forward matmuls and attention scores).
The last line is JSON, with `ratio` = vlm_jax step / torch step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from peer_flamingo import timed

VOCAB, WIDTH, LAYERS, HEADS, KV_HEADS, MLP, LENGTH = 32000, 512, 8, 8, 4, 1536, 512


def llama_model():
    """The torch reference with random weights, in float32."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=LENGTH,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def torch_side(model, ids: np.ndarray):
    """(train step, loss of the current weights) of the torch reference: next-token cross-entropy, AdamW."""
    import torch

    inputs = torch.from_numpy(ids.astype(np.int64))
    targets = inputs[:, 1:].reshape(-1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()

    def loss():
        logits = model(input_ids=inputs, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(targets.shape[0], -1), targets)

    def step():
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        optimizer.step()
        return float(value.detach())

    def first_loss():
        with torch.no_grad():
            return float(loss())

    return step, first_loss


def vlm_jax_side(hf_dir: str, ids: np.ndarray, overrides: list[str]):
    """(train step, loss of the current weights, compile seconds, training FLOPs per step) of vlm_jax."""
    import jax
    import ml_collections

    from vlm_jax.cli import _override_flags
    from vlm_jax.config_lib import module_defaults
    from vlm_jax.interop.convert import to_system_config
    from vlm_jax.lm.decoder import DecoderLM
    from vlm_jax.train.trainer import Trainer

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import lm as lm_config

    converted, params = to_system_config(hf_dir)
    c = lm_config.get_config("variant=50m")
    c.batch_size, c.mesh, c.log_every, c.checkpoint_every = ids.shape[0], "data=-1", 0, 0
    c.model = ml_collections.ConfigDict({**module_defaults(DecoderLM), **converted.model.to_dict()})
    c.optim.update(schedule="constant", warmup_steps=0, b2=0.999, clip_norm=0.0)
    config = _override_flags(c, overrides, {}).config

    trainer = Trainer(config, jax.devices()[:1])
    state = trainer.init(jax.random.key(0))
    state = state.replace(params=jax.device_put(params, trainer.state_shardings.params))
    batch_size, length = ids.shape
    loss_mask = np.ones(ids.shape, np.float32)
    loss_mask[:, -1] = 0
    batch = trainer.put_batch(
        {
            "tokens": ids.astype(np.int32),
            "targets": np.concatenate([ids[:, 1:], np.zeros((batch_size, 1))], axis=1).astype(np.int32),
            "loss_mask": loss_mask,
            "segment_ids": np.ones(ids.shape, np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy(),
        }
    )
    start = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}
    loss = jax.jit(trainer.system.loss)

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return jax.block_until_ready(metrics)

    def first_loss():
        loss_sum, weight, _ = loss(holder["state"].params, batch)
        return float(loss_sum / weight)

    return step, first_loss, compile_s, trainer.system.flops_per_example() * batch_size


def torch_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.ones(size, size), torch.ones(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args, overrides = parser.parse_known_args(argv)
    import jax
    import jax.numpy as jnp
    import torch

    from vlm_jax.train.metrics import measure_matmul_flops

    torch.set_num_threads(args.threads)
    model = llama_model()
    ids = np.random.default_rng(0).integers(3, VOCAB, (args.batch, LENGTH))
    with tempfile.TemporaryDirectory() as hf_dir:
        model.save_pretrained(hf_dir, safe_serialization=True)
        jax_step, jax_loss, compile_s, flops = vlm_jax_side(hf_dir, ids, overrides)
    torch_step, torch_loss = torch_side(model, ids)
    losses = {"torch": torch_loss(), "jax": jax_loss()}
    times = {"torch_step": [], "jax_step": [], "torch_peak": [], "jax_peak": []}
    for _ in range(args.rounds):
        times["torch_step"].append(timed(torch_step, args.steps, args.warmup))
        times["jax_step"].append(timed(jax_step, args.steps, args.warmup))
        times["torch_peak"].append(1 / torch_matmul_flops())
        times["jax_peak"].append(1 / measure_matmul_flops(jax.devices()[:1], jnp.float32, 2048))
    best = {k: min(v) for k, v in times.items()}
    peaks = {side: 1 / best[f"{side}_peak"] for side in ("torch", "jax")}
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "batch": f"{args.batch}x{LENGTH} tokens",
        "torch_threads": args.threads,
        "torch_version": torch.__version__,
        "first_loss": {k: round(v, 5) for k, v in losses.items()},
        "jax_compile_s": round(compile_s, 2),
        "torch_step_s": round(best["torch_step"], 3),
        "jax_step_s": round(best["jax_step"], 3),
        "step_rounds_s": {k: [round(t, 3) for t in times[f"{k}_step"]] for k in ("torch", "jax")},
        "model_tflop_per_step": round(flops / 1e12, 4),
        "torch_matmul_peak_tflops": round(peaks["torch"] / 1e12, 4),
        "jax_matmul_peak_tflops": round(peaks["jax"] / 1e12, 4),
        "torch_mfu": round(flops / best["torch_step"] / peaks["torch"], 3),
        "jax_mfu": round(flops / best["jax_step"] / peaks["jax"], 3),
        "jax_mfu_of_torch_peak": round(flops / best["jax_step"] / peaks["torch"], 3),
        "ratio": round(best["jax_step"] / best["torch_step"], 3),
        "overrides": overrides,
    }
    print(f"params {result['params']:,}; batch {result['batch']}; torch threads {args.threads}")
    print(f"first loss: torch {losses['torch']:.5f}, vlm_jax {losses['jax']:.5f}")
    print(f"{'':8s} {'step s':>8s} {'matmul peak TFLOP/s':>20s} {'MFU':>6s}")
    for side, name in (("torch", "torch"), ("jax", "vlm_jax")):
        print(f"{name:8s} {best[side + '_step']:8.3f} {peaks[side] / 1e12:20.4f} {result[side + '_mfu']:6.1%}")
    print(f"vlm_jax / torch: train step {result['ratio']:.2f}x (compile {compile_s:.1f} s)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
