"""Runs the same `vlm-jax train` on every worker of a Cloud TPU VM (a pod slice) through `gcloud`.

    python launch/tpu_pod.py --tpu NAME --zone ZONE [--project P] [--setup] [--repo_dir DIR] [--python PY] \\
        [--dry_run] -- <vlm-jax train args>
    python launch/tpu_pod.py --tpu NAME --zone ZONE [--project P] --stop

Every command goes through `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command ...`, so
it runs on all workers (one per TPU VM host) at once. On each worker the trainer joins the others by
itself: JAX finds the coordinator from the TPU metadata, nothing is passed.

--setup first packs this checkout (the files git tracks plus untracked ones it does not ignore) into a
tarball, copies it to every worker with `gcloud compute tpus tpu-vm scp --worker=all`, unpacks it into
--repo_dir (relative to the worker's home) and installs it with `PY -m pip install -e . "jax[tpu]==V"`
from the libtpu wheel index, V being this machine's jax version. Without train arguments --setup only sets
up. The train arguments go after `--`, each shell-quoted, and run as `cd DIR && exec PY -m vlm_jax.cli
train ARGS` (the `vlm-jax` entry point itself, which needs no PATH entry for pip's script folder).
--workdir must be a directory every worker shares: an NFS / Filestore mount (a gs:// bucket path only where
the trainer writes its workdir through etils epath; docs/scaling.md says where that stands).

Ctrl-C or SIGTERM while a run is going does not cut the ssh sessions: it sends SIGTERM to the trainer on
every worker (what --stop does: `pkill -TERM -f` the trainer), the trainers agree on a step, save a
checkpoint and exit, and their output keeps streaming until they do. A second signal stops waiting.
--dry_run prints the commands (one per line, shell-quoted) instead of running them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PROG = "tpu_pod.py"
REPO = Path(__file__).resolve().parent.parent
LIBTPU_INDEX = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
REMOTE_ARCHIVE = "vlm_jax_src.tar.gz"  # in each worker's home directory
# Matches `vlm-jax train ...` and `python -m vlm_jax.cli train ...`, but not the pkill command line itself.
TRAINER_PATTERN = "vlm(-jax|_jax[.]cli) train"
ARCHIVE_PLACEHOLDER = "TMP/vlm_jax_src.tar.gz"  # stands for a temporary file in --dry_run output


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one sentence and exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:
        fail(f"{message}; see --help.")


def fail(message: str) -> None:
    """Prints `tpu_pod.py: MESSAGE` to stderr and exits with status 2."""
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(launcher options, vlm-jax train arguments): everything after the first `--` is for `vlm-jax train`."""
    if "--" in argv:
        cut = argv.index("--")
        own, train_args = argv[:cut], argv[cut + 1 :]
    else:
        own, train_args = argv, []
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", help="the TPU VM's name (as in `gcloud compute tpus tpu-vm list`)")
    parser.add_argument("--zone", help="its zone, e.g. us-east5-a")
    parser.add_argument("--project", help="its Google Cloud project (default: gcloud's configured project)")
    parser.add_argument("--setup", action="store_true", help="copy this checkout to every worker and install it")
    parser.add_argument("--stop", action="store_true", help="send SIGTERM to the trainer on every worker")
    parser.add_argument("--repo_dir", default="vlm_jax", help="the checkout on the workers (relative: to home)")
    parser.add_argument("--python", default="python3", help="the workers' Python (>= 3.11) interpreter")
    parser.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args(own)
    missing = [f"--{name}" for name in ("tpu", "zone") if not getattr(args, name)]
    if missing:
        fail(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (the TPU VM to run on).")
    if args.stop and (args.setup or train_args):
        fail("--stop only stops a run; give it neither --setup nor train arguments.")
    if not (args.stop or args.setup or train_args):
        fail("nothing to run: put the vlm-jax train arguments after `--` (or pass --setup or --stop).")
    if train_args:
        workdir = _workdir(train_args)
        if workdir is None:
            fail("the train arguments need --workdir DIR, on storage every worker shares (e.g. a Filestore mount).")
        if not workdir.startswith("gs://"):
            print(
                f"{PROG}: note: --workdir {workdir} is not a gs:// path; it must be a mount every worker shares "
                "(NFS / Filestore), or each worker writes its own part of every checkpoint to its own disk.",
                file=sys.stderr,
            )
    return args, train_args


def _workdir(train_args: list[str]) -> str | None:
    """The value of --workdir in the train arguments, or None."""
    for i, arg in enumerate(train_args):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(train_args):
            return train_args[i + 1]
    return None


def remote_path(path: str) -> str:
    """`path` quoted for the workers' shell, keeping a leading `~/` expandable (as "$HOME"/...)."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def gcloud(verb: str, args: argparse.Namespace, *rest: str) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB ...` aimed at all workers of args.tpu."""
    project = ["--project", args.project] if args.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, "--zone", args.zone, *project, "--worker=all"]


def ssh_all(args: argparse.Namespace, command: str) -> list[str]:
    """The gcloud command running the shell command `command` on every worker at once."""
    return gcloud("ssh", args, args.tpu) + ["--command", command]


def jax_requirement() -> str:
    """`jax[tpu]==V` with this machine's jax version V, so the pod runs the jax the code was tried with."""
    try:
        return f"jax[tpu]=={importlib.metadata.version('jax')}"
    except importlib.metadata.PackageNotFoundError:
        return "jax[tpu]"


def setup_command(args: argparse.Namespace) -> str:
    """The shell command each worker runs for --setup: check Python, unpack the checkout, pip install it."""
    py, repo = shlex.quote(args.python), remote_path(args.repo_dir)
    check = (
        "import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else "
        '"vlm_jax needs Python >= 3.11 on every worker; %s is %d.%d (pass --python)." % (sys.executable, v[0], v[1]))'
    )
    return " && ".join(
        [
            f"{py} -c {shlex.quote(check)}",
            f"mkdir -p {repo}",
            f"tar -xzf ~/{REMOTE_ARCHIVE} -C {repo}",
            f"cd {repo}",
            f"{py} -m pip install -e . {shlex.quote(jax_requirement())} -f {LIBTPU_INDEX}",
        ]
    )


def train_command(args: argparse.Namespace, train_args: list[str]) -> str:
    """The shell command each worker runs: `cd DIR && exec PY -m vlm_jax.cli train ARGS` (ARGS shell-quoted).

    `exec` leaves one process whose command line is the trainer's, so --stop's pkill finds only it.
    """
    return f"cd {remote_path(args.repo_dir)} && exec {shlex.quote(args.python)} -m vlm_jax.cli train " + shlex.join(
        train_args
    )


def stop_command(args: argparse.Namespace) -> list[str]:
    """The gcloud command sending SIGTERM to the trainer on every worker (a worker without one is no error)."""
    return ssh_all(args, f'pkill -TERM -f {shlex.quote(TRAINER_PATTERN)} && echo "$(hostname): sent SIGTERM" || true')


def checkout_files(repo: Path) -> list[str]:
    """The checkout's files as git sees them: tracked ones that exist plus untracked ones not ignored."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        fail(f"--setup copies the git checkout {repo}, and `git ls-files` failed there ({e}).")
    names = sorted({name for name in out.decode().split("\0") if name})
    return [name for name in names if (repo / name).is_file()]


def pack(repo: Path, archive: str) -> int:
    """Writes the checkout's files (`checkout_files`) into the gzipped tarball `archive`; returns their count."""
    files = checkout_files(repo)
    with tarfile.open(archive, "w:gz") as tar:
        for name in files:
            tar.add(repo / name, arcname=name, recursive=False)
    return len(files)


def _ignore_sigint() -> None:
    """Child processes ignore the terminal's Ctrl-C: the launcher decides what a Ctrl-C means."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_step(command: list[str]) -> None:
    """Runs one setup command; a failure ends the launcher with that command's exit status."""
    print("+", shlex.join(command), file=sys.stderr, flush=True)
    rc = subprocess.call(command)
    if rc != 0:
        print(f"{PROG}: this step failed with exit status {rc}: {shlex.join(command)}", file=sys.stderr)
        sys.exit(rc)


def run_forwarding_signals(command: list[str], stop: list[str]) -> int:
    """Runs `command` (the pod run); the first SIGINT/SIGTERM runs `stop` and waits, a second stops waiting.

    Returns the run's exit status; a run that was stopped and still reports 0 returns 128 + the signal.
    """
    caught: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    print("+", shlex.join(command), file=sys.stderr, flush=True)
    proc = subprocess.Popen(command, preexec_fn=_ignore_sigint)
    stopping = False
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                return rc if rc != 0 or not caught else 128 + caught[0]
            except subprocess.TimeoutExpired:
                pass
            if caught and not stopping:
                stopping = True
                print(
                    f"{PROG}: caught {signal.Signals(caught[0]).name}: sending SIGTERM to the trainer on every worker; "
                    "they agree on a step, save and exit (signal again to stop waiting).",
                    file=sys.stderr,
                    flush=True,
                )
                print("+", shlex.join(stop), file=sys.stderr, flush=True)
                subprocess.call(stop, preexec_fn=_ignore_sigint)
            elif len(caught) > 1:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                print(
                    f"{PROG}: stopped waiting; the trainers were sent SIGTERM and save on their own "
                    f"(check with: {shlex.join(ssh_all_pgrep(command))}).",
                    file=sys.stderr,
                )
                return 128 + caught[-1]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ssh_all_pgrep(run: list[str]) -> list[str]:
    """The run's gcloud command with its --command replaced by a pgrep of the trainer (to see who still runs)."""
    cut = run.index("--command")
    return run[:cut] + ["--command", f'pgrep -af {shlex.quote(TRAINER_PATTERN)} || echo "$(hostname): none"']


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, then prints (--dry_run) or runs the setup, the run or the stop; returns the status."""
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    steps: list[tuple[str, list[str]]] = []  # (what, command); "pack" is done here, not by a command
    if args.stop:
        steps.append(("stop", stop_command(args)))
    if args.setup:
        steps.append(("pack", ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"]))
        steps.append(("setup", gcloud("scp", args, ARCHIVE_PLACEHOLDER, f"{args.tpu}:{REMOTE_ARCHIVE}")))
        steps.append(("setup", ssh_all(args, setup_command(args))))
    if train_args:
        steps.append(("run", ssh_all(args, train_command(args, train_args))))

    if args.dry_run:
        for what, command in steps:
            if what == "pack":
                print(f"# pack these files of {REPO} into a temporary {ARCHIVE_PLACEHOLDER}: {shlex.join(command)}")
            else:
                print(shlex.join(command))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, REMOTE_ARCHIVE)
        for what, command in steps:
            command = [archive if part == ARCHIVE_PLACEHOLDER else part for part in command]
            if what == "pack":
                count = pack(REPO, archive)
                print(
                    f"{PROG}: packed {count} files of {REPO} ({os.path.getsize(archive) / 1e6:.1f} MB)", file=sys.stderr
                )
            elif what == "run":
                started = time.monotonic()
                rc = run_forwarding_signals(command, stop_command(args))
                print(
                    f"{PROG}: the run ended with exit status {rc} after {time.monotonic() - started:.0f} s.",
                    file=sys.stderr,
                )
                return rc
            else:
                run_step(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
