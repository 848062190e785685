"""Test setup: 8 CPU devices (set before jax is imported) and shared tiny configs."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_lm():
    """The tiny LM config, shortened for tests, with a fixed peak so no matmul peak is measured."""
    from vlm_jax.config_lib import load_config

    c = load_config(os.path.join(REPO, "configs/lm.py:variant=tiny"))
    c.total_steps = 8
    c.log_every = 4
    c.checkpoint_every = 4
    c.eval_every = 0
    c.eval_steps = 1
    c.peak_tflops = 1.0
    c.optim.warmup_steps = 2
    return c


@pytest.fixture
def tiny_lm_config():
    return tiny_lm()


def pytest_configure(config):
    assert jax.device_count() == 8, "tests expect 8 CPU devices (XLA_FLAGS set in tests/conftest.py)"


@pytest.fixture(scope="session")
def trained_lm(tmp_path_factory):
    """(workdir, TrainResult) of one uninterrupted 8-step run of the tiny LM, shared by tests that only read it."""
    from vlm_jax.train import trainer

    workdir = str(tmp_path_factory.mktemp("trained_lm"))
    return workdir, trainer.train(tiny_lm(), workdir)
