"""Import transformers' `FuyuForCausalLM` (Fuyu-8B) into the `fuyu` system (config.json + *.safetensors, no torch).

Fuyu in transformers: `vision_embed_tokens`, a linear map with a bias from a
flattened 30 x 30 x 3 patch ((row, column, channel) order) to the LM width,
and a Persimmon LM (`hf_decoder.persimmon_from_tensors`) whose
`image_token_id` placeholders take the patch embeddings in order.

Key layouts, both accepted: `vision_embed_tokens.*`, `language_model.model.*`,
`language_model.lm_head.weight` (what `save_pretrained` writes, and the hub's
adept/fuyu-8b); `model.vision_embed_tokens.*`, `model.language_model.*`,
`lm_head.weight` (transformers' in-memory names). Config forms: a nested
`text_config`, or adept/fuyu-8b's flat config, whose text keys sit at the top
level (as `FuyuConfig.__post_init__` reads them), with `FuyuConfig`'s text
defaults for keys it omits.

The image-newline token is the tokenizer's `|NEWLINE|` piece, which
config.json does not name: it is read from the directory's tokenizer.json
(added tokens, then the model's vocabulary); a directory without one is
refused. The converted system's canvas (`model.image_size`, a square:
`vlm_jax/models/fuyu.py`) is the longer side of the image processor's
`size` (preprocessor_config.json; without one `FuyuImageProcessor`'s default
1080 x 1920), rounded up to whole patches, so every image the processor
makes fits; config.json's `image_size` (300) is used by nothing in
transformers' model or processor and is not read.
"""

from __future__ import annotations

import json
import os

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.hf_decoder import persimmon_from_tensors
from vlm_jax.interop.tensors import Tensors, read_config, read_safetensors

ARCHITECTURE = "FuyuForCausalLM"

# transformers' FuyuConfig text-config defaults (models/fuyu/configuration_fuyu.py, `sub_configs_defaults`): the
# values a flat or partial Fuyu config leaves to them.
TEXT_DEFAULTS = dict(
    vocab_size=262144,
    max_position_embeddings=16384,
    hidden_size=4096,
    intermediate_size=16384,
    num_hidden_layers=36,
    num_attention_heads=64,
    hidden_act="relu2",
    layer_norm_eps=1e-5,
    qk_layernorm=True,
    partial_rotary_factor=0.5,
)
_FLAT_KEYS = tuple(TEXT_DEFAULTS) + ("rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings")
_LAYOUTS = (  # (vision_embed_tokens prefix, language model prefix, head key)
    ("vision_embed_tokens.", "language_model.model.", "language_model.lm_head.weight"),
    ("model.vision_embed_tokens.", "model.language_model.", "lm_head.weight"),
)


def text_config(cfg: dict) -> dict:
    """The Persimmon config of a Fuyu config.json: its `text_config`, or its flat top-level text keys, over
    `FuyuConfig`'s text defaults."""
    nested = cfg.get("text_config")
    if nested is not None and not isinstance(nested, dict):
        raise UserError("config.json's text_config is not an object.")
    own = nested if nested is not None else {k: cfg[k] for k in _FLAT_KEYS if k in cfg}
    return {**TEXT_DEFAULTS, **own}


def newline_token_id(path: str) -> int:
    """The id of the `|NEWLINE|` piece in `path`'s tokenizer.json (its added tokens, then its model vocabulary)."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise UserError(
            f"{path}: no tokenizer.json, whose |NEWLINE| piece Fuyu puts after each row of image patches "
            "(config.json does not name it)."
        )
    with open(file, encoding="utf-8") as f:
        tokenizer = json.load(f)
    for token in tokenizer.get("added_tokens") or []:
        if token.get("content") == "|NEWLINE|":
            return int(token["id"])
    vocab = (tokenizer.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, dict) and "|NEWLINE|" in vocab:
        return int(vocab["|NEWLINE|"])
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        for i, entry in enumerate(vocab):
            if entry and entry[0] == "|NEWLINE|":
                return i
    raise UserError(f"{path}: tokenizer.json has no |NEWLINE| piece.")


def canvas_size(path: str, patch: int) -> int:
    """The side of a square canvas, in pixels, that holds every image `path`'s image processor makes: the longer
    side of its `size` (preprocessor_config.json; `FuyuImageProcessor`'s default 1080 x 1920 without one),
    rounded up to whole `patch`-pixel patches."""
    size = {"height": 1080, "width": 1920}
    file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            size = json.load(f).get("size") or size
    if not isinstance(size, dict) or not {"height", "width"} <= set(size):
        raise UserError(f"{path}: preprocessor_config.json's size {size!r} is not {{'height': H, 'width': W}}.")
    longer = max(int(size["height"]), int(size["width"]))
    return -(-longer // patch) * patch


def load_fuyu_dir(path: str) -> tuple[dict, dict, dict]:
    """(fuyu `config.model` dict, `config.data` dict, params) of a `FuyuForCausalLM` directory."""
    cfg = read_config(path)
    if ARCHITECTURE not in (cfg.get("architectures") or []):
        raise UserError(f"{path}: architectures {cfg.get('architectures')} do not include {ARCHITECTURE}.")
    channels, patch = int(cfg.get("num_channels", 3)), int(cfg.get("patch_size", 30))
    if channels != 3:
        raise UserError(f"{path}: num_channels {channels} is not supported (only RGB: 3).")
    size = canvas_size(path, patch)
    tc = text_config(cfg)
    image_token_id = int(cfg.get("image_token_id", 71011))
    newline_id = newline_token_id(path)
    tensors = read_safetensors(path)
    layout = next((lay for lay in _LAYOUTS if lay[0] + "weight" in tensors), None)
    if layout is None:
        raise UserError(f"{path}: no Fuyu patch embedding ({' or '.join(lay[0] + 'weight' for lay in _LAYOUTS)}).")
    vision_prefix, lm_prefix, head = layout
    lm_kwargs, decoder_params = persimmon_from_tensors(tc, lambda: tensors, lm_prefix, head, path)
    for name, token in (("image_token_id", image_token_id), ("|NEWLINE|", newline_id)):
        if not 0 <= token < lm_kwargs["vocab_size"]:
            raise UserError(f"{path}: {name} {token} is outside the vocabulary of {lm_kwargs['vocab_size']}.")
    t = Tensors(tensors, vision_prefix, path)
    kernel = t("weight").T  # [p * p * 3, width]: rows in (row, column, channel) order, as patchify_image flattens
    if kernel.shape != (patch * patch * channels, lm_kwargs["embed_dim"]):
        raise UserError(f"{path}: vision_embed_tokens has shape {kernel.shape[::-1]}, not a {patch} px patch map.")
    model = dict(
        name="fuyu",
        patch_size=patch,
        image_size=size,
        lm=lm_kwargs,
        image_tokens=(size // patch) ** 2,
        image_token_id=image_token_id,
        newline_token_id=newline_id,
    )
    data = dict(
        seq_len=min(2048, int(tc["max_position_embeddings"])),
        max_images=1,
        template="fuyu",
        image=dict(mode="fuyu", size=size, method="bilinear", normalization="siglip", max_aspect_ratio=20.0),
    )
    params = {"patch_embed": {"linear": {"kernel": kernel, "bias": t("bias")}}, "decoder": decoder_params}
    return model, data, params


@register_converter(ARCHITECTURE)
def convert_fuyu_dir(path: str, raw: dict) -> tuple:
    """(system config, params) of a `FuyuForCausalLM` directory: the `fuyu` system."""
    del raw  # load_fuyu_dir reads config.json itself
    model, data, params = load_fuyu_dir(path)
    return system_config(path, model, data), params
