"""Import transformers' `Idefics3ForConditionalGeneration` (HuggingFaceM4/Idefics3-8B-Llama3 and checkpoints saved
by transformers' `save_pretrained`) into the `idefics3` system; config.json and safetensors only, no torch.

Idefics3 in transformers: a SigLIP vision tower (`Idefics3VisionTransformer`: patch embedding with bias, learned
positions, pre-norm LayerNorm blocks with q/k/v/out biases and a tanh-GELU MLP, `post_layernorm`), whose
last_hidden_state goes through `Idefics3Connector` (a pixel shuffle by `scale_factor`, then
`modality_projection.proj`, one linear without bias) into a LLaMA LM whose `image_token_id` placeholders take the
features in order (`image_seq_len` = (image_size / patch_size)^2 / scale_factor^2 per tile).

Key layouts accepted: `model.vision_model.*`, `model.connector.*`, `model.text_model.*`, `lm_head.*` (the hub's
checkpoint and transformers' `save_pretrained`). The head is tied when config.json's top level says
`tie_word_embeddings` (transformers' default for Idefics3: false). Refused: a non-LLaMA text model, a
non-square or non-RGB vision tower, a patch grid the scale factor does not divide.
"""

from __future__ import annotations

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.hf_clip import vision_tower
from vlm_jax.interop.hf_decoder import decoder_from_tensors
from vlm_jax.interop.hf_llava import TEXT_MODELS
from vlm_jax.interop.tensors import Tensors, key_prefix, read_config, read_safetensors, square_side

ARCHITECTURE = "Idefics3ForConditionalGeneration"

# transformers' Idefics3VisionConfig defaults (configs may omit them).
VISION_DEFAULTS = dict(
    hidden_size=1152,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
_PREFIXES = {
    "vision tower": ("model.vision_model.", "embeddings.patch_embedding.weight"),
    "connector": ("model.connector.", "modality_projection.proj.weight"),
    "language model": ("model.text_model.", "embed_tokens.weight"),
}


def _prefix(tensors: dict, part: str, path: str) -> str:
    prefix, marker = _PREFIXES[part]
    return key_prefix(tensors, (prefix,), marker, f"Idefics3 {part}", path)


def load_idefics3_dir(path: str) -> tuple[dict, dict, dict]:
    """(idefics3 `config.model` dict, `config.data` dict, params) of an `Idefics3ForConditionalGeneration`
    directory."""
    cfg = read_config(path)
    if ARCHITECTURE not in (cfg.get("architectures") or []):
        raise UserError(f"{path}: architectures {cfg.get('architectures')} do not include {ARCHITECTURE}.")
    vc = {**VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
    vc.update(
        image_size=square_side(vc["image_size"], "image_size", path),
        patch_size=square_side(vc["patch_size"], "patch_size", path),
        vision_use_head=False,
    )
    tc = cfg.get("text_config") or {}
    model_type = tc.get("model_type", "llama")
    if model_type != "llama":
        raise UserError(f"{path}: a {model_type!r} language model is not supported (only 'llama').")
    arch, defaults = TEXT_MODELS["llama"]
    tc = {**defaults, "rms_norm_eps": 1e-5, **tc, "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False))}
    factor = int(cfg.get("scale_factor", 2))
    grid = vc["image_size"] // vc["patch_size"]
    if factor < 1 or grid % factor:
        raise UserError(f"{path}: a {grid} x {grid} patch grid cannot be pixel-shuffled by scale_factor {factor}.")

    tensors = read_safetensors(path)
    vision_kwargs, vision_params = vision_tower(
        "siglip", vc, Tensors(tensors, _prefix(tensors, "vision tower", path), path), path
    )
    lm_kwargs, decoder_params = decoder_from_tensors(
        arch, tc, lambda: tensors, _prefix(tensors, "language model", path), "lm_head.weight", path
    )
    image_token_id = int(cfg.get("image_token_id", 128257))
    if not 0 <= image_token_id < lm_kwargs["vocab_size"]:
        raise UserError(
            f"{path}: image_token_id {image_token_id} is outside the vocabulary of {lm_kwargs['vocab_size']}."
        )
    t = Tensors(tensors, _prefix(tensors, "connector", path), path)
    connector = {"proj": {"kernel": t("modality_projection.proj.weight").T}}
    size = vision_kwargs["image_size"]
    model = dict(
        name="idefics3",
        encoder="vit",
        encoder_kwargs=vision_kwargs,
        feature_layer=None,  # the post-LayerNormed last_hidden_state
        drop_class_token=False,
        connector=dict(kind="pixel_shuffle_linear", factor=factor),
        lm=lm_kwargs,
        image_size=size,
        image_tokens=(grid // factor) ** 2,
        image_token_id=image_token_id,
    )
    data = dict(
        seq_len=min(8192, int(tc.get("max_position_embeddings", 8192))),
        max_images=17,  # a 4 x 4 grid and the global image
        template="idefics3",
        template_options={"tile_tokens": (grid // factor) ** 2, "tiles_per_side": 4},
        image=dict(mode="idefics3", size=size, longest_edge=4 * size, normalization="siglip", max_aspect_ratio=20.0),
    )
    return model, data, {"vision": vision_params, "connector": connector, "decoder": decoder_params}


@register_converter(ARCHITECTURE)
def convert_idefics3_dir(path: str, raw: dict) -> tuple:
    """(system config, params) of an `Idefics3ForConditionalGeneration` directory: the `idefics3` system."""
    del raw  # load_idefics3_dir reads config.json itself
    model, data, params = load_idefics3_dir(path)
    return system_config(path, model, data), params
