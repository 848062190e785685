"""MiniGPT-v2: its configuration builds and trains a step on CPU; the paper size has the published parts' sizes."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

from conftest import REPO
from vlm_jax import cli, models
from vlm_jax.config_lib import load_config


def build(variant):
    return models.build(load_config(os.path.join(REPO, f"configs/minigpt_v2.py:variant={variant}")))


def test_paper_size_parts_match_the_published_sizes():
    system = build("7b")
    assert system.image_tokens == 256  # 448 / 14 = 32, 32^2 = 1024 patches, 4 per token (notes: "-75%")
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    count = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in shapes.items()}
    # LLaMA-2-7B: 6.74B parameters (Touvron et al. 2023, arXiv:2307.09288, table 1 and the released checkpoint).
    assert abs(count["decoder"] / 6.74e9 - 1) < 0.02
    # EVA ViT-g/14: "1.0B" parameters (Fang et al. 2023, EVA, arXiv:2211.07636, table 1; MiniGPT-v2 sec. 3.1).
    assert abs(count["vision"] / 1.0e9 - 1) < 0.02
    # One linear layer from 4 x 1408 to 4096 (with bias).
    assert count["connector"] == 4 * 1408 * 4096 + 4096


def test_tiny_merges_four_tokens_and_learns():
    system = build("tiny")
    assert system.image_tokens == 4  # 32 / 8 = 4, 16 patches -> 4 tokens
    batch = system.dummy_batch(2)
    batch["targets"] = np.roll(batch["tokens"], -1, axis=1)
    batch["loss_mask"][:] = 1.0
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), batch))

    def loss(p):
        total, weight, _ = system.loss(p, batch)
        return total / weight

    value, grads = jax.value_and_grad(loss)(params)
    # The loss is the mean next-token cross-entropy of the system's logits (float64 NumPy log-softmax).
    x = np.asarray(system.logits(params, batch), np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"], np.float64)
    np.testing.assert_allclose(float(value), (ce * mask).sum() / mask.sum(), rtol=1e-5)
    for leaf in jax.tree.leaves(grads["connector"]):  # every projector weight gets a gradient through the LM
        assert np.all(np.any(np.asarray(leaf) != 0, axis=0))


def test_tiny_trains_on_the_built_in_data_is_evaluated_and_answers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLM_JAX_CACHE", str(tmp_path / "cache"))
    config = os.path.join(REPO, "configs/minigpt_v2.py:data=builtin,scale=0.02")
    workdir = str(tmp_path / "run")
    short = ["--config.total_steps=4", "--config.batch_size=8", "--config.eval_examples=8", "--config.log_every=2"]
    assert cli.main(["train", "--config", config, "--workdir", workdir, *short]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--config", config, "--workdir", workdir, "--config.eval_examples=8"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["step"] == 4 and {"vqa_accuracy", "cider"} <= set(scores)
    image = tmp_path / "blue.png"
    Image.new("RGB", (64, 64), (20, 20, 220)).save(image)
    argv = ["generate", "--checkpoint", workdir, "--image", str(image), "--prompt", "What colour is the shape?"]
    assert cli.main(argv + ["--max_new_tokens", "5", "--out", str(tmp_path / "out.jsonl")]) == 0
    line = json.loads((tmp_path / "out.jsonl").read_text())
    assert 1 <= len(line["tokens"]) <= 5 and "<ImageHere>" not in line["text"]
