"""Runs any config on this machine: `python launch/local.py [--processes N] [--cpu_devices D] [--] ARGS`.

ARGS are `vlm-jax train` arguments (`--config ... --workdir ... --config.x=y`).
`--cpu_devices D` makes XLA expose D CPU devices per process, so a mesh such as
`data=2,fsdp=2,tensor=2` can be tried on a laptop before it goes to a pod.
`--processes N` starts N processes of the same command on localhost, joined
by JAX's distributed runtime (process 0 is the coordinator; CPU collectives
go through gloo): the multi-host code path — per-process data, collective
checkpoints, agreed preemption — on one machine. SIGTERM or SIGINT to this
launcher reaches every process, which then stop at the same step and save;
if one process fails, the others are stopped.

    python launch/local.py --cpu_devices 8 --config configs/lm.py:variant=tiny \\
        --workdir workdirs/lm_mesh --config.mesh=data=2,fsdp=2,tensor=2
    python launch/local.py --processes 2 --cpu_devices 4 -- --config configs/lm.py:variant=tiny \\
        --workdir workdirs/lm_2proc
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(cpu_devices: int) -> dict[str, str]:
    """This process's environment, with XLA told to expose `cpu_devices` CPU devices (0: unchanged)."""
    env = dict(os.environ)
    if cpu_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def commands(processes: int, train_args: list[str], port: int) -> list[list[str]]:
    """The `vlm-jax train` command line of each process."""
    base = [sys.executable, "-m", "vlm_jax.cli", "train", *train_args]
    if processes == 1:
        return [base]
    joined = ["--coordinator_address", f"localhost:{port}", "--num_processes", str(processes)]
    return [base + joined + ["--process_id", str(i)] for i in range(processes)]


def run(processes: int, env: dict[str, str], argv_per_process: list[list[str]]) -> int:
    """Starts the processes, passes SIGTERM / SIGINT on to all, stops the rest when one fails; the exit status
    is the first non-zero status of any process (0 if all succeed)."""
    children = [subprocess.Popen(argv, env=env) for argv in argv_per_process]

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    status = 0
    while any(child.poll() is None for child in children):
        failed = [child.returncode for child in children if child.returncode not in (None, 0)]
        if failed and status == 0:
            status = failed[0]
            if status not in (128 + signal.SIGTERM, 128 + signal.SIGINT):  # a crash, not an agreed stop
                print(f"launch/local.py: a process exited with status {status}; stopping the others.", file=sys.stderr)
                for child in children:
                    if child.poll() is None:
                        child.terminate()
        time.sleep(0.2)
    return status or next((c.returncode for c in children if c.returncode), 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=1, help="processes on localhost (default 1)")
    parser.add_argument("--cpu_devices", type=int, default=0, help="emulate D CPU devices per process (0: XLA's)")
    args, train_args = parser.parse_known_args(argv)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    if args.cpu_devices < 0:
        sys.exit(f"--cpu_devices must be positive, got {args.cpu_devices}.")
    if args.processes < 1:
        sys.exit(f"--processes must be positive, got {args.processes}.")
    env = environment(args.cpu_devices)
    argv_per_process = commands(args.processes, train_args, free_port())
    if args.processes == 1:
        print("+", " ".join(argv_per_process[0]), file=sys.stderr, flush=True)
        os.execvpe(sys.executable, argv_per_process[0], env)
    print(f"+ {args.processes} processes: {' '.join(argv_per_process[0])}", file=sys.stderr, flush=True)
    sys.exit(run(args.processes, env, argv_per_process))


if __name__ == "__main__":
    main()
