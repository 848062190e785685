"""LLaVA through the in-sequence system contract: packing isolation, parameter counts, training, eval, generation."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, packed_row, train_briefly
from vlm_jax import cli, models
from vlm_jax.config_lib import load_config


def tiny(template="llava", spec="llava.py:variant=tiny"):
    config = load_config(os.path.join(REPO, f"configs/{spec}"))
    config.data.template = template
    config.data.max_images = 2
    system = models.build(config)
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), system.dummy_batch(1)))
    return system, params


def example(rng, system, prefix_lm, text_len):
    """One example's tokens (image placeholders first, then text), its prefix flags and its image."""
    image_tokens = system.image_tokens  # tiny configs: 32 px images, patch 8
    tokens = [1] + [system.module.image_token_id] * image_tokens + list(rng.integers(10, 250, size=text_len))
    prefix = np.zeros(len(tokens), bool)
    if prefix_lm:
        prefix[: 1 + image_tokens + text_len // 2] = True  # images, bos-like token and half the text
    image = rng.normal(size=(32, 32, 3)).astype(np.float32)
    return np.asarray(tokens, np.int32), prefix, image


@pytest.mark.parametrize(
    "spec, template",
    [
        ("llava.py:variant=tiny", "llava"),
        ("llava.py:variant=tiny", "paligemma"),  # prefix-LM attention
        ("minigpt_v2.py:variant=tiny", "minigpt4"),  # 4-token concatenation
    ],
)
def test_a_packed_row_equals_its_examples_run_alone(spec, template):
    system, params = tiny(template, spec)
    assert system.prefix_lm == (template == "paligemma")
    rng = np.random.default_rng(0)
    a, b = example(rng, system, system.prefix_lm, 9), example(rng, system, system.prefix_lm, 14)
    length = len(a[0]) + len(b[0]) + 3
    logits = jax.jit(system.logits)
    packed = np.asarray(logits(params, packed_row([a, b], length)))[0]
    alone_a = np.asarray(logits(params, packed_row([a], length)))[0]
    alone_b = np.asarray(logits(params, packed_row([b], length)))[0]
    na, nb = len(a[0]), len(b[0])
    np.testing.assert_allclose(packed[:na], alone_a[:na], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[na : na + nb], alone_b[:nb], atol=1e-5, rtol=0)
    assert np.abs(alone_a[:na] - alone_b[:na]).max() > 1e-2  # the two examples do differ

    # Another image for example b: nothing of example a moves, b's text does.
    b2 = (b[0], b[1], rng.normal(size=(32, 32, 3)).astype(np.float32))
    changed = np.asarray(logits(params, packed_row([a, b2], length)))[0]
    np.testing.assert_array_equal(changed[:na], packed[:na])
    assert np.abs(changed[na : na + nb] - packed[na : na + nb]).max() > 1e-3


def test_placeholders_without_features_are_reported():
    system, params = tiny()
    rng = np.random.default_rng(1)
    a = example(rng, system, False, 5)
    batch = packed_row([a], len(a[0]) + 2)
    del batch["prefix_mask"]
    batch["image_segment_ids"][:] = 0  # the example's image slot is empty: its 16 placeholders get nothing
    batch["targets"], batch["loss_mask"] = np.zeros_like(batch["tokens"]), np.ones(batch["tokens"].shape, np.float32)
    _, weight, metrics = system.loss(params, batch)
    assert float(metrics["unplaced_image_tokens"] / weight) == 16  # 32 px, patch 8, class token dropped


def param_count(variant):
    system = models.build(load_config(os.path.join(REPO, f"configs/llava.py:variant={variant}")))
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


# Published totals: the Hugging Face Hub's safetensors parameter counts of llava-hf/llava-1.5-7b-hf ("7.06B") and
# llava-hf/llava-1.5-13b-hf ("13.4B"), the conversions of the LLaVA-1.5 checkpoints of Liu et al. 2023
# (arXiv:2310.03744): CLIP ViT-L/14-336 (304M) + 2-layer MLP + Vicuna-1.5 with 32064 vocabulary rows.
@pytest.mark.parametrize("variant, published", [("1.5-7b", 7.06e9), ("1.5-13b", 13.4e9)])
def test_paper_size_parameter_counts(variant, published):
    assert abs(param_count(variant) / published - 1) < 0.02


@pytest.fixture(scope="module", params=["tiny", "tiny-next"])
def trained(request, tmp_path_factory):
    """The tiny LLaVA (and LLaVA-NeXT) trained for a few steps on a small built-in dataset through `vlm-jax
    train` (stage 2, after its stage-1 prerequisite run)."""
    return train_briefly(tmp_path_factory, f"llava.py:variant={request.param},data=builtin,scale=0.02")


def test_tiny_llava_trains_evaluates_and_answers(trained, tmp_path, capsys, monkeypatch):
    workdir, status, cache, config = trained
    assert status == 0
    # Stage 2 started from the stage-1 run (projector only, plain template), trained once as a prerequisite.
    stage1 = json.load(open(os.path.join(workdir, "config.json")))["model"]["stage_checkpoint"]
    assert os.path.basename(stage1).startswith("llava-stage1-")
    stage1_config = json.load(open(os.path.join(stage1, "config.json")))
    assert stage1_config["data"]["template"] == "llava_plain" and stage1_config["optim"]["freeze"] == ["decoder/.*"]
    scalars = open(os.path.join(workdir, "report", "index.html")).read()
    assert "vqa_accuracy" in scalars and "cider" in scalars
    monkeypatch.setenv("VLM_JAX_CACHE", cache)
    capsys.readouterr()
    assert cli.main(["eval", "--config", config, "--workdir", workdir, "--config.eval_examples=8"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["step"] == 4 and {"vqa_accuracy", "cider", "bleu4"} <= set(scores)
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(image)
    capsys.readouterr()
    argv = ["generate", "--checkpoint", workdir, "--image", str(image), "--prompt", "What colour is the shape?"]
    assert cli.main(argv + ["--max_new_tokens", "6"]) == 0
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    assert "</s>" not in answer and "<image>" not in answer
    out = tmp_path / "out.jsonl"
    assert cli.main(argv + ["--max_new_tokens", "6", "--out", str(out)]) == 0
    line = json.loads(out.read_text())
    assert 1 <= len(line["tokens"]) <= 6


def test_a_stage_checkpoint_starts_every_part(tmp_path):
    from vlm_jax.config_lib import ConfigError
    from vlm_jax.interop.convert import write_checkpoint

    system, params = tiny()
    stage1 = jax.tree.map(lambda x: np.asarray(x) + 1.0, params)
    write_checkpoint(system.config, stage1, str(tmp_path / "stage1"))
    system.config.model.stage_checkpoint = str(tmp_path / "stage1")
    started = system.pretrained(jax.device_get(params))
    jax.tree.map(np.testing.assert_array_equal, started, stage1)
    lm = load_config(os.path.join(REPO, "configs/lm.py"))
    lm_system = models.build(lm)
    lm_shapes = nn.unbox(jax.eval_shape(lm_system.init, jax.random.PRNGKey(0), lm_system.dummy_batch(1)))
    write_checkpoint(lm, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), lm_shapes), str(tmp_path / "lm"))
    system.config.model.stage_checkpoint = str(tmp_path / "lm")
    with pytest.raises(ConfigError, match="holds a lm, not a llava"):
        system.pretrained(params)
