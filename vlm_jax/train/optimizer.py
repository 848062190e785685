"""The optax factory: schedules, optimizers, weight-decay masks, clipping, per-path rules.

`config.optim` keys (see configs/lm.py for a full example):

* `name`: "adamw" | "sgd" | "adafactor"; `lr`; `b1`, `b2`, `eps` (adamw);
  `momentum`, `nesterov` (sgd); `weight_decay`.
* `schedule`: "constant" | "cosine" | "linear" | "rsqrt", after
  `warmup_steps` of linear warmup from 0; `min_lr_ratio` is where cosine and
  linear end; `rsqrt_timescale` for rsqrt.
* `clip_norm` (global-norm clipping, 0 = off); `agc_clip` (adaptive gradient
  clipping as in the NFNet paper, unit-wise, 0 = off).
* `wd_exclude`: regexes of parameter paths that get no weight decay (besides
  the default: parameters with fewer than two non-'layers' dims, i.e. norm
  scales and biases, are not decayed).
* `freeze`: regexes of parameters that are not trained; they get no gradient
  and no optimizer state (see `split_trainable`).
* `lr_mults`: `[(regex, multiplier), ...]`, first match wins, default 1.
* `trainable_rows`: `[(regex, (row, ...)), ...]`: of a matching parameter
  only these rows (leading index; e.g. new tokens' embeddings) are updated;
  every other row stays bit-identical (its update is zeroed after the
  optimizer, weight decay included).

Paths are '/'-joined parameter names such as `layers/attn/query/kernel`,
matched with `re.fullmatch`.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from vlm_jax.errors import ConfigError


def path_str(path: tuple) -> str:
    """'/'-joined path of a flattened flax param dict key."""
    return "/".join(str(p) for p in path)


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Warmup followed by the configured decay; returns step -> learning rate."""
    lr = float(optim.lr)
    warmup = int(optim.get("warmup_steps", 0))
    decay_steps = max(total_steps - warmup, 1)
    final = lr * float(optim.get("min_lr_ratio", 0.0))
    kind = optim.get("schedule", "cosine")
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim.get("min_lr_ratio", 0.0)))
    elif kind == "linear":
        main = optax.linear_schedule(lr, final, decay_steps)
    elif kind == "rsqrt":
        timescale = float(optim.get("rsqrt_timescale", 10_000))
        main = lambda step: lr * jax.lax.rsqrt(1.0 + step / timescale)  # noqa: E731
    else:
        raise ConfigError(f"optim.schedule {kind!r} is not one of constant, cosine, linear, rsqrt.")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _first_match(patterns, path: str, default):
    for pattern, value in patterns:
        if re.fullmatch(pattern, path):
            return value
    return default


def decay_mask(param_names: Any, optim: ml_collections.ConfigDict) -> Any:
    """True where weight decay applies: matrices (ignoring a 'layers' axis) not excluded by regex."""
    flat = traverse_util.flatten_dict(param_names)
    exclude = [(p, True) for p in optim.get("wd_exclude", ())]
    mask = {
        k: len([n for n in names if n != "layers"]) >= 2 and not _first_match(exclude, path_str(k), False)
        for k, names in flat.items()
    }
    return traverse_util.unflatten_dict(mask)


def lr_multipliers(params: Any, optim: ml_collections.ConfigDict) -> Any:
    """Tree of per-parameter learning-rate multipliers from `optim.lr_mults` (any leaves)."""
    rules = [(p, float(m)) for p, m in optim.get("lr_mults", ())]
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: _first_match(rules, path_str(k), 1.0) for k in flat})


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int, param_names: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optax transformation for the *trainable* params named by `param_names`.

    `param_names` is a tree (same structure as the trainable params) of
    logical-axis-name tuples; it decides the default weight-decay mask.
    """
    schedule = make_schedule(optim, total_steps)
    wd = float(optim.get("weight_decay", 0.0))
    mask = decay_mask(param_names, optim)
    name = optim.get("name", "adamw")
    parts = []
    if float(optim.get("agc_clip", 0.0)) > 0:
        parts.append(optax.adaptive_grad_clip(float(optim.agc_clip)))
    if float(optim.get("clip_norm", 0.0)) > 0:
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    if name == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=float(optim.get("b1", 0.9)),
                b2=float(optim.get("b2", 0.999)),
                eps=float(optim.get("eps", 1e-8)),
                weight_decay=wd,
                mask=mask,
            )
        )
    elif name == "sgd":
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask))
        momentum = float(optim.get("momentum", 0.0))
        parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=bool(optim.get("nesterov", False))))
    elif name == "adafactor":
        parts.append(optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=mask))
    else:
        raise ConfigError(f"optim.name {name!r} is not one of adamw, sgd, adafactor.")
    if optim.get("lr_mults"):
        mults = lr_multipliers(param_names, optim)
        parts.append(optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, m: u * m, updates, mults)))
    if optim.get("trainable_rows"):
        parts.append(optax.stateless(lambda updates, params=None: keep_rows(updates, optim.trainable_rows)))
    return optax.chain(*parts), schedule


def keep_rows(updates: Any, rules) -> Any:
    """Zeroes the updates of every row not listed for a parameter matched by `rules` [(regex, rows)]."""
    rules = [(pattern, tuple(int(r) for r in rows)) for pattern, rows in rules]

    def mask(path, update):
        rows = _first_match(rules, path_str(tuple(k.key for k in path)), None)
        if rows is None:
            return update
        if max(rows) >= update.shape[0] or min(rows) < 0:
            raise ConfigError(f"optim.trainable_rows names rows {rows} of a parameter with {update.shape[0]} rows.")
        keep = jnp.zeros((update.shape[0],), bool).at[jnp.asarray(rows)].set(True)
        return jnp.where(keep.reshape((-1,) + (1,) * (update.ndim - 1)), update, 0)

    return jax.tree_util.tree_map_with_path(mask, updates)


def split_trainable(params: Any, freeze: list[str]) -> tuple[dict, dict]:
    """Splits a param tree into (trainable, frozen) trees by the freeze regexes."""
    flat = traverse_util.flatten_dict(params)
    trainable, frozen = {}, {}
    for k, v in flat.items():
        (frozen if any(re.fullmatch(p, path_str(k)) for p in freeze) else trainable)[k] = v
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
    """Inverse of `split_trainable`."""
    flat = traverse_util.flatten_dict(trainable)
    flat.update(traverse_util.flatten_dict(frozen))
    return traverse_util.unflatten_dict(flat)


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over all leaves (float32)."""
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
