"""Golden sharding files: every parameter's PartitionSpec, per paper-size system config, on a reference mesh.

`tests/golden/sharding/<config>_<variant>.json` records, for each config in `GOLDEN`, what the config's
`logical_axis_rules` make of every parameter on the reference mesh `REFERENCE_MESH` (data=1, fsdp=16,
tensor=4: 64 devices, e.g. 8 hosts of 8 accelerators, FSDP across hosts' worth of devices and 4-way tensor
parallelism; the sizes that make indivisible heads, KV heads and vocabularies show up). Nothing is allocated
and no device is needed: parameters come from `jax.eval_shape(system.init, ...)` and the mesh is a
`jax.sharding.AbstractMesh`, resolved by the trainer's own `sharding.tree_shardings` / `sharding.unsharded`.

Each file holds
  "config"        the config it was computed from (`configs/X.py:variant=V`);
  "mesh"          the reference mesh's axis sizes;
  "params"        parameter path -> {"names": logical axis names, "shape": [...], "spec": one entry per
                  dimension: null (replicated), a mesh axis, or a list of mesh axes};
  "replicated"    the dimensions a rule meant to shard but could not, with the reason (`sharding.unsharded`);
  "unruled_names" logical names that parameters use but no rule mentions (replicated by omission).
One parameter per line, keys sorted, so a rule change reads as a diff of the parameters it re-shards.
tests/test_golden_sharding.py recomputes every file and fails on any difference.

After an intended change (rules, model shapes, a new config), regenerate and review the diff:

    python -m tests.golden.update_sharding            # rewrite every file (and delete stale ones)
    python -m tests.golden.update_sharding --check    # only compare; exit status 1 on a difference
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # abstract work only; never wait for an accelerator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # `python tests/golden/update_sharding.py` from anywhere
    sys.path.insert(0, REPO)

import jax  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402

from vlm_jax import models, sharding  # noqa: E402
from vlm_jax.config_lib import load_config  # noqa: E402

GOLDEN_DIR = os.path.join(REPO, "tests", "golden", "sharding")
REFERENCE_MESH = {"data": 1, "fsdp": 16, "tensor": 4}
REGENERATE = "python -m tests.golden.update_sharding"

# (config file in configs/, variant): every system config at each paper size. NFNet is represented by F6
# (Flamingo's encoder and the config's default): F0-F7 share their layer shapes and differ in depth only.
# lm.py has no paper; its 50m and 1b variants are its non-test sizes.
GOLDEN = (
    ("clip", "B/16"),
    ("clip", "L/14"),
    ("deepseek_vl", "1.3b"),
    ("deepseek_vl", "7b"),
    ("flamingo", "3B"),
    ("flamingo", "9B"),
    ("flamingo", "80B"),
    ("fuyu", "8b"),
    ("idefics3", "8b"),
    ("internvl", "1.5"),
    ("internvl", "mini-4b"),
    ("internvl", "2-1b"),
    ("internvl", "2-8b"),
    ("llava", "7b"),
    ("llava", "1.5-7b"),
    ("llava", "1.5-13b"),
    ("llava", "next-7b"),
    ("lm", "50m"),
    ("lm", "1b"),
    ("minigpt_v2", "7b"),
    ("nfnet", "F6"),
    ("paligemma", "3b-224"),
    ("paligemma", "3b-448"),
    ("paligemma", "3b-896"),
    ("qwen2_vl", "7b"),
    ("qwen2_vl", "2.5-7b"),
    ("qwen_vl", "7b"),
    ("siglip", "B/16"),
    ("siglip", "So400m/14"),
)


def file_name(config: str, variant: str) -> str:
    """`clip`, `B/16` -> `clip_B-16.json` (characters other than letters, digits, '.' and '-' become '-')."""
    return f"{config}_{re.sub(r'[^A-Za-z0-9.-]+', '-', variant)}.json"


def config_spec(config: str, variant: str) -> str:
    """The `--config` argument for one golden entry, relative to the repository."""
    return f"configs/{config}.py:variant={variant}"


def reference_mesh(shape: dict[str, int] | None = None) -> AbstractMesh:
    """An `AbstractMesh` with the reference axis sizes (or `shape`): no devices behind it."""
    shape = REFERENCE_MESH if shape is None else shape
    return AbstractMesh(tuple(shape.values()), tuple(shape.keys()))


@functools.lru_cache(maxsize=None)
def abstract_params(spec: str) -> tuple[Any, tuple]:
    """(boxed abstract parameters of `jax.eval_shape(system.init)`, the config's rules as a tuple), for a
    `configs/X.py:arg` spec relative to the repository. Cached: tests share one tree per config."""
    config = load_config(os.path.join(REPO, spec))
    system = models.build(config)
    boxed = jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(1))
    rules = tuple(tuple(r) for r in config.get("logical_axis_rules", sharding.DEFAULT_RULES))  # as the trainer
    return boxed, rules


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _entry(axes: Any) -> Any:
    if axes is None or isinstance(axes, str):
        return axes
    return list(axes)


def spec_table(boxed: Any, rules, mesh, config: str = "") -> dict[str, Any]:
    """The golden record (see the module docstring) of the boxed parameter tree `boxed` under `rules` on
    `mesh`: what the trainer's `sharding.tree_shardings` and `sharding.unsharded` give."""
    shardings = jax.tree_util.tree_flatten_with_path(sharding.tree_shardings(boxed, rules, mesh))[0]
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=sharding._is_box)[0]
    if [p for p, _ in shardings] != [p for p, _ in leaves]:
        raise AssertionError("tree_shardings returned a tree of another structure than the parameters")
    ruled = {name for name, _ in rules}
    params, unruled = {}, set()
    for (path, leaf), (_, named) in zip(leaves, shardings):
        boxed_leaf = sharding._is_box(leaf)
        shape = list(leaf.value.shape if boxed_leaf else leaf.shape)
        names = list(leaf.names) if boxed_leaf else None  # None: no logical names, replicated by tree_shardings
        spec = [_entry(e) for e in named.spec] + [None] * (len(shape) - len(named.spec))
        params[_path(path)] = {"names": names, "shape": shape, "spec": spec}
        unruled.update(n for n in names or () if n is not None and n not in ruled)
    return {
        "config": config,
        "mesh": {str(k): int(v) for k, v in mesh.shape.items()},
        "params": params,
        "replicated": sorted(sharding.unsharded(boxed, rules, mesh)),
        "unruled_names": sorted(unruled),
    }


def compute(config: str, variant: str, rules=None, mesh=None) -> dict[str, Any]:
    """The golden record of one entry of `GOLDEN` (its config's rules on the reference mesh unless given)."""
    spec = config_spec(config, variant)
    boxed, config_rules = abstract_params(spec)
    return spec_table(boxed, config_rules if rules is None else rules, reference_mesh() if mesh is None else mesh, spec)


def render(table: dict[str, Any]) -> str:
    """The file text of a golden record: JSON with sorted keys, one parameter / list item per line."""

    def one(value):
        return json.dumps(value, sort_keys=True)

    out = ["{"]
    keys = sorted(table)
    for i, key in enumerate(keys):
        value, comma = table[key], "," if i < len(keys) - 1 else ""
        if isinstance(value, dict) and key == "params":
            items = [f"    {one(k)}: {one(value[k])}" for k in sorted(value)]
            out += [f"  {one(key)}: {{", ",\n".join(items), f"  }}{comma}"] if items else [f"  {one(key)}: {{}}{comma}"]
        elif isinstance(value, list) and value:
            out += [f"  {one(key)}: [", ",\n".join(f"    {one(v)}" for v in value), f"  ]{comma}"]
        else:
            out.append(f"  {one(key)}: {one(value)}{comma}")
    out.append("}")
    return "\n".join(out) + "\n"


def _fmt_spec(spec) -> str:
    def axes(e):
        return "None" if e is None else e if isinstance(e, str) else "(" + ", ".join(e) + ")"

    return "(" + ", ".join(axes(e) for e in spec) + ")"


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two golden records, one line each ("path: old spec -> new spec");
    empty when they agree."""
    lines = []
    for key in ("config", "mesh"):
        if old.get(key) != new.get(key):
            lines.append(f"{key}: {old.get(key)} -> {new.get(key)}")
    old_params, new_params = old.get("params", {}), new.get("params", {})
    for path in sorted(set(old_params) | set(new_params)):
        a, b = old_params.get(path), new_params.get(path)
        if a is None:
            lines.append(f"{path}: new parameter, shape {b['shape']}, spec {_fmt_spec(b['spec'])}")
        elif b is None:
            lines.append(f"{path}: no longer a parameter (was shape {a['shape']}, spec {_fmt_spec(a['spec'])})")
        elif a != b:
            parts = []
            if a["spec"] != b["spec"]:
                parts.append(f"{_fmt_spec(a['spec'])} -> {_fmt_spec(b['spec'])}")
            if a["shape"] != b["shape"]:
                parts.append(f"shape {a['shape']} -> {b['shape']}")
            if a["names"] != b["names"]:
                parts.append(f"names {a['names']} -> {b['names']}")
            lines.append(f"{path}: " + "; ".join(parts))
    for key, label in (("replicated", "replicated dimension"), ("unruled_names", "logical name without a rule")):
        before, after = set(old.get(key, ())), set(new.get(key, ()))
        lines += [f"{label} no longer: {x}" for x in sorted(before - after)]
        lines += [f"{label} now: {x}" for x in sorted(after - before)]
    return lines


def golden_path(config: str, variant: str) -> str:
    """The golden file of one entry of `GOLDEN`."""
    return os.path.join(GOLDEN_DIR, file_name(config, variant))


def main(argv: list[str] | None = None) -> int:
    """Rewrites (or with --check, compares) every golden file; prints one line per file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit status 1 if a file differs")
    args = parser.parse_args(argv)
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    expected = {file_name(c, v) for c, v in GOLDEN}
    differs = 0
    for config, variant in GOLDEN:
        path = golden_path(config, variant)
        table = compute(config, variant)
        text = render(table)
        old_text = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if old_text == text:
            print(f"{os.path.relpath(path, REPO)}: unchanged")
            continue
        differs += 1
        changes = diff(json.loads(old_text), table) if old_text is not None else []
        status = "new" if old_text is None else f"{len(changes)} change(s)" if changes else "reformatted"
        print(f"{os.path.relpath(path, REPO)}: {status}" + "".join(f"\n  {line}" for line in changes[:20]))
        if len(changes) > 20:
            print(f"  ... {len(changes) - 20} more")
        if not args.check:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    for stale in sorted(set(os.listdir(GOLDEN_DIR)) - expected):
        if stale.endswith(".json"):
            differs += 1
            print(f"{os.path.relpath(os.path.join(GOLDEN_DIR, stale), REPO)}: stale (not in GOLDEN)")
            if not args.check:
                os.remove(os.path.join(GOLDEN_DIR, stale))
    if args.check and differs:
        print(f"{differs} golden file(s) differ; if intended, run `{REGENERATE}` and commit the diff.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
