"""Joins JAX's multi-controller runtime when a run spans several processes.

Every process of a multi-host run executes the same `vlm-jax` command; before
anything touches a device, `initialize` connects it to the others through
`jax.distributed.initialize`:

- explicitly, with `--coordinator_address HOST:PORT --num_processes N
  --process_id I` (what `launch/local.py --processes N` passes on localhost);
- automatically, where JAX recognises the cluster it runs in (SLURM under
  `srun`, Cloud TPU VM pods, Open MPI, Kubernetes JobSets): the same detection
  `jax.distributed.initialize()` performs, asked first so that a laptop or a
  single machine outside a cluster stays a plain single process.

After it, `jax.process_index()` / `jax.process_count()` say who is who; the
trainer, the data pipelines, orbax and Grain take it from there.
"""

from __future__ import annotations

import sys

from vlm_jax.errors import UserError

FLAGS = {
    "coordinator_address": "HOST:PORT of process 0's coordinator (multi-process runs outside SLURM / TPU pods)",
    "num_processes": "how many processes the run has (with --coordinator_address)",
    "process_id": "this process's index, 0 .. num_processes-1 (with --coordinator_address)",
}


def detected_cluster() -> str | None:
    """The name of the cluster environment JAX would auto-detect here (e.g. "SlurmCluster"), or None.

    Uses the same list of environments and the same order as `jax.distributed.initialize()` with no arguments.
    """
    from jax._src.clusters import ClusterEnv  # JAX's own detection; there is no public API that only asks

    for env in ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__
    return None


def initialize(
    coordinator_address: str | None = None, num_processes: int | str | None = None, process_id: int | str | None = None
) -> bool:
    """Connects this process to the run's other processes; True if the run is now multi-controller.

    With none of the three arguments, initialises only where a cluster environment is detected. With some,
    all three are required. Safe to call twice (the second call does nothing).
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    given = {k: v for k, v in zip(FLAGS, (coordinator_address, num_processes, process_id)) if v not in (None, "")}
    if given and len(given) < len(FLAGS):
        missing = ", ".join(f"--{k}" for k in FLAGS if k not in given)
        raise UserError(
            f"a multi-process run needs --coordinator_address, --num_processes and --process_id; missing {missing}."
        )
    if given:
        try:
            count, index = int(given["num_processes"]), int(given["process_id"])
        except ValueError:
            raise UserError("--num_processes and --process_id must be integers.") from None
        if count < 1 or not 0 <= index < count:
            raise UserError(f"--process_id must be in 0..{count - 1} for --num_processes={count}, got {index}.")
        jax.distributed.initialize(
            coordinator_address=given["coordinator_address"], num_processes=count, process_id=index
        )
    elif (cluster := detected_cluster()) is not None:
        jax.distributed.initialize()
        if jax.process_index() == 0:
            print(f"Note: joined a {jax.process_count()}-process run ({cluster} detected).", file=sys.stderr)
    else:
        return False
    return True


def is_main() -> bool:
    """Whether this is process 0, the one that prints results and writes reports (True in a single process)."""
    import jax

    return jax.process_index() == 0


def process_label() -> str:
    """ "[process I/N] " in a multi-process run (for messages every process prints), else ""."""
    import jax

    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return ""
    return f"[process {jax.process_index()}/{jax.process_count()}] "
