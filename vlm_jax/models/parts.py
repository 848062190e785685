"""Pieces every multimodal system shares: building its vision encoder, counting FLOPs on abstract shapes, and
starting frozen parts from other checkpoints (checked against the model's own shapes)."""

from __future__ import annotations

from typing import Any

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


def load_vision(path: str, want: Any) -> Any:
    """The vision encoder params of checkpoint `path` (a `vision_encoder`, or a `dual_encoder`'s image tower),
    checked against `want` (the model's own vision params, host arrays)."""
    from vlm_jax.train.checkpoint import load_params

    config, _, vision = load_params(path)
    if config.model.name not in ("vision_encoder", "dual_encoder"):
        raise ConfigError(f"model.vision_checkpoint {path} holds a {config.model.name}, not a vision encoder.")
    vision = jax.device_get(vision)
    vision = vision["image_encoder"] if config.model.name == "dual_encoder" else vision
    return same_shapes(want, vision, "vision_checkpoint")


def load_lm(path: str) -> Any:
    """The params of the `lm` checkpoint `path` (host arrays)."""
    from vlm_jax.train.checkpoint import load_params

    config, _, lm = load_params(path)
    if config.model.name != "lm":
        raise ConfigError(f"model.lm_checkpoint {path} holds a {config.model.name}, not an lm.")
    return jax.device_get(lm)


def load_stage(path: str, system: str) -> Any:
    """The params of checkpoint `path`, an earlier training stage of the same `system` (host arrays)."""
    from vlm_jax.train.checkpoint import load_params

    config, _, params = load_params(path)
    if config.model.name != system:
        raise ConfigError(f"model.stage_checkpoint {path} holds a {config.model.name}, not a {system}.")
    return jax.device_get(params)
