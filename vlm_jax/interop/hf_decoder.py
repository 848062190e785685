"""Import transformers decoder LMs (config.json + *.safetensors, no torch) into `vlm_jax/lm/decoder.py`.

`LlamaForCausalLM`, `MistralForCausalLM` (sliding-window attention),
`Qwen2ForCausalLM` (biases on q/k/v), `GemmaForCausalLM`
(GeGLU, RMSNorm weights stored as `w` for a scale of `1 + w`, embeddings
scaled by sqrt(width), tied head) and `MptForCausalLM` (ALiBi, bias-free
LayerNorm, fused Wqkv, GELU MLP, tied head) and `PersimmonForCausalLM`
(Fuyu's LM: LayerNorm with biases, fused per-head query_key_value, per-head
query/key LayerNorm, partial rotary, squared-ReLU MLP with biases). Projections [out, in] become
kernels [in, heads, head_dim], per-layer weights are stacked for the scanned
stack, and a tied `lm_head` (not saved by transformers 5) is re-tied. RoPE
settings are read from `rope_parameters` (transformers 5) or the older
`rope_theta` / `rope_scaling`, with "linear" and "llama3" (Llama 3.1) scaling.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.tensors import Tensors as _Tensors
from vlm_jax.interop.tensors import read_config as _read_config
from vlm_jax.interop.tensors import read_safetensors as _read_tensors
from vlm_jax.nn.rope import SCALING_KEYS, check_scaling

ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "GemmaForCausalLM",
    "MptForCausalLM",
    "PersimmonForCausalLM",
)


def load_decoder_dir(path: str) -> tuple[dict, dict]:
    """(DecoderLM kwargs, params) of a LLaMA, Mistral, Qwen2, Gemma, MPT or Persimmon causal-LM directory."""
    cfg = _read_config(path)
    arch = next((a for a in cfg.get("architectures", []) if a in ARCHITECTURES), None)
    if arch is None:
        raise UserError(f"{path}: architectures {cfg.get('architectures')} are not one of {', '.join(ARCHITECTURES)}.")
    if arch == "MptForCausalLM":
        return _load_mpt(path, cfg)
    if arch == "PersimmonForCausalLM":
        return persimmon_from_tensors(cfg, lambda: _read_tensors(path), "model.", "lm_head.weight", path)
    return decoder_from_tensors(arch, cfg, lambda: _read_tensors(path), "model.", "lm_head.weight", path)


def decoder_from_tensors(
    arch: str, cfg: dict, tensors: Callable[[], dict], prefix: str, head: str, path: str
) -> tuple[dict, dict]:
    """(DecoderLM kwargs, params) of a LLaMA, Mistral, Qwen2 or Gemma decoder, alone or inside a larger checkpoint.

    `arch` is its transformers class (one of `ARCHITECTURES` but MPT and Persimmon), `cfg`
    its (text) config, `tensors()` returns the checkpoint's tensors (called
    after the config checks), `prefix` starts the base model's keys
    (`{prefix}embed_tokens.weight`, `{prefix}layers.*`), `head` is the LM
    head's key (read unless the embeddings are tied), and `path` names the
    checkpoint in errors.
    """
    gemma, qwen = arch == "GemmaForCausalLM", arch == "Qwen2ForCausalLM"
    if arch != "MistralForCausalLM" and (
        "sliding_attention" in (cfg.get("layer_types") or []) or (qwen and cfg.get("use_sliding_window"))
    ):
        raise UserError(f"{path}: sliding-window layers of {arch} are not supported (only Mistral's window on all).")
    if not gemma and cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: activation {cfg.get('hidden_act')!r} is not supported (only silu).")
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    width = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or width // heads)
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    tied = bool(cfg.get("tie_word_embeddings", gemma))  # Gemma ties by default
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
        qkv_bias=qwen,
        mlp_act="gelu_tanh" if gemma else "silu",
        embed_scale=gemma,
        rope_scaling=_rope_scaling(path, cfg),
        sliding_window=int(cfg.get("sliding_window") or 0) if arch == "MistralForCausalLM" else 0,
    )
    if gemma and cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UserError(f"{path}: Gemma activation {cfg.get('hidden_activation')!r} is not supported.")
    if not qwen and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise UserError(f"{path}: attention or MLP biases are not supported by the decoder yet.")
    t = _Tensors(tensors(), prefix, path)

    def norm(name):  # Gemma stores w for a scale of (1 + w)
        return {"scale": t(name) + 1.0 if gemma else t(name)}

    def projection(name, n):
        p = {"kernel": t(name + ".weight").T.reshape(width, n, head_dim)}
        if qwen:
            p["bias"] = t(name + ".bias").reshape(n, head_dim)
        return p

    def layer(i):
        p = f"layers.{i}."
        return {
            "attn_norm": norm(p + "input_layernorm.weight"),
            "mlp_norm": norm(p + "post_attention_layernorm.weight"),
            "attn": {
                "query": projection(p + "self_attn.q_proj", heads),
                "key": projection(p + "self_attn.k_proj", kv_heads),
                "value": projection(p + "self_attn.v_proj", kv_heads),
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
        "final_norm": norm("norm.weight"),
    }
    if not tied:
        params["lm_head"] = {"kernel": _Tensors(t.tensors, "", path)(head).T}
    return kwargs, params


def _rope_scaling(path: str, cfg: dict) -> dict | None:
    """The DecoderLM `rope_scaling` of a transformers config (None for plain RoPE).

    Read from `rope_parameters` (transformers 5) or the older `rope_scaling`
    (whose type may be under `type`); Llama 3's original context length falls
    back as in transformers' `standardize_rope_params` (a top-level
    `original_max_position_embeddings` first, then `max_position_embeddings`).
    """
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind not in SCALING_KEYS:
        raise UserError(f"{path}: RoPE scaling {kind!r} is not supported (only {', '.join(SCALING_KEYS)}).")
    scaling = {"rope_type": kind, **{key: rope.get(key) for key in SCALING_KEYS[kind]}}
    if kind == "llama3":
        scaling["original_max_position_embeddings"] = (
            cfg.get("original_max_position_embeddings")
            or scaling["original_max_position_embeddings"]
            or cfg.get("max_position_embeddings")
        )
    try:
        check_scaling(scaling)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return scaling


def persimmon_from_tensors(
    cfg: dict, tensors: Callable[[], dict], prefix: str, head: str, path: str
) -> tuple[dict, dict]:
    """(DecoderLM kwargs, params) of a Persimmon decoder (transformers' `PersimmonForCausalLM`), alone or as
    Fuyu's LM; the arguments are `decoder_from_tensors`'s.

    Persimmon: pre-LayerNorm blocks with biases; one fused `query_key_value`
    projection whose output is laid out [heads, (q, k, v), head_dim]
    (transformers' `_split_heads`); a LayerNorm over head_dim (shared by the
    heads) on queries and keys when `qk_layernorm`; RoPE on the first
    `partial_rotary_factor` of each head (0.5 by default); `dense` out
    projection with a bias; `relu2` (squared ReLU) MLP with biases; a final
    LayerNorm and an untied head unless `tie_word_embeddings`.
    """
    rope = cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type", (cfg.get("rope_scaling") or {}).get("type", "default"))
    if kind not in ("default", None):
        raise UserError(f"{path}: Persimmon RoPE scaling {kind!r} is not supported (only the default RoPE).")
    if cfg.get("hidden_act", "relu2") != "relu2":
        raise UserError(f"{path}: Persimmon activation {cfg.get('hidden_act')!r} is not supported (only relu2).")
    width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = width // heads
    if head_dim * heads != width:
        raise UserError(f"{path}: hidden_size {width} is not a multiple of num_attention_heads {heads}.")
    fraction = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5)))
    qk_norm = bool(cfg.get("qk_layernorm", True))
    tied = bool(cfg.get("tie_word_embeddings", False))
    kwargs = dict(
        vocab_size=int(cfg["vocab_size"]),
        embed_dim=width,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=heads,
        mlp_dim=int(cfg["intermediate_size"]),
        head_dim=head_dim,
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),  # PersimmonConfig default
        rope_fraction=fraction,
        qk_norm=qk_norm,
        norm="layernorm",
        norm_bias=True,
        norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        attn_bias=True,
        mlp="plain",
        mlp_act="sqrelu",
        mlp_bias=True,
        tie_embeddings=tied,
    )
    t = _Tensors(tensors(), prefix, path)

    def layernorm(name):
        return {"scale": t(name + ".weight"), "bias": t(name + ".bias")}

    def layer(i):
        p = f"layers.{i}."
        # [3 * width, width] rows laid out [heads, (q, k, v), head_dim] -> three [width, heads, head_dim] kernels
        fused = t(p + "self_attn.query_key_value.weight").reshape(heads, 3, head_dim, width)
        fused_bias = t(p + "self_attn.query_key_value.bias").reshape(heads, 3, head_dim)
        attn = {
            name: {"kernel": fused[:, j].transpose(2, 0, 1), "bias": fused_bias[:, j]}
            for j, name in enumerate(("query", "key", "value"))
        }
        attn["out"] = {
            "kernel": t(p + "self_attn.dense.weight").T.reshape(heads, head_dim, width),
            "bias": t(p + "self_attn.dense.bias"),
        }
        if qk_norm:
            attn["query_norm"] = layernorm(p + "self_attn.q_layernorm")
            attn["key_norm"] = layernorm(p + "self_attn.k_layernorm")
        return {
            "attn_norm": layernorm(p + "input_layernorm"),
            "mlp_norm": layernorm(p + "post_attention_layernorm"),
            "attn": attn,
            "mlp": {
                "up": {"kernel": t(p + "mlp.dense_h_to_4h.weight").T, "bias": t(p + "mlp.dense_h_to_4h.bias")},
                "down": {"kernel": t(p + "mlp.dense_4h_to_h.weight").T, "bias": t(p + "mlp.dense_4h_to_h.bias")},
            },
        }

    layers = [layer(i) for i in range(kwargs["num_layers"])]
    params = {
        "embed": {"embedding": t("embed_tokens.weight")},
        "layers": jax.tree.map(lambda *leaves: np.stack(leaves), *layers),
        "final_norm": layernorm("final_layernorm"),
    }
    if not tied:
        params["lm_head"] = {"kernel": _Tensors(t.tensors, "", path)(head).T}
    return kwargs, params


def _load_mpt(path: str, cfg: dict) -> tuple[dict, dict]:
    """MPT: ALiBi instead of positions, pre-LayerNorm without biases, fused Wqkv, up -> GELU -> down, tied head.

    Like transformers' `MptForCausalLM`, the ALiBi bias uses every key's
    distance to the query (translation-invariant, so padding does not shift
    it). Non-default MosaicML options (clip_qkv, qk_ln, ...) raise an error.
    """
    attn = cfg.get("attn_config") or {}
    width, heads = int(cfg["d_model"]), int(cfg["n_heads"])
    unsupported = {
        "attn_config.clip_qkv": attn.get("clip_qkv"),
        "attn_config.qk_ln": attn.get("qk_ln"),
        "attn_config.prefix_lm": attn.get("prefix_lm"),
        "attn_config.softmax_scale": attn.get("softmax_scale") not in (None, (width / heads) ** -0.5),
        "attn_config.alibi=false": attn.get("alibi", True) is False,
        "attn_config.attn_type": attn.get("attn_type", "multihead_attention") != "multihead_attention",
        "attn_config.alibi_bias_max": attn.get("alibi_bias_max", 8) != 8,  # transformers always uses 8
        "no_bias=false": cfg.get("no_bias", True) is False,
        "logit_scale": cfg.get("logit_scale"),
    }
    for option, used in unsupported.items():
        if used:
            raise UserError(f"{path}: MPT's {option} is not supported by this importer (default MPT settings only).")
    tied = bool(cfg.get("tie_word_embeddings", True))
    t = _Tensors(_read_tensors(path), "transformer.", path)
    kwargs = dict(
        vocab_size=int(cfg["vocab_size"]),
        embed_dim=width,
        num_layers=int(cfg["n_layers"]),
        num_heads=heads,
        num_kv_heads=heads,
        mlp_dim=t("blocks.0.ffn.up_proj.weight").shape[0],
        position_embedding="alibi",
        alibi_bias_max=8.0,
        norm="layernorm",
        norm_bias=False,
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        mlp="plain",
        mlp_act="gelu",
        tie_embeddings=tied,
    )
    head_dim = width // heads

    def layer(i):
        p = f"blocks.{i}."
        q, k, v = np.split(t(p + "attn.Wqkv.weight"), 3, axis=0)  # [3 * width, width]: q, then k, then v rows
        heads_kernel = lambda w: {"kernel": w.T.reshape(width, heads, head_dim)}  # noqa: E731
        return {
            "attn_norm": {"scale": t(p + "norm_1.weight")},
            "mlp_norm": {"scale": t(p + "norm_2.weight")},
            "attn": {
                "query": heads_kernel(q),
                "key": heads_kernel(k),
                "value": heads_kernel(v),
                "out": {"kernel": t(p + "attn.out_proj.weight").T.reshape(heads, head_dim, width)},
            },
            "mlp": {
                "up": {"kernel": t(p + "ffn.up_proj.weight").T},
                "down": {"kernel": t(p + "ffn.down_proj.weight").T},
            },
        }

    layers = [layer(i) for i in range(kwargs["num_layers"])]
    params = {
        "embed": {"embedding": t("wte.weight")},
        "layers": jax.tree.map(lambda *leaves: np.stack(leaves), *layers),
        "final_norm": {"scale": t("norm_f.weight")},
    }
    if not tied:
        params["lm_head"] = {"kernel": _Tensors(t.tensors, "", path)("lm_head.weight").T}
    return kwargs, params


@register_converter(*ARCHITECTURES)
def convert_decoder_dir(path: str, raw: dict) -> tuple:
    """(system config, params) of a decoder-LM directory: the `lm` system."""
    del raw  # load_decoder_dir reads config.json itself
    kwargs, params = load_decoder_dir(path)
    return system_config(path, dict(name="lm", **kwargs), {"seq_len": 8}), params
