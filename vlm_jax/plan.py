"""`vlm-jax plan`: the per-device memory of training a config on a mesh, known before a pod is booked.

Exact parts, by `jax.eval_shape` and the sharding rules on a `jax.sharding.AbstractMesh` (no device, nothing
allocated; the trainer's own `state_layout` / `batch_layout`):

* parameters, the optimizer state of the trainable ones, their gradients and the batch. An array's bytes per
  device are its bytes divided by the product of the sizes of the mesh axes its `PartitionSpec` uses
  (replicated: its full size). Gradients exist for the trainable parameters only (`optim.freeze`) and are
  sharded like them.

Activations and other temporaries come from XLA: the real train step (`Trainer.train_step`) is compiled for the
mesh and its `memory_analysis()` read. XLA's per-device peak of the step is

    argument + output - alias + temp

(arguments, the train state and the batch, live for the whole step; the donated state's buffers are reused for
the new state, so aliased outputs take no more; `temp` is the peak of everything else the buffer assignment
holds: gradients, activations kept for the backward pass, gathered FSDP weights, optimizer intermediates).
`activation_bytes` is that peak less the exact parts above, so the plan's total is XLA's peak. The compile is
*measured* when the mesh fits the devices at hand (the default backend's, else the host CPU's: `vlm-jax plan`
asks XLA for as many host CPU devices as the mesh has, up to `cli.PLAN_HOST_DEVICES`). Otherwise it is
*estimated*: the step is compiled on a smaller mesh (`emulation_shape`: data-parallel axes shrunk first, an FSDP
axis kept at 2 or more while it can be, the tensor axis last) with the same rows per device, and that mesh's
activations (its peak less its own exact parts) are carried over to the target. Where an axis the activations
split over (e.g. `tensor`) had to shrink, the estimate is conservative: those activations are over-counted.

XLA's CPU compiler measures (or the local accelerator's, when the mesh fits it); an accelerator's compiler
fuses, rematerialises and schedules differently, so keep a margin. Nothing here trains, builds data or runs a
config's prerequisites.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import ml_collections
from flax import traverse_util
from jax.sharding import AbstractMesh, PartitionSpec

from vlm_jax import config_lib, models, prerequisites, sharding
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.train import optimizer as optim_lib

GB = 1e9  # --device_memory_gb and the printed sizes are in units of 10^9 bytes


@dataclasses.dataclass
class Parts:
    """The exact per-device bytes of a train state and batch on a mesh, and what the rules left replicated."""

    params_bytes: int
    opt_bytes: int
    grad_bytes: int
    batch_bytes: int
    num_params: int
    num_trainable: int
    replicated_dims: list[str]  # sharding.unsharded: dims a rule meant to shard on this mesh but could not
    replicated_params: list[tuple[str, tuple[int, ...], int]]  # (path, shape, bytes) of fully replicated params

    @property
    def total(self) -> int:
        """Parameters + optimizer state + gradients + batch."""
        return self.params_bytes + self.opt_bytes + self.grad_bytes + self.batch_bytes


@dataclasses.dataclass
class Plan:
    """Per-device memory of a config's training on a mesh (`plan`)."""

    mesh: dict[str, int]
    parts: Parts
    activation_bytes: int
    activation_source: str  # "measured" (compiled on this mesh) or "estimated" (compiled on a smaller one)
    activation_method: str  # one sentence: how activation_bytes was obtained
    compiled_mesh: dict[str, int]
    compiled_batch_size: int
    xla: dict[str, int]  # memory_analysis() of that compile
    device_memory_bytes: int

    @property
    def total_bytes_per_device(self) -> int:
        """Everything per device: the exact parts plus activations and other temporaries."""
        return self.parts.total + self.activation_bytes

    @property
    def fits(self) -> bool:
        """Whether the total fits the device memory (no margin added)."""
        return self.total_bytes_per_device <= self.device_memory_bytes

    def summary(self) -> dict[str, Any]:
        """The JSON object `vlm-jax plan` prints last."""
        p = self.parts
        return {
            "mesh": self.mesh,
            "devices": math.prod(self.mesh.values()),
            "params_bytes": p.params_bytes,
            "opt_bytes": p.opt_bytes,
            "grad_bytes": p.grad_bytes,
            "batch_bytes": p.batch_bytes,
            "activation_bytes": self.activation_bytes,
            "activation_source": self.activation_source,
            "compiled_mesh": self.compiled_mesh,
            "compiled_batch_size": self.compiled_batch_size,
            "total_bytes_per_device": self.total_bytes_per_device,
            "device_memory_bytes": self.device_memory_bytes,
            "fits": self.fits,
            "num_params": p.num_params,
            "num_trainable": p.num_trainable,
            "replicated_dims": len(p.replicated_dims),
            "replicated_param_bytes": sum(b for _, _, b in p.replicated_params),
            "xla": self.xla,
        }


def abstract_mesh(shape: dict[str, int]) -> AbstractMesh:
    """A mesh of these axis sizes without devices: enough to resolve shardings and shapes."""
    return AbstractMesh(tuple(shape.values()), tuple(shape.keys()))


def spec_parts(spec: PartitionSpec, mesh_shape: dict[str, int]) -> int:
    """How many pieces a `PartitionSpec` cuts an array into: the product of the sizes of the mesh axes it uses."""
    axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(mesh_shape[a] for a in axes)


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes per device of a tree of arrays (or ShapeDtypeStructs) with a matching tree of NamedShardings."""
    leaves, shard_leaves = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    if len(leaves) != len(shard_leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(shard_leaves)} shardings.")
    total = 0
    for x, s in zip(leaves, shard_leaves):
        size = math.prod(x.shape) * x.dtype.itemsize
        total += size // spec_parts(s.spec, dict(s.mesh.shape))
    return total


def exact_parts(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], system: Any = None) -> Parts:
    """Per-device bytes of parameters, optimizer state, gradients and batch of `config` on a mesh of these axis
    sizes, by `jax.eval_shape` (no device needed, nothing allocated)."""
    from vlm_jax.train import trainer

    system = system if system is not None else models.build(config)
    mesh = abstract_mesh(mesh_shape)
    rules = tuple(tuple(r) for r in config.get("logical_axis_rules", sharding.DEFAULT_RULES))
    layout = trainer.state_layout(config, system, mesh, rules)
    freeze = list(config.optim.get("freeze", ()))
    abstract, shardings = layout.abstract, layout.shardings
    trainable, _ = optim_lib.split_trainable(abstract.params, freeze)
    trainable_shardings, _ = optim_lib.split_trainable(shardings.params, freeze)
    batch_shardings, batch = trainer.batch_layout(system, config.batch_size, mesh, rules)
    replicated = []
    flat_params = traverse_util.flatten_dict(abstract.params)
    flat_shardings = traverse_util.flatten_dict(shardings.params)
    for key, x in flat_params.items():
        if spec_parts(flat_shardings[key].spec, mesh_shape) == 1 and math.prod(mesh_shape.values()) > 1:
            replicated.append((optim_lib.path_str(key), tuple(x.shape), math.prod(x.shape) * x.dtype.itemsize))
    replicated.sort(key=lambda r: -r[2])
    return Parts(
        params_bytes=per_device_bytes(abstract.params, shardings.params),
        opt_bytes=per_device_bytes(abstract.opt_state, shardings.opt_state),
        grad_bytes=per_device_bytes(trainable, trainable_shardings),
        batch_bytes=per_device_bytes(batch, batch_shardings),
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
        num_trainable=sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)),
        replicated_dims=sharding.unsharded(layout.boxed, rules, mesh),
        replicated_params=replicated,
    )


def compiled_memory(config: ml_collections.ConfigDict, devices: list) -> dict[str, int]:
    """XLA's `memory_analysis()` of the trainer's compiled train step for `config` on `devices` (sizes per
    device), with `peak_bytes` = argument + output - alias + temp."""
    from vlm_jax.train import trainer

    run = trainer.Trainer(config, devices)
    stats = run.train_step.lower(run.abstract_state, run.abstract_batch).compile().memory_analysis()
    if stats is None:
        raise UserError(f"XLA's {devices[0].platform} compiler gives no memory analysis, so plan cannot measure.")
    names = ("argument", "output", "alias", "temp", "generated_code")
    out = {f"{n}_size_in_bytes": int(getattr(stats, f"{n}_size_in_bytes")) for n in names}
    out["peak_bytes"] = (
        out["argument_size_in_bytes"]
        + out["output_size_in_bytes"]
        - out["alias_size_in_bytes"]
        + out["temp_size_in_bytes"]
    )
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def emulation_shape(shape: dict[str, int], max_devices: int, rules: Any) -> dict[str, int]:
    """A mesh of at most `max_devices` devices to compile on in place of `shape`, each axis shrunk to a divisor of
    its size (so what divides the target's axis divides it too). Axes the batch is split over go first (their
    rows per device are kept by shrinking the batch with them): those that only split the batch (data), then
    those that also shard parameters (fsdp), kept at 2 while that is enough so that gathered weights still show
    as temporaries; the axes activations are split over (tensor) go last, in mesh order."""
    batch = _batch_axes(rules)
    params = {a for name, t in rules if name != "batch" for a in ((t,) if isinstance(t, str) else tuple(t or ()))}
    steps = [(a, 1) for a in shape if a in batch and a not in params]
    steps += [(a, min(2, shape[a])) for a in shape if a in batch and a in params]
    steps += [(a, 1) for a in shape if a in batch and a in params]
    steps += [(a, 1) for a in shape if a not in batch]
    out = dict(shape)
    for axis, floor in steps:
        while math.prod(out.values()) > max_devices and out[axis] > floor:
            rest = math.prod(out.values()) // out[axis]
            smaller = [d for d in _divisors(shape[axis]) if floor <= d < out[axis]]
            enough = [d for d in smaller if rest * d <= max_devices]
            out[axis] = max(enough) if enough else min(smaller)
    return out


def _devices_for(n: int, limit: int | None) -> list | None:
    """`n` devices to compile on: the default backend's if it has enough, else the host CPU's; None if neither
    (or if `limit` < n)."""
    if limit is not None and n > limit:
        return None
    for devices in (jax.devices, lambda: jax.devices("cpu")):
        try:
            found = devices()
        except RuntimeError:
            continue
        if len(found) >= n:
            return list(found[:n])
    return None


def local_device_memory() -> int | None:
    """The memory of the first local device (its allocator's limit), or None where the backend does not say."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # backends without memory stats
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def plannable(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` ready for planning without building or training anything: keys it reads from its tokenizer are
    read if that file exists (else a ConfigError says what to give), and paths to prerequisites are replaced by
    placeholders (they name data and pretrained weights, which never change a shape)."""
    plain = config.to_dict()
    plain.pop("prerequisites", None)
    if plain.get("from_tokenizer"):
        keys = ", ".join(k for k, _ in plain["from_tokenizer"])
        path = str((plain.get("data") or {}).get("tokenizer") or "")
        if not path or path.startswith(prerequisites.PREFIX) or not os.path.isfile(path):
            raise ConfigError(
                f"{keys} are read from the tokenizer {path or '(none)'}, which does not exist and which plan does "
                "not build: build it first (vlm-jax train does), or plan the config without a tokenizer."
            )
        plain = prerequisites.fill_from_tokenizer(plain)

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(strip(v) for v in node)
        if isinstance(node, str) and node.startswith(prerequisites.PREFIX):
            return f"(not built by plan: {node[len(prerequisites.PREFIX) :]})"
        return node

    return ml_collections.ConfigDict(strip(plain))


def plan(
    config: ml_collections.ConfigDict,
    mesh: str | None = None,
    devices: int | None = None,
    device_memory_gb: float | None = None,
    compile_devices: int | None = None,
) -> Plan:
    """The per-device memory of training `config` on `mesh` (default: the config's) over `devices` devices
    (default: the mesh's product; needed where the mesh has a -1). `device_memory_gb` (default: the local
    device's memory, if its backend says) decides `fits`. `compile_devices` caps how many local devices the
    train step may be compiled on (default: as many as there are)."""
    mesh = mesh or config.mesh
    pairs = sharding.parse_mesh(mesh)
    if devices is None:
        if any(size == -1 for _, size in pairs):
            raise ConfigError(f"mesh {mesh!r} has an axis of size -1: give --devices N, the target's device count.")
        devices = math.prod(size for _, size in pairs)
    if devices < 1:
        raise ConfigError(f"--devices is {devices}; a target has at least one device.")
    shape = sharding.mesh_shape(mesh, devices)
    if device_memory_gb is not None:
        if not device_memory_gb > 0:
            raise ConfigError(f"--device_memory_gb is {device_memory_gb}; give the memory of one device in GB.")
        memory = int(device_memory_gb * GB)
    else:
        memory = local_device_memory()
        if memory is None:
            raise ConfigError(
                f"the memory of the local {jax.devices()[0].platform} device is unknown: give --device_memory_gb, "
                "the memory of one target device in GB (e.g. 95 for a TPU v5p chip)."
            )
    config = plannable(config)
    with config.unlocked():
        config.mesh = ",".join(f"{a}={s}" for a, s in shape.items())
    config_lib.validate(config, devices)
    system = models.build(config)
    parts = exact_parts(config, shape, system)

    rules = tuple(tuple(r) for r in config.get("logical_axis_rules", sharding.DEFAULT_RULES))
    compile_on = _devices_for(devices, compile_devices)
    if compile_on is not None:
        stats = compiled_memory(config, compile_on)
        source, used, batch_size = "measured", shape, int(config.batch_size)
        own = parts
        method = (
            f"measured: XLA's memory analysis of the train step compiled for this mesh on {devices} "
            f"{compile_on[0].platform} device(s)"
        )
    else:
        available = max(len(jax.devices()), len(_cpu_devices()))
        limit = min(available, compile_devices) if compile_devices is not None else available
        used = emulation_shape(shape, limit, rules)
        rows = config.batch_size // _dp(shape, rules)
        small = ml_collections.ConfigDict(config.to_dict())
        batch_size = rows * _dp(used, rules)
        with small.unlocked():
            small.mesh = ",".join(f"{a}={s}" for a, s in used.items())
            small.batch_size = batch_size
        n = math.prod(used.values())
        stats = compiled_memory(small, _devices_for(n, None))
        own = exact_parts(small, used, system)
        source = "estimated"
        shrunk = [a for a in shape if used[a] < shape[a] and a not in _batch_axes(rules)]
        method = (
            f"estimated: the mesh needs {devices} devices and {limit} are at hand, so the train step was compiled "
            f"on mesh {small.mesh} with the same {rows} row(s) per device (batch_size={batch_size}) and its "
            "activations and temporaries (XLA's peak less its own parameters, optimizer state, gradients and "
            "batch) are carried over"
        )
        if shrunk:
            method += (
                f"; {', '.join(f'{a} was {shape[a]}, compiled at {used[a]}' for a in shrunk)}, so activations "
                "split over it are over-counted (a conservative estimate)"
            )
    activation = max(stats["peak_bytes"] - own.total, 0)
    return Plan(
        mesh=shape,
        parts=parts,
        activation_bytes=activation,
        activation_source=source,
        activation_method=method,
        compiled_mesh=dict(used),
        compiled_batch_size=batch_size,
        xla=stats,
        device_memory_bytes=memory,
    )


def _cpu_devices() -> list:
    try:
        return jax.devices("cpu")
    except RuntimeError:
        return []


def _batch_axes(rules: Any) -> set[str]:
    return {a for name, t in rules if name == "batch" for a in ((t,) if isinstance(t, str) else tuple(t or ()))}


def _dp(shape: dict[str, int], rules: Any) -> int:
    """The data-parallel size of a mesh of these axis sizes (what `batch` is split over)."""
    return math.prod(shape[a] for a in sharding.batch_axes(abstract_mesh(shape), rules))


def _gb(n: int) -> str:
    """Bytes as GB (10^9), or MB / kB where smaller."""
    for unit, size in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def report_lines(p: Plan, max_listed: int = 10) -> list[str]:
    """Human-readable lines, then one JSON object (`Plan.summary`) as the last line."""
    parts = p.parts
    mesh = ",".join(f"{a}={s}" for a, s in p.mesh.items())
    lines = [
        f"Per-device memory of a train step on mesh {mesh} ({math.prod(p.mesh.values())} devices):",
        f"  parameters       {_gb(parts.params_bytes):>14}  ({parts.num_params:,} parameters)",
        f"  optimizer state  {_gb(parts.opt_bytes):>14}  (of the {parts.num_trainable:,} trainable parameters)",
        f"  gradients        {_gb(parts.grad_bytes):>14}  (trainable parameters only, sharded like them)",
        f"  batch            {_gb(parts.batch_bytes):>14}",
        f"  activations      {_gb(p.activation_bytes):>14}  ({p.activation_source}; and other temporaries)",
        f"  total            {_gb(p.total_bytes_per_device):>14}  of {_gb(p.device_memory_bytes)}: "
        + ("fits" if p.fits else "does NOT fit"),
        f"Parameters, optimizer state, gradients and batch are exact (shapes and sharding rules); activations are "
        f"{p.activation_method}.",
    ]
    if parts.replicated_dims:
        shown = parts.replicated_dims[:max_listed]
        lines.append(
            f"{len(parts.replicated_dims)} parameter dimension(s) that the sharding rules map to mesh axes are "
            "replicated instead:"
        )
        lines += [f"  {line}" for line in shown]
        if len(parts.replicated_dims) > max_listed:
            lines.append(f"  ... {len(parts.replicated_dims) - max_listed} more")
    if parts.replicated_params:
        total = sum(b for _, _, b in parts.replicated_params)
        lines.append(
            f"{len(parts.replicated_params)} parameter(s) are whole on every device ({_gb(total)} each device), "
            "the largest:"
        )
        lines += [f"  {path} {list(shape)}: {_gb(b)}" for path, shape, b in parts.replicated_params[:5]]
    lines.append(json.dumps(p.summary()))
    return lines
