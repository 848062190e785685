"""Qwen-VL through the in-sequence system contract: the paper's sizes, the cross-attention resampler against a
PyTorch transcription of Qwen-VL's `Resampler`, packed examples kept apart, and the tiny model trained,
evaluated and answering. (No transformers class exists for Qwen-VL, so there is no checkpoint parity.)"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, packed_row, train_briefly
from vlm_jax import cli, models
from vlm_jax.config_lib import load_config
from vlm_jax.connectors.xattn_resampler import CrossAttentionResampler


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


def mae_posemb(width, side):
    """MAE's get_2d_sincos_pos_embed as Qwen-VL's visual.py copies it (meshgrid(w, h): grid[0] is the column)."""
    grid = np.stack(np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32)), 0)

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(width // 2, grid[0]), one_d(width // 2, grid[1])], axis=1).astype(np.float32)


class TorchResampler(torch.nn.Module):
    """Qwen-VL visual.py's Resampler, then ln_post and proj (VisionTransformer.forward's tail)."""

    def __init__(self, grid, width, heads, kv_dim):
        super().__init__()
        self.pos_embed = torch.from_numpy(mae_posemb(width, grid))
        self.query = torch.nn.Parameter(torch.randn(grid * grid, width))
        self.kv_proj = torch.nn.Linear(kv_dim, width, bias=False)
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_q, self.ln_kv = torch.nn.LayerNorm(width, eps=1e-6), torch.nn.LayerNorm(width, eps=1e-6)
        self.ln_post = torch.nn.LayerNorm(width, eps=1e-6)
        self.proj = torch.nn.Parameter(torch.randn(width, width) * width**-0.5)

    def get_abs_pos(self, tgt_size):
        src = int(self.pos_embed.shape[0] ** 0.5)
        grid = self.pos_embed.reshape(1, src, src, -1).permute(0, 3, 1, 2)
        out = torch.nn.functional.interpolate(grid, size=(tgt_size, tgt_size), mode="bicubic", align_corners=False)
        return out.permute(0, 2, 3, 1).flatten(0, 2)

    def forward(self, x):
        pos = self.get_abs_pos(int(x.shape[1] ** 0.5))
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        q = self.ln_q(self.query)
        q = q.unsqueeze(1).repeat(1, x.shape[1], 1)
        out = self.attn(q + self.pos_embed.unsqueeze(1), x + pos.unsqueeze(1), x)[0].permute(1, 0, 2)
        return self.ln_post(out) @ self.proj


def test_resampler_matches_qwen_vls_resampler():
    torch.manual_seed(0)
    grid, width, heads, kv_dim, tokens = 4, 32, 2, 24, 36  # 16 queries; keys on a 6 x 6 grid (positions resampled)
    ref = TorchResampler(grid, width, heads, kv_dim).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    t = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    w_q, w_k, w_v = np.split(t["attn.in_proj_weight"], 3)
    b_q, b_k, b_v = np.split(t["attn.in_proj_bias"], 3)
    head = width // heads

    def proj(w, b):
        return {"kernel": w.T.reshape(width, heads, head), "bias": b.reshape(heads, head)}

    params = {
        "queries": t["query"],
        "kv_proj": {"kernel": t["kv_proj.weight"].T},
        "ln_kv": {"scale": t["ln_kv.weight"], "bias": t["ln_kv.bias"]},
        "ln_q": {"scale": t["ln_q.weight"], "bias": t["ln_q.bias"]},
        "query": proj(w_q, b_q),
        "key": proj(w_k, b_k),
        "value": proj(w_v, b_v),
        "out": {"kernel": t["attn.out_proj.weight"].T.reshape(heads, head, width), "bias": t["attn.out_proj.bias"]},
        "ln_post": {"scale": t["ln_post.weight"], "bias": t["ln_post.bias"]},
        "proj": {"kernel": t["proj"]},
    }
    x = np.random.default_rng(0).normal(size=(3, tokens, kv_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    module = CrossAttentionResampler(out_dim=width, queries=grid * grid, head_dim=head)
    got = np.asarray(module.apply({"params": params}, x))
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


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
