"""Kill -9 trials: a run killed at random moments and restarted on the same workdir ends bit-identical.

    python benchmarks/kill_trials.py [--trials 10] [--kills 3] [--steps 60] [--out FILE]

Method. One uninterrupted `vlm-jax train` of the tiny LM (`--steps` steps, a
checkpoint every 5, asynchronous saves) gives the reference parameters. Each
trial then runs the same command on a fresh workdir, SIGKILLs it `--kills`
times, restarts it each time (odd kills: a random delay of 0-2 s after the
train step has compiled, landing between and inside steps; even kills: 0-50
ms after the log line of a checkpoint step, right after which the loop
starts the asynchronous save), lets the last start run to the end, and
compares its final parameters with the reference, bit for bit. Reported: trials
identical / trials, the kills that left an unfinished checkpoint directory
behind (a save in flight), and the steps each restart resumed from. The last
line is JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir: str, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "vlm_jax.cli", "train", "--config", os.path.join(REPO, "configs/lm.py:variant=tiny"),
        "--workdir", workdir, f"--config.total_steps={steps}", "--config.checkpoint_every=5", "--config.log_every=5",
        "--config.keep_checkpoints=3", "--config.eval_every=0", "--config.peak_tflops=1.0",
    ]  # fmt: skip


def killed_run(workdir: str, steps: int, delay: float, at_a_save: bool) -> tuple[bool, int | None]:
    """Starts the run and SIGKILLs it `delay` s after its train step compiled, or, `at_a_save`, `delay` s after
    the log line of a checkpoint step (the loop logs, then starts the save); (a save in flight, resumed-from)."""
    proc = subprocess.Popen(command(workdir, steps), stderr=subprocess.PIPE, text=True, cwd=REPO)
    resumed, compiled = None, False
    for line in proc.stderr:
        if line.startswith("Resuming from step"):
            resumed = int(line.split()[3].rstrip(":"))
        compiled = compiled or line.startswith("Compiled the train step")
        if compiled and (not at_a_save or line.startswith("[train] step")):
            break
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    in_flight = bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))
    return in_flight, resumed


def final_params(workdir: str):
    from vlm_jax.train.checkpoint import load_params

    return jax.device_get(load_params(workdir)[2])


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = tempfile.mkdtemp(prefix="kill_trials_")
    reference = os.path.join(root, "reference")
    subprocess.run(command(reference, args.steps), check=True, capture_output=True, cwd=REPO)
    want = final_params(reference)
    identical, in_flight, resumed_from = 0, 0, []
    for trial in range(args.trials):
        workdir = os.path.join(root, f"trial{trial}")
        for kill in range(args.kills):
            at_a_save = kill % 2 == 1
            delay = rng.uniform(0.0, 0.05) if at_a_save else rng.uniform(0.0, 2.0)
            saving, resumed = killed_run(workdir, args.steps, delay, at_a_save)
            in_flight += saving
            resumed_from.append(resumed)
        done = subprocess.run(command(workdir, args.steps), capture_output=True, text=True, cwd=REPO)
        got = final_params(workdir) if done.returncode == 0 else None
        same = got is not None and all(jax.tree.leaves(jax.tree.map(np.array_equal, got, want)))
        identical += same
        print(f"trial {trial}: {'identical' if same else 'DIFFERENT (exit ' + str(done.returncode) + ')'}", flush=True)
        shutil.rmtree(workdir)
    shutil.rmtree(root)
    result = {
        "trials": args.trials,
        "identical": identical,
        "kills": args.trials * args.kills,
        "kills_with_a_save_in_flight": in_flight,
        "restarts_resumed_from": resumed_from,
        "steps": args.steps,
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
