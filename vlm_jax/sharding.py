"""Device meshes and logical-axis sharding.

Every parameter and main activation carries *logical* axis names ("batch",
"embed", "mlp", "heads", ...). A config's `logical_axis_rules` maps them to the
*mesh* axes ("data", "fsdp", "tensor"). This module owns that mapping:

* `make_mesh("data=-1,fsdp=2,tensor=1")` builds a `jax.sharding.Mesh`;
* `resolve(names, rules, mesh, shape)` turns logical names into a
  `PartitionSpec` with **first match wins** semantics (see its docstring);
* `tree_shardings` does it for a whole tree of flax `LogicallyPartitioned`
  boxes (params, optimizer state); `unsharded` lists the dimensions a rule
  meant to shard but could not (so they are replicated), which the trainer
  reports at startup;
* `use_rules` + `constrain` annotate activations inside a model.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from vlm_jax.errors import UserError

Rules = Sequence[tuple[str, Any]]

# Mesh axes in the order they are laid out over devices (outermost first).
MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


class ShardingError(UserError):
    """A mesh or rule specification that cannot work on the given devices."""


def parse_mesh(spec: str | Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Parses `"data=-1,fsdp=2,tensor=1"` (or a list of pairs) into `[(axis, size)]`."""
    if isinstance(spec, str):
        pairs = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, sep, size = item.partition("=")
            if not sep:
                raise ShardingError(f"mesh entry {item!r} is not of the form axis=size (in mesh {spec!r}).")
            try:
                pairs.append((name.strip(), int(size)))
            except ValueError:
                raise ShardingError(f"mesh axis {name.strip()!r} has size {size!r}, which is not an integer.") from None
    else:
        pairs = [(str(n), int(s)) for n, s in spec]
    names = [n for n, _ in pairs]
    if not pairs:
        raise ShardingError("the mesh is empty; give at least one axis, e.g. 'data=-1'.")
    if len(set(names)) != len(names):
        raise ShardingError(f"mesh {spec!r} names an axis twice.")
    for name, size in pairs:
        if size == 0 or size < -1:
            raise ShardingError(f"mesh axis {name!r} has size {size}; sizes are positive, or -1 for 'the rest'.")
    if sum(size == -1 for _, size in pairs) > 1:
        raise ShardingError(f"mesh {spec!r} has more than one axis of size -1.")
    return pairs


def mesh_shape(spec: str | Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
    """Axis sizes of the mesh `spec` on `num_devices` devices, with -1 resolved."""
    pairs = parse_mesh(spec)
    known = math.prod(size for _, size in pairs if size != -1)
    if any(size == -1 for _, size in pairs):
        if num_devices % known:
            raise ShardingError(
                f"mesh {spec!r}: the fixed axes use {known} devices, which does not divide the {num_devices} devices available."
            )
        pairs = [(n, num_devices // known if s == -1 else s) for n, s in pairs]
    elif known != num_devices:
        raise ShardingError(
            f"mesh {spec!r} has {known} devices in all (the product of its axis sizes), but {num_devices} devices are available."
        )
    return dict(pairs)


def make_mesh(spec: str | Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a `Mesh` from a mesh spec over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    try:
        from jax.experimental import mesh_utils

        device_array = mesh_utils.create_device_mesh(tuple(shape.values()), devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
        print(
            f"Note: no topology-aware layout for mesh {shape} ({type(e).__name__}: {e}); devices are laid out "
            "in their listed order, which may put a sharded axis across slow links.",
            file=sys.stderr,
        )
        device_array = np.asarray(devices).reshape(tuple(shape.values()))
    return Mesh(device_array, tuple(shape.keys()))


def _as_axes(target: Any) -> tuple[str, ...]:
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def resolve(
    names: Sequence[str | None], rules: Rules, mesh: Mesh | AbstractMesh, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """Maps logical axis names to a `PartitionSpec` on `mesh`.

    For each dimension, the rules are scanned in order and the **first** rule
    for that logical name that can be used wins. A rule can be used when its
    mesh axes exist in the mesh, none of them is already taken by another
    dimension of the same array, and (if `shape` is given) the dimension is
    divisible by the product of their sizes. Rules that cannot be used are
    skipped; a dimension with no usable rule is replicated. Mesh axes that the
    mesh does not have are dropped from a rule (so one rule set serves meshes
    with and without, say, a "tensor" axis). Only the mesh's axis names and sizes are read, so `mesh` may be
    a `jax.sharding.AbstractMesh` (shardings for a mesh whose devices are not here; tests/golden/).
    """
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(names):
        chosen = None
        if name is not None:
            for rule_name, target in rules:
                if rule_name != name:
                    continue
                axes = tuple(a for a in _as_axes(target) if a in mesh.shape)
                if any(a in used for a in axes):
                    continue
                if shape is not None and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                    continue
                chosen = axes
                break
        if chosen:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def tree_shardings(tree: Any, rules: Rules, mesh: Mesh | AbstractMesh) -> Any:
    """`NamedSharding`s for a tree whose leaves may be flax `LogicallyPartitioned` boxes.

    Boxed leaves are resolved from their logical names (and shapes); plain
    leaves (step counters, optimizer scalars, factored statistics whose rank
    differs from the names) are replicated. The result has the structure of
    the *unboxed* tree.
    """

    def leaf_sharding(x):
        if _is_box(x):
            value = x.value
            names = x.names
            if len(names) == len(value.shape):
                return NamedSharding(mesh, resolve(names, rules, mesh, value.shape))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(leaf_sharding, tree, is_leaf=_is_box)


def unsharded(tree: Any, rules: Rules, mesh: Mesh | AbstractMesh) -> list[str]:
    """One line per parameter dimension that a rule maps to mesh axes of size > 1 but that ends up replicated
    (not divisible by the axes' size, or the axes taken by another dimension): "path dim NAME of size S: why".
    `tree` holds flax `LogicallyPartitioned` boxes (e.g. `jax.eval_shape` of an init)."""
    lines = []
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]
    for path, box in flat:
        if not _is_box(box) or len(box.names) != len(box.value.shape):
            continue
        spec = resolve(box.names, rules, mesh, box.value.shape)
        taken = {a for entry in spec if entry for a in _as_axes(entry)}
        for dim, (name, entry) in enumerate(zip(box.names, spec)):
            if name is None or entry is not None:
                continue
            wanted = [
                tuple(a for a in _as_axes(t) if a in mesh.shape and mesh.shape[a] > 1) for n, t in rules if n == name
            ]
            wanted = [axes for axes in wanted if axes]
            if not wanted:
                continue  # no rule shards this name on this mesh: replication is what the rules say
            size = box.value.shape[dim]
            axes = wanted[0]
            parts = math.prod(mesh.shape[a] for a in axes)
            why = (
                f"the mesh axes {'/'.join(axes)} are taken by another dimension"
                if any(a in taken for a in axes)
                else f"not divisible by {'x'.join(axes)}={parts}"
            )
            where = jax.tree_util.keystr(path).replace("']['", "/").strip("[']")
            lines.append(f"{where} dim {dim} {name!r} of size {size}: {why}")
    return lines


def logical_names(tree: Any) -> Any:
    """The logical axis names of every boxed leaf (None for unannotated leaves)."""
    return jax.tree.map(lambda x: tuple(x.names) if _is_box(x) else None, tree, is_leaf=_is_box)


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the global batch is split: the mesh axes that 'batch' maps to."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Sharding of a batch array with `ndim` dims: leading dim over the data-parallel axes."""
    return NamedSharding(mesh, resolve(("batch",) + (None,) * (ndim - 1), rules, mesh))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("vlm_jax_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
    """Within this context, `constrain` annotates activations for `mesh` and `rules`."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `use_rules`, or None outside one."""
    return _ACTIVE.get()


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over."""
    return _as_axes(resolve(("batch",), rules, mesh)[0])


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside `use_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, resolve(names, rules, mesh, x.shape)))
