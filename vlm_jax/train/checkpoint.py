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

Faults (docs/reliability.md): a workdir that cannot be written is one sentence
before any compute (`check_writable`); a save that fails (a full disk) is one
sentence naming the intact step it leaves; a step that cannot be read back (a
truncated file, a missing item) is moved to `WORKDIR/unreadable_checkpoints/`
and training resumes from the newest step that reads (`restore_newest`), saying
so; a checkpoint whose arrays do not fit the config's train state (another model
shape, another optimizer) is one sentence naming the first difference.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from typing import Any, Callable

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from vlm_jax.errors import ConfigError, UserError

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"


def check_writable(workdir: str) -> None:
    """One sentence when `workdir` (created if missing) cannot hold checkpoints: tried by writing a file there."""
    try:
        directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UserError(
            f"the workdir {workdir} cannot be written ({e.strerror or e}): give a --workdir on a writable disk."
        ) from None


def _reason(error: BaseException) -> str:
    """The first line of an exception, shortened: what a one-sentence message quotes."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


class Checkpointer:
    """Saves and restores (state, data state, config) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        self._unsaved_step: int | None = None  # the step of the save in flight
        self._saved_step: int | None = None  # the newest step known to be complete on disk (set by `save`)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
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
        if self._saved_step is None:
            self._saved_step = self.latest_step()
        with self._failures_named():
            self.manager.save(step, args=ocp.args.Composite(**items), force=force)  # first waits for the last one
        self._saved_step = self._saved_step if self._unsaved_step is None else self._unsaved_step
        self._unsaved_step = step

    @contextlib.contextmanager
    def _failures_named(self):
        """A failed write (a full disk, a file-size limit, a vanished directory) -> one sentence naming the step
        it leaves intact; orbax never finalizes a step whose write failed."""
        try:
            yield
        except Exception as e:  # orbax and tensorstore raise many kinds for an I/O failure
            intact = (
                f"the newest complete checkpoint, step {self._saved_step}, is intact"
                if self._saved_step is not None
                else "there is no complete checkpoint yet"
            )
            raise UserError(
                f"writing a checkpoint to {self.directory} failed ({_reason(e)}), e.g. because the disk is "
                f"full; {intact}: free space and run the same command to resume."
            ) from e

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

    def restore_newest(
        self, abstract_state: Any, data: grain.DatasetIterator | None, check_config: Callable[[Any], None]
    ) -> tuple[int, Any] | None:
        """(step, state) of the newest step that reads back, or None when there is no step at all.

        Each step's config goes through `check_config` (a ConfigError stops here) and its arrays are compared with
        `abstract_state` before anything is read. A step that cannot be read is moved to `unreadable_checkpoints/`
        (one sentence on stderr) and the next older one is tried; when none reads, one sentence says so."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        for step in steps:
            try:
                saved_config = self.config(step)
            except Exception as e:
                self._set_aside(step, e)
                continue
            check_config(saved_config)
            try:
                metadata = self.manager.item_metadata(step)["state"]
                if metadata is None:
                    raise FileNotFoundError("its train state has no metadata")
            except Exception as e:
                self._set_aside(step, e)
                continue
            check_same_arrays(metadata, abstract_state, self.directory, step)
            try:
                state = self.restore(step, abstract_state, data)
            except Exception as e:
                self._set_aside(step, e)
                continue
            return step, state
        raise UserError(
            f"none of the {len(steps)} checkpoint(s) in {self.directory} can be read (each was moved to "
            f"{os.path.join(self.workdir, UNREADABLE_DIR)}): run the same command to start afresh, or give a new "
            "--workdir."
        )

    def _set_aside(self, step: int, error: BaseException) -> None:
        """Moves an unreadable step out of the way (so no later save collides with it), saying why."""
        target = os.path.join(self.workdir, UNREADABLE_DIR, str(step))
        if jax.process_index() == 0:
            if os.path.exists(target):
                shutil.rmtree(target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
            print(
                f"Note: the checkpoint of step {step} cannot be read ({_reason(error)}); it was moved to {target} "
                "and an older step is tried.",
                file=sys.stderr,
            )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"vlm_jax_set_aside_{step}")
        self.manager.reload()

    def close(self) -> None:
        with self._failures_named():
            self.manager.wait_until_finished()
        self.manager.close()
        if self._unsaved_step is not None:
            self._saved_step, self._unsaved_step = self._unsaved_step, None


def check_same_arrays(metadata: Any, abstract_state: Any, directory: str, step: int) -> None:
    """One sentence when a checkpoint's arrays (orbax metadata) are not the arrays of `abstract_state`: a path
    only one side has (another optimizer, another model part) or another shape (another model size)."""

    def flat(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
        return {_path_name(p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}

    saved, wanted = flat(metadata), flat(abstract_state)
    where = f"the checkpoint of step {step} in {directory}"
    for name in sorted(set(saved) | set(wanted)):
        if name not in wanted:
            problem = f"holds {name}, which this config's train state has no place for"
        elif name not in saved:
            problem = f"has no {name}, which this config's train state needs"
        elif saved[name] != wanted[name]:
            problem = f"holds {name} of shape {saved[name]} but this config's is {wanted[name]}"
        else:
            continue
        raise ConfigError(
            f"{where} {problem} (another model or optimizer): use the config it was written with to resume, or "
            "a new --workdir."
        )


def _path_name(path: tuple) -> str:
    """'params/embed/embedding', 'opt_state/inner_state/0/mu/...': one naming for orbax metadata and live trees."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


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
        # A manager of its own: a partial restore takes the PyTree handler, not the Checkpointer's Standard one.
        manager = ocp.CheckpointManager(os.path.join(self.workdir, CHECKPOINT_DIR), item_names=("state",))
        restored = manager.restore(
            self.step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": target},
                    restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}),
                    partial_restore=True,
                )
            ),
        )
        manager.close()
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
