"""Import transformers `LlamaForCausalLM` directories (config.json + *.safetensors, no torch) into the decoder LM.

The decoder of `vlm_jax/lm/decoder.py` is LLaMA's architecture (RoPE in the
rotate-half layout, RMSNorm, SwiGLU, grouped-query attention), so this is a
renaming and reshaping of weights: projections [out, in] become kernels
[in, heads, head_dim], per-layer weights are stacked for the scanned stack,
and a tied `lm_head` (not saved by transformers 5) is re-tied. RoPE settings
are read from `rope_parameters` (transformers 5) or `rope_theta` (older).
"""

from __future__ import annotations

import jax
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.interop.hf_clip import _read_config, _read_tensors, _Tensors


def load_llama_dir(path: str) -> tuple[dict, dict]:
    """(DecoderLM kwargs, params) of a LlamaForCausalLM directory."""
    cfg = _read_config(path)
    scaling = (cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}).get("rope_type", "default")
    if scaling not in ("default", None):
        raise UserError(f"{path}: RoPE scaling {scaling!r} is not supported yet (only plain RoPE).")
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    width = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or width // heads)
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    tied = bool(cfg.get("tie_word_embeddings", False))
    kwargs = dict(
        vocab_size=int(cfg["vocab_size"]),
        embed_dim=width,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        mlp_dim=int(cfg["intermediate_size"]),
        head_dim=head_dim,
        rope_theta=float(theta),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=tied,
    )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError(f"{path}: attention or MLP biases are not supported by the decoder yet.")
    t = _Tensors(_read_tensors(path), "model.", path)

    def layer(i):
        p = f"layers.{i}."
        return {
            "attn_norm": {"scale": t(p + "input_layernorm.weight")},
            "mlp_norm": {"scale": t(p + "post_attention_layernorm.weight")},
            "attn": {
                "query": {"kernel": t(p + "self_attn.q_proj.weight").T.reshape(width, heads, head_dim)},
                "key": {"kernel": t(p + "self_attn.k_proj.weight").T.reshape(width, kv_heads, head_dim)},
                "value": {"kernel": t(p + "self_attn.v_proj.weight").T.reshape(width, kv_heads, head_dim)},
                "out": {"kernel": t(p + "self_attn.o_proj.weight").T.reshape(heads, head_dim, width)},
            },
            "mlp": {
                "gate": {"kernel": t(p + "mlp.gate_proj.weight").T},
                "up": {"kernel": t(p + "mlp.up_proj.weight").T},
                "down": {"kernel": t(p + "mlp.down_proj.weight").T},
            },
        }

    layers = [layer(i) for i in range(kwargs["num_layers"])]
    params = {
        "embed": {"embedding": t("embed_tokens.weight")},
        "layers": jax.tree.map(lambda *leaves: np.stack(leaves), *layers),
        "final_norm": {"scale": t("norm.weight")},
    }
    if not tied:
        params["lm_head"] = {"kernel": _Tensors(t.tensors, "", path)("lm_head.weight").T}
    return kwargs, params
