"""Mesh construction and the logical-axis rule resolver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vlm_jax import sharding


def test_mesh_shape_resolves_minus_one():
    assert sharding.mesh_shape("data=-1,fsdp=2,tensor=1", 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sharding.mesh_shape([("data", 2), ("fsdp", 2), ("tensor", 2)], 8) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=2,fsdp=2", "has 4 devices in all"),
        ("data=-1,fsdp=3", "does not divide the 8 devices"),
        ("data=-1,fsdp=-1", "more than one axis of size -1"),
        ("data=2,data=4", "names an axis twice"),
        ("data", "not of the form axis=size"),
        ("data=x", "not an integer"),
        ("data=0,fsdp=8", "sizes are positive"),
    ],
)
def test_mesh_errors_are_one_sentence(spec, message):
    with pytest.raises(sharding.ShardingError, match=message):
        sharding.mesh_shape(spec, 8)


def test_make_mesh_uses_all_devices():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


MESH = None


def mesh222():
    global MESH
    if MESH is None:
        MESH = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    return MESH


def test_first_match_wins_where_a_dict_would_take_the_last():
    rules = [("embed", "fsdp"), ("embed", "tensor")]
    assert sharding.resolve(("embed",), rules, mesh222()) == P("fsdp")
    # The pitfall the resolver avoids: building a dict keeps the *last* rule.
    assert dict(rules)["embed"] == "tensor"


def test_taken_axis_falls_through_to_next_rule():
    rules = [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("embed", "tensor")]
    # 'fsdp' is taken by the batch dim, so embed uses its second rule.
    assert sharding.resolve(("batch", "length", "embed"), rules, mesh222()) == P(("data", "fsdp"), None, "tensor")


def test_indivisible_dim_is_not_sharded_by_that_rule():
    rules = [("heads", "tensor"), ("embed", "fsdp")]
    assert sharding.resolve(("embed", "heads"), rules, mesh222(), shape=(8, 3)) == P("fsdp", None)
    assert sharding.resolve(("embed", "heads"), rules, mesh222(), shape=(8, 4)) == P("fsdp", "tensor")


def test_axes_missing_from_the_mesh_are_dropped():
    mesh = sharding.make_mesh("data=8")
    assert sharding.resolve(("batch", "mlp"), sharding.DEFAULT_RULES, mesh) == P("data", None)
    assert sharding.data_parallel_size(mesh, sharding.DEFAULT_RULES) == 8
    assert sharding.data_parallel_size(mesh222(), sharding.DEFAULT_RULES) == 4


def test_constrain_is_a_noop_outside_use_rules_and_shards_inside():
    x = jnp.ones((8, 4))
    assert sharding.constrain(x, ("batch", None)) is x

    @jax.jit
    def f(x):
        with sharding.use_rules(mesh222(), sharding.DEFAULT_RULES):
            return sharding.constrain(x * 2, ("batch", None))

    y = f(x)
    assert y.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4)))


def test_replicated_dimensions_a_rule_meant_to_shard_are_listed_with_the_reason():
    import flax.linen as nn

    mesh = sharding.make_mesh("data=1,fsdp=8,tensor=1")
    box = lambda shape, names: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)  # noqa: E731
    tree = {
        "odd": box((12, 16), ("embed", "mlp")),  # 12 rows cannot split 8 ways; tensor has size 1: no rule shards mlp
        "square": box((16, 16), ("embed", "embed")),  # the second dim finds fsdp taken by the first
        "fine": box((16, 4), ("embed", "heads")),
        "bias": box((3,), (None,)),
    }
    assert sorted(sharding.unsharded(tree, sharding.DEFAULT_RULES, mesh)) == [
        "odd dim 0 'embed' of size 12: not divisible by fsdp=8",
        "square dim 1 'embed' of size 16: the mesh axes fsdp are taken by another dimension",
    ]


def test_the_trainer_and_make_mesh_say_what_they_could_not_do(tiny_lm_config, capsys, monkeypatch):
    from jax.experimental import mesh_utils

    from vlm_jax.train.trainer import Trainer

    tiny_lm_config.mesh = "data=1,fsdp=1,tensor=8"  # the tiny LM has 4 query heads and 2 KV heads
    tiny_lm_config.batch_size = 8
    Trainer(tiny_lm_config)
    err = capsys.readouterr().err
    assert "parameter dimension(s) that the sharding rules map to mesh axes are replicated" in err
    assert "layers/attn/query/kernel dim 2 'heads' of size 4: not divisible by tensor=8" in err

    def no_topology(*args, **kwargs):
        raise ValueError("no layout")

    monkeypatch.setattr(mesh_utils, "create_device_mesh", no_topology)
    mesh = sharding.make_mesh("data=2,fsdp=4,tensor=1")
    assert mesh.devices.shape == (2, 4, 1)
    assert "no topology-aware layout for mesh {'data': 2, 'fsdp': 4, 'tensor': 1} (ValueError: no layout)" in (
        capsys.readouterr().err
    )
