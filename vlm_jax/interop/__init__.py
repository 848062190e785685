"""Import of public checkpoints (Hugging Face safetensors and timm directories) into vlm_jax param trees.

Converters register here. A module of this package decorates a function
`convert(path, raw_config) -> (system config, params)` with
`@register_converter("SomeForCausalLM", ...)`, naming the keys it reads:

* a transformers class name from config.json's `architectures`;
* `"model_type:<model_type>"` for transformers configs saved without
  `architectures`;
* `"timm:<architecture>"` for timm directories (config.json with an
  `architecture` string such as `dm_nfnet_f3`).

`find_converter(raw_config, path)` imports every module of the package on its
first call (so adding a converter means adding one module) and returns the
converter of the first key of the config that one registered; tensor and
config-file helpers they share live in `interop/tensors.py`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections

from vlm_jax.errors import UserError
from vlm_jax.registry import Registry

# (path, parsed config.json) -> (system config, params)
Converter = Callable[[str, dict], tuple[ml_collections.ConfigDict, Any]]

CONVERTERS = Registry(__name__, "converter")
register_converter = CONVERTERS.register  # @register_converter("SomeForCausalLM", ...) on a Converter


def converters() -> dict[str, Converter]:
    """Every registered key (sorted) and its converter."""
    return CONVERTERS.entries()


def config_keys(raw: dict) -> list[str]:
    """The registry keys a config.json offers, in order of preference."""
    keys = [str(a) for a in raw.get("architectures") or []]
    if raw.get("architecture"):
        keys.append(f"timm:{raw['architecture']}")
    if not keys and raw.get("model_type"):
        keys.append(f"model_type:{raw['model_type']}")
    return keys


def find_converter(raw: dict, path: str) -> Converter:
    """The converter for the model directory `path` whose parsed config.json is `raw`."""
    known = converters()
    keys = config_keys(raw)
    for key in keys:
        if key in known:
            return known[key]
    found = ", ".join(keys) if keys else "no architectures, architecture or model_type"
    raise UserError(f"{path!r} holds {found}, which no converter reads; known: {', '.join(known)}.")


def system_config(path: str, model: dict, data: dict | None = None) -> ml_collections.ConfigDict:
    """The config of a converted checkpoint: its `model`, the `data` fields `forward` needs, and its source."""
    return ml_collections.ConfigDict({"model": model, "data": data or {}, "converted_from": os.path.abspath(path)})
