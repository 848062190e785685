"""Import transformers' `IdeficsForVisionText2Text` (a Flamingo reproduction) into the `flamingo` system.

IDEFICS is a CLIP ViT (its `last_hidden_state`: class token included, no
post-LayerNorm), an optional Perceiver resampler (keys/values = concat(media,
latents), ReLU feed-forward, optional per-head LayerNorms of q and k), and a
LLaMA LM with a gated cross-attention block before layers 0, n, 2n, ...
(`cross_layer_interval`; RMSNorm + SwiGLU blocks, scalar or per-channel gates,
optional per-head RMSNorms of q and k). Its decoupled embedding and head
(`additional_vocab_size` extra rows, `additional_fc`) are concatenated into
one table and one head of `vocab_size + additional_vocab_size` rows.

Media masks: IDEFICS takes them as `image_attention_mask` [B, L, images]
from its processor (a token sees the latest image before it, and none after
an end-of-sequence token); `vlm-jax forward` passes that mask through.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.hf_clip import vision_tower
from vlm_jax.interop.tensors import Tensors, heads_kernel, out_kernel, read_config, read_safetensors, stack_layers
from vlm_jax.lm.decoder import flamingo_layout

ARCHITECTURE = "IdeficsForVisionText2Text"


def _vision_config(vc: dict) -> dict:
    """IDEFICS's vision config in the CLIP key names `hf_clip.vision_tower` reads."""
    return dict(
        hidden_size=int(vc.get("embed_dim", 768)),
        intermediate_size=int(vc.get("intermediate_size", 5120)),
        num_hidden_layers=int(vc.get("num_hidden_layers", 32)),
        num_attention_heads=int(vc.get("num_attention_heads", 16)),
        patch_size=int(vc.get("patch_size", 14)),
        image_size=int(vc.get("image_size", 224)),
        hidden_act=vc.get("hidden_act", "gelu"),
        layer_norm_eps=float(vc.get("layer_norm_eps", 1e-5)),
        num_channels=int(vc.get("num_channels", 3)),
    )


def _swiglu(t: Tensors, p: str) -> dict:
    return {name: {"kernel": t(f"{p}.{name}_proj.weight").T} for name in ("gate", "up", "down")}


def _perceiver(t: Tensors, pc: dict, depth: int) -> tuple[dict, dict]:
    heads, qk_norm = int(pc.get("resampler_n_heads", 16)), bool(pc.get("qk_layer_norms_perceiver", False))

    def layer(d: int) -> dict:
        a, f = f"blocks.{d}.0.", f"blocks.{d}.1."
        norm = lambda name: {"scale": t(name + ".weight"), "bias": t(name + ".bias")}  # noqa: E731
        out = {
            "norm_media": norm(a + "context_layer_norm"),
            "norm_latents": norm(a + "latents_layer_norm"),
            "query": {"kernel": heads_kernel(t(a + "q_proj.weight"), heads)},
            "key": {"kernel": heads_kernel(t(a + "k_proj.weight"), heads)},
            "value": {"kernel": heads_kernel(t(a + "v_proj.weight"), heads)},
            "out": {"kernel": out_kernel(t(a + "output_proj.weight"), heads)},
            "ff_norm": norm(f + "ln"),
            "ff_in": {"kernel": t(f + "fc.weight").T},
            "ff_out": {"kernel": t(f + "c_proj.weight").T},
        }
        if qk_norm:
            out["query_norm"], out["key_norm"] = norm(a + "q_layer_norm"), norm(a + "k_layer_norm")
        return out

    kwargs = dict(
        depth=depth,
        num_heads=heads,
        head_dim=int(pc.get("resampler_head_dim", 96)),
        num_latents=int(pc.get("resampler_n_latents", 64)),
        ff_act="relu",
        qk_norm=qk_norm,
    )
    params = {
        "latents": t("latents"),
        "layers": stack_layers([layer(d) for d in range(depth)]),
        "norm": {"scale": t("layer_norm.weight"), "bias": t("layer_norm.bias")},
    }
    return kwargs, params


def load_idefics_dir(path: str) -> tuple[dict, dict]:
    """(flamingo `config.model` dict, params) of an `IdeficsForVisionText2Text` directory."""
    cfg = read_config(path)
    if ARCHITECTURE not in cfg.get("architectures", []):
        raise UserError(f"{path}: architectures {cfg.get('architectures')} do not include {ARCHITECTURE}.")
    if cfg.get("tie_word_embeddings"):
        raise UserError(f"{path}: tied IDEFICS embeddings are not supported (IDEFICS checkpoints are untied).")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{path}: RoPE scaling {rope.get('rope_type')!r} is not supported (only plain RoPE).")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: IDEFICS hidden_act {cfg.get('hidden_act')!r} is not supported (only silu).")
    tensors = read_safetensors(path)
    t = Tensors(tensors, "model.", path)
    width, heads, layers = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
    every, eps = int(cfg.get("cross_layer_interval", 1)), float(cfg.get("rms_norm_eps", 1e-6))
    if layers % every:
        raise UserError(f"{path}: cross_layer_interval {every} does not divide num_hidden_layers {layers}.")
    vocab, extra = int(cfg["vocab_size"]), int(cfg.get("additional_vocab_size", 0))
    gate_shape = {"float": "scalar", "vector": "vector"}.get(cfg.get("alpha_type", "float"))
    if gate_shape is None:
        raise UserError(f"{path}: alpha_type {cfg.get('alpha_type')!r} is not 'float' or 'vector'.")
    qk_norm = bool(cfg.get("qk_layer_norms", False))

    vision_kwargs, vision_params = vision_tower(
        "clip", _vision_config(cfg.get("vision_config") or {}), Tensors(tensors, "model.vision_model.", path), path
    )
    resampler, perceiver_params = None, None
    if cfg.get("use_resampler", False):
        pc = cfg.get("perceiver_config") or {}
        resampler, perceiver_params = _perceiver(
            Tensors(tensors, "model.perceiver_resampler.", path), pc, int(pc.get("resampler_depth", 6))
        )

    def self_attention_layer(i: int) -> dict:
        p = f"layers.{i}."
        return {
            "attn_norm": {"scale": t(p + "input_layernorm.weight")},
            "mlp_norm": {"scale": t(p + "post_attention_layernorm.weight")},
            "attn": {
                "query": {"kernel": heads_kernel(t(p + "self_attn.q_proj.weight"), heads)},
                "key": {"kernel": heads_kernel(t(p + "self_attn.k_proj.weight"), heads)},
                "value": {"kernel": heads_kernel(t(p + "self_attn.v_proj.weight"), heads)},
                "out": {"kernel": out_kernel(t(p + "self_attn.o_proj.weight"), heads)},
            },
            "mlp": _swiglu(t, p + "mlp"),
        }

    def cross_attention_layer(j: int) -> dict:
        p = f"gated_cross_attn_layers.{j}."
        gate = (lambda a: a.reshape(())) if gate_shape == "scalar" else (lambda a: a.reshape(width))
        out = {
            "attn_gate": gate(t(p + "alpha_cross_attn")),
            "ff_gate": gate(t(p + "alpha_dense")),
            "norm": {"scale": t(p + "input_layernorm.weight")},
            "query": {"kernel": heads_kernel(t(p + "cross_attn.q_proj.weight"), heads)},
            "key": {"kernel": heads_kernel(t(p + "cross_attn.k_proj.weight"), heads)},
            "value": {"kernel": heads_kernel(t(p + "cross_attn.v_proj.weight"), heads)},
            "out": {"kernel": out_kernel(t(p + "cross_attn.o_proj.weight"), heads)},
            "ff_norm": {"scale": t(p + "post_attention_layernorm.weight")},
            "ff": _swiglu(t, p + "mlp"),
        }
        if qk_norm:
            out["query_norm"] = {"scale": t(p + "cross_attn.q_layer_norm.weight")}
            out["key_norm"] = {"scale": t(p + "cross_attn.k_layer_norm.weight")}
        return out

    stacked = stack_layers([self_attention_layer(i) for i in range(layers)])
    rows = [t("embed_tokens.weight")] + ([t("embed_tokens.additional_embedding.weight")] if extra else [])
    decoder: dict[str, Any] = {
        "embed": {"embedding": np.concatenate(rows)},
        "layer_groups": {
            "xattn": stack_layers([cross_attention_layer(j) for j in range(layers // every)]),
            "layers": flamingo_layout(stacked, every),
        },
        "final_norm": {"scale": t("norm.weight")},
    }
    head = Tensors(tensors, "lm_head.", path)
    decoder["lm_head"] = {
        "kernel": np.concatenate([head("weight")] + ([head("additional_fc.weight")] if extra else [])).T
    }
    lm = dict(
        vocab_size=vocab + extra,
        embed_dim=width,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        mlp_dim=int(cfg["intermediate_size"]),
        head_dim=width // heads,
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        norm_eps=eps,
        tie_embeddings=False,
        cross_attn_every=every,
        cross_attn=dict(
            num_heads=heads,
            head_dim=width // heads,
            norm="rmsnorm",
            norm_eps=eps,
            ff="gated",
            ff_dim=int(cfg["intermediate_size"]),
            gate_shape=gate_shape,
            qk_norm=qk_norm,
        ),
    )
    model = dict(
        name="flamingo",
        encoder="vit",
        encoder_kwargs=vision_kwargs,
        image_size=vision_kwargs["image_size"],
        resampler=resampler,
        lm=lm,
        # IDEFICS's processor adds <fake_token_around_image> and <image> as the two extra tokens (vocab, vocab + 1).
        media_token_id=vocab + 1 if extra >= 2 else vocab - 1,
        only_attend_immediate_media=True,
        image_tokens=1,
    )
    params = {"vision": vision_params, "decoder": decoder}
    if perceiver_params is not None:
        params["perceiver"] = perceiver_params
    return model, params


@register_converter(ARCHITECTURE)
def convert_idefics_dir(path: str, raw: dict) -> tuple:
    """(system config, params) of an `IdeficsForVisionText2Text` directory: the `flamingo` system."""
    del raw  # load_idefics_dir reads config.json itself
    model, params = load_idefics_dir(path)
    return system_config(path, model, {"seq_len": 8, "max_images": 1}), params
