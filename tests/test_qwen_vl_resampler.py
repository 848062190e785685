"""Qwen-VL's cross-attention resampler against a PyTorch transcription of Qwen-VL's `Resampler` (visual.py) on the
same random weights. The rest of Qwen-VL (sizes, packing, training) is in tests/test_qwen_vl.py, which needs no
PyTorch."""

import numpy as np
import pytest

from vlm_jax.connectors.xattn_resampler import CrossAttentionResampler

torch = pytest.importorskip(
    "torch", reason="the reference is a PyTorch transcription of Qwen-VL's Resampler: pip install -e '.[interop]'"
)


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
