"""Qwen-VL through the in-sequence system contract: the paper's sizes, packed examples kept apart, and the tiny
model trained, evaluated and answering. (No transformers class exists for Qwen-VL, so there is no checkpoint
parity; the cross-attention resampler against a PyTorch transcription of Qwen-VL's `Resampler` is in
tests/test_qwen_vl_resampler.py.)"""

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


def test_paper_size_parameter_counts():
    """arXiv:2308.12966 table 1: vision encoder 1.9B, VL adapter 0.08B, LLM 7.7B, total 9.6B."""
    system = models.build(load_config(os.path.join(REPO, "configs/qwen_vl.py:variant=7b")))
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    count = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in shapes.items()}
    assert abs(sum(count.values()) / 9.6e9 - 1) < 0.02
    assert abs(count["decoder"] / 7.7e9 - 1) < 0.02
    adapter = count["connector"] - 4096 * 4096 - 2 * 4096  # without ln_post and proj, which the ViT owns there
    assert abs(adapter / 0.08e9 - 1) < 0.1 and abs(count["vision"] / 1.9e9 - 1) < 0.05  # the table's 1-2 digits
    assert system.image_tokens == 256


def test_a_packed_row_equals_its_examples_run_alone():
    system = models.build(load_config(os.path.join(REPO, "configs/qwen_vl.py:variant=tiny")))
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), system.dummy_batch(1)))
    rng, image_id = np.random.default_rng(0), system.module.image_token_id

    def example(text_len):
        tokens = [1, *[image_id] * system.image_tokens, *rng.integers(10, 250, size=text_len)]
        return (
            np.asarray(tokens, np.int32),
            np.zeros(len(tokens), bool),
            rng.normal(size=(32, 32, 3)).astype(np.float32),
        )

    a, b = example(9), example(14)
    length = len(a[0]) + len(b[0]) + 3
    logits = jax.jit(system.logits)
    strip = lambda batch: {k: v for k, v in batch.items() if k != "prefix_mask"}  # noqa: E731
    both = np.asarray(logits(params, strip(packed_row([a, b], length))))[0]
    alone_a = np.asarray(logits(params, strip(packed_row([a], length))))[0]
    alone_b = np.asarray(logits(params, strip(packed_row([b], length))))[0]
    na, nb = len(a[0]), len(b[0])
    np.testing.assert_allclose(both[:na], alone_a[:na], atol=1e-5, rtol=0)
    np.testing.assert_allclose(both[na : na + nb], alone_b[:nb], atol=1e-5, rtol=0)
    b2 = (b[0], b[1], rng.normal(size=(32, 32, 3)).astype(np.float32))
    changed = np.asarray(logits(params, strip(packed_row([a, b2], length))))[0]
    np.testing.assert_array_equal(changed[:na], both[:na])
    assert np.abs(changed[na : na + nb] - both[na : na + nb]).max() > 1e-3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_briefly(tmp_path_factory, "qwen_vl.py:data=builtin,scale=0.02")


def test_tiny_qwen_vl_trains_evaluates_and_answers(trained, tmp_path, capsys, monkeypatch):
    workdir, status, cache, config = trained
    assert status == 0
    monkeypatch.setenv("VLM_JAX_CACHE", cache)
    capsys.readouterr()
    assert cli.main(["eval", "--config", config, "--workdir", workdir, "--config.eval_examples=8"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["step"] == 4 and {"vqa_accuracy", "cider"} <= set(scores)
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(image)
    argv = ["generate", "--checkpoint", workdir, "--image", str(image), "--prompt", "What colour is the shape?"]
    out = tmp_path / "out.jsonl"
    assert cli.main(argv + ["--max_new_tokens", "6", "--out", str(out)]) == 0
    assert 1 <= len(json.loads(out.read_text())["tokens"]) <= 6
