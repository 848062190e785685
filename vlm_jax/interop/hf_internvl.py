"""Import transformers' `InternVLForConditionalGeneration` (InternVL 2.5 / 3 "-hf" checkpoints, and InternVL 1.5 /
Mini-InternVL / InternVL2 converted to that format) into the `internvl` system.

InternVL in transformers: an InternViT vision tower (`InternVLVisionModel`: a class token and learned positions,
pre-norm blocks with LayerNorm or RMSNorm, optional RMSNorm over all heads' queries and keys, layer scales
`lambda_1` / `lambda_2`, an output projection with a bias whether or not q/k/v have one), whose
`hidden_states[vision_feature_layer]` (-1: the last block's output; these towers have no final norm under
`use_mean_pooling`) without the class token is pixel-shuffled by `1 / downsample_ratio` and mapped by
`multi_modal_projector` (LayerNorm, linear_1, GELU, linear_2) into a Qwen2 or LLaMA-format LM, whose
`image_token_id` placeholders take the features in order (`image_seq_length` per 448 px tile).

Key layouts accepted: `vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.*` (transformers 5's `save_pretrained`) and `model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*` (the hub's -hf checkpoints). The head is
tied when config.json's top level says `tie_word_embeddings` (transformers' default for InternVL: true).
"""

from __future__ import annotations

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.hf_decoder import decoder_from_tensors
from vlm_jax.interop.hf_llava import TEXT_MODELS as LLAVA_TEXT_MODELS
from vlm_jax.interop.hf_llava import _feature_tap
from vlm_jax.interop.tensors import (
    Tensors,
    heads_bias,
    heads_kernel,
    key_prefix,
    out_kernel,
    read_config,
    read_safetensors,
    square_side,
    stack_layers,
)

ARCHITECTURE = "InternVLForConditionalGeneration"

# transformers' InternVLVisionConfig defaults for the keys read here (configs may omit them).
VISION_DEFAULTS = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    attention_bias=False,
    use_qk_norm=False,
    hidden_act="gelu",
    norm_type="layer_norm",
    layer_norm_eps=1e-6,
    image_size=(448, 448),
    patch_size=(14, 14),
    num_channels=3,
    use_absolute_position_embeddings=True,
    use_mean_pooling=True,
)
# model_type -> (decoder architecture, transformers' config defaults the decoder reads).
TEXT_MODELS = {
    "qwen2": (
        "Qwen2ForCausalLM",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=22016,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=32768,
        ),
    ),
    "llama": LLAVA_TEXT_MODELS["llama"],
}
_PREFIXES = {
    "vision tower": (("vision_tower.", "model.vision_tower."), "embeddings.cls_token"),
    "projector": (("multi_modal_projector.", "model.multi_modal_projector."), "linear_1.weight"),
    "language model": (("language_model.model.", "model.language_model."), "embed_tokens.weight"),
}
_HEADS = ("language_model.lm_head.weight", "lm_head.weight")
_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


def _prefix(tensors: dict, part: str, path: str) -> str:
    """The key prefix of `part` in this checkpoint (the first layout whose marker key it holds)."""
    candidates, marker = _PREFIXES[part]
    return key_prefix(tensors, candidates, marker, f"InternVL {part}", path)


def vision_tower(vc: dict, t: Tensors, path: str) -> tuple[dict, dict]:
    """(ViT kwargs, params) of an InternVL vision tower; `vc` its config (missing keys: transformers' defaults)."""
    vc = {**VISION_DEFAULTS, **vc}
    width, heads, depth = int(vc["hidden_size"]), int(vc["num_attention_heads"]), int(vc["num_hidden_layers"])
    size, patch = square_side(vc["image_size"], "image_size", path), square_side(vc["patch_size"], "patch_size", path)
    norm = {"layer_norm": "layernorm", "rms_norm": "rmsnorm"}.get(vc["norm_type"])
    refusals = [
        (norm is None, f"norm_type {vc['norm_type']!r} is not 'layer_norm' or 'rms_norm'"),
        (vc["hidden_act"] not in _ACTS, f"vision hidden_act {vc['hidden_act']!r} is not one of {', '.join(_ACTS)}"),
        (int(vc["num_channels"]) != 3, f"the vision tower takes {vc['num_channels']} channels, not RGB"),
        (not vc["use_absolute_position_embeddings"], "a vision tower without position embeddings is not supported"),
        (not vc["use_mean_pooling"], "use_mean_pooling=false (a final vision LayerNorm) is not supported"),
        # transformers normalises q and k with RMSNorm whatever norm_type says; the ViT uses its own norm there.
        (vc["use_qk_norm"] and norm != "rmsnorm", "QK norm with norm_type 'layer_norm' is not supported"),
    ]
    for refused, why in refusals:
        if refused:
            raise UserError(f"{path}: {why}.")
    qkv_bias = bool(vc["attention_bias"])
    kwargs = dict(
        variant="", width=width, depth=depth, mlp_dim=int(vc["intermediate_size"]), num_heads=heads,
        patch_size=patch, image_size=size, posemb="learn", posemb_resample="bicubic", pool="none",
        class_token=True, final_norm=False, norm=norm, norm_eps=float(vc["layer_norm_eps"]),
        mlp_act=_ACTS[vc["hidden_act"]], attn_bias=qkv_bias, attn_out_bias=True, qk_norm=bool(vc["use_qk_norm"]),
        qk_norm_over="all", layer_scale=0.1,
    )  # fmt: skip
    pos = t("embeddings.position_embeddings")[0]
    grid = size // patch
    if pos.shape[0] != grid * grid + 1:
        raise UserError(
            f"{path}: the vision position embedding has {pos.shape[0]} rows, not the {grid * grid + 1} that "
            f"image_size {size} and patch_size {patch} imply."
        )

    def norm_params(name: str) -> dict:
        out = {"scale": t(name + ".weight")}
        if norm == "layernorm":
            out["bias"] = t(name + ".bias")
        return out

    def layer(i: int) -> dict:
        p = f"encoder.layer.{i}."
        attn = {}
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            attn[ours] = {"kernel": heads_kernel(t(f"{p}attention.{theirs}.weight"), heads)}
            if qkv_bias:
                attn[ours]["bias"] = heads_bias(t(f"{p}attention.{theirs}.bias"), heads)
        attn["out"] = {
            "kernel": out_kernel(t(p + "attention.projection_layer.weight"), heads),
            "bias": t(p + "attention.projection_layer.bias"),
        }
        if kwargs["qk_norm"]:  # RMSNorm over all heads: a [heads * head_dim] scale
            attn["query_norm"] = {"scale": heads_bias(t(p + "attention.q_norm.weight"), heads)}
            attn["key_norm"] = {"scale": heads_bias(t(p + "attention.k_norm.weight"), heads)}
        linear = {
            name: {"kernel": t(f"{p}mlp.{name}.weight").T, "bias": t(f"{p}mlp.{name}.bias")} for name in ("fc1", "fc2")
        }
        return {
            "attn_norm": norm_params(p + "layernorm_before"),
            "attn": attn,
            "ls1": t(p + "lambda_1"),
            "mlp_norm": norm_params(p + "layernorm_after"),
            "mlp": linear,
            "ls2": t(p + "lambda_2"),
        }

    params = {
        "patch_embed": {
            "kernel": t("embeddings.patch_embeddings.projection.weight").transpose(2, 3, 1, 0),
            "bias": t("embeddings.patch_embeddings.projection.bias"),
        },
        "cls": (t("embeddings.cls_token")[0, 0] + pos[0])[None, None],  # the class position folded in
        "pos_embedding": pos[1:][None],
        "layers": stack_layers([layer(i) for i in range(depth)]),
    }
    return kwargs, params


def load_internvl_dir(path: str) -> tuple[dict, dict, dict]:
    """(internvl `config.model` dict, `config.data` dict, params) of an `InternVLForConditionalGeneration`
    directory."""
    cfg = read_config(path)
    if ARCHITECTURE not in (cfg.get("architectures") or []):
        raise UserError(f"{path}: architectures {cfg.get('architectures')} do not include {ARCHITECTURE}.")
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise UserError(f"{path}: projector_hidden_act {act!r} is not supported (only 'gelu').")
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise UserError(
            f"{path}: vision_feature_select_strategy {cfg['vision_feature_select_strategy']!r} is not supported "
            "(only 'default': the class token dropped before the pixel shuffle)."
        )
    ratio = float(cfg.get("downsample_ratio", 0.5))
    factor = int(round(1 / ratio))
    if abs(factor * ratio - 1) > 1e-6:
        raise UserError(f"{path}: downsample_ratio {ratio} is not 1 / an integer.")
    vc, tc = cfg.get("vision_config") or {}, cfg.get("text_config")
    if not isinstance(tc, dict):
        raise UserError(f"{path}: config.json has no text_config object.")
    model_type = tc.get("model_type", "qwen2")
    if model_type not in TEXT_MODELS:
        raise UserError(f"{path}: a {model_type!r} language model is not supported (only {', '.join(TEXT_MODELS)}).")
    arch, defaults = TEXT_MODELS[model_type]
    tc = {**defaults, **tc, "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True))}

    tensors = read_safetensors(path)
    vision_kwargs, vision_params = vision_tower(
        vc, Tensors(tensors, _prefix(tensors, "vision tower", path), path), path
    )
    layer = cfg.get("vision_feature_layer", -1)
    tap = _feature_tap(layer, vision_kwargs["depth"], path)
    head = next((key for key in _HEADS if key in tensors), _HEADS[0])
    lm_kwargs, decoder_params = decoder_from_tensors(
        arch, tc, lambda: tensors, _prefix(tensors, "language model", path), head, path
    )
    image_token_id = int(cfg.get("image_token_id", 151667))
    if not 0 <= image_token_id < lm_kwargs["vocab_size"]:
        raise UserError(
            f"{path}: image_token_id {image_token_id} is outside the vocabulary of {lm_kwargs['vocab_size']}."
        )
    t = Tensors(tensors, _prefix(tensors, "projector", path), path)
    connector = {
        "layer_norm": {"scale": t("layer_norm.weight"), "bias": t("layer_norm.bias")},
        **{name: {"kernel": t(name + ".weight").T, "bias": t(name + ".bias")} for name in ("linear_1", "linear_2")},
    }
    grid = vision_kwargs["image_size"] // vision_kwargs["patch_size"]
    if grid % factor:
        raise UserError(f"{path}: a {grid} x {grid} patch grid cannot be pixel-shuffled by {factor}.")
    model = dict(
        name="internvl",
        encoder="vit",
        encoder_kwargs=vision_kwargs,
        feature_layer=None if tap == -1 else tap,  # -1: the last block's output, as `tokens` (no final norm)
        drop_class_token=True,
        connector=dict(kind="pixel_shuffle_mlp", factor=factor, version="v2"),
        lm=lm_kwargs,
        image_size=vision_kwargs["image_size"],
        image_tokens=(grid // factor) ** 2,
        image_token_id=image_token_id,
    )
    size = vision_kwargs["image_size"]
    data = dict(
        seq_len=min(8192, int(tc["max_position_embeddings"])),
        max_images=13,  # 12 tiles and the thumbnail, as InternVL trains
        template="internvl",
        image=dict(
            mode="internvl",
            size=size,
            min_tiles=1,
            max_tiles=12,
            use_thumbnail=True,
            normalization="imagenet",
            max_aspect_ratio=20.0,
        ),
    )
    return model, data, {"vision": vision_params, "connector": connector, "decoder": decoder_params}


@register_converter(ARCHITECTURE)
def convert_internvl_dir(path: str, raw: dict) -> tuple:
    """(system config, params) of an `InternVLForConditionalGeneration` directory: the `internvl` system."""
    del raw  # load_internvl_dir reads config.json itself
    model, data, params = load_internvl_dir(path)
    return system_config(path, model, data), params
