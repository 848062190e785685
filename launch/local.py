"""Runs any config on this machine: `python launch/local.py [--cpu_devices N] [--] ARGS`.

ARGS are `vlm-jax train` arguments (`--config ... --workdir ... --config.x=y`).
`--cpu_devices N` makes XLA expose N CPU devices, so a mesh such as
`data=2,fsdp=2,tensor=2` can be tried on a laptop before it goes to a pod.

    python launch/local.py --cpu_devices 8 --config configs/lm.py:variant=tiny \\
        --workdir workdirs/lm_mesh --config.mesh=data=2,fsdp=2,tensor=2
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu_devices", type=int, default=0, help="emulate N CPU devices (0: leave XLA's default)")
    args, train_args = parser.parse_known_args(argv)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    env = dict(os.environ)
    if args.cpu_devices:
        if args.cpu_devices < 1:
            sys.exit(f"--cpu_devices must be positive, got {args.cpu_devices}.")
        env["XLA_FLAGS"] = (
            f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.cpu_devices}".strip()
        )
        env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "vlm_jax.cli", "train", *train_args]
    print("+", " ".join(command), file=sys.stderr, flush=True)
    os.execvpe(sys.executable, command, env)


if __name__ == "__main__":
    main()
