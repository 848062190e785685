"""Import transformers' `DeepseekVLHybridForConditionalGeneration` (DeepSeek-VL-7B: SigLIP-L + SAM-B) and
`DeepseekVLForConditionalGeneration` (DeepSeek-VL-1.3B: SigLIP-L only) into the `deepseek_vl` system.

DeepSeek-VL in transformers: a `SiglipVisionModel` whose `last_hidden_state` (after `post_layernorm`; the
attention-pooling head, when a config keeps one, is never used for the logits and is not converted) feeds the
aligner; the hybrid model adds a `SamVisionModel` at 1024 px (`high_res_vision_model`: its neck output, plus
`high_res_vision_alpha` times a second neck `high_res_vision_neck` of the first global layer's hidden state,
each through the shared `high_res_vision_proj` downsampling convs) and a hybrid aligner (`vision_proj`,
`high_res_vision_proj`, GELU, `proj`); the 1.3B aligner is `linear1`, GELU, `linear2`. A LLaMA LM takes the
576 features per image at its `image_token_id` placeholders. The head is tied when config.json's top level
says `tie_word_embeddings` (transformers' default for both classes: true).

Key layouts accepted: `model.vision_model.*` (transformers 5's `save_pretrained`) or
`model.vision_model.vision_model.*` (the in-memory names, as the conversion script writes them), `model.aligner.*`,
`model.high_res_vision_model.vision_encoder.*`, `model.high_res_vision_neck.*`, `model.high_res_vision_proj.*`,
`model.language_model.*` and `lm_head.weight`.
"""

from __future__ import annotations

from typing import Any

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.hf_clip import vision_tower
from vlm_jax.interop.hf_decoder import decoder_from_tensors
from vlm_jax.interop.hf_llava import TEXT_MODELS
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

HYBRID, SIGLIP_ONLY = "DeepseekVLHybridForConditionalGeneration", "DeepseekVLForConditionalGeneration"

# transformers' SamVisionConfig defaults for the keys read here.
SAM_DEFAULTS = dict(
    hidden_size=768,
    output_channels=256,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=1024,
    patch_size=16,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    qkv_bias=True,
    mlp_ratio=4.0,
    use_abs_pos=True,
    use_rel_pos=True,
    window_size=14,
    global_attn_indexes=(2, 5, 8, 11),
    mlp_dim=None,
)


def _conv(t: Tensors, name: str) -> dict:
    """A torch conv weight [out, in, kh, kw] -> a flax `nn.Conv` kernel [kh, kw, in, out]."""
    return {"kernel": t(name + ".weight").transpose(2, 3, 1, 0)}


def _norm(t: Tensors, name: str) -> dict:
    return {"scale": t(name + ".weight"), "bias": t(name + ".bias")}


def _linear(t: Tensors, name: str) -> dict:
    return {"kernel": t(name + ".weight").T, "bias": t(name + ".bias")}


def _neck(t: Tensors, prefix: str) -> dict:
    return {
        "conv1": _conv(t, prefix + "conv1"),
        "norm1": _norm(t, prefix + "layer_norm1"),
        "conv2": _conv(t, prefix + "conv2"),
        "norm2": _norm(t, prefix + "layer_norm2"),
    }


def sam_encoder(sc: dict, t: Tensors, path: str) -> tuple[dict, dict]:
    """(SAMEncoder kwargs, params) of a transformers `SamVisionModel` (`t` reads `vision_encoder.*`)."""
    sc = {**SAM_DEFAULTS, **{k: v for k, v in sc.items() if v is not None}}
    width, heads, depth = int(sc["hidden_size"]), int(sc["num_attention_heads"]), int(sc["num_hidden_layers"])
    refusals = [
        (int(sc["num_channels"]) != 3, f"the SAM tower takes {sc['num_channels']} channels, not RGB"),
        (sc["hidden_act"] != "gelu", f"SAM hidden_act {sc['hidden_act']!r} is not supported (only 'gelu')"),
        (not sc["use_abs_pos"], "a SAM tower without absolute positions (use_abs_pos=false) is not supported"),
        (not sc["use_rel_pos"], "a SAM tower without relative positions (use_rel_pos=false) is not supported"),
        (not sc["qkv_bias"], "a SAM tower without q/k/v biases (qkv_bias=false) is not supported"),
    ]
    for refused, why in refusals:
        if refused:
            raise UserError(f"{path}: {why}.")
    mlp_dim = int(sc["mlp_dim"] or width * float(sc["mlp_ratio"]))
    global_layers = tuple(int(i) for i in sc["global_attn_indexes"])
    kwargs = dict(
        variant="", width=width, depth=depth, num_heads=heads, global_layers=global_layers, mlp_dim=mlp_dim,
        patch_size=int(sc["patch_size"]), image_size=int(sc["image_size"]), window=int(sc["window_size"]),
        out_channels=int(sc["output_channels"]), norm_eps=float(sc["layer_norm_eps"]),
    )  # fmt: skip
    from vlm_jax.encoders.sam import SAMEncoder

    period = SAMEncoder(**kwargs).period()  # refuses global layers that are not every k-th layer

    def block(i: int) -> dict:
        p = f"layers.{i}."
        qkv_w, qkv_b = t(p + "attn.qkv.weight"), t(p + "attn.qkv.bias")
        attn = {
            name: {
                "kernel": heads_kernel(qkv_w[j * width : (j + 1) * width], heads),
                "bias": heads_bias(qkv_b[j * width : (j + 1) * width], heads),
            }
            for j, name in enumerate(("query", "key", "value"))
        }
        attn["out"] = {"kernel": out_kernel(t(p + "attn.proj.weight"), heads), "bias": t(p + "attn.proj.bias")}
        attn["rel_pos_h"], attn["rel_pos_w"] = t(p + "attn.rel_pos_h"), t(p + "attn.rel_pos_w")
        mlp = {"fc1": _linear(t, p + "mlp.lin1"), "fc2": _linear(t, p + "mlp.lin2")}
        return {"norm1": _norm(t, p + "layer_norm1"), "attn": attn, "norm2": _norm(t, p + "layer_norm2"), "mlp": mlp}

    groups = []
    for g in range(depth // period):
        first = g * period
        group = {f"window_{j}": block(first + j) for j in range(period - 1)}
        group["global"] = block(first + period - 1)
        groups.append(group)
    params = {
        "patch_embed": {
            "kernel": t("patch_embed.projection.weight").transpose(2, 3, 1, 0),
            "bias": t("patch_embed.projection.bias"),
        },
        "pos_embed": t("pos_embed"),
        "layers": stack_layers(groups),
        "neck": _neck(t, "neck."),
    }
    return kwargs, params


def load_deepseek_vl_dir(path: str) -> tuple[dict, dict, dict]:
    """(deepseek_vl `config.model` dict, `config.data` dict, params) of a `DeepseekVLHybridForConditionalGeneration`
    or `DeepseekVLForConditionalGeneration` directory."""
    cfg = read_config(path)
    archs = cfg.get("architectures") or []
    if HYBRID not in archs and SIGLIP_ONLY not in archs:
        raise UserError(f"{path}: architectures {archs} include neither {HYBRID} nor {SIGLIP_ONLY}.")
    hybrid = HYBRID in archs
    vc, tc = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    if vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise UserError(f"{path}: a {vc['model_type']!r} vision tower is not supported (only SigLIP's).")
    model_type = tc.get("model_type", "llama")
    if model_type != "llama":
        raise UserError(f"{path}: a {model_type!r} language model is not supported (only 'llama').")
    arch, defaults = TEXT_MODELS["llama"]
    tc = {**defaults, **tc, "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True))}

    tensors = read_safetensors(path)
    vision_prefix = key_prefix(
        tensors, ("model.vision_model.vision_model.", "model.vision_model."), "embeddings.patch_embedding.weight",
        "SigLIP vision tower", path,
    )  # fmt: skip
    vision_kwargs, vision_params = vision_tower("siglip", vc, Tensors(tensors, vision_prefix, path), path)
    vision_params.pop("map_head", None)  # the pooling head never reaches the logits
    vision_kwargs["pool"] = "none"
    head = "lm_head.weight"
    lm_kwargs, decoder_params = decoder_from_tensors(arch, tc, lambda: tensors, "model.language_model.", head, path)
    image_token_id = int(cfg.get("image_token_id", 100015))
    if not 0 <= image_token_id < lm_kwargs["vocab_size"]:
        raise UserError(
            f"{path}: image_token_id {image_token_id} is outside the vocabulary of {lm_kwargs['vocab_size']}."
        )
    low = vision_kwargs["image_size"]
    grid = low // vision_kwargs["patch_size"]
    t = Tensors(tensors, "model.", path)
    params: dict[str, Any] = {"vision": vision_params, "decoder": decoder_params}
    model = dict(
        name="deepseek_vl", encoder_kwargs=vision_kwargs, sam={}, lm=lm_kwargs, low_res_size=low, image_size=low,
        image_tokens=grid * grid, image_token_id=image_token_id, low_res_normalization="siglip",
        high_res_normalization="clip",
    )  # fmt: skip
    if hybrid:
        sam_tensors = Tensors(tensors, "model.high_res_vision_model.vision_encoder.", path)
        sam_kwargs, sam_params = sam_encoder(cfg.get("high_res_vision_config") or {}, sam_tensors, path)
        params["high_res"] = {
            "sam": sam_params,
            "neck_hd": _neck(t, "high_res_vision_neck."),
            "downsample": {name: _conv(t, "high_res_vision_proj." + name) for name in ("conv1", "conv2")},
            "alpha": t("high_res_vision_alpha").reshape(1),
        }
        params["aligner"] = {n: _linear(t, "aligner." + n) for n in ("vision_proj", "high_res_vision_proj", "proj")}
        model.update(sam=sam_kwargs, image_size=sam_kwargs["image_size"])
    else:
        params["aligner"] = {"linear_1": _linear(t, "aligner.linear1"), "linear_2": _linear(t, "aligner.linear2")}
    data = dict(
        seq_len=min(4096, int(tc["max_position_embeddings"])),
        max_images=1,
        template="deepseek_vl",
        image=dict(mode="deepseek_vl", size=model["image_size"], normalization="clip" if hybrid else "siglip",
                   max_aspect_ratio=20.0),
    )  # fmt: skip
    return model, data, params


@register_converter(HYBRID, SIGLIP_ONLY)
def convert_deepseek_vl_dir(path: str, raw: dict) -> tuple:
    """(system config, params) of a DeepSeek-VL directory (hybrid or SigLIP-only): the `deepseek_vl` system."""
    del raw  # load_deepseek_vl_dir reads config.json itself
    model, data, params = load_deepseek_vl_dir(path)
    return system_config(path, model, data), params
