"""Config helpers: `parse_arg` for `get_config(arg)` strings, loading, and `validate`.

`validate` turns every inconsistency we can detect before compiling into one
`ConfigError` with one clear sentence.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any, Iterable

import ml_collections

from vlm_jax import sharding
from vlm_jax.errors import ConfigError  # defined there; configs/*.py import it from here

ConfigDict = ml_collections.ConfigDict


def parse_arg(arg: str | None, **defaults: Any) -> ConfigDict:
    """Parses a config argument such as `"variant=tiny,res=224"` against typed defaults.

    Values are converted to the type of their default (bools accept
    true/false/1/0; a bare name means True). Unknown names are an error, so a
    typo never silently falls back to a default.
    """
    result = dict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise ConfigError(f"config argument {name!r} is not one of {sorted(defaults)}.")
        default = defaults[name]
        if not sep:
            value: Any = True
        elif isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"config argument {name}={raw!r} is not a boolean.")
            value = raw.lower() in ("true", "1")
        elif isinstance(default, (int, float)):
            try:
                value = type(default)(ast.literal_eval(raw))
            except (ValueError, SyntaxError):
                raise ConfigError(f"config argument {name}={raw!r} is not a number.") from None
        else:
            value = raw
        result[name] = value
    return ConfigDict(result)


def load_config(spec: str) -> ConfigDict:
    """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"the config file {path} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"vlm_jax_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"the config file {path} defines no get_config(arg).")
    config = module.get_config(arg or None)
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"get_config in {path} returned a {type(config).__name__}, not an ml_collections ConfigDict.")
    return config


def training_config(total_steps: int, batch_size: int, mesh: str = "data=-1,fsdp=1,tensor=1") -> ConfigDict:
    """A config with the top-level keys every training config has (docs/design.md), at the usual values: log
    every 10 steps, a checkpoint every 1000 (3 kept), no periodic evaluation; a system config adds `model`,
    `data` and `optim`."""
    c = ConfigDict()
    c.seed = 0
    c.total_steps = total_steps
    c.batch_size = batch_size
    c.grad_accum_steps = 1
    c.mesh = mesh
    c.logical_axis_rules = sharding.DEFAULT_RULES
    c.log_every = 10
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.eval_every = 0
    c.eval_steps = 2
    c.peak_tflops = 0.0  # per device; 0 = spec-sheet table, else measured
    return c


def module_defaults(module: type, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The settings of a Flax module (a dataclass) whose default is a bool, int, float, str or tuple, with that
    default: a config lists them so every option of the module is a `--config.` key (None cannot be overridden
    from the command line) while its default stays written once, in the module."""
    import dataclasses

    skip = {"parent", "name", *exclude}
    return {
        f.name: f.default
        for f in dataclasses.fields(module)
        if f.name not in skip and isinstance(f.default, (bool, int, float, str, tuple))
    }


def compute_dtype(*parts: dict[str, Any], tiny: bool) -> ml_collections.FieldReference:
    """One activation dtype shared by the `dtype` key of every model part in `parts` (a FieldReference, so
    `--config.model.lm.dtype=float32` changes them all): float32 for tiny test models, bfloat16 for paper sizes.
    Either way parameters, optimizer state, logits, softmaxes and the loss stay float32 and matmuls accumulate
    in float32 (`vlm_jax/nn/layers.py`, `matmul`)."""
    dtype = ml_collections.FieldReference("float32" if tiny else "bfloat16")
    for part in parts:
        part["dtype"] = dtype
    return dtype


def to_json(config: ConfigDict) -> str:
    """The config as JSON (what checkpoints store beside the state)."""
    return config.to_json_best_effort(sort_keys=True, indent=2)


def from_json(text: str) -> ConfigDict:
    """Inverse of `to_json` (tuples come back as lists)."""
    return ConfigDict(json.loads(text))


def validate(config: ConfigDict, num_devices: int) -> None:
    """Checks a training config against the registry and the device count."""
    from vlm_jax import models  # local: loading a config should not import every system

    required = (
        "seed",
        "total_steps",
        "batch_size",
        "mesh",
        "log_every",
        "checkpoint_every",
        "eval_every",
        "model",
        "data",
        "optim",
    )
    missing = [k for k in required if k not in config]
    if missing:
        raise ConfigError(f"the config has no {', '.join(missing)} (every training config needs these top-level keys).")
    from vlm_jax import prerequisites  # local: it imports this module

    prerequisites.check_resolved(config)
    models.get(config.model.name)  # raises ConfigError naming the known systems
    try:
        shape = sharding.mesh_shape(config.mesh, num_devices)
    except sharding.ShardingError as e:
        raise ConfigError(str(e)) from None
    rules = config.get("logical_axis_rules", sharding.DEFAULT_RULES)
    dp = math.prod(shape[a] for a in _batch_axes(rules, shape))
    accum = int(config.get("grad_accum_steps", 1))
    if accum < 1:
        raise ConfigError(f"grad_accum_steps is {accum}; it must be at least 1.")
    if config.batch_size % (dp * accum):
        raise ConfigError(
            f"batch_size={config.batch_size} is not divisible by the data-parallel size {dp}"
            + (f" times grad_accum_steps={accum}" if accum > 1 else "")
            + f" (mesh {config.mesh!r})."
        )
    if config.total_steps < 1:
        raise ConfigError(f"total_steps is {config.total_steps}; it must be at least 1.")
    for key in ("log_every", "checkpoint_every", "eval_every"):
        if config[key] < 0:
            raise ConfigError(f"{key} is {config[key]}; use a positive number of steps, or 0 to turn it off.")
    rules = [p for p, _ in config.optim.get("lr_mults", ())] + [p for p, _ in config.optim.get("trainable_rows", ())]
    for pattern in list(config.optim.get("freeze", ())) + rules:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"optim pattern {pattern!r} is not a valid regular expression ({e}).") from None


def _batch_axes(rules: Iterable, shape: dict[str, int]) -> tuple[str, ...]:
    for name, target in rules:
        if name == "batch":
            axes = (target,) if isinstance(target, str) else tuple(target or ())
            return tuple(a for a in axes if a in shape)
    return ()


def validate_patterns(config: ConfigDict, param_paths: list[str]) -> None:
    """Every freeze / lr-multiplier / trainable-rows regex must match at least one parameter path."""
    for key, patterns in (
        ("optim.freeze", config.optim.get("freeze", ())),
        ("optim.lr_mults", [p for p, _ in config.optim.get("lr_mults", ())]),
        ("optim.trainable_rows", [p for p, _ in config.optim.get("trainable_rows", ())]),
    ):
        for pattern in patterns:
            if not any(re.fullmatch(pattern, path) for path in param_paths):
                example = ", ".join(param_paths[:4])
                raise ConfigError(f"{key} pattern {pattern!r} matches no parameter (paths look like: {example}, ...).")
    frozen = [p for p in param_paths if any(re.fullmatch(f, p) for f in config.optim.get("freeze", ()))]
    if len(frozen) == len(param_paths):
        raise ConfigError("optim.freeze matches every parameter, so there is nothing to train.")


# Keys that fix the shapes and structure of a checkpointed train state.
_STRUCTURAL_KEYS = ("model", "optim.name", "optim.freeze")


def validate_checkpoint_config(saved: ConfigDict, given: ConfigDict, where: str) -> None:
    """A checkpoint can be resumed only with the same model and optimizer structure."""
    for key in _STRUCTURAL_KEYS:
        a, b = _lookup(saved, key), _lookup(given, key)
        if _normalise(a) != _normalise(b):
            diff = _first_difference(_normalise(a), _normalise(b), key)
            raise ConfigError(
                f"the checkpoint in {where} was written with {diff[0]}={diff[1]!r} but the config gives {diff[2]!r}; "
                "use the same config to resume, or a new --workdir."
            )


def _lookup(config: ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return node


def _normalise(x: Any) -> Any:
    if isinstance(x, ConfigDict):
        x = x.to_dict()
    if isinstance(x, dict):
        return {k: _normalise(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_normalise(v) for v in x]
    return x


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}")
    return path, a, b
