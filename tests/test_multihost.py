"""Multi-process training on localhost: 2 processes x 4 CPU devices, joined by JAX's distributed runtime.

The tiny Flamingo trains the same with 2 processes as with 1 (the global batches are the same rows: the data
is dealt to `data.streams=2` streams whatever the process count); a SIGTERM to both processes stops them at
the same step with a checkpoint, and the resumed run ends bit-identical to an uninterrupted one; checkpoints
move between process counts.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from vlm_jax.config_lib import load_config

_spec = importlib.util.spec_from_file_location("local_launcher", os.path.join(REPO, "launch", "local.py"))
launcher = importlib.util.module_from_spec(_spec)  # launch/local.py: free_port, environment
_spec.loader.exec_module(launcher)

STEPS = 4
OVERRIDES = {
    "log_every": 1,
    "checkpoint_every": 0,
    "eval_every": 0,
    "peak_tflops": 1.0,
    "data.streams": 2,
    "data.worker_count": 0,
}


def spec(interleaved_folder, spm_model_path):
    return f"{REPO}/configs/flamingo.py:variant=tiny,data={interleaved_folder},tokenizer={spm_model_path}"


def config_of(config_spec, total_steps):
    c = load_config(config_spec)
    c.total_steps = total_steps
    for key, value in OVERRIDES.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def launch(config_spec, workdir, total_steps):
    """`launch/local.py --processes 2 --cpu_devices 4` training the config (output piped, line by line)."""
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "total_steps": total_steps}.items()]
    argv = [sys.executable, "launch/local.py", "--processes", "2", "--cpu_devices", "4", "--"]
    argv += ["--config", config_spec, "--workdir", str(workdir), *flags]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def params_of(workdir):
    from vlm_jax.train.checkpoint import load_params

    return jax.device_get(load_params(str(workdir))[2])


def assert_same(a, b, atol):
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def runs(interleaved_folder, spm_model_path, tmp_path_factory):
    """Workdirs of: 1 process x 8 devices (in this process), and 2 processes x 4 devices, uninterrupted."""
    from vlm_jax.train import trainer

    config_spec = spec(interleaved_folder, spm_model_path)
    root = tmp_path_factory.mktemp("multihost")
    two = launch(config_spec, root / "two", STEPS)  # runs while this process trains the 1-process run
    one = trainer.train(config_of(config_spec, STEPS), str(root / "one"))
    status, out = finish(two)
    assert status == 0, out[-3000:]
    assert one.step == STEPS
    return config_spec, root


def test_two_processes_train_like_one(runs):
    _, root = runs
    one, two = params_of(root / "one"), params_of(root / "two")  # the 2-process checkpoint opens in 1 process
    assert_same(two, one, atol=1e-6)
    saved = sorted(os.listdir(root / "two" / "checkpoints" / str(STEPS) / "data"))
    assert [n for n in saved if n.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]


def test_the_streams_deal_each_record_to_one_process(runs):
    from data_pipelines.pipeline import local_streams, records_dataset

    config_spec, _ = runs
    c = config_of(config_spec, STEPS)
    c.data.streams = 4
    records = range(50)
    seen = []
    for process in range(2):
        streams, count = local_streams(c, process, 2)
        assert list(streams) == [process, process + 2] and count == 4
        seen.append([i for s in streams for i in records_dataset(c, records, s, count, repeat=False)])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(records)
    assert len(seen[0]) == len(set(seen[0]))


def test_sigterm_stops_both_processes_at_one_step_and_the_resumed_run_ends_bit_identical(runs, tmp_path):
    from data_pipelines.pipeline import GrainPipeline
    from vlm_jax import prerequisites

    config_spec, root = runs
    workdir = tmp_path / "stopped"
    process = launch(config_spec, workdir, STEPS)
    lines = []
    for line in process.stdout:  # the runtime is up on both processes once process 0 reports its parameters
        lines.append(line)
        if line.startswith("Starting:"):
            break
    process.send_signal(signal.SIGTERM)  # the launcher passes it to both processes
    status, out = finish(process)
    out = "".join(lines) + out
    assert status == 128 + signal.SIGTERM, out[-3000:]
    steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and 1 <= steps[0] < STEPS, (steps, out[-3000:])
    stopped = steps[0]
    assert f"Caught SIGTERM at step {stopped}" in out

    # Each process saved its own data state: that of its own stream after `stopped` batches.
    config = prerequisites.resolve(config_of(config_spec, STEPS), train=False)
    data = workdir / "checkpoints" / str(stopped) / "data"
    for index in range(2):
        pipeline = GrainPipeline(config, "train", index, 2)
        for _ in range(stopped):
            next(pipeline)
        assert json.loads((data / f"process_{index}-of-2.json").read_text()) == json.loads(
            json.dumps(pipeline.get_state())
        )

    status, out = finish(launch(config_spec, workdir, STEPS))  # the same command resumes
    assert status == 0 and f"Resuming from step {stopped}" in out, out[-3000:]
    assert_same(params_of(workdir), params_of(root / "two"), atol=0)


def test_a_one_process_checkpoint_resumes_in_two_processes(runs, tmp_path):
    from vlm_jax.train import trainer

    config_spec, root = runs
    for name in ("two", "one"):
        shutil.copytree(root / "one", tmp_path / name)
    status, out = finish(launch(config_spec, tmp_path / "two", STEPS + 2))
    assert status == 0 and f"Resuming from step {STEPS}" in out, out[-3000:]
    assert "saved by 1 process(es) and this run has 2" in out
    # The same continuation in 1 process: its data also starts afresh (its data state removed).
    for f in (tmp_path / "one" / "checkpoints" / str(STEPS) / "data").glob("process_*"):
        f.unlink()
    result = trainer.train(config_of(config_spec, STEPS + 2), str(tmp_path / "one"))
    assert result.step == STEPS + 2
    assert_same(params_of(tmp_path / "two"), params_of(tmp_path / "one"), atol=1e-6)


def test_forward_in_two_processes_reads_shards_and_matches_one_process(runs, tmp_path):
    """`vlm-jax forward` joins the run like `train`: 2 processes read the 2-process checkpoint onto an
    fsdp x tensor mesh spanning both, and process 0 writes the logits of 1 process on its data-parallel mesh."""
    from vlm_jax.train.checkpoint import load_params

    _, root = runs
    rng = np.random.default_rng(0)
    inputs = {
        "input_ids": rng.integers(5, 300, (2, 12)).astype(np.int32),
        "pixel_values": rng.random((2, 1, 3, 32, 32), np.float32),
    }
    np.savez(tmp_path / "in.npz", **inputs)
    port = launcher.free_port()
    argv = [sys.executable, "-m", "vlm_jax.cli", "forward", "--checkpoint", str(root / "two")]
    argv += ["--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / "out.npz"), "--mesh", "fsdp=4,tensor=2"]
    argv += ["--coordinator_address", f"localhost:{port}", "--num_processes", "2"]
    processes = [
        subprocess.Popen(
            argv + ["--process_id", str(i)],
            cwd=REPO,
            env=launcher.environment(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [finish(p, timeout=200) for p in processes]
    assert [status for status, _ in outs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "Wrote logits" in outs[0][1] and "Wrote logits" not in outs[1][1]  # process 0 writes, once
    _, system, params = load_params(str(root / "two"))
    want = system.forward(params, inputs)["logits"]
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["logits"], want, rtol=0, atol=2e-5)


PREREQUISITES_SCRIPT = """
import os, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from vlm_jax import prerequisites
root = sys.argv[3]

def build():  # like a data build: does nothing where its result is already there
    path = os.path.join(root, "data")
    if not os.path.isdir(path):
        os.makedirs(path)
        open(os.path.join(path, f"built-by-{jax.process_index()}"), "w").close()
    return path

def train(workdir):  # like a collective training run: every process takes part, in one shared workdir
    open(os.path.join(workdir, f"trained-by-{jax.process_index()}"), "w").close()
    if jax.process_index() == 0:
        open(os.path.join(workdir, "config.json"), "w").close()

prerequisites._process_0_first("data", build)
prerequisites._train_together(os.path.join(root, "lm-0123456789"), train)
"""


def test_prerequisites_of_a_multi_process_run_are_built_once_and_trained_together(tmp_path):
    """A declared data build runs on process 0 only (the others find its result); a prerequisite run is trained by
    all processes together in one folder that appears under its final name only when complete."""
    script = tmp_path / "prerequisites.py"
    script.write_text(PREREQUISITES_SCRIPT)
    port = launcher.free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), f"localhost:{port}", str(i), str(tmp_path)],
            cwd=REPO,
            env=launcher.environment(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [finish(p, timeout=120) for p in processes]
    assert [status for status, _ in outs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert os.listdir(tmp_path / "data") == ["built-by-0"]
    assert sorted(os.listdir(tmp_path / "lm-0123456789")) == ["config.json", "trained-by-0", "trained-by-1"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".building")]
