"""The trainer on 8 CPU devices: mesh equivalence, shardings, accumulation, freezing, resume, validation."""

import math
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import data_pipelines
from conftest import read_tensorboard_scalars, tiny_lm
from vlm_jax import sharding
from vlm_jax.config_lib import ConfigError
from vlm_jax.models.lm import LanguageModel
from vlm_jax.train import trainer as trainer_lib
from vlm_jax.train.checkpoint import Checkpointer, load_params

MESHES = {"data=1": 1, "data=8": 8, "data=2,fsdp=2,tensor=2": 8}
STEPS = 3


def run_steps(config, devices, steps=STEPS):
    trainer = trainer_lib.Trainer(config, devices=devices)
    state = trainer.init(jax.random.key(config.seed))
    init_params = jax.device_get(state.params)
    data = data_pipelines.build(config, "train")
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, trainer.put_batch(next(data)))
        losses.append(float(metrics["loss"]))
    return trainer, state, init_params, losses


@pytest.fixture(scope="module")
def mesh_runs():
    runs = {}
    for mesh, n in MESHES.items():
        config = tiny_lm()
        config.mesh = mesh
        runs[mesh] = run_steps(config, jax.devices()[:n])
    return runs


def test_meshes_give_the_same_losses_and_params(mesh_runs):
    _, ref_state, init_params, ref_losses = mesh_runs["data=1"]
    ref = jax.device_get(ref_state.params)
    # the steps moved every parameter array, so equal parameters below are not just the shared initialisation
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), ref, init_params)))
    for mesh in ("data=8", "data=2,fsdp=2,tensor=2"):
        _, state, _, losses = mesh_runs[mesh]
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=mesh)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=mesh),
            jax.device_get(state.params),
            ref,
        )


def test_every_parameter_is_sharded_as_the_rules_say(mesh_runs):
    trainer, state, _, _ = mesh_runs["data=2,fsdp=2,tensor=2"]
    # DEFAULT_RULES: embed->fsdp, vocab/heads/kv_heads/mlp->tensor, layers/head_dim replicated.
    expected = {
        "embed/embedding": P("tensor", "fsdp"),
        "layers/attn/query/kernel": P(None, "fsdp", "tensor", None),
        "layers/attn/key/kernel": P(None, "fsdp", "tensor", None),
        "layers/attn/value/kernel": P(None, "fsdp", "tensor", None),
        "layers/attn/out/kernel": P(None, "tensor", None, "fsdp"),
        "layers/attn_norm/scale": P(None, "fsdp"),
        "layers/mlp_norm/scale": P(None, "fsdp"),
        "layers/mlp/gate/kernel": P(None, "fsdp", "tensor"),
        "layers/mlp/up/kernel": P(None, "fsdp", "tensor"),
        "layers/mlp/down/kernel": P(None, "tensor", "fsdp"),
        "final_norm/scale": P("fsdp"),
        "lm_head/kernel": P("fsdp", "tensor"),
    }
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(state.params).items()}
    assert set(flat) == set(expected)
    for path, array in flat.items():
        assert array.sharding.spec == expected[path], path
        # Created sharded: no device holds the whole array when it is split.
        split = np.prod([trainer.mesh.shape[a] for a in expected[path] if a is not None])
        assert array.addressable_shards[0].data.size * split == array.size, path
    # Adam's moments follow their parameters.
    mu = state.opt_state.inner_state[1][0].mu
    assert mu["layers"]["mlp"]["down"]["kernel"].sharding.spec == expected["layers/mlp/down/kernel"]
    # Every parameter carries logical names.
    boxed = jax.eval_shape(trainer.system.init, jax.random.key(0), trainer.system.dummy_batch(1))
    assert all(
        n is not None
        for n in jax.tree.leaves(sharding.logical_names(boxed), is_leaf=lambda x: x is None or isinstance(x, tuple))
    )


def test_gradient_accumulation_matches_one_big_batch(mesh_runs):
    config = tiny_lm()
    config.mesh = "data=8"
    config.grad_accum_steps = 2
    _, state, _, losses = run_steps(config, jax.devices())
    _, ref_state, _, ref_losses = mesh_runs["data=8"]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        jax.device_get(state.params),
        jax.device_get(ref_state.params),
    )


def test_frozen_params_are_bit_identical_and_hold_no_optimizer_state():
    config = tiny_lm()
    config.mesh = "data=8"
    config.optim.freeze = ["embed/.*", "layers/mlp/.*"]
    _, state, init_params, _ = run_steps(config, jax.devices(), steps=2)
    flat_init = traverse_util.flatten_dict(init_params)
    flat_now = traverse_util.flatten_dict(jax.device_get(state.params))
    for key, value in flat_now.items():
        path = "/".join(key)
        frozen = path.startswith("embed/") or path.startswith("layers/mlp/")
        assert np.array_equal(value, flat_init[key]) == frozen, path
    opt_paths = {
        "/".join(str(k.key) for k in p if isinstance(k, jax.tree_util.DictKey))
        for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    }
    assert not any(p.startswith("embed/") or p.startswith("layers/mlp/") for p in opt_paths)
    assert any(p.startswith("layers/attn/") for p in opt_paths)


def test_trainable_rows_update_only_the_listed_rows():
    config = tiny_lm()
    config.mesh = "data=8"
    config.optim.freeze = ["layers/.*", "final_norm/.*", "lm_head/.*"]
    config.optim.trainable_rows = [("embed/embedding", (3, 7))]
    _, state, init_params, _ = run_steps(config, jax.devices(), steps=2)
    before, after = init_params["embed"]["embedding"], np.asarray(jax.device_get(state.params)["embed"]["embedding"])
    changed = np.flatnonzero(np.any(before != after, axis=1))
    assert changed.tolist() == [3, 7]


def test_training_lowers_the_loss_and_writes_logs(trained_lm):
    workdir, result = trained_lm
    assert result.step == 8
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    assert {"loss", "accuracy", "grad_norm", "learning_rate", "examples_per_s", "tokens_per_s", "mfu"} <= set(
        result.metrics
    )
    scalars = read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    assert set(scalars["train/loss"]) == {4, 8}
    assert scalars["train/loss"][8] == pytest.approx(result.metrics["loss"], rel=1e-6)
    # steps 5-8 average below ln 256 = 5.55, the loss of a uniform guess over the tiny LM's 256 tokens
    assert tiny_lm().model.vocab_size == 256 and scalars["train/loss"][8] < math.log(256)
    # MFU = examples/s x FLOPs per example / peak, the peak being config.peak_tflops = 1 TFLOP/s on each of 8 devices
    flops = LanguageModel(tiny_lm()).flops_per_example()
    assert scalars["train/mfu"][8] == pytest.approx(scalars["train/examples_per_s"][8] * flops / 8e12, rel=1e-5)


def test_sigterm_saves_and_resume_is_bit_identical(trained_lm, tmp_path, monkeypatch):
    workdir = str(tmp_path)
    original_build = data_pipelines.build

    def build_that_signals(config, split, *args):
        it = original_build(config, split, *args)
        real_next = type(it).__next__

        class Signalling(type(it)):
            def __next__(self):
                batch = real_next(self)
                if self.next_batch == 3:  # while step 3 runs, as a preemption would
                    signal.raise_signal(signal.SIGTERM)
                return batch

        it.__class__ = Signalling
        return it

    monkeypatch.setattr(data_pipelines, "build", build_that_signals)
    stopped = trainer_lib.train(tiny_lm(), workdir)
    assert stopped.stopped_by_signal == signal.SIGTERM and stopped.step == 3
    assert Checkpointer(workdir).latest_step() == 3
    monkeypatch.setattr(data_pipelines, "build", original_build)

    resumed = trainer_lib.train(tiny_lm(), workdir)
    assert resumed.step == 8
    _, _, want = load_params(trained_lm[0])
    _, _, got = load_params(workdir)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_incomplete_save_is_ignored(trained_lm, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained_lm[0], workdir)
    # What a crash in the middle of writing step 12 leaves behind.
    partial = os.path.join(workdir, "checkpoints", "12.orbax-checkpoint-tmp-1700000000")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "garbage"), "wb") as f:
        f.write(b"\x00" * 10)
    assert Checkpointer(workdir).latest_step() == 8
    load_params(workdir)


def test_checkpoint_with_another_model_is_refused(trained_lm):
    config = tiny_lm()
    config.model.embed_dim = 32
    with pytest.raises(ConfigError, match=r"written with model.embed_dim=64 but the config gives 32"):
        trainer_lib.train(config, trained_lm[0])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c.model, "name", "lm9"), "model.name 'lm9' is not a known system"),
        (lambda c: setattr(c, "mesh", "data=3,fsdp=1"), "has 3 devices in all"),
        (lambda c: setattr(c, "batch_size", 12), "batch_size=12 is not divisible by the data-parallel size 8"),
        (lambda c: setattr(c, "grad_accum_steps", 4), "times grad_accum_steps=4"),
        (lambda c: setattr(c.optim, "freeze", ["vision/.*"]), "optim.freeze pattern 'vision/.*' matches no parameter"),
        (lambda c: setattr(c.optim, "freeze", [".*"]), "matches every parameter"),
        (
            lambda c: setattr(c.optim, "lr_mults", (("nope", 0.1),)),
            "optim.lr_mults pattern 'nope' matches no parameter",
        ),
        (lambda c: setattr(c.optim, "name", "lion"), "optim.name 'lion' is not one of adamw, sgd, adafactor"),
        (lambda c: setattr(c.optim, "schedule", "cubic"), "optim.schedule 'cubic' is not one of"),
        (lambda c: setattr(c.data, "name", "c4"), "data.name 'c4' is not a known pipeline"),
        (lambda c: setattr(c.model, "colour", "red"), "model.colour is not a setting of the lm system"),
    ],
)
def test_config_errors_are_one_clear_sentence(change, message, tmp_path):
    config = tiny_lm()
    change(config)
    with pytest.raises(ConfigError, match=re.escape(message)):
        trainer_lib.train(config, str(tmp_path))


def test_validation_loss_stops_where_the_validation_data_ends(monkeypatch, capsys):
    class FakeTrainer:  # eval_step sums: loss 2.0 per batch over weight 1.0
        config = tiny_lm()
        system = object()
        put_batch = staticmethod(lambda batch: batch)
        eval_step = staticmethod(lambda params, batch: {"loss": 2.0 * batch, "weight": 1.0 * batch})

    FakeTrainer.config.eval_steps = 4
    monkeypatch.setattr(data_pipelines, "build", lambda *args: (b for b in [1, 3]))  # two batches, then the end
    assert trainer_lib.evaluate(FakeTrainer(), None) == {"loss": 2.0}
    assert "ended after 2 of eval_steps=4 batches" in capsys.readouterr().err
    monkeypatch.setattr(data_pipelines, "build", lambda *args: (b for b in []))
    with pytest.raises(ConfigError, match="the validation data gives no batch of batch_size=16 rows"):
        trainer_lib.evaluate(FakeTrainer(), None)
