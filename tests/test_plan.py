"""`vlm-jax plan` (vlm_jax/plan.py): exact bytes against hand counts, activations against XLA's own memory
analysis of the compiled train step, the CLI's JSON line and its errors, and the estimate for a mesh larger than
the 8 CPU devices."""

import json
import os
import subprocess
import sys

import jax
import pytest

from vlm_jax import cli, plan
from vlm_jax.config_lib import load_config
from vlm_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = os.path.join(REPO, "configs/lm.py:variant=tiny")
MESH = "data=2,fsdp=2,tensor=2"

# The tiny LM (configs/lm.py): vocab 256, width 64, 2 layers, 4 heads of 16, 2 KV heads, gated MLP of 128, RMSNorm
# scales, untied head. Matrices have a dim named embed (-> fsdp) and one named vocab / heads / kv_heads / mlp
# (-> tensor); norm scales only embed.
EMBED, HEAD = 256 * 64, 64 * 256
QUERY = OUT = 2 * 64 * 4 * 16
KEY = VALUE = 2 * 64 * 2 * 16
MLP = 3 * 2 * 64 * 128  # gate, up, down
NORMS = 64 + 2 * 64 + 2 * 64  # final, attn and mlp norms of both layers
MATRICES = EMBED + HEAD + QUERY + OUT + KEY + VALUE + MLP


def lm_config(**overrides):
    c = load_config(LM)
    for k, v in overrides.items():
        c[k] = v
    return c


def test_param_bytes_by_hand():
    """fsdp=2 x tensor=2 cuts every matrix in 4 and every norm scale in 2; on tensor=8 the 4 query heads and the
    2 KV heads do not divide, so query, key, value and out stay whole (4 dims said), the rest split 8 ways."""
    parts = plan.exact_parts(lm_config(), {"data": 2, "fsdp": 2, "tensor": 2})
    assert parts.num_params == MATRICES + NORMS
    assert parts.params_bytes == 4 * (MATRICES // 4 + NORMS // 2)
    assert parts.grad_bytes == parts.params_bytes  # everything trains
    # AdamW: two moments sharded like the params, plus two replicated int32 step counters (Adam's bias
    # correction and the learning-rate schedule's): 8 bytes; the skip of non-finite updates
    # (optax.apply_if_finite): two int32 counters and a bool, 9 bytes.
    assert parts.opt_bytes - 2 * parts.params_bytes == 8 + 9
    assert parts.batch_bytes == 16 * 64 * 4 * 5 // 4  # 5 [16, 64] 4-byte arrays split over data x fsdp
    assert parts.replicated_dims == []

    parts = plan.exact_parts(lm_config(), {"data": 1, "fsdp": 1, "tensor": 8})
    whole = QUERY + OUT + KEY + VALUE
    assert parts.params_bytes == 4 * ((EMBED + HEAD + MLP) // 8 + whole + NORMS)
    assert len(parts.replicated_dims) == 4
    assert any(line.startswith("layers/attn/query/kernel dim 2 'heads' of size 4") for line in parts.replicated_dims)


def test_frozen_parameters_get_no_gradient_or_optimizer_state():
    c = lm_config()
    c.optim.freeze = ("layers/mlp/.*",)
    parts = plan.exact_parts(c, {"data": 8})  # nothing sharded: whole arrays per device
    assert parts.params_bytes == 4 * (MATRICES + NORMS)
    assert parts.grad_bytes == 4 * (MATRICES + NORMS - MLP)
    assert parts.num_trainable == MATRICES + NORMS - MLP
    assert parts.opt_bytes - 2 * parts.grad_bytes == 8 + 9  # moments of the trainable params and the counters


@pytest.fixture(scope="module")
def xla_reference():
    """XLA's memory analysis of the trainer's train step compiled for MESH on the 8 CPU devices, done here."""
    from vlm_jax.train.trainer import Trainer

    c = lm_config(mesh=MESH)
    run = Trainer(c, jax.devices())
    return run.train_step.lower(run.abstract_state, run.abstract_batch).compile().memory_analysis()


def peak(stats) -> int:
    """Per-device peak of a compiled step: its arguments live throughout, the donated ones hold the outputs
    aliased to them, other outputs come on top, and temp is the peak of everything else it allocates."""
    return (
        stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
    )


def test_estimated_plan_against_xla(xla_reference):
    """Only 4 devices allowed for the compile: the step is compiled on a smaller mesh with the same rows per
    device and the activations carried over; the total stays within 15% of XLA's measurement on the real mesh."""
    p = plan.plan(lm_config(), MESH, device_memory_gb=1.0, compile_devices=4)
    assert p.activation_source == "estimated"
    assert p.compiled_mesh == {"data": 1, "fsdp": 2, "tensor": 2} and p.compiled_batch_size == 8
    # + the int32 step; - the 1-byte `last_finite` flag of optax.apply_if_finite, which the step writes but never
    # reads, so XLA keeps no argument buffer for it
    assert (
        p.parts.params_bytes + p.parts.opt_bytes + p.parts.batch_bytes + 4 - 1 == xla_reference.argument_size_in_bytes
    )
    assert abs(p.total_bytes_per_device - peak(xla_reference)) <= 0.15 * peak(xla_reference)


def test_emulation_shape():
    rules = lm_config().logical_axis_rules
    assert plan.emulation_shape({"data": 4, "fsdp": 16, "tensor": 4}, 8, rules) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert plan.emulation_shape({"data": 1, "fsdp": 64, "tensor": 1}, 8, rules) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert plan.emulation_shape({"data": 2, "fsdp": 2, "tensor": 16}, 8, rules) == {"data": 1, "fsdp": 1, "tensor": 8}
    assert plan.emulation_shape({"data": 6, "fsdp": 3, "tensor": 1}, 8, rules) == {"data": 2, "fsdp": 3, "tensor": 1}


def run_cli(capsys, *args):
    code = cli.main(["plan", "--config", LM, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_and_fits_against_xla(capsys, xla_reference):
    """The plan measured on the 8 CPU devices, through the command: its exact parts are XLA's arguments and its
    total is XLA's peak; --device_memory_gb decides `fits`."""
    code, out, _ = run_cli(capsys, "--mesh", MESH, "--device_memory_gb", "1")
    assert code == 0
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1])
    for key in ("params_bytes", "opt_bytes", "grad_bytes", "activation_bytes", "total_bytes_per_device", "fits"):
        assert key in summary
    assert summary["fits"] is True and summary["activation_source"] == "measured"
    assert summary["mesh"] == summary["compiled_mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert summary["replicated_dims"] == 0
    assert summary["total_bytes_per_device"] == sum(
        summary[k] for k in ("params_bytes", "opt_bytes", "grad_bytes", "batch_bytes", "activation_bytes")
    )
    assert any(line.strip().startswith("total") and "fits" in line for line in lines[:-1])
    # XLA's arguments are the train state and the batch: the exact parts, plus the 4-byte step counter.
    exact = summary["params_bytes"] + summary["opt_bytes"] + summary["batch_bytes"]
    assert exact + 4 - 1 == xla_reference.argument_size_in_bytes  # the step counter; the unread flag (above)
    assert summary["grad_bytes"] <= xla_reference.temp_size_in_bytes  # gradients are among the temporaries
    assert abs(summary["total_bytes_per_device"] - peak(xla_reference)) <= 0.15 * peak(xla_reference)

    too_small = f"{summary['total_bytes_per_device'] * 0.9 / 1e9:.6f}"
    code, out, _ = run_cli(capsys, "--mesh", MESH, "--device_memory_gb", too_small)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["fits"] is False
    assert "does NOT fit" in out


@pytest.mark.parametrize(
    "args, words",
    [
        (["--mesh", "data=2,fsdp=x", "--device_memory_gb", "1"], "not an integer"),
        (["--mesh", "data=-1,tensor=2", "--device_memory_gb", "1"], "--devices"),
        (["--mesh", "data=3", "--devices", "4", "--device_memory_gb", "1"], "4 devices are available"),
        (["--mesh", "data=32", "--device_memory_gb", "1"], "not divisible by the data-parallel size 32"),
        (["--mesh", MESH, "--device_memory_gb", "lots"], "not a number"),
        (["--mesh", MESH], "--device_memory_gb"),
    ],
)
def test_cli_errors_are_one_sentence(capsys, args, words):
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_mesh_larger_than_the_devices_is_estimated(capsys):
    """fsdp=64 on 8 CPU devices: compiled on fsdp=8 with the same rows per device, said to be an estimate; a
    fresh process, where `vlm-jax plan` asks XLA for 64 host devices, measures it, and the two agree."""
    args = ["--mesh", "data=1,fsdp=64,tensor=1", "--device_memory_gb", "1", "--config.batch_size=64"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    estimate = json.loads(out.strip().splitlines()[-1])
    assert estimate["activation_source"] == "estimated" and estimate["compiled_mesh"] == {
        "data": 1,
        "fsdp": 8,
        "tensor": 1,
    }
    assert "activations are estimated" in out

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-m", "vlm_jax.cli", "plan", "--config", LM, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["activation_source"] == "measured" and measured["compiled_mesh"] == estimate["mesh"]
    for key in ("params_bytes", "opt_bytes", "grad_bytes", "batch_bytes"):
        assert measured[key] == estimate[key]
    assert (
        abs(estimate["total_bytes_per_device"] - measured["total_bytes_per_device"])
        <= 0.15 * measured["total_bytes_per_device"]
    )


def test_plan_builds_no_prerequisite(tmp_path, monkeypatch):
    """The built-in main job's tokenizer is a prerequisite: plan says so instead of building it."""
    monkeypatch.setenv("VLM_JAX_CACHE", str(tmp_path))
    config = load_config(os.path.join(REPO, "configs/flamingo.py:data=builtin"))
    with pytest.raises(ConfigError, match="which plan does not build"):
        plan.plan(config, "data=8", device_memory_gb=1.0)
    assert os.listdir(tmp_path) == []
