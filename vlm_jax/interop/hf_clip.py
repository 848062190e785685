"""Import transformers CLIP / SigLIP checkpoint directories (config.json + *.safetensors) without torch.

`load_hf_dir(path)` returns `(kind, kwargs, params)`:

* kind "two_tower": `TwoTower(**kwargs)` with `params` (CLIPModel, SiglipModel);
* kind "vit": `ViT(**kwargs)` with `params` (CLIPVisionModel,
  CLIPVisionModelWithProjection, SiglipVisionModel).

`params` is the plain (unboxed) tree of float32 numpy arrays that
`module.apply({"params": params}, ...)` takes, with per-layer weights stacked
on a leading axis for the scanned layer stack. Both key layouts of the vision
models are accepted (`CLIPVisionModel` saves `embeddings.*`, the other classes
`vision_model.embeddings.*`), and the config forms: nested `vision_config` /
`text_config`, legacy `vision_config_dict` / `text_config_dict`, a flat vision
config, and configs that omit default values (transformers' defaults fill them).

Semantics carried over: CLIP folds the class token's position embedding into
the class token and normalises only the pooled class token (`norm_tokens=False`);
learned position embeddings are resampled bicubically as transformers'
`interpolate_pos_encoding=True` does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.tensors import (
    Tensors,
    heads_bias,
    heads_kernel,
    out_kernel,
    read_config,
    read_safetensors,
    stack_layers,
)

_ACTS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}

# transformers' config defaults, for configs saved with only their non-default values.
_CLIP_VISION = dict(
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=512,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_CLIP_TEXT = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    projection_dim=512,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)
_SIGLIP_VISION = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=True,
)
_SIGLIP_TEXT = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=64,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    projection_size=None,
)

# architecture -> (family, kind)
_ARCHS = {
    "CLIPModel": ("clip", "two_tower"),
    "SiglipModel": ("siglip", "two_tower"),
    "CLIPVisionModel": ("clip", "vit"),
    "CLIPVisionModelWithProjection": ("clip", "vit"),
    "SiglipVisionModel": ("siglip", "vit"),
}
_MODEL_TYPES = {
    "clip": ("clip", "two_tower"),
    "siglip": ("siglip", "two_tower"),
    "clip_vision_model": ("clip", "vit"),
    "siglip_vision_model": ("siglip", "vit"),
}


# ---------------------------------------------------------------------------------------------
# Key prefixes.


def _find_prefix(tensors: dict, suffix: str, prefer: str, what: str, where: str) -> str:
    prefixes = sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix))
    if not prefixes:
        raise UserError(f"the checkpoint in {where!r} has no {what} (no tensor named '*{suffix}').")
    for p in prefixes:
        if p.endswith(prefer):
            return p
    return prefixes[0]


# ---------------------------------------------------------------------------------------------
# Weight layouts.


def _linear(t: Tensors, name: str, bias: bool = True) -> dict:
    out = {"kernel": t(name + ".weight").T}
    if bias:
        out["bias"] = t(name + ".bias")
    return out


def _norm(t: Tensors, name: str) -> dict:
    return {"scale": t(name + ".weight"), "bias": t(name + ".bias")}


def _attn_from_qkv(w: dict[str, np.ndarray], b: dict[str, np.ndarray], wo, bo, heads: int) -> dict:
    """Torch-layout q/k/v/out weights ([out, in]) -> DenseGeneral kernels with (heads, head_dim) axes."""
    out = {name: {"kernel": heads_kernel(w[name], heads), "bias": heads_bias(b[name], heads)} for name in w}
    out["out"] = {"kernel": out_kernel(wo, heads), "bias": bo}
    return out


def _layer(t: Tensors, i: int, heads: int) -> dict:
    p = f"encoder.layers.{i}."
    names = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
    w = {k: t(f"{p}self_attn.{v}.weight") for k, v in names.items()}
    b = {k: t(f"{p}self_attn.{v}.bias") for k, v in names.items()}
    return {
        "attn_norm": _norm(t, p + "layer_norm1"),
        "attn": _attn_from_qkv(w, b, t(p + "self_attn.out_proj.weight"), t(p + "self_attn.out_proj.bias"), heads),
        "mlp_norm": _norm(t, p + "layer_norm2"),
        "mlp": {"fc1": _linear(t, p + "mlp.fc1"), "fc2": _linear(t, p + "mlp.fc2")},
    }


def _sub_config(cfg: dict, key: str, defaults: dict, flat_ok: bool) -> dict:
    sub = cfg.get(key) or cfg.get(key + "_dict")
    if sub is None:
        if not flat_ok:
            raise UserError(f"config.json lacks {key!r}, which a two-tower CLIP/SigLIP config must have.")
        sub = cfg
    return {**defaults, **{k: v for k, v in sub.items() if v is not None or k not in defaults}}


def _act(name: str) -> str:
    if name not in _ACTS:
        raise UserError(f"hidden_act {name!r} is not supported; supported: {', '.join(_ACTS)}.")
    return _ACTS[name]


# ---------------------------------------------------------------------------------------------
# Towers.


def vision_tower(family: str, vc: dict, t: Tensors, where: str) -> tuple[dict, dict]:
    """(ViT kwargs, params) of a CLIP (`family` "clip") or SigLIP ("siglip") vision tower.

    `vc` is the vision config in transformers' CLIP key names (`hidden_size`,
    `patch_size`, ...; keys it omits take transformers' defaults for the
    family), `t` reads the tower's tensors (`embeddings.*`,
    `encoder.layers.*`, ...) and `where` names the checkpoint in errors.
    """
    defaults = _CLIP_VISION if family == "clip" else _SIGLIP_VISION
    vc = _sub_config({"vision_config": vc}, "vision_config", defaults, flat_ok=False)
    width, heads, p = vc["hidden_size"], vc["num_attention_heads"], vc["patch_size"]
    if vc.get("num_channels", 3) != 3:
        raise UserError(
            f"the vision tower in {where!r} takes {vc['num_channels']} channels; only RGB (3) is supported."
        )
    kwargs = dict(
        variant="",
        width=width,
        depth=vc["num_hidden_layers"],
        mlp_dim=vc["intermediate_size"],
        num_heads=heads,
        patch_size=p,
        image_size=vc["image_size"],
        posemb="learn",
        posemb_resample="bicubic",
        norm="layernorm",
        norm_eps=float(vc["layer_norm_eps"]),
        mlp_act=_act(vc["hidden_act"]),
        attn_bias=True,
        final_norm=True,
    )
    grid = vc["image_size"] // p
    pos = t("embeddings.position_embedding.weight")
    params: dict[str, Any] = {
        "patch_embed": {"kernel": t("embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)},
    }
    if family == "clip":
        kwargs.update(pool="cls", class_token=True, pre_norm=True, norm_tokens=False, patch_bias=False)
        if pos.shape[0] != grid * grid + 1:
            raise UserError(
                f"the vision position embedding in {where!r} has {pos.shape[0]} rows, not the {grid * grid + 1} "
                f"that image_size {vc['image_size']} and patch_size {p} imply."
            )
        params["cls"] = (t("embeddings.class_embedding") + pos[0])[None, None]
        params["pos_embedding"] = pos[1:][None]
        params["pre_norm"] = _norm(t, "pre_layrnorm")
    else:
        use_head = bool(vc.get("vision_use_head", True))
        kwargs.update(
            pool="map" if use_head else "none", class_token=False, pre_norm=False, norm_tokens=True, patch_bias=True
        )
        if pos.shape[0] != grid * grid:
            raise UserError(
                f"the vision position embedding in {where!r} has {pos.shape[0]} rows, not the {grid * grid} "
                f"that image_size {vc['image_size']} and patch_size {p} imply."
            )
        params["patch_embed"]["bias"] = t("embeddings.patch_embedding.bias")
        params["pos_embedding"] = pos[None]
        if use_head:
            w_in, b_in = t("head.attention.in_proj_weight"), t("head.attention.in_proj_bias")
            w = dict(zip(("query", "key", "value"), np.split(w_in, 3, axis=0)))
            b = dict(zip(("query", "key", "value"), np.split(b_in, 3, axis=0)))
            params["map_head"] = {
                "probe": t("head.probe"),
                "attn": _attn_from_qkv(
                    w, b, t("head.attention.out_proj.weight"), t("head.attention.out_proj.bias"), heads
                ),
                "norm": _norm(t, "head.layernorm"),
                "mlp": {"fc1": _linear(t, "head.mlp.fc1"), "fc2": _linear(t, "head.mlp.fc2")},
            }
    params["layers"] = stack_layers([_layer(t, i, heads) for i in range(vc["num_hidden_layers"])])
    params["final_norm"] = _norm(t, "post_layernorm")
    return kwargs, params


def _text(family: str, tc: dict, t: Tensors) -> tuple[dict, dict]:
    kwargs = dict(
        vocab_size=tc["vocab_size"],
        width=tc["hidden_size"],
        depth=tc["num_hidden_layers"],
        num_heads=tc["num_attention_heads"],
        mlp_dim=tc["intermediate_size"],
        max_len=tc["max_position_embeddings"],
        mlp_act=_act(tc["hidden_act"]),
        norm="layernorm",
        norm_eps=float(tc["layer_norm_eps"]),
        attn_bias=True,
    )
    params: dict[str, Any] = {
        "token_embed": {"embedding": t("embeddings.token_embedding.weight")},
        "pos_embedding": t("embeddings.position_embedding.weight"),
        "layers": stack_layers([_layer(t, i, tc["num_attention_heads"]) for i in range(tc["num_hidden_layers"])]),
        "final_norm": _norm(t, "final_layer_norm"),
    }
    if family == "clip":
        eos = tc.get("eos_token_id")
        kwargs.update(causal=True, pool="eos", eos_token_id=int(eos if eos is not None else 2))
    else:
        kwargs.update(causal=False, pool="last", head=int(tc.get("projection_size") or tc["hidden_size"]))
        params["head"] = _linear(t, "head")
    return kwargs, params


def _classify(cfg: dict, path: str) -> tuple[str, str, str]:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in _ARCHS:
            return arch, *_ARCHS[arch]
    model_type = cfg.get("model_type")
    if not archs and model_type in _MODEL_TYPES:
        return model_type, *_MODEL_TYPES[model_type]
    found = ", ".join(archs) if archs else f"model_type {model_type!r}"
    raise UserError(f"{path!r} holds an unsupported architecture ({found}); supported: {', '.join(_ARCHS)}.")


def load_hf_dir(path: str) -> tuple[str, dict, dict]:
    """(kind, module kwargs, params) of a transformers CLIP/SigLIP directory; kind is "two_tower" or "vit"."""
    cfg = read_config(path)
    arch, family, kind = _classify(cfg, path)
    tensors = read_safetensors(path)
    vdef, tdef = (_CLIP_VISION, _CLIP_TEXT) if family == "clip" else (_SIGLIP_VISION, _SIGLIP_TEXT)

    vc = _sub_config(cfg, "vision_config", vdef, flat_ok=kind == "vit")
    vprefix = _find_prefix(tensors, "embeddings.patch_embedding.weight", "vision_model.", "vision tower", path)
    vkwargs, vparams = vision_tower(family, vc, Tensors(tensors, vprefix, path), path)
    top = Tensors(tensors, "", path)

    if kind == "vit":
        if arch == "CLIPVisionModelWithProjection":
            vkwargs["proj_dim"] = int(vc["projection_dim"])
            vparams["proj"] = {"kernel": top("visual_projection.weight").T}
        return kind, vkwargs, vparams

    tc = _sub_config(cfg, "text_config", tdef, flat_ok=False)
    tprefix = _find_prefix(tensors, "embeddings.token_embedding.weight", "text_model.", "text tower", path)
    tkwargs, tparams = _text(family, tc, Tensors(tensors, tprefix, path))
    params: dict[str, Any] = {"image_encoder": vparams, "text_encoder": tparams}
    if family == "clip":
        embed_dim = int(cfg.get("projection_dim", 512))
        params["visual_projection"] = {"kernel": top("visual_projection.weight").T}
        params["text_projection"] = {"kernel": top("text_projection.weight").T}
        params["logit_scale"] = top("logit_scale").reshape(())
        kwargs = dict(
            vision=vkwargs,
            text=tkwargs,
            embed_dim=embed_dim,
            projection="clip",
            logit_scale_init=float(cfg.get("logit_scale_init_value", 2.6592)),
            logit_bias_init=None,
        )
    else:
        if tkwargs["head"] != vkwargs["width"]:
            raise UserError(
                f"the SigLIP text head projects to {tkwargs['head']} dims but image embeddings have "
                f"{vkwargs['width']}; the two towers must agree."
            )
        if vkwargs["pool"] == "none":
            raise UserError("a SigLIP two-tower model needs the vision attention-pooling head (vision_use_head=True).")
        params["logit_scale"] = top("logit_scale").reshape(())
        params["logit_bias"] = top("logit_bias").reshape(())
        kwargs = dict(
            vision=vkwargs,
            text=tkwargs,
            embed_dim=int(vkwargs["width"]),
            projection="siglip",
            logit_scale_init=math.log(10.0),
            logit_bias_init=-10.0,
        )
    return kind, kwargs, params


@register_converter(*_ARCHS, *(f"model_type:{m}" for m in _MODEL_TYPES))
def convert_clip_dir(path: str, raw: dict) -> tuple[Any, dict]:
    """(system config, params) of a CLIP/SigLIP directory: a `vision_encoder` (ViT) or a `dual_encoder`."""
    del raw  # load_hf_dir reads config.json itself
    kind, kwargs, params = load_hf_dir(path)
    if kind == "vit":
        return system_config(path, dict(name="vision_encoder", encoder="vit", kwargs=kwargs)), params
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
    return system_config(path, model), params


def build(path: str) -> tuple[Any, dict]:
    """(flax module, params) of a transformers CLIP/SigLIP directory."""
    kind, kwargs, params = load_hf_dir(path)
    if kind == "vit":
        from vlm_jax.encoders.vit import ViT

        return ViT(**kwargs), params
    from vlm_jax.encoders.two_tower import TwoTower

    return TwoTower(**kwargs), params


__all__ = ["load_hf_dir", "build", "convert_clip_dir", "vision_tower"]
