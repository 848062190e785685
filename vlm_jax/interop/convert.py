"""`vlm-jax convert-hf`: a public checkpoint directory -> a vlm_jax checkpoint (params + config).

The directory's config.json picks the converter from the registry in
`vlm_jax/interop/__init__.py`: its `architectures` (transformers), or
`timm:<architecture>` (timm), or `model_type:<type>` (transformers configs
without `architectures`). Registered today (no torch needed):

* transformers `CLIPModel`, `SiglipModel` -> system `dual_encoder` (`hf_clip.py`);
* transformers `CLIPVisionModel(WithProjection)`, `SiglipVisionModel` -> system `vision_encoder` (ViT);
* timm `dm_nfnet_f0` .. `dm_nfnet_f6` -> system `vision_encoder` (NFNet, `timm_nfnet.py`);
* transformers `IdeficsForVisionText2Text` -> system `flamingo` (`hf_idefics.py`);
* transformers `LlavaForConditionalGeneration` (CLIP tower, LLaMA or Mistral LM) -> system `llava` (`hf_llava.py`);
* transformers `LlavaNextForConditionalGeneration` (the same parts, AnyRes views, `image_newline`) -> system `llava`
  with LLaVA-NeXT's data settings (`hf_llava_next.py`);
* transformers `PaliGemmaForConditionalGeneration` (SigLIP tower, Gemma LM) -> system `paligemma` (`hf_paligemma.py`);
* transformers decoder LMs (`hf_decoder.ARCHITECTURES`: LLaMA, Qwen2, Gemma, MPT, ...) -> system `lm`.

Adding a converter: write a module in `vlm_jax/interop/` with a function
`(path, raw_config) -> (system config, params)` decorated with
`@register_converter("SomeForConditionalGeneration", ...)`, reading files and
reshaping weights with `interop/tensors.py`; the module is found by itself.
A directory no converter reads is a one-sentence error listing the known keys
(`vlm_jax.interop.converters()` lists them).

Weights are read from safetensors files only (`interop/tensors.py`); a directory with only PyTorch pickles
(`pytorch_model.bin`, `*.pt`, `*.pth`) is refused with the command that converts them, as unpickling can run code.

The output directory is laid out like a training workdir (`checkpoints/0/`
with the params and the config), so `vlm-jax forward --checkpoint OUT` and
`load_params` read it like any other checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.interop import find_converter
from vlm_jax.interop.tensors import read_config, refuse_pickles


def to_system_config(path: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(vlm_jax config, params) of a transformers or timm directory, by the converter registered for its config.
    A directory whose weights are only PyTorch pickles is refused before anything else (`refuse_pickles`)."""
    raw = read_config(path)
    refuse_pickles(path, raw)
    return find_converter(raw, path)(path, raw)


def convert(path: str, out_dir: str) -> ml_collections.ConfigDict:
    """Converts `path` and writes `out_dir/checkpoints/0/`; returns the config."""
    config, params = to_system_config(path)
    write_checkpoint(config, params, out_dir)
    return config


def write_checkpoint(config: ml_collections.ConfigDict, params: Any, out_dir: str) -> None:
    """Writes params (float32) and config as step 0 of `out_dir`, a checkpoint `--checkpoint` and `load_params` read."""
    import jax

    from vlm_jax.train.checkpoint import Checkpointer

    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    ckpt = Checkpointer(out_dir, keep=1, async_save=False)
    ckpt.save(0, {"step": np.zeros((), np.int32), "params": params}, None, config, force=True)
    ckpt.close()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
