"""Sharded restores: `load_params` and `pretrained` read checkpoints straight into the target shardings on any
mesh (never replicated, never through the host as a whole), and forward / generate run on such params.

References never come from the code under test: saved values are read back by orbax as plain numpy arrays
(`saved_arrays`), Flamingo's regrouping is a numpy reshape written here, and expected partition specs and
shard shapes are written out by hand for a few leaves.
"""

import contextlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from conftest import REPO
from vlm_jax import cli, generate, models, sharding
from vlm_jax.config_lib import load_config
from vlm_jax.interop.convert import write_checkpoint
from vlm_jax.train import trainer as trainer_lib
from vlm_jax.train.checkpoint import fit_mesh, load_mesh, load_params


@contextlib.contextmanager
def no_host_copies():
    """Records the shape of every jax.Array whose value is copied to the host inside the block.

    On CPU, `jax.transfer_guard_device_to_host("disallow")` lets `np.asarray` and `jax.device_get` through (CPU
    buffers are host memory already), so the guard alone proves nothing here; it is kept for accelerators.
    The CPU check: every host copy of a jax.Array (np.asarray, jax.device_get, .tolist(), float()) goes through
    the array's `_value` property, which this spies on. `test_the_host_copy_spy_catches_device_get` shows it
    catches the old path, `jax.device_get` of a whole tree."""
    cls = type(jnp.zeros(()))
    original = cls.__dict__["_value"]
    seen = []

    def spy(self):
        seen.append(self.shape)
        return original.fget(self)

    with pytest.MonkeyPatch.context() as mp, jax.transfer_guard_device_to_host("disallow"):
        mp.setattr(cls, "_value", property(spy))
        yield seen


def saved_arrays(workdir, step):
    """Every param of a checkpoint step as numpy arrays, read by orbax alone (no vlm_jax code)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path).item_metadata
    meta = getattr(meta, "tree", meta)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))["params"]


def flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_equal_trees(got, want):
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def random_params(system, seed):
    """Params of `system`'s shapes drawn here with numpy (distinct values everywhere, no jit)."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def save(config, params, path):
    write_checkpoint(config, params, str(path))
    return str(path)


def test_the_host_copy_spy_catches_device_get():
    x = jax.device_put(np.ones((8, 4), np.float32), NamedSharding(jax.make_mesh((8,), ("d",)), PartitionSpec("d")))
    with no_host_copies() as seen:
        jax.device_get({"a": x + 1})
    assert seen == [(8, 4)]


def test_a_checkpoint_saved_data_parallel_restores_sharded_on_other_meshes(trained_lm):
    workdir, result = trained_lm  # the tiny LM, trained and saved on mesh data=8 (every param whole on each device)
    want = saved_arrays(workdir, result.step)
    with no_host_copies() as seen:
        config, _, params = load_params(workdir, "fsdp=4,tensor=2")
    assert seen == []
    assert config.mesh == "data=-1,fsdp=1,tensor=1"
    assert_equal_trees(params, want)
    embedding = params["embed"]["embedding"]  # logical ("vocab", "embed") -> ("tensor", "fsdp")
    assert embedding.shape == (256, 64) and embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
    assert dict(embedding.sharding.mesh.shape) == {"fsdp": 4, "tensor": 2}
    assert {s.data.shape for s in embedding.addressable_shards} == {(128, 16)}
    down = params["layers"]["mlp"]["down"]["kernel"]  # ("layers", "mlp", "embed") -> (None, "tensor", "fsdp")
    assert down.sharding.spec == PartitionSpec(None, "tensor", "fsdp")
    assert {s.data.shape for s in down.addressable_shards} == {(2, 64, 16)}
    assert not any(x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    on_first = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device.id == 0)
    assert on_first <= total / 4, (on_first, total)

    two = sharding.make_mesh("fsdp=2", jax.devices()[:2])  # a 2-device subset
    with no_host_copies() as seen:
        _, _, params = load_params(os.path.join(workdir, "checkpoints", str(result.step)), two)
    assert seen == []
    assert_equal_trees(params, want)
    embedding = params["embed"]["embedding"]
    assert embedding.sharding.device_set == set(jax.devices()[:2]) and embedding.sharding.spec == PartitionSpec(
        None, "fsdp"
    )
    assert {s.data.shape for s in embedding.addressable_shards} == {(256, 32)}

    one = sharding.make_mesh("data=1", jax.devices()[:1])
    _, _, params = load_params(workdir, one)
    assert_equal_trees(params, want)
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(params))


def test_a_saved_mesh_that_does_not_fit_falls_back_to_one_that_does(capsys):
    assert fit_mesh("data=8", 1) == "data=1"
    assert fit_mesh("data=-1,fsdp=4,tensor=2", 2) == "data=1,fsdp=2,tensor=1"
    assert fit_mesh("data=2,fsdp=4,tensor=2", 8) == "data=1,fsdp=4,tensor=2"
    assert fit_mesh("fsdp=16", 8) == "fsdp=8"
    mesh = load_mesh(ConfigDict({"mesh": "data=8"}), jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1}
    assert "the config's mesh 'data=8' does not fit the 1 device(s) here; params are loaded on mesh 'data=1'" in (
        capsys.readouterr().err
    )
    mesh = load_mesh(ConfigDict({"mesh": "data=2,fsdp=2,tensor=2"}))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert capsys.readouterr().err == ""  # a mesh that fits is used as saved, silently
    assert dict(load_mesh(ConfigDict({})).shape) == {"fsdp": 8}  # a convert-hf config names no mesh


def test_forward_and_generate_run_on_sharded_params(trained_lm, tmp_path):
    workdir = trained_lm[0]
    ids = np.array([[5, 6, 7, 8, 9, 10], [3, 5, 7, 11, 13, 17]], np.int32)
    np.savez(tmp_path / "in.npz", input_ids=ids)
    outs = {}
    for mesh in ("data=8", "fsdp=4,tensor=2"):
        argv = ["--checkpoint", workdir, "--inputs", str(tmp_path / "in.npz"), "--out", str(tmp_path / f"{mesh}.npz")]
        assert cli.main(["forward", *argv, "--mesh", mesh]) == 0
        outs[mesh] = np.load(tmp_path / f"{mesh}.npz")["logits"]
    np.testing.assert_allclose(outs["fsdp=4,tensor=2"], outs["data=8"], atol=1e-5, rtol=1e-5)

    _, system, replicated = load_params(workdir, "data=8")
    _, _, sharded = load_params(workdir, "fsdp=4,tensor=2")
    batch = generate.left_pad([[5, 6, 7], [3, 5, 7, 11, 13]])
    settings = generate.Sampling(max_new_tokens=4)
    got = generate.generate(system, sharded, batch, settings)
    np.testing.assert_array_equal(got, generate.generate(system, replicated, batch, settings))
    assert got.shape == (2, 4)


def test_flamingo_pretrained_reads_its_lm_and_vision_into_the_trainer_shardings(tmp_path):
    c = load_config(os.path.join(REPO, "configs/flamingo.py:variant=tiny"))
    c.model.lm.num_layers = 3  # cross-attention every 2 layers: one group of 2 and a tail of 1
    c.mesh = "data=2,fsdp=2,tensor=2"
    every = c.model.lm.cross_attn_every
    assert every == 2
    lm_config = ConfigDict(
        {
            "model": dict(name="lm", **{k: v for k, v in c.model.lm.items() if not k.startswith("cross_attn")}),
            "data": {"seq_len": 8},
        }
    )
    vision_config = ConfigDict(
        {
            "model": dict(name="vision_encoder", encoder="vit", kwargs=c.model.encoder_kwargs.to_dict(), image_size=32),
            "data": {},
        }
    )
    lm = random_params(models.build(lm_config), 1)
    vision = random_params(models.build(vision_config), 2)
    c.model.lm_checkpoint = save(lm_config, lm, tmp_path / "lm")
    c.model.vision_checkpoint = save(vision_config, vision, tmp_path / "vision")

    trainer = trainer_lib.Trainer(c)
    fresh = trainer.abstract_state.params
    with no_host_copies() as seen:
        params = trainer.system.pretrained(fresh, trainer.mesh, trainer.rules)
    assert seen == []

    decoder = params["decoder"]
    for name in ("embed", "final_norm", "lm_head"):
        assert_equal_trees(decoder[name], lm[name])
    grouped = jax.tree.map(lambda a: a[:2].reshape((1, 2) + a.shape[1:]), lm["layers"])  # numpy regrouping
    assert_equal_trees(decoder["layer_groups"]["layers"], grouped)
    assert_equal_trees(decoder["layer_groups_tail"]["layers"], jax.tree.map(lambda a: a[2:], lm["layers"]))
    assert_equal_trees(params["vision"], vision)
    assert params["perceiver"] is fresh["perceiver"]  # what no checkpoint fills is left as it was
    assert decoder["layer_groups"]["xattn"] is fresh["decoder"]["layer_groups"]["xattn"]

    shardings = flat(trainer.state_shardings.params)
    loaded = {k: v for k, v in flat(params).items() if isinstance(v, jax.Array)}
    assert len(loaded) == len(jax.tree.leaves(lm)) + len(jax.tree.leaves(lm["layers"])) + len(
        jax.tree.leaves(vision)
    )  # layers: group + tail
    for key, value in loaded.items():
        assert value.sharding == shardings[key], key
    down = decoder["layer_groups"]["layers"]["mlp"]["down"]["kernel"]  # (groups, every, mlp, embed)
    assert down.shape == (1, 2, 128, 64) and down.sharding.spec == PartitionSpec(None, None, "tensor", "fsdp")
    assert {s.data.shape for s in down.addressable_shards} == {(1, 2, 64, 32)}
    embedding = decoder["embed"]["embedding"]
    assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
    assert {s.data.shape for s in embedding.addressable_shards} == {(128, 32)}


def test_llava_pretrained_reads_stage_lm_and_vision_into_the_trainer_shardings(tmp_path):
    c = load_config(os.path.join(REPO, "configs/llava.py:variant=tiny"))
    c.mesh = "data=2,fsdp=2,tensor=2"
    system = models.build(c)
    lm_config = ConfigDict({"model": dict(name="lm", **c.model.lm.to_dict()), "data": {"seq_len": 8}})
    vit = {k: v for k, v in c.model.encoder_kwargs.to_dict().items() if k != "taps"}
    vision_config = ConfigDict(
        {"model": dict(name="vision_encoder", encoder="vit", kwargs=vit, image_size=c.model.image_size), "data": {}}
    )
    stage = random_params(system, 3)
    lm = random_params(models.build(lm_config), 4)
    vision = random_params(models.build(vision_config), 5)
    c.model.stage_checkpoint = save(c, stage, tmp_path / "stage1")
    c.model.lm_checkpoint = save(lm_config, lm, tmp_path / "lm")
    c.model.vision_checkpoint = save(vision_config, vision, tmp_path / "vision")

    trainer = trainer_lib.Trainer(c)
    with no_host_copies() as seen:
        params = trainer.system.pretrained(trainer.abstract_state.params, trainer.mesh, trainer.rules)
    assert seen == []
    assert_equal_trees(params["connector"], stage["connector"])  # the stage starts what the others do not
    assert_equal_trees(params["decoder"], lm)
    assert_equal_trees(params["vision"], vision)
    shardings = flat(trainer.state_shardings.params)
    for key, value in flat(params).items():
        assert value.sharding == shardings[key], key
    embedding = params["decoder"]["embed"]["embedding"]
    assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
    assert {s.data.shape for s in embedding.addressable_shards} == {(embedding.shape[0] // 2, 32)}

    # Every checkpoint is checked before any is read: a wrong vision checkpoint fails before the stage or LM is read.
    from vlm_jax.config_lib import ConfigError
    from vlm_jax.train.checkpoint import SavedParams

    reads = []
    original = SavedParams.restore
    c.model.vision_checkpoint = c.model.lm_checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SavedParams, "restore", lambda self, target: reads.append(self.path) or original(self, target))
        with pytest.raises(ConfigError, match=r"model.vision_checkpoint .*lm holds a lm, not a vision encoder"):
            trainer.system.pretrained(trainer.abstract_state.params, trainer.mesh, trainer.rules)
        assert reads == []
        c.model.vision_checkpoint = ""
        trainer.system.pretrained(trainer.abstract_state.params, trainer.mesh, trainer.rules)
        assert reads == [c.model.stage_checkpoint, c.model.lm_checkpoint]  # the stage (but its LM), then the LM
