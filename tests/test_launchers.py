"""The TPU pod and SLURM launchers, without a pod or a cluster: gcloud and srun are fakes on PATH.

What is proven: the exact gcloud / srun command lines, that the train arguments reach the trainer intact
through the quoting (the workers' shell is played by a local bash), the setup script's steps on a local
"worker" home, the SIGINT forwarding logic, and the sbatch script's argument passing and environment.
What is not: anything on a real TPU VM or SLURM cluster.
"""

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import REPO

TPU_POD = os.path.join(REPO, "launch", "tpu_pod.py")
SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
# Arguments a shell would mangle without quoting: spaces, both quotes, $, a glob, a backslash, ;.
AWKWARD = [
    "--config",
    "configs/flamingo.py:variant=9B",
    "--workdir",
    "gs://bucket/my run",
    '--config.note=it\'s "quoted"; $HOME * \\n',
    "--config.mesh=data=-1,fsdp=16",
]

spec = importlib.util.spec_from_file_location("tpu_pod", TPU_POD)
tpu_pod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tpu_pod)


def dry_run(capsys, *argv):
    """The lines `tpu_pod.py ARGV --dry_run` prints, each split as a shell would."""
    assert tpu_pod.main(["--dry_run", *argv]) == 0
    return capsys.readouterr().out.splitlines()


def remote_command(gcloud_argv):
    """The --command of a `gcloud ... ssh` argv, checking it targets every worker."""
    assert gcloud_argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert "--worker=all" in gcloud_argv
    return gcloud_argv[gcloud_argv.index("--command") + 1]


def recorder(path, log):
    """An executable at `path` that appends {argv, cwd, env} as a JSON line to `log` (a fake python / srun)."""
    path.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': dict(os.environ)}) + '\\n')\n"
    )
    path.chmod(0o755)
    return path


def records(log):
    """The JSON lines a recorder wrote."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_dry_run_prints_one_ssh_to_all_workers_with_the_args_quoted(capsys, tmp_path):
    repo_dir = tmp_path / "the repo"  # a space in the path too
    repo_dir.mkdir()
    fake_python = recorder(tmp_path / "python", tmp_path / "log")
    lines = dry_run(
        capsys, "--tpu", "my-pod", "--zone", "us-east5-a", "--project", "my-proj",
        "--repo_dir", str(repo_dir), "--python", str(fake_python), "--", *AWKWARD,
    )  # fmt: skip
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
    assert argv[argv.index("--zone") + 1] == "us-east5-a" and argv[argv.index("--project") + 1] == "my-proj"
    command = remote_command(argv)
    assert "exec " in command and " -m vlm_jax.cli train " in command
    # Play the worker: its shell runs the command; the fake python must receive exactly the train args.
    subprocess.run(["bash", "-c", command], check=True, env={**os.environ, "HOME": str(tmp_path)})
    (call,) = records(tmp_path / "log")
    assert call["argv"] == ["-m", "vlm_jax.cli", "train", *AWKWARD]
    assert call["cwd"] == str(repo_dir)


def test_home_relative_repo_dir_is_expanded_on_the_worker(capsys, tmp_path):
    (tmp_path / "code dir").mkdir()
    recorder(tmp_path / "python", tmp_path / "log")
    (line,) = dry_run(
        capsys, "--tpu", "p", "--zone", "z", "--repo_dir", "~/code dir", "--python", str(tmp_path / "python"),
        "--", "--workdir=gs://b/r",
    )  # fmt: skip
    assert "--project" not in shlex.split(line)
    subprocess.run(
        ["bash", "-c", remote_command(shlex.split(line))], check=True, env={**os.environ, "HOME": str(tmp_path)}
    )
    (call,) = records(tmp_path / "log")
    assert call["cwd"] == str(tmp_path / "code dir") and call["argv"][-1] == "--workdir=gs://b/r"


def test_setup_copies_the_checkout_and_installs_it_on_every_worker(capsys, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "log"
    # A fake worker python: records pip calls, runs real Python for `-c` (the version check).
    fake_python = tmp_path / "python"
    fake_python.write_text(
        f'#!/bin/bash\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
        f'exec {recorder(tmp_path / "rec", log)} "$@"\n'
    )
    fake_python.chmod(0o755)
    lines = dry_run(
        capsys, "--tpu", "pod", "--zone", "z", "--setup", "--python", str(fake_python), "--", "--workdir", "gs://b/r"
    )
    assert lines[0].startswith("# pack ") and "ls-files --cached --others --exclude-standard" in lines[0]
    scp, setup, run = (shlex.split(line) for line in lines[1:])
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[5:7] == [tpu_pod.ARCHIVE_PLACEHOLDER, "pod:vlm_jax_src.tar.gz"]
    command = remote_command(setup)
    assert tpu_pod.LIBTPU_INDEX in command and remote_command(run).startswith("cd vlm_jax && exec ")
    # Play one worker: the archive scp'd to its home, then the setup command in its shell.
    count = tpu_pod.pack(tpu_pod.REPO, str(home / tpu_pod.REMOTE_ARCHIVE))
    assert count > 50
    subprocess.run(["bash", "-c", command], check=True, cwd=home, env={**os.environ, "HOME": str(home)})
    assert (home / "vlm_jax" / "setup.py").is_file() and (home / "vlm_jax" / "vlm_jax" / "cli.py").is_file()
    assert not any(
        part == "__pycache__"
        for name in tarfile.open(home / tpu_pod.REMOTE_ARCHIVE).getnames()
        for part in name.split("/")
    )
    (call,) = records(log)
    assert call["cwd"] == str(home / "vlm_jax")
    assert call["argv"] == ["-m", "pip", "install", "-e", ".", tpu_pod.jax_requirement(), "-f", tpu_pod.LIBTPU_INDEX]
    assert tpu_pod.jax_requirement().startswith("jax[tpu]==")


def test_setup_refuses_an_old_worker_python(tmp_path):
    old = tmp_path / "python"
    fake = "import collections, sys; sys.version_info = collections.namedtuple('v', 'major minor')(3, 10); exec(sys.argv[1])"
    old.write_text(f'#!/bin/bash\nexec {sys.executable} -c {shlex.quote(fake)} "$2"\n')
    old.chmod(0o755)
    args = tpu_pod.argparse.Namespace(python=str(old), repo_dir="vlm_jax")
    check = tpu_pod.setup_command(args).split(" && ")[0]
    result = subprocess.run(["bash", "-c", check], capture_output=True, text=True)
    assert result.returncode == 1
    assert "vlm_jax needs Python >= 3.11 on every worker" in result.stderr and "3.10" in result.stderr


def test_pack_takes_tracked_and_unignored_files_only(tmp_path):
    repo = tmp_path / "repo"
    (repo / "workdirs").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/workdirs/\n")
    (repo / "a.py").write_text("a")
    (repo / "gone.py").write_text("g")
    (repo / "workdirs" / "ckpt").write_text("big")
    subprocess.run(["git", "-C", str(repo), "add", "a.py", "gone.py", ".gitignore"], check=True)
    (repo / "gone.py").unlink()  # tracked but deleted: skipped, not an error
    (repo / "new.py").write_text("n")  # untracked, not ignored: taken
    archive = tmp_path / "out.tar.gz"
    assert tpu_pod.pack(repo, str(archive)) == 3
    assert sorted(tarfile.open(archive).getnames()) == [".gitignore", "a.py", "new.py"]


def test_stop_sends_sigterm_to_the_trainer_on_every_worker(capsys):
    (line,) = dry_run(capsys, "--tpu", "pod", "--zone", "z", "--stop")
    command = remote_command(shlex.split(line))
    assert command.startswith("pkill -TERM -f ")
    pattern = shlex.split(command)[3]

    def matches(cmdline):  # pkill -f matches full command lines with an extended regex, as grep -E
        return subprocess.run(["grep", "-qE", pattern], input=cmdline, text=True).returncode == 0

    assert matches("python3 -m vlm_jax.cli train --config configs/lm.py --workdir gs://b/r")
    assert matches("/usr/bin/python3 /home/u/.local/bin/vlm-jax train --workdir /mnt/r")
    assert not matches("python3 -m vlm_jax.cli eval --workdir gs://b/r")
    assert not matches(f"bash -c {command}")  # the shell running pkill is no trainer


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--zone", "z", "--", "--workdir", "gs://b/r"], "--tpu is required"),
        (["--", "--workdir", "gs://b/r"], "--tpu and --zone are required"),
        (["--tpu", "p", "--zone", "z"], "nothing to run: put the vlm-jax train arguments after `--`"),
        (["--tpu", "p", "--zone", "z", "--", "--config", "c.py"], "the train arguments need --workdir DIR"),
        (["--tpu", "p", "--zone", "z", "--stop", "--", "--workdir", "w"], "--stop only stops a run"),
        (["--tpu", "p", "--zone", "z", "--bogus", "--", "--workdir", "w"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_command_lines_are_one_sentence_and_status_2(argv, message):
    result = subprocess.run([sys.executable, TPU_POD, *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tpu_pod.py: ") and message in result.stderr
    assert result.stdout == ""


def test_a_local_workdir_gets_a_note(capsys):
    assert tpu_pod.main(["--tpu", "p", "--zone", "z", "--dry_run", "--", "--workdir", "workdirs/run"]) == 0
    assert "is not a gs:// path; it must be a mount every worker shares" in capsys.readouterr().err


FAKE_GCLOUD = """#!{python}
import json, os, signal, sys, time
argv = sys.argv[1:]
command = argv[argv.index("--command") + 1] if "--command" in argv else ""
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": argv, "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN}}) + "\\n")
if command.startswith("pkill"):
    if {honour_stop}:
        open({stopped!r}, "w").close()
    sys.exit(0)
deadline = time.time() + 30
while not os.path.exists({stopped!r}) and time.time() < deadline:
    time.sleep(0.05)
sys.exit(143 if os.path.exists({stopped!r}) else 99)  # the trainers' status after SIGTERM
"""


def start_with_fake_gcloud(tmp_path, honour_stop):
    """Starts tpu_pod.py (for real) with a fake gcloud on PATH; returns (process, log path)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        FAKE_GCLOUD.format(
            python=sys.executable, log=str(log), stopped=str(tmp_path / "stopped"), honour_stop=honour_stop
        )
    )
    (bin_dir / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    argv = [sys.executable, TPU_POD, "--tpu", "pod", "--zone", "z", "--", *AWKWARD]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not records(log) and time.time() < deadline:
        time.sleep(0.05)
    assert records(log), "the launcher never ran gcloud"
    return proc, log


def wait_for(predicate, seconds=20):
    deadline = time.time() + seconds
    while not predicate() and time.time() < deadline:
        time.sleep(0.05)
    assert predicate()


def test_ctrl_c_stops_the_trainers_and_waits_for_them(tmp_path, capsys):
    proc, log = start_with_fake_gcloud(tmp_path, honour_stop=True)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err  # the run's own status: the trainers saved and exited on SIGTERM
    run, stop = records(log)
    (expected,) = dry_run(capsys, "--tpu", "pod", "--zone", "z", "--", *AWKWARD)
    assert run["argv"] == shlex.split(expected)[1:]  # what runs is what --dry_run prints
    assert run["sigint_ignored"]  # the terminal's Ctrl-C does not cut the ssh sessions
    assert remote_command(["gcloud", *stop["argv"]]).startswith("pkill -TERM -f ")
    assert "caught SIGINT: sending SIGTERM to the trainer on every worker" in err


def test_a_second_signal_stops_waiting(tmp_path):
    proc, log = start_with_fake_gcloud(tmp_path, honour_stop=False)  # trainers that never finish saving
    os.kill(proc.pid, signal.SIGINT)
    wait_for(lambda: len(records(log)) == 2)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped waiting; the trainers were sent SIGTERM" in err and "pgrep -af" in err


def test_a_failing_setup_step_ends_the_launcher(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text("#!/bin/bash\nexit 7\n")
    (bin_dir / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, TPU_POD, "--tpu", "p", "--zone", "z", "--setup"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 7
    assert (
        "packed " in result.stderr
        and "this step failed with exit status 7: gcloud compute tpus tpu-vm scp" in result.stderr
    )


# --- SLURM ---------------------------------------------------------------------------------------------


def test_sbatch_script_is_valid_bash_with_its_directives_first():
    subprocess.run(["bash", "-n", SBATCH], check=True)
    lines = open(SBATCH).read().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line.split()[1] for line in lines if line.startswith("#SBATCH")]
    # sbatch reads #SBATCH lines only before the first command
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert "--ntasks-per-node=1" in directives and any(d.startswith("--gpus-per-node=") for d in directives)


def run_sbatch(tmp_path, args, **slurm_env):
    """Runs the batch script as sbatch would on the first node, with a fake srun on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder(bin_dir / "srun", tmp_path / "srun.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", **slurm_env)
    result = subprocess.run(["bash", SBATCH, *args], env=env, capture_output=True, text=True, cwd=tmp_path)
    return result, records(tmp_path / "srun.log")


def test_sbatch_runs_srun_vlm_jax_train_with_exactly_the_args(tmp_path):
    slurm = dict(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16")
    result, calls = run_sbatch(tmp_path, AWKWARD, **slurm)
    assert result.returncode == 0, result.stderr
    (call,) = calls
    assert call["argv"] == ["--kill-on-bad-exit=1", "vlm-jax", "train", *AWKWARD]
    assert call["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"  # the one process per node owns all its GPUs
    assert call["env"]["SRUN_CPUS_PER_TASK"] == "16"
    assert all(call["env"][k] == v for k, v in slurm.items())  # srun passes the job's environment on
    assert "vlm-jax train on 2 nodes x 4 GPUs" in result.stdout


def test_sbatch_without_args_or_gpus_says_so(tmp_path):
    result, calls = run_sbatch(tmp_path, [], SLURM_GPUS_ON_NODE="8")
    assert result.returncode == 2 and "give the vlm-jax train arguments after the script name" in result.stderr
    result, calls = run_sbatch(tmp_path, ["--workdir", "/shared/r"])
    assert result.returncode == 2 and "no GPUs were allocated to this job" in result.stderr
    assert calls == []
