"""open_flamingo (PyTorch) weights -> vlm_jax parameters, from a state dict of numpy arrays (no torch import).

Key names follow open_flamingo's `src/helpers.py` (the same layout as
lucidrains' flamingo-pytorch).
"""

from __future__ import annotations

import numpy as np

from vlm_jax.errors import UserError


def _get(state: dict, key: str) -> np.ndarray:
    if key not in state:
        raise UserError(f"the open_flamingo state dict lacks {key!r}.")
    return np.asarray(state[key], np.float32)


def perceiver_params(state: dict, num_heads: int, prefix: str = "") -> dict:
    """`PerceiverResampler` weights -> params of `vlm_jax.connectors.perceiver.PerceiverResampler`."""
    latents = _get(state, prefix + "latents")
    width = latents.shape[1]
    depth = len({k.split(".")[1] for k in state if k.startswith(prefix + "layers.")})
    if depth == 0:
        raise UserError("the open_flamingo state dict has no perceiver layers.")

    def heads(w):  # torch [inner, width] -> [width, heads, head_dim]
        return w.T.reshape(width, num_heads, -1)

    layers = []
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        kv = _get(state, p + "0.to_kv.weight")
        inner = kv.shape[0] // 2
        layers.append(
            {
                "norm_media": {
                    "scale": _get(state, p + "0.norm_media.weight"),
                    "bias": _get(state, p + "0.norm_media.bias"),
                },
                "norm_latents": {
                    "scale": _get(state, p + "0.norm_latents.weight"),
                    "bias": _get(state, p + "0.norm_latents.bias"),
                },
                "query": {"kernel": heads(_get(state, p + "0.to_q.weight"))},
                "key": {"kernel": heads(kv[:inner])},
                "value": {"kernel": heads(kv[inner:])},
                "out": {"kernel": _get(state, p + "0.to_out.weight").T.reshape(num_heads, -1, width)},
                "ff_norm": {"scale": _get(state, p + "1.0.weight"), "bias": _get(state, p + "1.0.bias")},
                "ff_in": {"kernel": _get(state, p + "1.1.weight").T},
                "ff_out": {"kernel": _get(state, p + "1.3.weight").T},
            }
        )
    stacked = {k: {n: np.stack([layer[k][n] for layer in layers]) for n in layers[0][k]} for k in layers[0]}
    params = {
        "latents": latents,
        "layers": stacked,
        "norm": {"scale": _get(state, prefix + "norm.weight"), "bias": _get(state, prefix + "norm.bias")},
    }
    if prefix + "frame_embs" in state:
        params["frame_embs"] = _get(state, prefix + "frame_embs")
    if prefix + "media_time_embs" in state:
        params["media_time_embs"] = _get(state, prefix + "media_time_embs")[:, 0, :]
    return params


def gated_xattn_params(state: dict, num_heads: int, prefix: str = "") -> dict:
    """`GatedCrossAttentionBlock` weights -> params of `vlm_jax.lm.gated_xattn.GatedCrossAttention`."""
    q = _get(state, prefix + "attn.to_q.weight")
    kv = _get(state, prefix + "attn.to_kv.weight")
    out = _get(state, prefix + "attn.to_out.weight")
    inner, width, visual = q.shape[0], q.shape[1], kv.shape[1]
    return {
        "attn_gate": _get(state, prefix + "attn_gate").reshape(()),
        "ff_gate": _get(state, prefix + "ff_gate").reshape(()),
        "norm": {"scale": _get(state, prefix + "attn.norm.weight"), "bias": _get(state, prefix + "attn.norm.bias")},
        "query": {"kernel": q.T.reshape(width, num_heads, -1)},
        "key": {"kernel": kv[:inner].T.reshape(visual, num_heads, -1)},
        "value": {"kernel": kv[inner:].T.reshape(visual, num_heads, -1)},
        "out": {"kernel": out.T.reshape(num_heads, -1, width)},
        "ff_norm": {"scale": _get(state, prefix + "ff.0.weight"), "bias": _get(state, prefix + "ff.0.bias")},
        "ff_in": {"kernel": _get(state, prefix + "ff.1.weight").T},
        "ff_out": {"kernel": _get(state, prefix + "ff.3.weight").T},
    }
