"""The `vlm-jax` command: README/CI agreement, forward, config flags, SIGTERM in a real process."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from vlm_jax import cli
from vlm_jax.train.checkpoint import load_params


def quickstart_block(n):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, ".ci", "quickstart_block.py"), str(n)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def test_readme_blocks_are_what_ci_runs():
    main_job, test_command = quickstart_block(1), quickstart_block(2)
    assert "vlm-jax train" in main_job
    assert test_command.strip() == "bash tests/setup_and_run.sh"  # one command sets up and runs the suite
    script = open(os.path.join(REPO, "tests", "setup_and_run.sh")).read()
    for step in ("pip install -q torch==", '-e ".[test,interop]"', "--no-deps timm==", "python -m pytest -q"):
        assert step in script, step
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert "quickstart_block.py 2" in ci  # CI runs README block (b) verbatim


def test_config_overrides_reach_the_config():
    fv = cli._parse_config_flags(
        [
            "--config",
            os.path.join(REPO, "configs/lm.py:variant=tiny"),
            "--config.optim.lr=0.5",
            "--config.optim.freeze=('embed/.*',)",
            "--workdir=/x",
        ],
        {"workdir": ""},
    )
    assert fv.config.optim.lr == 0.5 and fv.config.optim.freeze == ("embed/.*",) and fv.workdir == "/x"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "configs/nope.py"], "the config file configs/nope.py does not exist."),
        (["--config", "configs/lm.py:variant=huge"], "variant 'huge' is not one of"),
        (["--config", "configs/lm.py:colour=red"], "config argument 'colour' is not one of"),
        (["--config", "configs/lm.py", "--config.optim.lrr=1"], "names a key the config does not have ('lrr'"),
        (["--config", "configs/lm.py", "--config.optim.lr=abc"], "could not convert string to float"),
    ],
)
def test_bad_train_arguments_are_one_sentence(args, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["train", *args, "--workdir", "/tmp/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and "Traceback" not in err


def forward(checkpoint, inputs, out):
    """`vlm-jax forward` in-process; returns the exit status."""
    return cli.main(["forward", "--checkpoint", str(checkpoint), "--inputs", str(inputs), "--out", str(out)])


def test_forward_writes_the_logits_of_the_checkpoint(trained_lm, tmp_path):
    workdir = trained_lm[0]
    ids = np.array([[5, 6, 7, 8, 9, 10], [3, 5, 7, 0, 0, 0]], np.int32)
    mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0]], np.int32)
    np.savez(tmp_path / "in.npz", input_ids=ids, attention_mask=mask)
    assert forward(workdir, tmp_path / "in.npz", tmp_path / "out.npz") == 0
    logits = np.load(tmp_path / "out.npz")["logits"]
    assert logits.shape == (2, 6, 256)
    _, system, params = load_params(workdir)
    row = {"tokens": ids[1:, :3], "segment_ids": np.ones((1, 3), np.int32), "positions": np.arange(3)[None]}
    np.testing.assert_allclose(
        logits[1, :3], np.asarray(system.logits(params, row))[0], atol=1e-5
    )  # padding changes nothing before it
    # A step directory works as --checkpoint too.
    assert forward(os.path.join(workdir, "checkpoints", "4"), tmp_path / "in.npz", tmp_path / "out4.npz") == 0
    assert not np.allclose(np.load(tmp_path / "out4.npz")["logits"], logits)


def test_forward_bad_inputs_are_one_sentence(trained_lm, tmp_path, capsys):
    workdir = trained_lm[0]
    np.savez(tmp_path / "bad.npz", ids=np.zeros((1, 3), np.int32))
    assert forward(workdir, tmp_path / "bad.npz", tmp_path / "o.npz") == 2
    assert "the inputs have no 'input_ids' (found: ids)." in capsys.readouterr().err
    np.savez(tmp_path / "big.npz", input_ids=np.full((1, 3), 999, np.int32))
    assert forward(workdir, tmp_path / "big.npz", tmp_path / "o.npz") == 2
    assert "input_ids must lie in [0, 256)" in capsys.readouterr().err
    assert forward(tmp_path, tmp_path / "big.npz", tmp_path / "o.npz") == 2
    assert "is neither a workdir with checkpoints nor a step directory" in capsys.readouterr().err


def test_sigterm_to_a_training_process_leaves_a_restorable_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vlm_jax.cli",
            "train",
            "--config",
            os.path.join(REPO, "configs/lm.py:variant=tiny"),
            "--workdir",
            workdir,
            "--config.total_steps=1000000",
            "--config.log_every=1",
            "--config.peak_tflops=1.0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    lines = []
    deadline = time.time() + 300
    for line in proc.stderr:
        lines.append(line)
        if "step 3/" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    output = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "Caught SIGTERM at step" in output and "run the same command to resume" in output
    config, _, params = load_params(workdir)
    assert config.total_steps == 1000000 and params["embed"]["embedding"].shape == (256, 64)


def test_local_launcher_runs_a_config_on_emulated_devices(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "launch", "local.py"),
            "--cpu_devices",
            "2",
            "--config",
            os.path.join(REPO, "configs/lm.py:variant=tiny"),
            "--workdir",
            str(tmp_path),
            "--config.total_steps=2",
            "--config.log_every=1",
            "--config.peak_tflops=1.0",
            "--config.mesh=data=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "mesh {'data': 2}" in out.stderr and "step 2/2" in out.stderr


def test_train_tokenizer_command_writes_a_loadable_model(corpus, tmp_path, capsys):
    from data_pipelines.tokenizer import Tokenizer

    prefix = str(tmp_path / "spm")
    assert cli.main(["data", "train-tokenizer", "--input", corpus, "--out", prefix, "--vocab_size", "420"]) == 0
    assert f"Wrote {prefix}.model" in capsys.readouterr().out
    tokenizer = Tokenizer(prefix + ".model")
    assert tokenizer.vocab_size == 420 and tokenizer.encode("<image>") == [tokenizer.token_id("<image>")]
    assert cli.main(["data", "train-tokenizer", "--input", str(tmp_path / "none.txt"), "--out", prefix]) == 2
