"""Import transformers' `Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration` into the
`qwen2_vl` system.

The vision tower (`visual.*`): a bias-free Conv3d patch embedding [D, 3, 2, 14, 14] (a linear map of the
flattened patch), blocks with a fused `qkv` (q, k, v stacked, with biases) and `proj`, LayerNorm `norm1` /
`norm2` (eps 1e-6) and a quick-GELU `fc1` / `fc2` MLP (Qwen2.5-VL: RMSNorm and a SiLU-gated MLP
`gate_proj` / `up_proj` / `down_proj` with biases, window attention except `fullatt_block_indexes`), then the
merger (`ln_q`, `mlp.0`, GELU, `mlp.2`). The LM is Qwen2 (q/k/v biases) with M-RoPE
(`rope_parameters.mrope_section`). Key layouts: `model.*` / `visual.*` / `lm_head.*` (the hub's checkpoints and
transformers 5's `save_pretrained`) and `model.language_model.*` / `model.visual.*` (in-memory names).
"""

from __future__ import annotations

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.hf_decoder import decoder_from_tensors
from vlm_jax.interop.tensors import (
    Tensors,
    heads_bias,
    heads_kernel,
    key_prefix,
    out_kernel,
    read_config,
    read_safetensors,
    stack_layers,
)

ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
_ACTS = {"quick_gelu": "quick_gelu", "silu": "silu", "gelu": "gelu"}


def vision_tower(vc: dict, t: Tensors, qwen25: bool, path: str) -> tuple[dict, dict, dict]:
    """(NativeViT kwargs, merger kwargs, params {"vision", "merger"}) of a Qwen2-VL / Qwen2.5-VL vision tower."""
    width = int(vc.get("embed_dim" if not qwen25 else "hidden_size", 1280))
    heads, depth = int(vc.get("num_heads", 16)), int(vc.get("depth", 32))
    patch, frames, merge = (
        int(vc.get("patch_size", 14)),
        int(vc.get("temporal_patch_size", 2)),
        int(vc.get("spatial_merge_size", 2)),
    )
    act = vc.get("hidden_act", "silu" if qwen25 else "quick_gelu")
    if act not in _ACTS:
        raise UserError(f"{path}: vision hidden_act {act!r} is not one of {', '.join(_ACTS)}.")
    if int(vc.get("in_channels", vc.get("in_chans", 3))) != 3:
        raise UserError(f"{path}: the vision tower takes {vc.get('in_channels')} channels; only RGB (3) is supported.")
    theta = float((vc.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    if qwen25:
        mlp_dim, norm, mlp = int(vc["intermediate_size"]), "rmsnorm", "gated"
        window = int(vc.get("window_size", 112))
        if window % (patch * merge):
            raise UserError(f"{path}: window_size {window} is not a multiple of {patch * merge} px.")
        window_merge, full = window // (patch * merge), tuple(int(i) for i in vc.get("fullatt_block_indexes", ()))
    else:
        mlp_dim, norm, mlp = int(width * float(vc.get("mlp_ratio", 4))), "layernorm", "plain"
        window_merge, full = 0, ()
    kwargs = dict(
        width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=patch, temporal_patch_size=frames,
        norm=norm, norm_eps=1e-6, mlp=mlp, mlp_act=_ACTS[act], rope_theta=theta, merge=merge,
        window_merge=window_merge, full_attention_layers=full,
    )  # fmt: skip

    def norm_params(name: str) -> dict:
        out = {"scale": t(name + ".weight")}
        if norm == "layernorm":
            out["bias"] = t(name + ".bias")
        return out

    def linear(name: str) -> dict:
        return {"kernel": t(name + ".weight").T, "bias": t(name + ".bias")}

    def block(i: int) -> dict:
        p = f"blocks.{i}."
        w, b = np.split(t(p + "attn.qkv.weight"), 3, axis=0), np.split(t(p + "attn.qkv.bias"), 3, axis=0)
        attn = {
            name: {"kernel": heads_kernel(w[j], heads), "bias": heads_bias(b[j], heads)}
            for j, name in enumerate(("query", "key", "value"))
        }
        attn["out"] = {"kernel": out_kernel(t(p + "attn.proj.weight"), heads), "bias": t(p + "attn.proj.bias")}
        if mlp == "gated":
            mlp_params = {name: linear(f"{p}mlp.{name}_proj") for name in ("gate", "up", "down")}
        else:
            mlp_params = {name: linear(f"{p}mlp.{name}") for name in ("fc1", "fc2")}
        return {
            "attn_norm": norm_params(p + "norm1"),
            "attn": attn,
            "mlp_norm": norm_params(p + "norm2"),
            "mlp": mlp_params,
        }

    embed = t("patch_embed.proj.weight")
    if embed.shape[1:] != (3, frames, patch, patch):
        raise UserError(f"{path}: the patch embedding has shape {embed.shape}, not [D, 3, {frames}, {patch}, {patch}].")
    vision = {"patch_embed": {"kernel": embed.reshape(embed.shape[0], -1).T}, "layers": stack_layers(
        [block(i) for i in range(depth)]
    )}  # fmt: skip
    merger = {
        "norm": norm_params("merger.ln_q"),
        "linear_1": linear("merger.mlp.0"),
        "linear_2": linear("merger.mlp.2"),
    }
    return kwargs, dict(norm=norm, norm_eps=1e-6), {"vision": vision, "merger": merger}


def load_qwen2_vl_dir(path: str) -> tuple[dict, dict, dict]:
    """(qwen2_vl `config.model` dict, `config.data` dict, params) of a Qwen2-VL / Qwen2.5-VL directory."""
    cfg = read_config(path)
    arch = next((a for a in cfg.get("architectures") or [] if a in ARCHITECTURES), None)
    if arch is None:
        raise UserError(f"{path}: architectures {cfg.get('architectures')} are not one of {', '.join(ARCHITECTURES)}.")
    qwen25 = arch.startswith("Qwen2_5")
    vc, tc = cfg.get("vision_config") or {}, cfg.get("text_config") or cfg
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    sections = tuple(int(s) for s in rope.get("mrope_section") or ())
    if not sections:
        raise UserError(f"{path}: the text config has no rope_parameters.mrope_section (M-RoPE sections).")
    tc = {**tc, "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))}
    tc["rope_parameters"] = {k: v for k, v in rope.items() if k not in ("mrope_section", "mrope_interleaved")}
    if tc["rope_parameters"].get("rope_type", rope.get("type")) == "mrope":
        tc["rope_parameters"]["rope_type"] = "default"  # older configs name M-RoPE's plain frequencies "mrope"

    tensors = read_safetensors(path)
    visual = key_prefix(tensors, ("visual.", "model.visual."), "patch_embed.proj.weight", "vision tower", path)
    vision_kwargs, merger_kwargs, vision_params = vision_tower(vc, Tensors(tensors, visual, path), qwen25, path)
    lm_prefix = key_prefix(tensors, ("model.language_model.", "model."), "embed_tokens.weight", "language model", path)
    lm_kwargs, decoder = decoder_from_tensors(
        "Qwen2ForCausalLM", tc, lambda: tensors, lm_prefix, "lm_head.weight", path
    )
    lm_kwargs["mrope_sections"] = sections
    image_token_id = int(cfg.get("image_token_id", 151655))
    model = dict(
        name="qwen2_vl",
        vision=vision_kwargs,
        merger=merger_kwargs,
        lm=lm_kwargs,
        image_token_id=image_token_id,
        video_token_id=int(cfg.get("video_token_id", 151656)),
        # Qwen2.5-VL's videos step the temporal position by seconds per frame pair x tokens_per_second.
        video_tokens_per_second=float(vc.get("tokens_per_second", 2)) if qwen25 else 0.0,
    )
    data = dict(seq_len=min(8192, int(tc.get("max_position_embeddings", 32768))), max_patches=16384)
    return model, data, {**vision_params, "decoder": decoder}


@register_converter(*ARCHITECTURES)
def convert_qwen2_vl_dir(path: str, raw: dict) -> tuple:
    """(system config, params) of a Qwen2-VL or Qwen2.5-VL directory: the `qwen2_vl` system."""
    del raw
    model, data, params = load_qwen2_vl_dir(path)
    return system_config(path, model, data), params
