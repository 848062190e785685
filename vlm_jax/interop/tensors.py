"""Reading checkpoint files and reshaping PyTorch weights: the helpers every converter in `interop/` shares.

* `read_config(path)`: a model directory's config.json as a dict;
* `read_safetensors(path)`: every tensor of its safetensors files (one file,
  or the shards a `*.safetensors.index.json` lists), as numpy arrays;
* `refuse_pickles(path, raw_config)`: the one-sentence refusal of a directory
  whose weights are only PyTorch pickles (`.bin`, `.pt`, `.pth`, `.ckpt`);
* `Tensors`: those tensors read through a key prefix, as float32, a missing
  key being a UserError that names it;
* `heads_kernel`, `heads_bias`, `out_kernel`: PyTorch `nn.Linear` weights
  ([out, in]) -> `DenseGeneral` kernels with (heads, head_dim) axes;
* `stack_layers`: per-layer param trees -> one tree with a leading layer axis
  (the layout of the scanned layer stacks).

None of them needs torch, and nothing here unpickles: a pickle (PyTorch's
`.bin` / `.pt` / `.pth` checkpoints) can run any code when it is loaded, so
weights are read from safetensors files only, and a directory that has only
pickles is refused with the command that converts them (docs/reliability.md).
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from vlm_jax.errors import UserError


def read_config(path: str) -> dict:
    """The parsed config.json of the model directory `path`."""
    if not os.path.isdir(path):
        raise UserError(
            f"the model directory {path!r} does not exist or is not a directory; give a Hugging Face or timm "
            "model directory (config.json + *.safetensors)."
        )
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise UserError(f"{path!r} has no config.json, so it is not a Hugging Face or timm model directory.")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{file!r} is not readable JSON ({e}).") from None
    if not isinstance(config, dict):
        raise UserError(f"{file!r} holds a JSON {type(config).__name__}, not the object a model config is.")
    return config


# PyTorch checkpoint files: pickles, which can run code when unpickled, so never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def refuse_pickles(path: str, raw_config: dict | None = None) -> None:
    """A UserError if the model directory `path` has no safetensors weights but PyTorch pickle files: says why they
    are not read and how to convert them (`raw_config`, its config.json, names the transformers class to use)."""
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if not pickles:
        return
    shown = ", ".join(pickles[:3]) + (f" and {len(pickles) - 3} more" if len(pickles) > 3 else "")
    architectures = (raw_config or {}).get("architectures") or []
    cls = str(architectures[0]) if architectures and str(architectures[0]).isidentifier() else "AutoModel"
    raise UserError(
        f"{path!r} holds its weights only as PyTorch pickle files ({shown}), which vlm-jax never loads because "
        "unpickling a file can run any code it carries; convert them to safetensors in an environment you trust, "
        f"e.g. python -c \"from transformers import {cls}; {cls}.from_pretrained('{path}')"
        f".save_pretrained('{path}', safe_serialization=True)\", then run convert-hf again."
    )


def _shard_files(path: str) -> list[str]:
    """The safetensors files of `path`: the shards its index lists, or every `*.safetensors` file."""
    indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    if len(indexes) > 1:
        raise UserError(f"{path!r} has {len(indexes)} safetensors index files; keep one.")
    if not indexes:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            refuse_pickles(path)
            raise UserError(f"{path!r} has no *.safetensors file, the only weight format convert-hf reads.")
        return files
    try:
        with open(indexes[0], encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{indexes[0]!r} is not a safetensors index (JSON with a 'weight_map' object): {e}.") from None
    missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise UserError(f"{path!r} lacks the shard(s) {', '.join(missing)} that {os.path.basename(indexes[0])} lists.")
    return [os.path.join(path, n) for n in names]


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of the model directory `path` by key (the shards of an index file, else every *.safetensors)."""
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for name in _shard_files(path):
        try:
            tensors.update(load_file(name))
        except Exception as e:  # noqa: BLE001 - corrupt file or a dtype numpy lacks
            raise UserError(f"cannot read {name!r} with safetensors ({type(e).__name__}: {e}).") from None
    return tensors


class Tensors:
    """Checkpoint tensors read through a key prefix, as float32.

    `t = Tensors(tensors, "model.", path)`; `t("norm.weight")` is
    `tensors["model.norm.weight"]`, and a missing key is a UserError naming
    the full key and `where` (the directory, or a description of the state
    dict); `"norm.weight" in t` tests for a key.
    """

    def __init__(self, tensors: dict[str, np.ndarray], prefix: str, where: str):
        self.tensors, self.prefix, self.where = tensors, prefix, where

    def __call__(self, key: str) -> np.ndarray:
        full = self.prefix + key
        if full not in self.tensors:
            raise UserError(
                f"the checkpoint ({self.where}) lacks tensor {full!r} (absent or tied weights are not supported here)."
            )
        return np.asarray(self.tensors[full], dtype=np.float32)

    def __contains__(self, key: str) -> bool:
        return self.prefix + key in self.tensors


def key_prefix(tensors: dict, candidates: tuple[str, ...], marker: str, what: str, where: str) -> str:
    """The first of `candidates` (key prefixes of the checkpoint layouts in circulation) under which `marker`
    exists; a UserError naming `what` and every key looked for otherwise."""
    for prefix in candidates:
        if prefix + marker in tensors:
            return prefix
    raise UserError(f"the checkpoint in {where!r} has no {what} (none of {', '.join(p + marker for p in candidates)}).")


def square_side(value, what: str, where: str) -> int:
    """One side of a square vision `image_size` / `patch_size` in a config (an int or a [height, width] pair);
    a UserError for a non-square one."""
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    if h != w:
        raise UserError(f"{where}: a non-square vision {what} {list(value)} is not supported.")
    return int(h)


def heads_kernel(weight: np.ndarray, heads: int) -> np.ndarray:
    """A PyTorch projection into heads, [heads * head_dim, in] -> `DenseGeneral` kernel [in, heads, head_dim]."""
    return weight.T.reshape(weight.shape[1], heads, -1)


def heads_bias(bias: np.ndarray, heads: int) -> np.ndarray:
    """The bias of such a projection, [heads * head_dim] -> [heads, head_dim]."""
    return bias.reshape(heads, -1)


def out_kernel(weight: np.ndarray, heads: int) -> np.ndarray:
    """A PyTorch projection out of heads, [out, heads * head_dim] -> `DenseGeneral` kernel [heads, head_dim, out]."""
    return weight.T.reshape(heads, -1, weight.shape[0])


def stack_layers(layers: list[dict]) -> dict:
    """Per-layer param trees (same structure) -> one tree whose leaves have a leading layer axis."""
    import jax

    return jax.tree.map(lambda *leaves: np.stack(leaves), *layers)
