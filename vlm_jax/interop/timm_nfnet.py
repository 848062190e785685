"""Import timm `dm_nfnet_f*` checkpoints (a timm/Hugging Face directory) into `NFNet` params.

A timm-format directory holds `config.json` (`architecture`, `num_classes`,
optional `model_args`, `pretrained_cfg`) and `model.safetensors` (a torch state
dict). It is read with the safetensors numpy API; torch is not needed.

    kwargs, params = load_timm_nfnet("/path/to/dm_nfnet_f6")
    model = NFNet(**kwargs)
    out = model.apply({"params": params}, images)  # images [B, H, W, 3], normalised as pretrained_cfg says

timm feeds NCHW images normalised with `pretrained_cfg["mean"]` / `["std"]`
(ImageNet statistics for the DeepMind weights); `NFNet` takes NHWC and does no
normalisation itself.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.interop import register_converter, system_config
from vlm_jax.interop.tensors import read_config, read_safetensors

_ARCH = re.compile(r"^dm_nfnet_f([0-6])$")
# timm `model_args` keys and the NFNet field each maps to (None: accepted, no effect on the forward pass).
_ARG_MAP = {
    "depths": "depths",
    "channels": "widths",
    "stem_chs": "stem_width",
    "group_size": "group_size",
    "num_features": "final_width",
    "bottle_ratio": "bottleneck_ratio",
    "alpha": "alpha",
    "std_conv_eps": "ws_eps",
    "drop_rate": "drop_rate",
    "num_classes": None,
    "in_chans": None,
    "drop_path_rate": None,
    "skipinit": None,
}
# model_args that are accepted only with the value the dm_nfnet models use.
_FIXED_ARGS = {
    "global_pool": "avg",
    "act_layer": "gelu",
    "same_padding": True,
    "gamma_in_act": True,
    "extra_conv": True,
    "stem_type": "deep_quad",
    "attn_layer": "se",
    "output_stride": 32,
    "width_factor": 1.0,
}


def _conv(sd: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """timm ScaledStdConv2dSame (weight OIHW, bias, gain [O,1,1,1]) -> WSConv2D (kernel HWIO, bias, gain [O])."""
    return {
        "kernel": np.ascontiguousarray(sd.pop(f"{prefix}.weight").transpose(2, 3, 1, 0)),
        "bias": sd.pop(f"{prefix}.bias"),
        "gain": sd.pop(f"{prefix}.gain").reshape(-1),
    }


def _dense_from_conv1x1(sd: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    w = sd.pop(f"{prefix}.weight")
    return {"kernel": np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1]).T), "bias": sd.pop(f"{prefix}.bias")}


def _stack(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Same-structure param trees -> one tree of arrays stacked on a new leading axis."""
    first = entries[0]
    if any(set(e) != set(first) for e in entries):
        raise ValueError("their parameters differ")
    return {
        k: _stack([e[k] for e in entries]) if isinstance(first[k], dict) else np.stack([e[k] for e in entries])
        for k in first
    }


def _read(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config_path = os.path.join(path, "config.json")
    weights_path = os.path.join(path, "model.safetensors")
    for f in (config_path, weights_path):
        if not os.path.isfile(f):
            raise UserError(f"{path!r} is not a timm model directory: {os.path.basename(f)} is missing.")
    return read_config(path), {k: np.asarray(v, np.float32) for k, v in read_safetensors(path).items()}


def load_timm_nfnet(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a timm `dm_nfnet_f0`..`dm_nfnet_f6` directory; returns `(nfnet_kwargs, params)` for `NFNet`.

    `params` is a nested dict of float32 numpy arrays (`{"stem_conv1": {"kernel": ...}, ...}`; timm's
    `stages.S.0` becomes `stageS_block0`, `stages.S.1..` are stacked into `stageS_blocks`, NFNet's scanned layout), to be used as
    `NFNet(**nfnet_kwargs).apply({"params": params}, images)`.
    """
    config, sd = _read(path)
    arch = str(config.get("architecture", ""))
    m = _ARCH.match(arch)
    if not m:
        raise UserError(
            f"{path!r} holds a timm {arch or 'unnamed'!r} model; only dm_nfnet_f0..dm_nfnet_f6 are supported."
        )
    kwargs: dict[str, Any] = {"variant": f"F{m.group(1)}", "ws_style": "timm", "activation": "gelu"}
    model_args = dict(config.get("model_args") or {})
    for key, value in model_args.items():
        if key in _FIXED_ARGS:
            if value != _FIXED_ARGS[key]:
                raise UserError(f"timm model_args {key}={value!r} is not supported (only {_FIXED_ARGS[key]!r}).")
        elif key not in _ARG_MAP:
            raise UserError(f"timm model_args key {key!r} is not supported by the NFNet importer.")
        elif _ARG_MAP[key] is not None:
            kwargs[_ARG_MAP[key]] = tuple(value) if isinstance(value, list) else value
    kwargs.setdefault("drop_rate", 0.0)  # timm's default dropout before the head
    try:
        params = _convert(sd, kwargs)
    except KeyError as e:
        raise UserError(f"{path!r} is not a complete dm_nfnet checkpoint: tensor {e.args[0]!r} is missing.") from e
    if sd:
        raise UserError(f"{path!r} has weights the NFNet importer does not know: {sorted(sd)[:5]}.")
    if tuple(kwargs["depths"]) != tuple(model_args.get("depths", kwargs["depths"])):
        raise UserError(
            f"{path!r}: the weights have stage depths {kwargs['depths']}, config.json says {model_args['depths']}."
        )
    return kwargs, params


def _convert(sd: dict[str, np.ndarray], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pops the timm tensors from `sd` into an NFNet param tree; sets the shape-derived kwargs."""
    params: dict[str, Any] = {}
    for i in range(1, 5):
        params[f"stem_conv{i}"] = _conv(sd, f"stem.conv{i}")
    blocks = sorted(
        {tuple(int(n) for n in k.split(".")[1:3]) for k in sd if k.startswith("stages.")},
    )
    depths = [0, 0, 0, 0]
    stacked: dict[int, list[dict[str, Any]]] = {0: [], 1: [], 2: [], 3: []}
    for stage, block in blocks:
        if stage > 3 or block != depths[stage]:
            raise UserError(f"timm block stages.{stage}.{block} is unexpected: stages 0-3 of blocks 0, 1, ...")
        p = f"stages.{stage}.{block}"
        entry = {name: _conv(sd, f"{p}.{name}") for name in ("conv1", "conv2", "conv2b", "conv3")}
        if f"{p}.downsample.conv.weight" in sd:
            entry["downsample"] = _conv(sd, f"{p}.downsample.conv")
        entry["se"] = {
            "fc1": _dense_from_conv1x1(sd, f"{p}.attn_last.fc1"),
            "fc2": _dense_from_conv1x1(sd, f"{p}.attn_last.fc2"),
        }
        # skipinit=False models have no gain: the residual branch is then scaled by 1.
        entry["skipinit_gain"] = np.asarray(sd.pop(f"{p}.skipinit_gain", np.float32(1.0)), np.float32).reshape(())
        if block == 0:  # a stage's transition block stands alone
            params[f"stage{stage}_block0"] = entry
        else:  # the others are NFNet's scanned stack: stacked on a leading layers axis
            stacked[stage].append(entry)
        depths[stage] = max(depths[stage], block + 1)
    for stage, entries in stacked.items():
        if entries:
            try:
                params[f"stage{stage}_blocks"] = _stack(entries)
            except ValueError as e:
                raise UserError(f"timm stage {stage}'s blocks 1..{len(entries)} differ in shape: {e}") from e
    kwargs["depths"] = tuple(depths)
    params["final_conv"] = _conv(sd, "final_conv")
    if "head.fc.weight" in sd:
        params["head"] = {"kernel": np.ascontiguousarray(sd.pop("head.fc.weight").T), "bias": sd.pop("head.fc.bias")}
        kwargs["num_classes"] = int(params["head"]["bias"].shape[0])
    else:
        kwargs["num_classes"] = 0
    # Widths, stem and final widths as stored (they override the variant's when a model was customised).
    kwargs["widths"] = tuple(int(params[f"stage{s}_block0"]["conv3"]["bias"].shape[0]) for s in range(4))
    kwargs["stem_width"] = int(params["stem_conv4"]["bias"].shape[0])
    kwargs["final_width"] = int(params["final_conv"]["bias"].shape[0])
    kwargs["group_size"] = int(params["stage0_block0"]["conv2"]["kernel"].shape[2])
    return params


@register_converter(*(f"timm:dm_nfnet_f{i}" for i in range(7)))
def convert_timm_nfnet_dir(path: str, raw: dict) -> tuple:
    """(system config, params) of a timm `dm_nfnet_f*` directory: a `vision_encoder` (NFNet)."""
    kwargs, params = load_timm_nfnet(path)
    size = int(raw.get("pretrained_cfg", {}).get("input_size", [3, 224, 224])[-1])
    return system_config(path, dict(name="vision_encoder", encoder="nfnet", kwargs=kwargs, image_size=size)), params
