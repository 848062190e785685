"""orbax checkpoints of a training run: the train state, the data-iterator state and the config.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`. orbax writes each step
into a temporary directory and renames it when complete, so a crash during a
save leaves no step directory that restores wrong; `latest_step` only sees
finalized steps, and leftover temporary directories are removed at start-up.

`data` holds the data-iterator state of every process, written by Grain's own
orbax handler (`grain.checkpoint`: `process_<i>-of-<n>.json`, one per process)
in the same atomic step as the train state, which every process writes its
shards of. A run restarted with another number of processes restores the
train state and says that its data starts afresh.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    """Saves and restores (state, data state, config) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
            item_names=("state", "data", "config"),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data: grain.DatasetIterator | None,
        config: ml_collections.ConfigDict,
        force: bool = False,
    ) -> None:
        """Starts an (async) save of step `step` on every process; `close()` waits until it is on disk.

        `data` is this process's pipeline iterator (None: no data state, e.g. an imported checkpoint); its
        state is taken now, by Grain's handler."""
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config.to_dict())}
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data)
        self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data: grain.DatasetIterator | None = None) -> Any:
        """The state placed as `abstract_state`'s shardings say; `data` (this process's pipeline iterator) is set
        to its saved state when the checkpoint has one for this process (same number of processes)."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data is not None:
            saved_by = self.data_processes(step)
            if saved_by == jax.process_count():
                args["data"] = grain.checkpoint.CheckpointRestore(data)
            elif jax.process_index() == 0:
                saved = f"was saved by {saved_by} process(es)" if saved_by else "is missing"
                print(
                    f"Note: the data state of step {step} {saved} and this run has {jax.process_count()}: the "
                    "train state is restored, the data pipeline starts from its beginning.",
                    file=sys.stderr,
                )
        return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

    def data_processes(self, step: int) -> int:
        """How many processes wrote the data state of step `step` (0 if it has none)."""
        names = [p.name for p in (epath.Path(self.directory) / str(step) / "data").glob("process_*-of-*.json")]
        return int(names[0].rsplit("-of-", 1)[1].removesuffix(".json")) if names else 0

    def config(self, step: int) -> ml_collections.ConfigDict:
        """The config a checkpoint was written with."""
        return ml_collections.ConfigDict(
            self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        )

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve(path: str) -> tuple[str, int]:
    """`--checkpoint` argument -> (workdir, step): a workdir (its latest step) or a step directory."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        workdir = path
        step = Checkpointer(workdir, async_save=False).latest_step()
        if step is None:
            raise FileNotFoundError(f"{path} holds no complete checkpoint.")
        return workdir, step
    parent, name = os.path.split(path)
    if os.path.basename(parent) == CHECKPOINT_DIR and name.isdigit():
        return os.path.dirname(parent), int(name)
    raise FileNotFoundError(f"{path} is neither a workdir with checkpoints nor a step directory inside one.")


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings: the restore target for orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def fit_mesh(spec: str, num_devices: int) -> str:
    """A mesh spec like `spec` that fits `num_devices` devices: each fixed axis keeps the largest size that divides
    both its own and what the devices leave (the gcd), and the `-1` axis (else "data", else the first) takes the
    rest; e.g. "data=8" -> "data=1" on one device, "data=-1,fsdp=16,tensor=2" -> "data=1,fsdp=8,tensor=1" on 8."""
    import math

    from vlm_jax import sharding

    pairs = sharding.parse_mesh(spec)
    names = [n for n, _ in pairs]
    rest = next((n for n, s in pairs if s == -1), "data" if "data" in names else names[0])
    sizes, used = {}, 1
    for name, size in pairs:
        if name != rest:
            sizes[name] = math.gcd(size, num_devices // used)
            used *= sizes[name]
    sizes[rest] = num_devices // used
    return ",".join(f"{n}={sizes[n]}" for n in names)


def load_mesh(config: ml_collections.ConfigDict, devices: list | None = None) -> jax.sharding.Mesh:
    """The mesh a checkpoint's params are loaded on: its config's `mesh` over `devices` (default: all devices;
    "fsdp=-1" for a config without one, such as a `convert-hf` output), or, when that mesh does not fit the
    devices present (saved on 8 devices, opened on 1), `fit_mesh` of it, said on stderr."""
    from vlm_jax import sharding

    devices = list(jax.devices() if devices is None else devices)
    spec = config.get("mesh") or "fsdp=-1"
    try:
        sharding.mesh_shape(spec, len(devices))
    except sharding.ShardingError:
        fitted = fit_mesh(spec, len(devices))
        print(
            f"Note: the config's mesh {spec!r} does not fit the {len(devices)} device(s) here; "
            f"params are loaded on mesh {fitted!r} instead.",
            file=sys.stderr,
        )
        spec = fitted
    return sharding.make_mesh(spec, devices)


def config_rules(config: ml_collections.ConfigDict) -> tuple:
    """The config's `logical_axis_rules` as a tuple of pairs (the default rules where it has none)."""
    from vlm_jax import sharding

    return tuple(tuple(r) for r in config.get("logical_axis_rules", sharding.DEFAULT_RULES))


class SavedParams:
    """The params of one checkpoint step before any array is read: the config they were saved with, its
    system, and their abstract tree; `abstract` places them on a mesh and `restore` reads any part of them.

    `path` is a `--checkpoint` argument (`resolve`)."""

    def __init__(self, path: str):
        import flax.linen as nn

        from vlm_jax import models

        self.path = path
        self.workdir, self.step = resolve(path)
        self.config = Checkpointer(self.workdir, async_save=False).config(self.step)
        self.system = models.build(self.config)
        self.boxed = jax.eval_shape(self.system.init, jax.random.key(0), self.system.dummy_batch(1))
        self.shapes = nn.unbox(self.boxed)

    def abstract(self, mesh: jax.sharding.Mesh, rules: Any) -> Any:
        """ShapeDtypeStructs of every param, sharded on `mesh` as `rules` shard the saved model's params."""
        from vlm_jax import sharding

        return abstract_like(self.shapes, sharding.tree_shardings(self.boxed, rules, mesh))

    def restore(self, target: Any) -> Any:
        """Reads the params of `target` (a tree of ShapeDtypeStructs with shardings, shaped like the params or any
        part of them: absent keys are not read) straight into those shardings: each device reads its own shard
        (orbax); nothing else (optimizer state, other params) is read."""
        ckpt = Checkpointer(self.workdir, async_save=False)
        restored = ckpt.manager.restore(
            self.step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": target},
                    restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}),
                    partial_restore=True,
                )
            ),
        )
        ckpt.close()
        return restored["state"]["params"]


def load_params(
    path: str, mesh: jax.sharding.Mesh | str | None = None, rules: Any = None
) -> tuple[ml_collections.ConfigDict, Any, Any]:
    """(config, system, params) from a `--checkpoint` path, the params read straight into their shardings on
    `mesh` (a Mesh, or a spec such as "fsdp=4,tensor=2" over all devices; default: `load_mesh`, the saved
    config's mesh fitted to the devices present) by `rules` (default: the config's `logical_axis_rules`).

    A checkpoint restores on any mesh and process count; only the parameters are read (not the optimizer
    state), each device reading its own shards (never a replicated or whole host copy)."""
    from vlm_jax import sharding

    saved = SavedParams(path)
    if mesh is None:
        mesh = load_mesh(saved.config)
    elif isinstance(mesh, str):
        mesh = sharding.make_mesh(mesh)
    rules = config_rules(saved.config) if rules is None else tuple(tuple(r) for r in rules)
    return saved.config, saved.system, saved.restore(saved.abstract(mesh, rules))
