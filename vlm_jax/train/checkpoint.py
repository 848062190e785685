"""orbax checkpoints of a training run: the train state, the data-iterator state and the config.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`. orbax writes each step
into a temporary directory and renames it when complete, so a crash during a
save leaves no step directory that restores wrong; `latest_step` only sees
finalized steps, and leftover temporary directories are removed at start-up.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

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
        self, step: int, state: Any, data_state: dict, config: ml_collections.ConfigDict, force: bool = False
    ) -> None:
        """Starts an (async) save of step `step`; `close()` waits until it is on disk."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config.to_dict()),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state placed as `abstract_state`'s shardings say, data-iterator state)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["data"]

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


def load_params(path: str, devices: list | None = None) -> tuple[ml_collections.ConfigDict, Any, Any]:
    """(config, system, params) from a `--checkpoint` path, params replicated on `devices`.

    Only the parameters are read (not the optimizer state).
    """
    import flax.linen as nn
    import numpy as np

    from vlm_jax import models

    workdir, step = resolve(path)
    ckpt = Checkpointer(workdir, async_save=False)
    config = ckpt.config(step)
    system = models.build(config)
    devices = list(jax.devices() if devices is None else devices)
    replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(devices), ("d",)), jax.sharding.PartitionSpec()
    )
    boxed = jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(1))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), nn.unbox(boxed))
    restored = ckpt.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={"params": target},
                restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}),
                partial_restore=True,
            )
        ),
    )
    ckpt.close()
    return config, system, restored["state"]["params"]
