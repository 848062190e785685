"""Import transformers' `LlavaForConditionalGeneration` (LLaVA, LLaVA-1.5, BakLLaVA) into the `llava` system.

LLaVA in transformers: a CLIP vision tower, whose hidden state
`hidden_states[vision_feature_layer]` (-2: after the penultimate block) gives
the image features — without the class token under
`vision_feature_select_strategy="default"`, with it under "full" — then a
projector `linear_2(act(linear_1(x)))` to the LM width (the `mlp` connector,
depth 2), then a LLaMA / Vicuna or Mistral LM whose `image_token_id`
placeholders take the projected features in order. The whole vision tower is
converted (its last block and post-LayerNorm too, though the features are
tapped before them), so `vision` is a complete ViT.

Checkpoint key layouts in circulation, all accepted:

* `vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
  `language_model.lm_head.*`: transformers 5's `save_pretrained` (it writes
  the legacy names; the CLIP tower has no inner `vision_model`);
* the same with `vision_tower.vision_model.*`: llava-hf's hub checkpoints;
* `model.vision_tower[.vision_model].*`, `model.multi_modal_projector.*`,
  `model.language_model.*`, `lm_head.*`: transformers' in-memory names
  (state dicts saved as they are).

Config forms: `image_token_id` or the older `image_token_index`; sub-configs
that omit default values (llava-hf's do) take transformers' defaults
(`CLIPVisionConfig`, `LlamaConfig`, `MistralConfig`); the head is tied when
the top-level or the text config says `tie_word_embeddings`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.hf_clip import vision_tower
from vlm_jax.interop.hf_decoder import decoder_from_tensors
from vlm_jax.interop.tensors import Tensors, key_prefix, read_config, read_safetensors

ARCHITECTURE = "LlavaForConditionalGeneration"

# The text models LLaVA checkpoints use that the decoder reads: model_type -> (transformers class, the defaults of
# its config class for the keys the decoder reads, which llava-hf's configs often omit).
TEXT_MODELS = {
    "llama": (
        "LlamaForCausalLM",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            max_position_embeddings=2048,
        ),
    ),
    "mistral": (
        "MistralForCausalLM",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            sliding_window=4096,
        ),
    ),
}

# Where each part's tensors live, by layout (see the module docstring), with a key that marks the layout.
_PREFIXES = {
    "vision tower": (
        ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.", "model.vision_tower."),
        "embeddings.patch_embedding.weight",
    ),
    "projector": (("multi_modal_projector.", "model.multi_modal_projector."), "linear_1.weight"),
    "language model": (("language_model.model.", "model.language_model."), "embed_tokens.weight"),
}
_HEADS = ("language_model.lm_head.weight", "lm_head.weight")


def _prefix(tensors: dict, part: str, path: str) -> str:
    """The key prefix of `part` in this checkpoint (the first layout whose marker key it holds)."""
    candidates, marker = _PREFIXES[part]
    return key_prefix(tensors, candidates, marker, f"LLaVA {part}", path)


def _feature_tap(layer: Any, depth: int, path: str) -> int:
    """transformers' `vision_feature_layer` (an index into `hidden_states`: 0 is the embeddings, k the output of
    block k) -> the ViT tap (a negative block index, counted from the last block)."""
    if isinstance(layer, (list, tuple)):
        raise UserError(f"{path}: vision_feature_layer {layer} (several layers, concatenated) is not supported.")
    if not isinstance(layer, int) or not -(depth + 1) <= layer <= depth:
        raise UserError(f"{path}: vision_feature_layer {layer!r} is not an index into {depth + 1} hidden states.")
    block = layer % (depth + 1)
    if block == 0:
        raise UserError(f"{path}: vision_feature_layer {layer} taps the patch embeddings, which is not supported.")
    return block - 1 - depth


def _text_config(cfg: dict, path: str) -> tuple[str, dict]:
    """(decoder architecture, text config with transformers' defaults filled in) of a LLaVA config."""
    tc = cfg.get("text_config")
    if not isinstance(tc, dict):
        raise UserError(f"{path}: config.json has no text_config object.")
    model_type = tc.get("model_type", "llama")
    if model_type not in TEXT_MODELS:
        raise UserError(
            f"{path}: a {model_type!r} language model is not supported in LLaVA (only {', '.join(TEXT_MODELS)})."
        )
    arch, defaults = TEXT_MODELS[model_type]
    tied = bool(cfg.get("tie_word_embeddings") or tc.get("tie_word_embeddings"))
    return arch, {**defaults, **tc, "tie_word_embeddings": tied}


def load_llava_dir(path: str, architecture: str = ARCHITECTURE) -> tuple[dict, dict, dict, dict]:
    """(llava `config.model` dict, `config.data` dict, params, all the checkpoint's tensors) of a directory whose
    config.json's architectures include `architecture`: LLaVA's parts, which LLaVA-NeXT shares (`hf_llava_next.py`
    reads the tensors it adds from the returned ones)."""
    cfg = read_config(path)
    if architecture not in (cfg.get("architectures") or []):
        raise UserError(f"{path}: architectures {cfg.get('architectures')} do not include {architecture}.")
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise UserError(f"{path}: projector_hidden_act {act!r} is not supported (only 'gelu').")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise UserError(f"{path}: vision_feature_select_strategy {strategy!r} is not 'default' or 'full'.")
    vc = cfg.get("vision_config")
    if not isinstance(vc, dict):
        raise UserError(f"{path}: config.json has no vision_config object.")
    if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise UserError(f"{path}: a {vc['model_type']!r} vision tower is not supported in LLaVA (only CLIP's).")
    arch, tc = _text_config(cfg, path)
    image_token_id = int(cfg.get("image_token_id", cfg.get("image_token_index", 32000)))

    tensors = read_safetensors(path)
    vision_kwargs, vision_params = vision_tower(
        "clip", vc, Tensors(tensors, _prefix(tensors, "vision tower", path), path), path
    )
    tap = _feature_tap(cfg.get("vision_feature_layer", -2), vision_kwargs["depth"], path)
    lm_prefix = _prefix(tensors, "language model", path)
    head = next((key for key in _HEADS if key in tensors), _HEADS[0])
    lm_kwargs, decoder_params = decoder_from_tensors(arch, tc, lambda: tensors, lm_prefix, head, path)
    if not 0 <= image_token_id < lm_kwargs["vocab_size"]:
        raise UserError(
            f"{path}: image_token_id {image_token_id} is outside the vocabulary of {lm_kwargs['vocab_size']}."
        )

    t = Tensors(tensors, _prefix(tensors, "projector", path), path)
    bias = cfg.get("multimodal_projector_bias", True)

    def linear(name: str) -> dict:
        kernel = t(name + ".weight").T
        # The MLP connector always has biases; zeros are the same map as none.
        return {"kernel": kernel, "bias": t(name + ".bias") if bias else np.zeros(kernel.shape[1], np.float32)}

    grid = vision_kwargs["image_size"] // vision_kwargs["patch_size"]
    model = dict(
        name="llava",
        encoder="vit",
        encoder_kwargs=vision_kwargs,
        feature_layer=tap,
        drop_class_token=strategy == "default",
        connector=dict(kind="mlp", depth=2, act="gelu"),
        lm=lm_kwargs,
        image_size=vision_kwargs["image_size"],
        image_tokens=grid * grid + int(strategy == "full"),  # "full" keeps the class token
        image_token_id=image_token_id,
    )
    # Rows of LLaVA-1.5's training length (its scripts' model_max_length 2048), within the LM's context.
    data = dict(seq_len=min(2048, int(tc["max_position_embeddings"])), max_images=1, template="llava")
    params = {
        "vision": vision_params,
        "connector": {"linear_1": linear("linear_1"), "linear_2": linear("linear_2")},
        "decoder": decoder_params,
    }
    return model, data, params, tensors


@register_converter(ARCHITECTURE)
def convert_llava_dir(path: str, raw: dict) -> tuple:
    """(system config, params) of a `LlavaForConditionalGeneration` directory: the `llava` system."""
    del raw  # load_llava_dir reads config.json itself
    model, data, params, _ = load_llava_dir(path)
    return system_config(path, model, data), params
