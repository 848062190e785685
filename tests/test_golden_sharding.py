"""Every paper-size system's parameter shardings on the reference mesh match the committed golden files.

A rule or model change that re-shards a parameter (or replicates a dimension a rule meant to shard) fails
here with the parameters it changed; if intended, `python -m tests.golden.update_sharding` rewrites the files
(tests/golden/update_sharding.py, docs/sharding.md "Golden sharding files").
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from golden import update_sharding as golden

from vlm_jax import sharding


def _load(config, variant):
    path = golden.golden_path(config, variant)
    if not os.path.exists(path):
        pytest.fail(f"{os.path.relpath(path, golden.REPO)} is missing; run `{golden.REGENERATE}` and commit it.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text, json.loads(text)


@pytest.mark.parametrize(
    "config, variant", golden.GOLDEN, ids=[golden.file_name(c, v)[: -len(".json")] for c, v in golden.GOLDEN]
)
def test_parameter_shardings_match_the_golden_file(config, variant):
    text, old = _load(config, variant)
    new = golden.compute(config, variant)
    changes = golden.diff(old, new)
    shown = "\n  ".join(changes[:40]) + (f"\n  ... {len(changes) - 40} more" if len(changes) > 40 else "")
    assert not changes, (
        f"{golden.config_spec(config, variant)} on mesh {golden.REFERENCE_MESH} no longer matches "
        f"{golden.file_name(config, variant)} ({len(changes)} difference(s), golden -> now):\n  {shown}\n"
        f"If the change is intended, run `{golden.REGENERATE}` and commit the diff."
    )
    assert text == golden.render(new), (
        f"{golden.file_name(config, variant)} has the right content but not the canonical layout (edited by hand?); "
        f"run `{golden.REGENERATE}`."
    )


def test_every_system_config_has_golden_files_and_no_file_is_stale():
    configs = sorted(f[: -len(".py")] for f in os.listdir(os.path.join(golden.REPO, "configs")) if f.endswith(".py"))
    assert sorted({c for c, _ in golden.GOLDEN}) == configs, "each configs/*.py needs its paper sizes in GOLDEN"
    on_disk = sorted(f for f in os.listdir(golden.GOLDEN_DIR) if f.endswith(".json"))
    assert on_disk == sorted(golden.file_name(c, v) for c, v in golden.GOLDEN), (
        f"tests/golden/sharding/ holds other files than GOLDEN names; run `{golden.REGENERATE}`."
    )


def test_a_dropped_rule_is_reported_as_the_parameters_it_reshards():
    """Without the `mlp -> tensor` rule, exactly the parameters whose `mlp` dimension was on `tensor` change,
    each reported as "path: old spec -> new spec"."""
    _, old = _load("lm", "1b")
    boxed, rules = golden.abstract_params(golden.config_spec("lm", "1b"))
    without_mlp = tuple(r for r in rules if r[0] != "mlp")
    assert len(without_mlp) == len(rules) - 1
    changes = golden.diff(old, golden.spec_table(boxed, without_mlp, golden.reference_mesh(), old["config"]))
    expected = {
        path
        for path, p in old["params"].items()
        if any(n == "mlp" and s == "tensor" for n, s in zip(p["names"], p["spec"]))
    }
    assert expected == {"layers/mlp/down/kernel", "layers/mlp/gate/kernel", "layers/mlp/up/kernel"}
    assert sorted(changes) == sorted(
        [
            "layers/mlp/down/kernel: (None, tensor, fsdp) -> (None, None, fsdp)",
            "layers/mlp/gate/kernel: (None, fsdp, tensor) -> (None, fsdp, None)",
            "layers/mlp/up/kernel: (None, fsdp, tensor) -> (None, fsdp, None)",
            "logical name without a rule now: mlp",
        ]
    )


def test_a_change_in_what_is_replicated_is_reported():
    """PaliGemma's single KV head cannot split 4 ways: the golden file lists it; a rule set that no longer
    meant to shard `kv_heads` leaves every spec as it was, and the comparison still says what changed."""
    _, old = _load("paligemma", "3b-224")
    assert old["replicated"] == [
        "decoder/layers/attn/key/kernel dim 2 'kv_heads' of size 1: not divisible by tensor=4",
        "decoder/layers/attn/value/kernel dim 2 'kv_heads' of size 1: not divisible by tensor=4",
    ]
    boxed, rules = golden.abstract_params(golden.config_spec("paligemma", "3b-224"))
    no_kv = tuple(r for r in rules if r[0] != "kv_heads")
    changes = golden.diff(old, golden.spec_table(boxed, no_kv, golden.reference_mesh(), old["config"]))
    assert changes == [
        "replicated dimension no longer: decoder/layers/attn/key/kernel dim 2 'kv_heads' of size 1: not divisible by tensor=4",
        "replicated dimension no longer: decoder/layers/attn/value/kernel dim 2 'kv_heads' of size 1: not divisible by tensor=4",
        "logical name without a rule now: kv_heads",
    ]


def test_a_reshaped_or_removed_parameter_is_reported():
    _, old = _load("lm", "50m")
    new = json.loads(json.dumps(old))
    new["params"]["embed/embedding"]["shape"][0] += 1
    del new["params"]["final_norm/scale"]
    new["params"]["extra/kernel"] = {"names": ["embed"], "shape": [512], "spec": ["fsdp"]}
    assert golden.diff(old, new) == [
        "embed/embedding: shape [32000, 512] -> [32001, 512]",
        "extra/kernel: new parameter, shape [512], spec (fsdp)",
        "final_norm/scale: no longer a parameter (was shape [512], spec (fsdp))",
    ]


def test_the_abstract_reference_mesh_resolves_as_a_real_mesh_of_the_same_shape():
    """The golden files use an AbstractMesh; on 8 real devices it must give what the trainer's mesh gives."""
    shape = {"data": 1, "fsdp": 4, "tensor": 2}
    real, abstract = sharding.make_mesh("data=1,fsdp=4,tensor=2"), golden.reference_mesh(shape)
    box = lambda shape, names: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)  # noqa: E731
    tree = {
        "embed": box((32, 8), ("vocab", "embed")),
        "mlp": box((3, 8, 6), ("layers", "embed", "mlp")),  # 6 % 2 == 0 but 8 % 4 == 0 too
        "odd": box((6, 3), ("embed", "heads")),  # neither divides: listed as replicated
        "square": box((8, 8), ("embed", "embed")),
        "plain": jnp.zeros((4,)),
    }
    a = golden.spec_table(tree, sharding.DEFAULT_RULES, real)
    b = golden.spec_table(tree, sharding.DEFAULT_RULES, abstract)
    assert a == b
    assert a["params"]["mlp"]["spec"] == [None, "fsdp", "tensor"]
    assert a["params"]["plain"] == {"names": None, "shape": [4], "spec": [None]}
    assert len(a["replicated"]) == 3


def test_render_is_canonical_json():
    _, old = _load("clip", "B/16")
    text = golden.render(old)
    assert json.loads(text) == old
    assert golden.render(json.loads(text)) == text
    assert golden.render({"params": {}, "replicated": []}) == '{\n  "params": {},\n  "replicated": []\n}\n'
