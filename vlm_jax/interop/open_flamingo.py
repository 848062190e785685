"""open_flamingo (PyTorch) weights -> vlm_jax parameters, from a state dict of numpy arrays (no torch import).

Key names follow open_flamingo's `src/helpers.py` (the same layout as
lucidrains' flamingo-pytorch).
"""

from __future__ import annotations

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.interop.tensors import Tensors, heads_kernel, out_kernel, stack_layers

_WHERE = "open_flamingo state dict"


def perceiver_params(state: dict, num_heads: int, prefix: str = "") -> dict:
    """`PerceiverResampler` weights -> params of `vlm_jax.connectors.perceiver.PerceiverResampler`."""
    t = Tensors(state, prefix, _WHERE)
    depth = len({k.split(".")[1] for k in state if k.startswith(prefix + "layers.")})
    if depth == 0:
        raise UserError("the open_flamingo state dict has no perceiver layers.")

    def norm(name):
        return {"scale": t(name + ".weight"), "bias": t(name + ".bias")}

    layers = []
    for i in range(depth):
        p = f"layers.{i}."
        k, v = np.split(t(p + "0.to_kv.weight"), 2, axis=0)
        layers.append(
            {
                "norm_media": norm(p + "0.norm_media"),
                "norm_latents": norm(p + "0.norm_latents"),
                "query": {"kernel": heads_kernel(t(p + "0.to_q.weight"), num_heads)},
                "key": {"kernel": heads_kernel(k, num_heads)},
                "value": {"kernel": heads_kernel(v, num_heads)},
                "out": {"kernel": out_kernel(t(p + "0.to_out.weight"), num_heads)},
                "ff_norm": norm(p + "1.0"),
                "ff_in": {"kernel": t(p + "1.1.weight").T},
                "ff_out": {"kernel": t(p + "1.3.weight").T},
            }
        )
    params = {"latents": t("latents"), "layers": stack_layers(layers), "norm": norm("norm")}
    if "frame_embs" in t:
        params["frame_embs"] = t("frame_embs")
    if "media_time_embs" in t:
        params["media_time_embs"] = t("media_time_embs")[:, 0, :]
    return params


def gated_xattn_params(state: dict, num_heads: int, prefix: str = "") -> dict:
    """`GatedCrossAttentionBlock` weights -> params of `vlm_jax.lm.gated_xattn.GatedCrossAttention`."""
    t = Tensors(state, prefix, _WHERE)
    k, v = np.split(t("attn.to_kv.weight"), 2, axis=0)
    return {
        "attn_gate": t("attn_gate").reshape(()),
        "ff_gate": t("ff_gate").reshape(()),
        "norm": {"scale": t("attn.norm.weight"), "bias": t("attn.norm.bias")},
        "query": {"kernel": heads_kernel(t("attn.to_q.weight"), num_heads)},
        "key": {"kernel": heads_kernel(k, num_heads)},
        "value": {"kernel": heads_kernel(v, num_heads)},
        "out": {"kernel": out_kernel(t("attn.to_out.weight"), num_heads)},
        "ff_norm": {"scale": t("ff.0.weight"), "bias": t("ff.0.bias")},
        "ff_in": {"kernel": t("ff.1.weight").T},
        "ff_out": {"kernel": t("ff.3.weight").T},
    }
