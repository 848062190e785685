"""Pieces every multimodal system shares: building its vision encoder, counting FLOPs on abstract shapes, and
starting frozen parts from other checkpoints (checked against the model's own shapes, then read straight into the
shardings training gives them: never replicated, never the whole tree on the host)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from vlm_jax.errors import ConfigError, UserError
from vlm_jax.flops import matmul_flops

ENCODERS = ("vit", "nfnet")
_KEY = jax.random.PRNGKey(0)


def vision_encoder(encoder: str, kwargs: dict) -> nn.Module:
    """The ViT or NFNet named by `model.encoder`, with its fields."""
    if encoder == "vit":
        from vlm_jax.encoders.vit import ViT

        return ViT(**kwargs)
    if encoder == "nfnet":
        from vlm_jax.encoders.nfnet import NFNet

        return NFNet(**kwargs)
    raise ConfigError(f"model.encoder {encoder!r} is not one of {', '.join(ENCODERS)}.")


def text_inputs(inputs: dict, vocab: int, required: tuple[str, ...] = ("input_ids",)) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids as int32 [B, L], attention_mask > 0) of transformers-style `vlm-jax forward` inputs, after
    one-sentence UserErrors for missing `required` keys, a wrong rank or ids outside [0, vocab)."""
    missing = [k for k in required if k not in inputs]
    if missing:
        raise UserError(
            f"the inputs have no {', '.join(map(repr, missing))} (found: {', '.join(sorted(inputs)) or 'nothing'})."
        )
    tokens = np.asarray(inputs["input_ids"], np.int32)
    if tokens.ndim != 2:
        raise UserError(f"input_ids must be [batch, length]; got shape {tokens.shape}.")
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise UserError(f"input_ids must lie in [0, {vocab}); got values from {tokens.min()} to {tokens.max()}.")
    present = np.asarray(inputs.get("attention_mask", np.ones_like(tokens)), np.int32) > 0
    return tokens, present


def check_lm_settings(lm: Any) -> None:
    """Raises a ConfigError naming the first key of `model.lm` that is not a `DecoderLM` setting."""
    import dataclasses

    from vlm_jax.lm.decoder import DecoderLM

    fields = {f.name for f in dataclasses.fields(DecoderLM)} - {"parent", "name"}
    unknown = set(lm) - fields
    if unknown:
        raise ConfigError(f"model.lm.{sorted(unknown)[0]} is not a DecoderLM setting ({', '.join(sorted(fields))}).")


def forward_flops(module: nn.Module, *args) -> float:
    """Matmul FLOPs of `module.apply` on abstract inputs (`vlm_jax.flops`: scanned layers counted per layer)."""
    return matmul_flops(module.apply, jax.eval_shape(module.init, _KEY, *args), *args)


def output_shape(module: nn.Module, *args) -> Any:
    """The abstract output of `module.apply` on abstract inputs."""
    return jax.eval_shape(module.apply, jax.eval_shape(module.init, _KEY, *args), *args)


# Training FLOPs that follow `optim.freeze` (the MFU numerator of every system's `flops_per_example`).


def trained(system: Any) -> Callable[..., bool]:
    """`trains(*prefixes)`: whether any parameter of `system` under one of the module paths `prefixes` (e.g.
    "vision", "decoder/lm_head") is trained, i.e. escapes every `optim.freeze` regex. The split is the trainer's
    own (`optimizer.split_trainable` of the init's abstract shapes: nothing is allocated)."""
    from flax import traverse_util

    from vlm_jax.train.optimizer import path_str, split_trainable

    shapes = nn.unbox(jax.eval_shape(system.init, _KEY, system.dummy_batch(1)))
    trainable, _ = split_trainable(shapes, list(system.config.get("optim", {}).get("freeze", ())))
    paths = [path_str(k) for k in traverse_util.flatten_dict(trainable)]

    def trains(*prefixes: str) -> bool:
        return any(path == p or path.startswith(p + "/") for path in paths for p in prefixes)

    return trains


def training_flops(chain: Any) -> float:
    """Training FLOPs of parts that run one above the other, `chain` = [(forward FLOPs, trained?), ...] from the
    input up: a trained part costs 3x its forward (forward, input gradient, weight gradient); a frozen part with
    a trained part below it 2x (forward and the input gradient that must pass through it); a frozen part with
    nothing trained below it 1x (forward only). Parts that read the same input (two branches that meet, as
    Flamingo's media and text) are listed one branch after the other, the branch without FLOPs (an embedding
    lookup) last, next to where they meet.

    Approximations, small against the whole: a part counts as trained when any of its parameters is (a part
    that trains only its norms or gates is counted with every weight gradient); the lowest trained part's input
    gradient is counted though nothing below needs it (a trained patch embedding's gradient of the pixels, or
    LLaVA stage 1's connector, whose first matmul really costs 2x); and the input gradient of an
    activation-by-activation matmul (attention scores and their weighted sum) is two matmuls, not one, so a
    frozen part that gradients pass through costs its attention-score FLOPs once more than counted."""
    total, below = 0.0, False
    for flops, trains in chain:
        total += flops * (3.0 if trains else 2.0 if below else 1.0)
        below = below or trains
    return total


def decoder_chain(decoder: Any, prefix: str, trains: Callable[..., bool], seq_len: int, *media: Any) -> list:
    """A `DecoderLM`'s parts for `training_flops`, from the input up, for one row of `seq_len` tokens: its
    embeddings (a lookup: no matmul FLOPs, but trained they send gradients through everything above), for a
    Flamingo LM (`media` = abstract latents and media mask) each group's cross-attention block then its layers
    (so frozen LM layers above a trained block pass gradients: 2x), else all layers, the final norm, and the
    head (with tied embeddings the embedding's matmul, trained with the embedding). `prefix` is the decoder's
    module path ("" for the `lm` system) and `trains` the system's `trained`."""
    p = prefix + "/" if prefix else ""
    row = jax.ShapeDtypeStruct((1, seq_len), np.int32)
    positions = jax.ShapeDtypeStruct((1, 3, seq_len), np.int32) if decoder.mrope_sections else row  # M-RoPE
    plain = decoder.clone(cross_attn_every=0)
    head = forward_flops(plain.clone(num_layers=0), row, row, positions)
    layers = forward_flops(plain, row, row, positions) - head
    layer = layers / decoder.num_layers
    chain = [(0.0, trains(p + "embed", p + "pos_embed"))]
    every = decoder.cross_attn_every
    if not every:
        chain.append((layers, trains(p + "layers")))
    else:
        groups, tail = divmod(decoder.num_layers, every)
        block = (forward_flops(decoder, row, row, row, *media) - head - layers) / (groups + bool(tail))
        for name, count, depth in (("layer_groups", groups, every), ("layer_groups_tail", bool(tail), tail)):
            for _ in range(count):
                chain.append((block, trains(f"{p}{name}/xattn")))
                chain.append((depth * layer, trains(f"{p}{name}/layers")))
    chain.append((0.0, trains(p + "final_norm")))
    chain.append((head, trains(p + ("embed" if decoder.tie_embeddings else "lm_head"))))
    return chain


def same_shapes(want: Any, got: Any, what: str) -> Any:
    """`got` if its tree and shapes equal `want`'s; else a ConfigError naming the first difference."""
    want_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    got_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    for key in sorted(set(want_flat) | set(got_flat)):
        if key not in got_flat or key not in want_flat:
            side = "lacks" if key not in got_flat else "has an unexpected"
            raise ConfigError(f"model.{what} {side} parameter {key}; is it the model's architecture?")
        if np.shape(want_flat[key]) != np.shape(got_flat[key]):
            raise ConfigError(
                f"model.{what}{key} has shape {np.shape(got_flat[key])}; the model needs {np.shape(want_flat[key])}."
            )
    return got


def placement(config: Any, mesh: Any = None, rules: Any = None) -> tuple[Any, tuple]:
    """(mesh, rules) that `pretrained` places parts with: the given ones (the trainer's), or by default the
    config's `mesh` (fitted to the devices present, `checkpoint.load_mesh`) and its `logical_axis_rules`."""
    from vlm_jax.train.checkpoint import config_rules, load_mesh

    mesh = load_mesh(config) if mesh is None else mesh
    return mesh, config_rules(config) if rules is None else tuple(tuple(r) for r in rules)


def targets(system: Any, mesh: Any = None, rules: Any = None) -> Any:
    """ShapeDtypeStructs of `system`'s params carrying the shardings training gives them: `sharding.tree_shardings`
    of its init's logical names by `rules` on `mesh`, exactly as the trainer's `state_shardings.params` (defaults:
    `placement`). Parts that `pretrained` loads from other checkpoints are read straight into these shardings."""
    from vlm_jax import sharding
    from vlm_jax.train.checkpoint import abstract_like

    mesh, rules = placement(system.config, mesh, rules)
    boxed = jax.eval_shape(system.init, _KEY, system.dummy_batch(1))
    return abstract_like(nn.unbox(boxed), sharding.tree_shardings(boxed, rules, mesh))


def shardings_of(tree: Any) -> Any:
    """The `.sharding` of every leaf (ShapeDtypeStructs or arrays): e.g. the `out_shardings` of a jit that
    computes them."""
    return jax.tree.map(lambda x: x.sharding, tree)


def checkpoint(path: str, what: str, kinds: tuple[str, ...], kind: str) -> Any:
    """The `SavedParams` of `model.<what>` = `path` (nothing read yet), after a ConfigError unless the checkpoint
    holds one of the systems `kinds` (`kind` names them in the message)."""
    from vlm_jax.train.checkpoint import SavedParams

    saved = SavedParams(path)
    if saved.config.model.name not in kinds:
        raise ConfigError(f"model.{what} {path} holds a {saved.config.model.name}, not {kind}.")
    return saved


def load_vision(path: str, want: Any, drop: tuple[str, ...] = ()) -> Callable[[], Any]:
    """Checks now, reads when called: the vision encoder params of checkpoint `path` (a `vision_encoder`, or a
    `dual_encoder`'s image tower) without the parts named in `drop`, checked against `want` (the model's vision
    params as ShapeDtypeStructs with shardings, see `targets`), then read straight into `want`'s shardings.
    `pretrained` checks every checkpoint before it reads any, so a wrong one fails before a long read."""
    saved = checkpoint(path, "vision_checkpoint", ("vision_encoder", "dual_encoder"), "a vision encoder")
    tower = "image_encoder" if saved.config.model.name == "dual_encoder" else None
    shapes = saved.shapes[tower] if tower else saved.shapes
    same_shapes(want, {k: v for k, v in shapes.items() if k not in drop}, "vision_checkpoint")
    if tower:
        return lambda: saved.restore({tower: want})[tower]
    return lambda: saved.restore(want)


def load_lm(path: str, want: Any) -> Callable[[], Any]:
    """Checks now, reads when called: the params of the `lm` checkpoint `path`, checked against `want` (the
    model's decoder as ShapeDtypeStructs with shardings), then read straight into `want`'s shardings."""
    saved = checkpoint(path, "lm_checkpoint", ("lm",), "an lm")
    same_shapes(want, saved.shapes, "lm_checkpoint")
    return lambda: saved.restore(want)


def load_stage(path: str, system: str, want: Any, skip: tuple[str, ...] = ()) -> Callable[[], dict]:
    """Checks now, reads when called: the params of checkpoint `path`, an earlier training stage of the same
    `system`, checked against `want` (all the model's params as ShapeDtypeStructs with shardings), then read
    straight into `want`'s shardings; the top-level parts in `skip` (those other checkpoints fill) are checked
    but not read."""
    saved = checkpoint(path, "stage_checkpoint", (system,), f"a {system}")
    same_shapes(want, saved.shapes, "stage_checkpoint")
    return lambda: dict(saved.restore({k: v for k, v in want.items() if k not in skip}))
