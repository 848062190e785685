"""Vision Transformer (ViT / CLIP / SigLIP / InternViT shapes) with scanned layers and feature taps.

A variant string such as ``"B/16"`` or ``"So400m/14"`` picks the width, depth,
MLP width, head count and patch size (`decode_variant`); explicit fields
override any of them (tiny test models). The block stack is one `nn.scan`
(optionally rematerialised), so compile time does not grow with depth. When
`taps` are requested the scan also returns every block's output, from which the
requested layers are picked. The blocks (`EncoderBlock`, `MultiHeadAttention`,
`Mlp`, `Norm`) are the shared ones of `vlm_jax/nn/`.

Parameter layout (all float32, every leaf logically named)::

    patch_embed/{kernel [p, p, C, D], bias [D]}  (stem="conv": [p/4, p/4, stem_width, D])
    stem/conv{1,2}/{kernel, bias}       (stem="conv": 4x4 stride 4, then 3x3, stem_width channels)
    cls [1, 1, D]                       (class token; its position embedding folded in)
    pos_embedding [1, g*g, D]           (posemb="learn"; g = image_size // patch)
    pre_norm/{scale, bias}              (CLIP's pre_layrnorm)
    layers/...                          (stacked on a leading "layers" axis)
    final_norm/{scale, bias}
    map_head/{probe, attn, norm, mlp}   (pool="map")
    proj/kernel                         (proj_dim set; CLIPVisionModelWithProjection)
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import sharding
from vlm_jax.errors import UserError
from vlm_jax.nn.encoder import MultiHeadAttention, encoder_stack
from vlm_jax.nn.layers import DenseGeneral, Mlp, Norm

# Shapes by size name. Sources: big_vision models/vit.py (Ti..G, So400m), OpenCLIP
# ViT-bigG-14.json (bigG), OpenGVLab InternViT-6B / InternViT-300M config.json.
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16),
    "bigG": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16),
    "InternViT-6B": dict(width=3200, depth=48, mlp_dim=12800, num_heads=25),
    "InternViT-300M": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
}
_DEFAULT_PATCH = {"InternViT-6B": 14, "InternViT-300M": 14}


def decode_variant(variant: str) -> dict[str, int]:
    """`"So400m/14"` -> dict(width, depth, mlp_dim, num_heads, patch_size)."""
    name, sep, patch = variant.partition("/")
    if name not in VARIANTS:
        raise UserError(f"unknown ViT variant {variant!r}; known sizes are {', '.join(VARIANTS)} (e.g. 'B/16').")
    if sep:
        if not re.fullmatch(r"[1-9][0-9]*", patch):
            raise UserError(f"ViT variant {variant!r} has patch size {patch!r}, which is not a positive integer.")
        patch_size = int(patch)
    elif name in _DEFAULT_PATCH:
        patch_size = _DEFAULT_PATCH[name]
    else:
        raise UserError(f"ViT variant {variant!r} lacks a patch size; write it as '{name}/16' (or /14, /32).")
    return dict(VARIANTS[name], patch_size=patch_size)


# ---------------------------------------------------------------------------------------------
# Position embeddings.


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2D sin-cos position embedding [h*w, width] (MoCo v3 / big_vision `posemb_sincos_2d`)."""
    if width % 4:
        raise UserError(f"sincos2d position embeddings need a width divisible by 4, got {width}.")
    y, x = np.mgrid[:h, :w]
    q = width // 4
    omega = 1.0 / temperature ** (np.arange(q) / max(q - 1, 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def _interp_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """[n_out, n_in] weights of PyTorch's `interpolate(..., align_corners=False)` along one axis."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        if method == "bilinear":
            src = max(src, 0.0)
            x0 = int(np.floor(src))
            t = src - x0
            m[i, min(x0, n_in - 1)] += 1 - t
            m[i, min(x0 + 1, n_in - 1)] += t
        elif method == "bicubic":
            x0 = int(np.floor(src))
            t = src - x0
            a = -0.75  # PyTorch's cubic convolution coefficient

            def near(d):  # |d| <= 1
                return ((a + 2) * d - (a + 3)) * d * d + 1

            def far(d):  # 1 < |d| < 2
                return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

            weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
            for k, wk in enumerate(weights):
                m[i, min(max(x0 - 1 + k, 0), n_in - 1)] += wk
        else:
            raise UserError(f"unknown position-embedding resampling {method!r}; use 'bilinear' or 'bicubic'.")
    return m.astype(np.float32)


def resample_posemb(posemb: jax.Array, old_hw: tuple[int, int], new_hw: tuple[int, int], method: str) -> jax.Array:
    """Resizes a [1, h*w, D] grid of position embeddings to [1, H*W, D] (PyTorch interpolate semantics)."""
    if tuple(old_hw) == tuple(new_hw):
        return posemb
    grid = posemb.reshape(old_hw + (posemb.shape[-1],))
    mh = jnp.asarray(_interp_matrix(old_hw[0], new_hw[0], method))
    mw = jnp.asarray(_interp_matrix(old_hw[1], new_hw[1], method))
    out = jnp.einsum("Hh,Ww,hwd->HWd", mh, mw, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape((1, new_hw[0] * new_hw[1], posemb.shape[-1]))


# ---------------------------------------------------------------------------------------------


class MAPHead(nn.Module):
    """Multihead attention pooling with a learned probe (SigLIP / big_vision MAPHead)."""

    num_heads: int
    mlp_dim: int
    mlp_act: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        probe = self.param(
            "probe",
            nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed")),
            (1, 1, width),
        )
        probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, width))
        h = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(probe, x)
        y = Norm(self.norm, self.norm_eps, dtype=self.dtype, name="norm")(h)
        h = h + Mlp(self.mlp_dim, self.mlp_act, self.dtype, name="mlp")(y)
        return h[:, 0]


class ConvStem(nn.Module):
    """[B, H, W, 3] -> [B, H/4, W/4, channels]: a 4x4 stride-4 conv, GELU, a 3x3 'SAME' conv, GELU (ViT stem="conv").

    Kernels [kh, kw, in, out] with axes ("conv_h", "conv_w", "conv_in", "conv_out"), biases ("conv_out",).
    """

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, (kernel, stride, padding) in enumerate([(4, 4, "VALID"), (3, 1, "SAME")]):
            x = nn.Conv(
                self.channels,
                (kernel, kernel),
                stride,
                padding=padding,
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                name=f"conv{i + 1}",
            )(x)
            x = nn.gelu(x, approximate=False)
        return x


class ViT(nn.Module):
    """Images [B, H, W, 3] -> dict(pooled [B, width], tokens [B, N(+1), width], taps {i: [B, N(+1), width]}).

    `taps` are block indices (negative counts from the end): the hidden state
    after that block, before any final norm — `taps=(-2,)` is LLaVA's
    penultimate layer (transformers' `hidden_states[-2]`). `tokens` are
    final-normed when `final_norm and norm_tokens` (CLIP normalises only the
    pooled class token: `norm_tokens=False`). With `proj_dim`, "embeds" is the
    pooled output projected without bias (CLIP's visual projection).

    `stem="conv"` replaces the linear patchify with a small convolutional stem
    (early convolutions, Xiao et al. 2021, arXiv:2106.14881): a 4x4 stride-4
    conv, GELU, a 3x3 conv, GELU (`stem_width` channels, default `width`), then
    `patch_embed` patchifies the stride-4 map in (p/4)x(p/4) blocks, so the token
    grid is the same as with `stem="patch"`. Trained from scratch on small data
    it learns local shape much faster than a linear patchify (docs/systems.md).
    """

    variant: str = "B/16"
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    image_size: int = 224
    posemb: str = "learn"
    posemb_resample: str = "bilinear"
    pool: str = "cls"
    class_token: bool | None = None  # default: pool == "cls"
    pre_norm: bool = False
    final_norm: bool = True
    norm_tokens: bool = True
    qk_norm: bool = False
    qk_norm_over: str = "head"
    layer_scale: float | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    mlp_act: str = "gelu"
    attn_bias: bool = True
    attn_out_bias: bool | None = None  # default: attn_bias (InternViT-6B: False on q/k/v, True on the output)
    patch_bias: bool = True
    stem: str = "patch"
    stem_width: int | None = None
    proj_dim: int | None = None
    dtype: str = "float32"
    remat: str = "none"
    taps: tuple[int, ...] = ()

    def shape(self) -> dict[str, int]:
        """The resolved (width, depth, mlp_dim, num_heads, patch_size)."""
        base = decode_variant(self.variant) if self.variant else {}
        out = {}
        for key in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
            value = getattr(self, key)
            if value is None:
                if key not in base:
                    raise UserError(f"ViT needs {key}: give a variant such as 'B/16' or set {key} explicitly.")
                value = base[key]
            out[key] = int(value)
        return out

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, Any]:
        s = self.shape()
        width, depth, p = s["width"], s["depth"], s["patch_size"]
        dtype = jnp.dtype(self.dtype)
        if self.pool not in ("cls", "gap", "map", "none"):
            raise UserError(f"unknown ViT pool {self.pool!r}; use 'cls', 'gap', 'map' or 'none'.")
        use_cls = self.pool == "cls" if self.class_token is None else self.class_token
        if self.pool == "cls" and not use_cls:
            raise UserError("ViT pool='cls' needs class_token=True.")

        b, h, w, _ = images.shape
        gh, gw = h // p, w // p
        x = images[:, : gh * p, : gw * p].astype(dtype)
        if self.stem == "conv":
            if p % 4:
                raise UserError(f"ViT stem='conv' needs a patch size divisible by 4, got {p}.")
            x = ConvStem(self.stem_width or width, dtype, name="stem")(x)
        elif self.stem != "patch":
            raise UserError(f"unknown ViT stem {self.stem!r}; use 'patch' or 'conv'.")
        block, c = x.shape[1] // gh, x.shape[-1]  # pixels (or stride-4 stem cells) per patch side
        x = x.reshape(b, gh, block, gw, block, c).transpose(0, 1, 3, 2, 4, 5)
        x = DenseGeneral(
            width,
            ("patch", "patch", "channels", "embed"),
            in_dims=3,
            use_bias=self.patch_bias,
            dtype=dtype,
            name="patch_embed",
        )(x)
        x = x.reshape(b, gh * gw, width)

        if self.posemb == "learn":
            g0 = self.image_size // p
            pe = self.param(
                "pos_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(1 / math.sqrt(width)), (None, "length", "embed")),
                (1, g0 * g0, width),
            )
            x = x + resample_posemb(pe, (g0, g0), (gh, gw), self.posemb_resample).astype(dtype)
        elif self.posemb == "sincos2d":
            x = x + jnp.asarray(posemb_sincos_2d(gh, gw, width), dtype)[None]
        elif self.posemb != "none":
            raise UserError(f"unknown ViT posemb {self.posemb!r}; use 'learn' or 'sincos2d'.")
        if use_cls:
            cls = self.param(
                "cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")), (1, 1, width)
            )
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, width)), x], axis=1)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        if self.pre_norm:
            x = Norm(self.norm, self.norm_eps, dtype=dtype, name="pre_norm")(x)

        taps = tuple(self.taps)
        for t in taps:
            if not -depth <= t < depth:
                raise UserError(f"ViT tap {t} is out of range for a {depth}-layer model.")
        x, stacked = encoder_stack(
            depth,
            self.remat,
            num_heads=s["num_heads"],
            mlp_dim=s["mlp_dim"],
            norm=self.norm,
            norm_eps=self.norm_eps,
            mlp_act=self.mlp_act,
            attn_bias=self.attn_bias,
            attn_out_bias=self.attn_out_bias,
            qk_norm=self.qk_norm,
            qk_norm_over=self.qk_norm_over,
            layer_scale=self.layer_scale,
            emit=bool(taps),
            dtype=dtype,
        )(x, None, None)

        out: dict[str, Any] = {"taps": {t: stacked[t] for t in taps}}
        y = Norm(self.norm, self.norm_eps, dtype=dtype, name="final_norm")(x) if self.final_norm else x
        out["tokens"] = y if self.norm_tokens else x
        patches = y[:, 1:] if use_cls else y
        if self.pool == "cls":
            pooled = y[:, 0]
        elif self.pool == "gap":
            pooled = jnp.mean(patches, axis=1)
        elif self.pool == "map":
            pooled = MAPHead(
                s["num_heads"], s["mlp_dim"], self.mlp_act, self.norm, self.norm_eps, dtype, name="map_head"
            )(y)
        else:
            pooled = None
        if pooled is not None:
            out["pooled"] = sharding.constrain(pooled, ("batch", "embed"))
            if self.proj_dim:
                out["embeds"] = DenseGeneral(self.proj_dim, ("embed", None), dtype=dtype, name="proj")(pooled)
        return out
