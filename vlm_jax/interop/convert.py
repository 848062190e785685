"""`vlm-jax convert-hf`: a public checkpoint directory -> a vlm_jax checkpoint (params + config).

Recognised inputs (no torch needed):

* transformers `CLIPModel`, `SiglipModel` -> system `dual_encoder`;
* transformers `CLIPVisionModel(WithProjection)`, `SiglipVisionModel` -> system `vision_encoder` (ViT);
* timm `dm_nfnet_f*` directories (config.json with `architecture`) -> system `vision_encoder` (NFNet);
* transformers `IdeficsForVisionText2Text` -> system `flamingo`;
* transformers `LlamaForCausalLM`, `Qwen2ForCausalLM`, `GemmaForCausalLM`, `MptForCausalLM` -> system `lm`.

The output directory is laid out like a training workdir (`checkpoints/0/`
with the params and the config), so `vlm-jax forward --checkpoint OUT` and
`load_params` read it like any other checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.errors import UserError


def _config_json(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise UserError(f"the checkpoint directory {path} does not exist.")
    if not os.path.isfile(file):
        raise UserError(f"{path} has no config.json; give a transformers or timm model directory.")
    with open(file) as f:
        return json.load(f)


def to_system_config(path: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(vlm_jax config, params) of a transformers or timm directory."""
    raw = _config_json(path)
    if "IdeficsForVisionText2Text" in raw.get("architectures", []):
        from vlm_jax.interop.hf_idefics import load_idefics_dir

        model, params = load_idefics_dir(path)
        config = ml_collections.ConfigDict(
            {"model": model, "data": {"seq_len": 8, "max_images": 1}, "converted_from": os.path.abspath(path)}
        )
        return config, params
    decoders = {"LlamaForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM", "MptForCausalLM"}
    if set(raw.get("architectures", [])) & decoders:
        from vlm_jax.interop.hf_decoder import load_decoder_dir

        kwargs, params = load_decoder_dir(path)
        config = ml_collections.ConfigDict(
            {"model": dict(name="lm", **kwargs), "data": {"seq_len": 8}, "converted_from": os.path.abspath(path)}
        )
        return config, params
    if str(raw.get("architecture", "")).startswith("dm_nfnet"):
        from vlm_jax.interop.timm_nfnet import load_timm_nfnet

        kwargs, params = load_timm_nfnet(path)
        size = int(raw.get("pretrained_cfg", {}).get("input_size", [3, 224, 224])[-1])
        model = dict(name="vision_encoder", encoder="nfnet", kwargs=kwargs, image_size=size)
    else:
        from vlm_jax.interop.hf_clip import load_hf_dir

        kind, kwargs, params = load_hf_dir(path)
        if kind == "vit":
            model = dict(name="vision_encoder", encoder="vit", kwargs=kwargs)
        else:
            siglip = kwargs.get("logit_bias_init") is not None
            model = dict(
                name="dual_encoder",
                loss="sigmoid" if siglip else "softmax",
                chunked_loss=True,
                projection=kwargs["projection"],
                embed_dim=kwargs["embed_dim"],
                # The converted scale and bias are in the params; the inits only matter for new training.
                logit_scale_init=float(kwargs.get("logit_scale_init", math.log(1 / 0.07))),
                logit_bias_init=kwargs.get("logit_bias_init"),
                vision=kwargs["vision"],
                text=kwargs["text"],
            )
    config = ml_collections.ConfigDict({"model": model, "data": {}, "converted_from": os.path.abspath(path)})
    return config, params


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
    ckpt.save(0, {"step": np.zeros((), np.int32), "params": params}, {}, config, force=True)
    ckpt.close()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
