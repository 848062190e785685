"""Import transformers' `PaliGemmaForConditionalGeneration` (config.json + *.safetensors, no torch): the `paligemma`
system.

A PaliGemma directory holds a SigLIP vision tower (`hf_clip.vision_tower`: PaliGemma reads its post-LayerNormed
tokens, so a pooling head, if the config declares one, is neither used nor converted), the
`multi_modal_projector.linear` map and a Gemma LM (`hf_decoder.decoder_from_tensors`: RMSNorm weights `w` for a
scale of `1 + w`, GeGLU, embeddings scaled by sqrt(width), `lm_head` tied to the embeddings and then not saved).
Key layouts accepted, each part found by the suffix of one of its tensors:

* transformers 5 in memory: `model.vision_tower.*`, `model.multi_modal_projector.linear.*`,
  `model.language_model.*`, `lm_head.weight`;
* the hub's checkpoints (and transformers 5's `save_pretrained`, which writes them back):
  `vision_tower.vision_model.*` (or `vision_tower.*`), `multi_modal_projector.linear.*`,
  `language_model.model.*` (`language_model.lm_head.weight` if untied).

Config: `vision_config` / `text_config` hold only the values that differ from transformers' SigLIP-vision and
Gemma defaults (filled in), or are absent (PaliGemma's own defaults: So400m-like tower, Gemma-2B).
PaliGemma 2 (a Gemma 2 LM) and any option the `paligemma` system cannot run is a one-sentence error.
"""

from __future__ import annotations

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.hf_clip import vision_tower
from vlm_jax.interop.hf_decoder import decoder_from_tensors
from vlm_jax.interop.tensors import Tensors, read_config, read_safetensors

ARCHITECTURE = "PaliGemmaForConditionalGeneration"

# transformers' GemmaConfig defaults for the keys a saved text config may omit (`decoder_from_tensors` would
# otherwise take LLaMA's fallbacks, e.g. head_dim = width / heads), and PaliGemmaConfig's sub-config defaults
# (used when a sub-config is absent altogether; hf_clip fills the SigLIP vision defaults).
_GEMMA = dict(
    vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
)  # fmt: skip
_PALIGEMMA_VISION = dict(
    intermediate_size=4096, hidden_size=1152, patch_size=14, image_size=224, num_hidden_layers=27,
    num_attention_heads=16,
)  # fmt: skip
_PALIGEMMA_TEXT = dict(
    hidden_size=2048, num_hidden_layers=18, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1,
    vocab_size=257152,
)  # fmt: skip


def _prefix(tensors: dict, suffix: str, what: str, where: str) -> str:
    """The one key prefix in front of `suffix` (e.g. "language_model.model." before "embed_tokens.weight")."""
    prefixes = sorted({k[: -len(suffix)] for k in tensors if k.endswith(suffix)})
    if len(prefixes) != 1:
        found = "none" if not prefixes else ", ".join(repr(p) for p in prefixes)
        raise UserError(
            f"the checkpoint ({where}) must hold one {what} (a tensor named '*{suffix}'); prefixes found: {found}."
        )
    return prefixes[0]


def _text_config(cfg: dict, where: str) -> dict:
    """The Gemma config with GemmaConfig's defaults filled in and the top-level `tie_word_embeddings`."""
    tc = cfg.get("text_config")
    tc = dict(_PALIGEMMA_TEXT) if tc is None else {k: v for k, v in tc.items() if v is not None}
    if tc.get("model_type", "gemma") != "gemma":
        raise UserError(
            f"{where}: the text model is {tc.get('model_type')!r} (PaliGemma 2 uses Gemma 2); only Gemma is supported."
        )
    tc = {**_GEMMA, **tc, "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True))}
    # `hidden_activation` (older configs) wins when set; a bare `hidden_act="gelu"` is Gemma's legacy name for the
    # tanh approximation (transformers' GemmaConfig maps it so).
    act = tc.get("hidden_activation") or ("gelu_pytorch_tanh" if tc["hidden_act"] == "gelu" else tc["hidden_act"])
    if act != "gelu_pytorch_tanh":
        raise UserError(f"{where}: Gemma activation {act!r} is not supported (only gelu_pytorch_tanh).")
    return {**tc, "hidden_activation": act}


def load_paligemma_dir(path: str) -> tuple[dict, dict]:
    """(paligemma `config.model` dict, params) of a `PaliGemmaForConditionalGeneration` directory."""
    cfg = read_config(path)
    if ARCHITECTURE not in (cfg.get("architectures") or []):
        raise UserError(f"{path}: architectures {cfg.get('architectures')} do not include {ARCHITECTURE}.")
    vc = cfg.get("vision_config")
    vc = dict(_PALIGEMMA_VISION) if vc is None else {k: v for k, v in vc.items() if v is not None}
    vc["vision_use_head"] = False  # PaliGemma reads the tokens, never the pooled output
    tc = _text_config(cfg, path)
    tensors = read_safetensors(path)

    vision_prefix = _prefix(tensors, "embeddings.patch_embedding.weight", "vision tower", path)
    vision_kwargs, vision_params = vision_tower("siglip", vc, Tensors(tensors, vision_prefix, path), path)
    projector = Tensors(tensors, _prefix(tensors, "multi_modal_projector.linear.weight", "projector", path), path)
    lm_prefix = _prefix(tensors, "embed_tokens.weight", "language model", path)
    heads = [k for k in tensors if k.endswith("lm_head.weight")]
    head = heads[0] if len(heads) == 1 else "lm_head.weight"  # read only if untied; a missing key is named
    lm, decoder = decoder_from_tensors("GemmaForCausalLM", tc, lambda: tensors, lm_prefix, head, path)
    weight = projector("multi_modal_projector.linear.weight")
    if weight.shape != (lm["embed_dim"], vision_kwargs["width"]):
        raise UserError(
            f"{path}: the projector maps {weight.shape[1]} -> {weight.shape[0]} dims, not the vision width "
            f"{vision_kwargs['width']} -> the LM width {lm['embed_dim']}."
        )
    image_token_id = int(cfg.get("image_token_index", cfg.get("image_token_id", 256000)))
    if not 0 <= image_token_id < lm["vocab_size"]:
        raise UserError(
            f"{path}: image_token_index {image_token_id} lies outside the LM's {lm['vocab_size']} embedding rows."
        )
    grid = vision_kwargs["image_size"] // vision_kwargs["patch_size"]
    model = dict(
        name="paligemma",
        encoder="vit",
        encoder_kwargs=vision_kwargs,
        feature_layer=None,
        drop_class_token=False,
        connector=dict(kind="linear"),
        lm=lm,
        image_size=vision_kwargs["image_size"],
        image_tokens=grid * grid,
        image_token_id=image_token_id,
    )
    params = {
        "vision": vision_params,
        "connector": {
            "linear": {"kernel": weight.T, "bias": projector("multi_modal_projector.linear.bias")},
        },
        "decoder": decoder,
    }
    return model, params


@register_converter(ARCHITECTURE)
def convert_paligemma_dir(path: str, raw: dict) -> tuple:
    """(system config, params) of a `PaliGemmaForConditionalGeneration` directory: the `paligemma` system
    (data: the "paligemma" template, for its prefix-LM mask from `token_type_ids`)."""
    del raw  # load_paligemma_dir reads config.json itself
    model, params = load_paligemma_dir(path)
    data = {"seq_len": 8, "max_images": 1, "template": "paligemma"}
    return system_config(path, model, data), params


__all__ = ["load_paligemma_dir", "convert_paligemma_dir"]
