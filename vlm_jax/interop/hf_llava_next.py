"""Import transformers' `LlavaNextForConditionalGeneration` (LLaVA-NeXT, LLaVA-1.6) into the `llava` system.

LLaVA-NeXT is LLaVA-1.5's parts (CLIP tower, `linear_1` / GELU / `linear_2`
projector, LLaMA or Mistral LM: `hf_llava.load_llava_dir` reads them, in every
key layout it accepts) plus AnyRes: each image is a base view and the tiles of
the `image_grid_pinpoints` resolution that suits it best, all at the tower's
`image_size`; the tiles' features form one grid whose padding rows or columns
are cut off, with the learned `image_newline` vector after each grid row
(transformers' `LlavaNextModel.pack_image_features`). The converted system
does the same from `data.image` (mode "anyres", `anyres_layout="llava_next"`:
the data names each placeholder's feature) and its top-level
`image_newline` parameter.

`image_newline` is stored as `image_newline` (`save_pretrained`, llava-hf's
hub checkpoints) or `model.image_newline` (transformers' in-memory names).
A config without `image_grid_pinpoints` takes transformers' default (LLaVA-1.6's
336-pixel grids). `vision_feature_select_strategy="full"` keeps CLIP's class
token in every view, which transformers then folds into the feature grid
(it only warns); that is refused.
"""

from __future__ import annotations

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.hf_llava import load_llava_dir

ARCHITECTURE = "LlavaNextForConditionalGeneration"

# transformers' LlavaNextConfig default (height, width) pinpoints, for configs that leave them out.
DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_NEWLINE_KEYS = ("image_newline", "model.image_newline")


def _pinpoints(cfg: dict, tile: int, path: str) -> list[list[int]]:
    """The config's `image_grid_pinpoints` ([height, width] pairs), each a whole number of `tile`-pixel tiles."""
    pinpoints = cfg.get("image_grid_pinpoints")
    if pinpoints is None:  # transformers' default, as LlavaNextConfig fills it in
        pinpoints = DEFAULT_PINPOINTS
    valid = isinstance(pinpoints, list) and pinpoints
    valid = valid and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) for v in p) for p in pinpoints
    )
    if not valid:
        raise UserError(f"{path}: image_grid_pinpoints {pinpoints!r} is not a list of [height, width] pairs.")
    for h, w in pinpoints:
        if h < tile or w < tile or h % tile or w % tile:
            raise UserError(
                f"{path}: image_grid_pinpoint [{h}, {w}] is not a grid of whole {tile}-pixel tiles (the vision "
                "tower's image_size)."
            )
    return [[h, w] for h, w in pinpoints]


@register_converter(ARCHITECTURE)
def convert_llava_next_dir(path: str, raw: dict) -> tuple:
    """(system config, params) of a `LlavaNextForConditionalGeneration` directory: the `llava` system with AnyRes
    data settings and the `image_newline` parameter."""
    if raw.get("vision_feature_select_strategy", "default") == "full":
        raise UserError(
            f"{path}: vision_feature_select_strategy 'full' keeps CLIP's class token in each view's features, which "
            "does not fit LLaVA-NeXT's feature grid (only 'default' is supported)."
        )
    model, data, params, tensors = load_llava_dir(path, ARCHITECTURE)
    tile = int(model["image_size"])
    pinpoints = _pinpoints(raw, tile, path)
    key = next((k for k in _NEWLINE_KEYS if k in tensors), None)
    if key is None:
        raise UserError(
            f"the checkpoint in {path!r} has no LLaVA-NeXT image_newline tensor ({' or '.join(_NEWLINE_KEYS)})."
        )
    newline = np.asarray(tensors[key], np.float32)
    width = int(model["lm"]["embed_dim"])
    if newline.shape != (width,):
        raise UserError(f"{path}: {key} has shape {newline.shape}, not the LM width ({width},).")
    model["image_newline"] = True
    params["image_newline"] = newline
    data["image"] = dict(
        mode="anyres",
        size=tile,
        grid_pinpoints=pinpoints,
        anyres_layout="llava_next",
        normalization="clip",
        method="bicubic",
        max_aspect_ratio=20.0,
    )
    # Image slots per row: one image's base view and the tiles of its largest pinpoint.
    data["max_images"] = 1 + max((h // tile) * (w // tile) for h, w in pinpoints)
    return system_config(path, model, data), params
