"""vlm_jax's Flamingo train step against its PyTorch reference on the same model, in one run.

    python benchmarks/peer_flamingo.py [--steps 5] [--warmup 2] [--threads 2] [--config.x=y ...]

The reference is transformers' `IdeficsForVisionText2Text` (a Flamingo reproduction) at "Flamingo-small"
size: a LLaMA LM of 8 layers x 512 (8 heads, vocab 8000 + 2 added tokens), a CLIP ViT of 6 layers x 384
at 112 px / 16, a Perceiver resampler of 2 layers x 64 latents (8 heads x 64), a gated cross-attention
block every 2 LM layers. It is built with random weights (nothing is downloaded), saved with
`save_pretrained`, and imported by the `convert-hf` converter, so both sides train the same weights.
Both freeze the ViT and the LM (embeddings and head included) and train the resampler and the
cross-attention blocks with AdamW, on the same batch: 4 rows x 128 tokens with 2 images each, every token
attending to the latest image before it.

Method. torch runs with `--threads` intra-op threads (the machine's cores by default); a step is forward,
next-token cross-entropy, backward and `AdamW.step()`. vlm_jax runs its own jitted, donated train step
(`Trainer.train_step`, compiled ahead of time) on one device. Each side is warmed up, then timed over
`--steps` steps; the two sides alternate `--rounds` times and the best round of each is kept, so drift of
the machine's speed hits both. Forward-only times (no gradient) are reported too. The last line is JSON,
with `ratio` = vlm_jax step / torch step (below 1: vlm_jax is faster).

`--config.key=value` overrides the vlm_jax training config (e.g. `--config.model.dtype=bfloat16`);
`--xla_dump DIR` writes vlm_jax's optimized HLO there for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

BATCH, LENGTH, IMAGES, IMAGE_SIZE, VOCAB = 4, 128, 2, 112, 8000
IMAGE, FAKE = VOCAB + 1, VOCAB  # IDEFICS's added tokens: <fake_token_around_image>, <image>


def idefics_model():
    """The torch reference with random weights, in float32, its ViT and LM frozen."""
    import torch
    import transformers

    config = transformers.IdeficsConfig(
        vocab_size=VOCAB,
        additional_vocab_size=2,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        max_position_embeddings=LENGTH,
        cross_layer_interval=2,
        use_resampler=True,
        tie_word_embeddings=False,
        freeze_text_layers=True,
        freeze_lm_head=True,
        freeze_vision_layers=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        vision_config=dict(
            embed_dim=384,
            image_size=IMAGE_SIZE,
            patch_size=16,
            intermediate_size=1536,
            num_hidden_layers=6,
            num_attention_heads=6,
        ),
        perceiver_config=dict(resampler_n_latents=64, resampler_depth=2, resampler_n_heads=8, resampler_head_dim=64),
    )
    torch.manual_seed(0)
    model = transformers.IdeficsForVisionText2Text(config)
    for name, p in model.named_parameters():  # trained: the resampler and the gated cross-attention blocks
        p.requires_grad = "perceiver_resampler" in name or "gated_cross_attn_layers" in name
    return model


def batch_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids with two `<fake><image><fake>` groups per row, pixels, and IDEFICS's image mask (each token sees
    the latest image before it)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (BATCH, LENGTH))
    ids[:, 0] = 1
    first, second = 1, LENGTH // 2
    for at in (first, second):
        ids[:, at : at + 3] = (FAKE, IMAGE, FAKE)
    position = np.arange(LENGTH)
    mask = np.zeros((BATCH, LENGTH, IMAGES), np.int64)
    mask[:, (position > first) & (position <= second), 0] = 1
    mask[:, position > second + 1, 1] = 1
    return {
        "input_ids": ids.astype(np.int64),
        "pixel_values": rng.normal(size=(BATCH, IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32),
        "image_attention_mask": mask,
    }


def count(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trained


def torch_side(model, arrays, autocast: bool = False):
    """(train step, forward) closures of the torch reference; `autocast`: its matmuls in bfloat16 under
    `torch.autocast` (float32 weights and optimizer, like vlm_jax's bfloat16 `dtype`)."""
    import contextlib

    import torch

    inputs = {k: torch.from_numpy(v) for k, v in arrays.items()}
    targets = inputs["input_ids"][:, 1:].reshape(-1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)
    model.train()

    def loss():  # next-token cross-entropy over the whole vocabulary (transformers' own IDEFICS loss views the
        # logits as `vocab_size` wide, without the added tokens, and fails)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            logits = model(**inputs, use_cache=False).logits
        logits = logits.float()[:, :-1].reshape(targets.shape[0], -1)
        return torch.nn.functional.cross_entropy(logits, targets)

    def step():
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        optimizer.step()
        return float(value.detach())

    def forward():
        with torch.no_grad():
            return float(loss())

    return step, forward


# vlm_jax's names of what the reference freezes (configs/flamingo.py freezes the same parts)
FROZEN = (
    "vision/.*",
    "decoder/embed/.*",
    "decoder/layer_groups/layers/.*",
    "decoder/final_norm/.*",
    "decoder/lm_head/.*",
)


def vlm_jax_config(hf_dir: str, overrides: list[str]):
    """A training config of the converted model: the converter's `model` (its vision encoder, resampler and LM with
    every setting of their modules, so `--config.model.lm.remat=full` or `--config.model.resampler.dtype=bfloat16`
    works), the same frozen parts, AdamW; then the `--config.key=value` overrides."""
    import ml_collections

    from vlm_jax.cli import _override_flags
    from vlm_jax.config_lib import module_defaults, training_config
    from vlm_jax.connectors.perceiver import PerceiverResampler
    from vlm_jax.encoders.vit import ViT
    from vlm_jax.interop.convert import to_system_config
    from vlm_jax.lm.decoder import DecoderLM

    converted, params = to_system_config(hf_dir)
    c = training_config(total_steps=1000, batch_size=BATCH, mesh="data=-1")
    c.log_every = c.checkpoint_every = 0
    c.model = converted.model
    for key, module in (("encoder_kwargs", ViT), ("resampler", PerceiverResampler), ("lm", DecoderLM)):
        c.model[key] = ml_collections.ConfigDict({**module_defaults(module), **converted.model[key].to_dict()})
    c.data = ml_collections.ConfigDict(dict(seq_len=LENGTH, max_images=IMAGES))
    c.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=1e-4,
            schedule="constant",
            warmup_steps=0,
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.1,
            wd_exclude=(),
            clip_norm=0.0,
            lr_mults=(),
            freeze=FROZEN,
        )
    )
    return _override_flags(c, overrides, {}).config, params


def jax_batch(arrays) -> dict[str, np.ndarray]:
    """The same rows in vlm_jax's batch format (the next token is the target; the last position has none)."""
    ids = arrays["input_ids"].astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((BATCH, 1), np.int32)], axis=1)
    loss_mask = np.ones((BATCH, LENGTH), np.float32)
    loss_mask[:, -1] = 0
    return {
        "tokens": ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": np.ones((BATCH, LENGTH), np.int32),
        "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)).copy(),
        "images": arrays["pixel_values"].transpose(0, 1, 3, 4, 2).copy(),
        "image_segment_ids": np.ones((BATCH, IMAGES), np.int32),
    }


def jax_side(config, params, arrays):
    """(train step, forward, compile seconds, trained parameter count) of vlm_jax on one device."""
    import jax
    import optax

    from vlm_jax.train.trainer import Trainer

    trainer = Trainer(config, jax.devices()[:1])
    state = trainer.init(jax.random.key(0))
    state = state.replace(params=jax.device_put(params, trainer.state_shardings.params))
    batch = trainer.put_batch(jax_batch(arrays))
    start = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}
    loss = jax.jit(lambda p, b: trainer.system.loss(p, b))
    jax.block_until_ready(loss(holder["state"].params, batch))
    trained = sum(x.size for x in jax.tree.leaves(optax.tree_utils.tree_get(state.opt_state, "mu") or {}))

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return jax.block_until_ready(metrics)

    def forward():
        return jax.block_until_ready(loss(holder["state"].params, batch))

    return step, forward, compile_s, trained


def timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--xla_dump", default="")
    parser.add_argument("--torch_autocast", action="store_true", help="torch's matmuls in bfloat16 (torch.autocast)")
    args, overrides = parser.parse_known_args(argv)
    if args.xla_dump:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={args.xla_dump}".strip()
    import torch

    torch.set_num_threads(args.threads)
    model = idefics_model()
    total, torch_trained = count(model)
    arrays = batch_arrays()
    with tempfile.TemporaryDirectory() as hf_dir:
        model.save_pretrained(hf_dir, safe_serialization=True)
        config, params = vlm_jax_config(hf_dir, overrides)
    torch_step, torch_forward = torch_side(model, arrays, args.torch_autocast)
    jax_step, jax_forward, compile_s, jax_trained = jax_side(config, params, arrays)
    if jax_trained != torch_trained:
        raise SystemExit(f"the two sides train different parameters: torch {torch_trained:,}, vlm_jax {jax_trained:,}.")
    times = {"torch_step": [], "jax_step": [], "torch_forward": [], "jax_forward": []}
    for _ in range(args.rounds):
        times["torch_step"].append(timed(torch_step, args.steps, args.warmup))
        times["jax_step"].append(timed(jax_step, args.steps, args.warmup))
        times["torch_forward"].append(timed(torch_forward, args.steps, 1))
        times["jax_forward"].append(timed(jax_forward, args.steps, 1))
    best = {k: min(v) for k, v in times.items()}
    result = {
        "params": total,
        "trained_params": torch_trained,
        "batch": f"{BATCH}x{LENGTH} tokens, {IMAGES} images of {IMAGE_SIZE}px per row",
        "torch_threads": args.threads,
        "torch_autocast_bf16": args.torch_autocast,
        "torch_version": torch.__version__,
        "jax_compile_s": round(compile_s, 2),
        **{f"{k}_s": round(v, 4) for k, v in best.items()},
        **{f"{k}_rounds_s": [round(t, 4) for t in v] for k, v in times.items()},
        "ratio": round(best["jax_step"] / best["torch_step"], 3),
        "forward_ratio": round(best["jax_forward"] / best["torch_forward"], 3),
        "overrides": overrides,
    }
    print(f"params {total:,} ({torch_trained:,} trained); batch {result['batch']}; torch threads {args.threads}")
    print(f"{'':10s} {'train step':>12s} {'forward':>10s}")
    print(f"{'torch':10s} {best['torch_step']:12.3f} {best['torch_forward']:10.3f}")
    print(f"{'vlm_jax':10s} {best['jax_step']:12.3f} {best['jax_forward']:10.3f}   (compile {compile_s:.1f} s)")
    print(f"vlm_jax / torch: train step {result['ratio']:.2f}x, forward {result['forward_ratio']:.2f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
