"""A training process whose batches come from a Grain worker process exits cleanly: status 0, and no
`resource_tracker` warning about leaked shared-memory blocks (each batch crosses from the worker in shared
memory; one left unreleased at exit used to be reported by Python's resource tracker)."""

import os
import subprocess
import sys

from conftest import REPO


def test_training_with_a_grain_worker_exits_without_leaked_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: the quickest compile
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlm_jax.cli",
            "train",
            "--config",
            os.path.join(REPO, "configs/clip.py:variant=tiny"),
            "--workdir",
            str(tmp_path / "run"),
            "--config.total_steps=3",
            "--config.batch_size=8",
            "--config.log_every=1",
            "--config.eval_every=0",
            "--config.checkpoint_every=0",
            "--config.peak_tflops=1.0",
            "--config.data.worker_count=1",
            "--config.model.vision.depth=1",
            "--config.model.text.depth=1",  # a quicker compile
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "step 3/3" in out.stderr, out.stderr
    assert "leaked shared_memory" not in out.stderr and "resource_tracker" not in out.stderr, out.stderr
