"""NFNet-F0..F7: Normalizer-Free ResNets (Brock, De, Smith, Simonyan 2021).

"High-Performance Large-Scale Image Recognition Without Normalization",
arXiv:2102.06171; the architecture follows the official Haiku code
(deepmind-research `nfnets/`) and timm's `dm_nfnet_f*` models, which are
numerically checked against each other in `tests/test_nfnet.py` (timm side).

Structure (for F0, input [B, H, W, 3]):

* stem: four 3x3 WS-convs 3->16 (stride 2) ->32 ->64 ->128 (stride 2), a scaled
  GELU between them (not after the last);
* four stages of NF bottleneck blocks, widths 256/512/1536/1536, depths
  [1, 2, 6, 3] * k for F(k-1), strides 1/2/2/2 (first block of a stage);
* a block: `out = act(x) * beta`; shortcut = x, or a 1x1 WS-conv of `out`
  (average-pooled 2x2 'SAME' first when strided) when shape changes; residual
  branch 1x1 conv -> 3x3 grouped conv (stride) -> 3x3 grouped conv -> 1x1 conv
  (activations between, group size 128, bottleneck ratio 0.5), then
  `2 * sigmoid-SE(out) * out`, stochastic depth, times `skipinit_gain` (a learned
  scalar initialised to 0) and `alpha` (0.2), plus the shortcut. `beta` is
  1 / expected std of the block input, reset after each stage's first block;
* final 1x1 WS-conv to 2x the last width (3072), a scaled GELU -> `features`,
  global average pool -> `pooled`, optional dropout + linear classifier.

All convs use TF-style 'SAME' padding (as timm's `dm_` variants and the Haiku
code), so odd, non-square inputs give the same result as the reference.

Weight standardisation: `ws_style="timm"` (default, what timm checkpoints use)
is `(w - mean) / sqrt(var + eps) * gain / sqrt(fan_in)` with `eps=1e-5`;
`ws_style="deepmind"` is the Haiku code's
`(w - mean) * gain * rsqrt(max(var * fan_in, eps))` with `eps=1e-4`.
`activation="gelu"` is the exact (erf) GELU as in timm; `"gelu_tanh"` is the
tanh approximation the Haiku code uses (`jax.nn.gelu`'s default); both use the
gamma constant 1.7015043497085571.

Stochastic depth follows the Haiku code: block i of N gets rate
`stochastic_depth_rate * i / N`, drops the whole residual branch per example,
and does not rescale kept examples. It is only active with `deterministic=False`
(which then needs a 'dropout' rng, split per block in the scanned stacks), like the head dropout.

Parameters: `stem_conv1..4`, then per stage S (0-3) `stageS_block0` (the transition block: stride,
`downsample` shortcut conv when the shape changes) and, when the stage has depth d > 1, `stageS_blocks`:
blocks 1..d-1, identical in shape, as one `nn.scan`, so compile time does not grow with depth (F1..F7
compile in about the same time). Every leaf of `stageS_blocks` is stacked on a leading axis of size d - 1, block 1
first, with the logical name "layers" (as the decoder's scanned layers); each block's beta and
stochastic-depth keep probability are scanned inputs, the same numbers the unrolled loop used. Then
`final_conv` and, with classes, `head`.

Logical axis names of the parameters (with "layers" first in `stageS_blocks`):

* conv kernels [kh, kw, in/groups, out]: ("conv_h", "conv_w", "conv_in", "conv_out");
* conv bias and WS gain [out]: ("conv_out",);
* squeeze-excite: fc1 kernel ("conv_out", "se_hidden"), bias ("se_hidden",);
  fc2 kernel ("se_hidden", "conv_out"), bias ("conv_out",);
* classifier: kernel ("conv_out", "classes"), bias ("classes",);
* `skipinit_gain`: a scalar, () (("layers",) when stacked).

Activations [B, h, w, C] are constrained to ("batch", "height", "width", "conv_out").
None of these names except "batch" is in `sharding.DEFAULT_RULES` ("layers" maps to no mesh axis there),
so parameters are replicated unless a config adds rules for them.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import sharding
from vlm_jax.errors import UserError
from vlm_jax.nn.activations import activation
from vlm_jax.nn.layers import DenseGeneral

# F-variants, from the Haiku code's `nfnet_params` (deepmind-research nfnets/base.py):
# widths, depths, train/test resolutions and the head dropout rate used in the paper.
_WIDTHS = (256, 512, 1536, 1536)
VARIANTS: dict[str, dict[str, Any]] = {
    f"F{k}": dict(
        depths=tuple(d * (k + 1) for d in (1, 2, 6, 3)),
        widths=_WIDTHS,
        train_res=train_res,
        test_res=test_res,
        drop_rate=drop_rate,
    )
    for k, (train_res, test_res, drop_rate) in enumerate(
        [
            (192, 256, 0.2),
            (224, 320, 0.3),
            (256, 352, 0.4),
            (320, 416, 0.4),
            (384, 512, 0.5),
            (416, 544, 0.5),
            (448, 576, 0.5),
            (480, 608, 0.5),
        ]
    )
}
GROUP_SIZE = 128
BOTTLENECK_RATIO = 0.5
SE_RATIO = 0.5
ALPHA = 0.2
STAGE_STRIDES = (1, 2, 2, 2)

# The "gamma" constant of each activation, baked in so that act(N(0, 1)) has
# roughly unit variance (Haiku `base.nonlinearities`; the same numbers as timm's `_nonlin_gamma`).
GAMMA = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "gelu_tanh": 1.7015043497085571,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "softsign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}
ACT_AXES = ("batch", "height", "width", "conv_out")


def scaled_activation(name: str):
    """`x -> act(x) * gamma` for one of the names in `GAMMA` (the functions are `vlm_jax.nn.activations`')."""
    if name not in GAMMA:
        raise UserError(f"unknown NFNet activation {name!r}; choose one of {', '.join(sorted(GAMMA))}.")
    fn, gamma = activation(name), GAMMA[name]
    return lambda x: fn(x) * jnp.asarray(gamma, x.dtype)


def _dtype(dtype: Any) -> Any:
    return jnp.dtype(dtype)


class WSConv2D(nn.Module):
    """2D convolution with scaled weight standardisation, a learnable per-output gain, and a bias.

    Kernel [kh, kw, in/groups, out] with axes ("conv_h", "conv_w", "conv_in", "conv_out");
    'SAME' (TF-style) padding. Standardisation runs in float32; the conv in `dtype`.
    """

    features: int
    kernel_size: int = 1
    strides: int = 1
    groups: int = 1
    eps: float = 1e-5
    ws_style: str = "timm"  # "timm" or "deepmind", see the module docstring
    dtype: Any = "float32"

    def standardized_kernel(self, kernel: jax.Array, gain: jax.Array) -> jax.Array:
        fan_in = int(np.prod(kernel.shape[:-1]))
        mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
        var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
        if self.ws_style == "timm":
            scale = jax.lax.rsqrt(var + self.eps) * (gain * fan_in**-0.5)
        elif self.ws_style == "deepmind":
            scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, self.eps)) * gain
        else:
            raise ValueError(f"ws_style must be 'timm' or 'deepmind', got {self.ws_style!r}.")
        return (kernel - mean) * scale

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_ch = x.shape[-1]
        if in_ch % self.groups or self.features % self.groups:
            raise ValueError(f"{in_ch} -> {self.features} channels do not split into {self.groups} groups.")
        k = self.kernel_size
        shape = (k, k, in_ch // self.groups, self.features)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_in", "normal"), ("conv_h", "conv_w", "conv_in", "conv_out")
            ),
            shape,
            jnp.float32,
        )
        gain = self.param(
            "gain", nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)), (self.features,), jnp.float32
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), (self.features,), jnp.float32
        )
        dtype = _dtype(self.dtype)
        w = self.standardized_kernel(jnp.asarray(kernel, jnp.float32), jnp.asarray(gain, jnp.float32))
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            w.astype(dtype),
            window_strides=(self.strides, self.strides),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        return y + bias.astype(dtype)


class SqueezeExcite(nn.Module):
    """Returns the sigmoid gate [B, 1, 1, C]: mean over H, W -> fc1 -> ReLU -> fc2 -> sigmoid."""

    hidden: int
    dtype: Any = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = _dtype(self.dtype)
        h = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
        h = DenseGeneral(self.hidden, ("conv_out", "se_hidden"), use_bias=True, dtype=dtype, name="fc1")(h)
        h = DenseGeneral(x.shape[-1], ("se_hidden", "conv_out"), use_bias=True, dtype=dtype, name="fc2")(nn.relu(h))
        return nn.sigmoid(h)[:, None, None, :]


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """2x2 / stride-2 average pool with 'SAME' padding, averaging only the real (unpadded) inputs."""
    window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
    # A NumPy zero as the initial value makes it lax's (differentiable) window sum; a jnp one is a tracer
    # under jit, which leaves a generic reduce_window that reverse-mode autodiff cannot go through.
    summed = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, window, strides, "SAME")
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    counts = jax.lax.reduce_window(ones, np.zeros((), x.dtype), jax.lax.add, window, strides, "SAME")
    return summed / counts


class _NFBlockBase(nn.Module):
    """The fields and the computation shared by `NFBlock` (one block) and `NFBlockStep` (a scanned stack's body)."""

    out_ch: int
    stride: int
    alpha: float = ALPHA
    group_size: int = GROUP_SIZE
    bottleneck_ratio: float = BOTTLENECK_RATIO
    se_ratio: float = SE_RATIO
    activation: str = "gelu"
    ws_eps: float = 1e-5
    ws_style: str = "timm"
    dtype: Any = "float32"

    def block(self, x: jax.Array, beta: jax.Array, keep: Any) -> jax.Array:
        """The block (called from a compact `__call__`) with `beta` [] in x.dtype and `keep`, the float32
        stochastic-depth keep probability (None: no stochastic depth)."""
        act = scaled_activation(self.activation)
        conv = dict(eps=self.ws_eps, ws_style=self.ws_style, dtype=self.dtype)
        in_ch = x.shape[-1]
        groups = int(self.out_ch * self.bottleneck_ratio) // self.group_size
        if groups < 1:
            raise ValueError(
                f"bottleneck width of {self.out_ch} channels is smaller than group size {self.group_size}."
            )
        mid = groups * self.group_size

        out = act(x) * beta
        if in_ch != self.out_ch or self.stride != 1:
            shortcut = _avg_pool_same(out) if self.stride > 1 else out
            shortcut = WSConv2D(self.out_ch, 1, name="downsample", **conv)(shortcut)
        else:
            shortcut = x
        out = WSConv2D(mid, 1, name="conv1", **conv)(out)
        out = WSConv2D(mid, 3, self.stride, groups, name="conv2", **conv)(act(out))
        out = WSConv2D(mid, 3, 1, groups, name="conv2b", **conv)(act(out))
        out = WSConv2D(self.out_ch, 1, name="conv3", **conv)(act(out))
        gate = SqueezeExcite(int(self.out_ch * self.se_ratio), dtype=self.dtype, name="se")(out)
        out = 2.0 * gate.astype(out.dtype) * out
        if keep is not None:
            if not self.has_rng("dropout"):
                raise ValueError("NFNet with deterministic=False needs a 'dropout' rng (rngs={'dropout': key}).")
            u = jax.random.uniform(self.make_rng("dropout"), (out.shape[0], 1, 1, 1), jnp.float32)
            out = out * jnp.floor(keep + u).astype(out.dtype)
        skipinit_gain = self.param("skipinit_gain", nn.with_logical_partitioning(nn.initializers.zeros, ()), ())
        out = out * skipinit_gain.astype(out.dtype)
        return out * jnp.asarray(self.alpha, out.dtype) + shortcut


class NFBlock(_NFBlockBase):
    """One NF bottleneck block (see the module docstring) with its own `beta` and stochastic depth rate."""

    beta: float = 1.0
    stochastic_depth_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        rate = self.stochastic_depth_rate
        keep = 1.0 - rate if not deterministic and rate > 0.0 else None
        return self.block(x, jnp.asarray(self.beta, x.dtype), keep)


class NFBlockStep(_NFBlockBase):
    """The body of `nn.scan` over a stage's identical blocks (stride 1, in = out channels): carry x; scanned
    `(beta, keep)`, each block's beta [] in x.dtype and float32 stochastic-depth keep probability [] (used
    only when `stochastic_depth`, i.e. not deterministic and a non-zero rate). Returns `(x, None)`."""

    stochastic_depth: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, consts: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        beta, keep = consts
        x = self.block(x, beta, keep if self.stochastic_depth else None)
        return sharding.constrain(x, ACT_AXES), None


def _scan_blocks(length: int):
    """`NFBlockStep` scanned `length` times; parameters stacked on a leading 'layers' axis."""
    return nn.scan(
        NFBlockStep,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=0,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class NFNet(nn.Module):
    """NFNet-F0..F7 (see the module docstring for the architecture and axis names).

    `variant` picks depths/widths from `VARIANTS`; `depths`, `widths`, `stem_width`
    (default widths[0] // 2), `group_size` and `final_width` (default 2 * widths[-1])
    override them, e.g. for tiny test models. `drop_rate=None` uses the variant's
    paper dropout before the classifier (only with `num_classes > 0` and
    `deterministic=False`). `num_classes=0` builds no classifier.

    `__call__(images [B, H, W, 3], deterministic=True)` returns a dict:
    `features` [B, h, w, C] (the activated output of the final conv, before
    pooling: what Flamingo's frozen NFNet-F6 feeds its Perceiver Resampler),
    `pooled` [B, C] (float32 mean over h, w) and, with a head, `logits` [B, num_classes].
    """

    variant: str = "F0"
    num_classes: int = 0
    drop_rate: float | None = None
    stochastic_depth_rate: float = 0.1
    dtype: str = "float32"
    depths: Sequence[int] | None = None
    widths: Sequence[int] | None = None
    stem_width: int | None = None
    group_size: int = GROUP_SIZE
    final_width: int | None = None
    alpha: float = ALPHA
    bottleneck_ratio: float = BOTTLENECK_RATIO
    se_ratio: float = SE_RATIO
    activation: str = "gelu"
    ws_eps: float = 1e-5
    ws_style: str = "timm"

    def config(self) -> dict[str, Any]:
        """The resolved architecture: depths, widths, stem_width, final_width, drop_rate."""
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown NFNet variant {self.variant!r}; choose one of {sorted(VARIANTS)}.")
        v = VARIANTS[self.variant]
        depths = tuple(self.depths if self.depths is not None else v["depths"])
        widths = tuple(self.widths if self.widths is not None else v["widths"])
        if len(depths) != len(STAGE_STRIDES) or len(widths) != len(STAGE_STRIDES):
            raise ValueError(f"NFNet needs 4 stage depths and widths, got {depths} and {widths}.")
        return dict(
            depths=depths,
            widths=widths,
            stem_width=self.stem_width or widths[0] // 2,
            final_width=self.final_width or 2 * widths[-1],
            drop_rate=v["drop_rate"] if self.drop_rate is None else self.drop_rate,
        )

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
        cfg = self.config()
        dtype = _dtype(self.dtype)
        act = scaled_activation(self.activation)
        conv = dict(eps=self.ws_eps, ws_style=self.ws_style, dtype=self.dtype)

        x = sharding.constrain(images.astype(dtype), ACT_AXES)
        s = cfg["stem_width"]
        stem = [(s // 8, 2), (s // 4, 1), (s // 2, 1), (s, 2)]
        for i, (ch, stride) in enumerate(stem):
            x = WSConv2D(ch, 3, stride, name=f"stem_conv{i + 1}", **conv)(x)
            if i < len(stem) - 1:
                x = act(x)
        x = sharding.constrain(x, ACT_AXES)

        num_blocks = sum(cfg["depths"])
        block_args = dict(
            alpha=self.alpha,
            group_size=self.group_size,
            bottleneck_ratio=self.bottleneck_ratio,
            se_ratio=self.se_ratio,
            activation=self.activation,
            ws_eps=self.ws_eps,
            ws_style=self.ws_style,
            dtype=self.dtype,
        )
        index = 0
        expected_std = 1.0
        for stage, (depth, width, stride) in enumerate(zip(cfg["depths"], cfg["widths"], STAGE_STRIDES)):
            betas, keeps = [], []  # of blocks 1..depth-1, from Python floats as NFBlock converts its fields
            for b in range(depth):
                rate = self.stochastic_depth_rate * index / num_blocks
                if b == 0:  # the transition block: stride, maybe a shortcut conv
                    x = NFBlock(
                        out_ch=width,
                        stride=stride,
                        beta=1.0 / expected_std,
                        stochastic_depth_rate=rate,
                        name=f"stage{stage}_block0",
                        **block_args,
                    )(x, deterministic)
                    x = sharding.constrain(x, ACT_AXES)
                    expected_std = 1.0  # the expected variance resets after a stage's first block
                else:
                    betas.append(jnp.asarray(1.0 / expected_std, dtype))
                    keeps.append(jnp.asarray(1.0 - rate, jnp.float32))
                index += 1
                expected_std = (expected_std**2 + self.alpha**2) ** 0.5
            if betas:  # blocks 1..depth-1 are identical in shape: one scan, compiled once whatever the depth
                x, _ = _scan_blocks(len(betas))(
                    out_ch=width,
                    stride=1,
                    stochastic_depth=not deterministic and self.stochastic_depth_rate > 0.0,
                    name=f"stage{stage}_blocks",
                    **block_args,
                )(x, (jnp.stack(betas), jnp.stack(keeps)))

        features = act(WSConv2D(cfg["final_width"], 1, name="final_conv", **conv)(x))
        features = sharding.constrain(features, ACT_AXES)
        pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
        out = {"features": features, "pooled": pooled}
        if self.num_classes:
            h = nn.Dropout(cfg["drop_rate"], deterministic=deterministic)(pooled)
            out["logits"] = DenseGeneral(
                self.num_classes,
                ("conv_out", "classes"),
                use_bias=True,
                dtype=jnp.float32,
                kernel_init=nn.initializers.normal(0.01),
                name="head",
            )(h)
        return out


def num_params(tree: Any) -> int:
    """Total number of parameters in a (possibly boxed / abstract) param tree."""
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(tree))
    return int(sum(int(np.prod(leaf.shape)) for leaf in leaves))
