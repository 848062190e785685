"""NFNet-F*: numeric parity with timm's `dm_nfnet_f*`, published sizes and constants, stochastic depth.

timm (`pip install --no-deps timm`) imports torchvision at import time but the
NFNet models use none of it; when torchvision is not installed, `_import_timm`
puts a stand-in package on the import path just for that import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import sharding
from vlm_jax.encoders.nfnet import GAMMA, NFNet, WSConv2D, num_params, scaled_activation
from vlm_jax.errors import UserError
from vlm_jax.interop.timm_nfnet import load_timm_nfnet

# A small dm_nfnet: every part of the real one (deep stem, transition blocks with and
# without pooling, grouped convs with >1 group, SE, final conv, head, a scanned stack of blocks
# with different betas), with fewer/narrower layers.
TINY_ARGS = dict(depths=(1, 3, 1, 1), channels=(32, 64, 96, 96), stem_chs=32, group_size=16, num_features=128)
NUM_CLASSES = 7

TORCH_REASON = "the reference (timm's dm_nfnet) is PyTorch: pip install -e '.[interop]'"
TIMM_REASON = "the reference is timm's dm_nfnet: pip install --no-deps timm==1.0.31 (setup.py)"


class _Anything:
    """Stands for any torchvision attribute: callable, subclassable, attribute-bearing."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _AnythingMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _AnythingClass(_Anything, metaclass=_AnythingMeta):
    pass


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `torchvision` and every `torchvision.*` importable as empty packages of stand-ins."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+stand-in"

        def getattr_(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _AnythingClass if name[:1].isupper() else _Anything()

        module.__getattr__ = getattr_
        return module

    def exec_module(self, module):
        pass


def _import_timm():
    pytest.importorskip("torch", reason=TORCH_REASON)
    if "timm" in sys.modules:
        return sys.modules["timm"]
    finder = None
    if importlib.util.find_spec("torchvision") is None:
        finder = _TorchvisionStandIn()
        sys.meta_path.insert(0, finder)
    try:
        timm = pytest.importorskip("timm", reason=TIMM_REASON)
    finally:
        if finder is not None:
            sys.meta_path.remove(finder)
    return timm


@pytest.fixture(scope="module")
def timm():
    return _import_timm()


def _randomise(model, seed: int = 0) -> None:
    """Random weights everywhere (of the torch.nn.Module `model`), including WS gains and skipinit gains (zero at init, which would hide bugs).

    Conv weights get a non-zero mean and a small, per-tensor spread, so mean removal and the
    WS epsilon (1e-5 against variances ~1e-5..1e-2) both matter.
    """
    import torch  # the callers' `timm` fixture has skipped without it

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gain") or name.endswith("skipinit_gain"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "attn_last" in name or name.startswith("head"):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:  # standardised conv weights
                std = 10 ** (-2.5 + 1.5 * torch.rand((), generator=g))
                p.copy_(0.05 + std * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def timm_tiny(timm, tmp_path_factory):
    """(timm model, its timm-format directory with a head, the same without a head)."""
    import torch  # the `timm` fixture has skipped without it
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("dm_nfnet_f0", pretrained=False, num_classes=NUM_CLASSES, **TINY_ARGS).eval()
    _randomise(model)
    with_head = tmp_path_factory.mktemp("dm_nfnet_tiny")
    save_for_hf(model, str(with_head), safe_serialization=True)
    headless = timm.create_model("dm_nfnet_f0", pretrained=False, num_classes=0, **TINY_ARGS).eval()
    headless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    no_head = tmp_path_factory.mktemp("dm_nfnet_tiny_nohead")
    save_for_hf(headless, str(no_head), safe_serialization=True)
    return model, str(with_head), str(no_head)


def _images(batch=8, h=67, w=45, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def converted(timm_tiny):
    """(kwargs, params) from the importer, 8 odd non-square images, and timm's outputs for them."""
    import torch  # the `timm` fixture has skipped without it

    model, path, _ = timm_tiny
    images = _images()  # 67 x 45: odd and non-square, so every strided SAME conv and pool pads unevenly
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        ref = dict(
            features=feats.permute(0, 2, 3, 1).numpy(),
            pooled=feats.mean((2, 3)).numpy(),
            logits=model.forward_head(feats).numpy(),
        )
    kwargs, params = load_timm_nfnet(path)
    return kwargs, params, images, ref


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_parity_with_timm_sharded(converted):
    """Converted weights reproduce timm (eval mode) on a 67x45 input under a data=4 x tensor=2 mesh.

    The model has stochastic depth (rates up to 0.72) and head dropout (0.5) configured and a
    dropout rng given: with deterministic=True both must be the identity.
    """
    kwargs, params, images, ref = converted
    assert kwargs["num_classes"] == NUM_CLASSES and kwargs["depths"] == TINY_ARGS["depths"]
    model = NFNet(**{**kwargs, "stochastic_depth_rate": 0.9, "drop_rate": 0.5})
    mesh = sharding.make_mesh("data=4,fsdp=1,tensor=2")
    rules = list(sharding.DEFAULT_RULES) + [("conv_out", "tensor")]
    with sharding.use_rules(mesh, rules):
        out = jax.jit(lambda p, x, r: model.apply({"params": p}, x, deterministic=True, rngs={"dropout": r}))(
            params, images, jax.random.PRNGKey(3)
        )
    assert out["features"].shape == ref["features"].shape == (8, 3, 2, 128)
    assert out["pooled"].shape == (8, 128) and out["logits"].shape == (8, NUM_CLASSES)
    for key in ("pooled", "logits", "features"):
        assert np.std(ref[key]) > 0.1, f"reference {key} is too small for the tolerance to mean anything"
    # pooled and logits: absolute 1e-4; the feature map (|values| up to ~4): 1e-4 relative to its largest value.
    for key, tol in (("pooled", 1e-4), ("logits", 1e-4), ("features", 1e-4 * np.abs(ref["features"]).max())):
        diff = _max_diff(out[key], ref[key])
        assert diff <= tol, f"{key}: max abs diff {diff:.3g} vs timm (tolerance {tol:.3g})"


def test_import_without_head(converted, timm_tiny):
    kwargs, params, images, _ = converted
    kwargs0, params0 = load_timm_nfnet(timm_tiny[2])
    assert kwargs0 == {**kwargs, "num_classes": 0}
    assert set(params0) == set(params) - {"head"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, params0, {k: v for k, v in params.items() if k != "head"})
    out = jax.eval_shape(lambda p, x: NFNet(**kwargs0).apply({"params": p}, x), params0, images)
    assert set(out) == {"features", "pooled"} and out["pooled"].shape == (8, 128)


def test_importer_errors(tmp_path, timm_tiny):
    with pytest.raises(UserError, match="config.json is missing"):
        load_timm_nfnet(str(tmp_path))
    _, path, _ = timm_tiny
    bad = tmp_path / "resnet"
    bad.mkdir()
    config = json.load(open(f"{path}/config.json"))
    config["architecture"] = "resnet50"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="model.safetensors is missing"):
        load_timm_nfnet(str(bad))
    (bad / "model.safetensors").write_bytes(open(f"{path}/model.safetensors", "rb").read())
    with pytest.raises(UserError, match="only dm_nfnet_f0"):
        load_timm_nfnet(str(bad))
    config["architecture"] = "dm_nfnet_f0"
    config["model_args"]["act_layer"] = "silu"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="act_layer"):
        load_timm_nfnet(str(bad))


def test_stochastic_depth_when_not_deterministic(converted):
    """deterministic=False with a rng drops residual branches (identity when deterministic: see the parity test)."""
    kwargs, params, images, ref = converted
    model = NFNet(**{**kwargs, "stochastic_depth_rate": 0.9})
    train = jax.jit(lambda p, x, r: model.apply({"params": p}, x, deterministic=False, rngs={"dropout": r}))(
        params, images, jax.random.PRNGKey(3)
    )
    diff = np.max(np.abs(np.asarray(train["pooled"]) - ref["pooled"]), axis=1)
    assert (diff > 1e-3).any(), "stochastic depth with rates up to 0.72 per block dropped nothing in 8 examples"
    with pytest.raises(ValueError, match="dropout"):
        jax.eval_shape(lambda p, x: model.apply({"params": p}, x, deterministic=False), params, images)


# Parameter counts with the 1000-class head. Published: Brock et al. 2021 (arXiv:2102.06171),
# Table 3 "Params" column (also listed per model on paperswithcode.com/paper/high-performance-large-scale-image).
PUBLISHED_PARAMS_M = {
    "F0": 71.5,
    "F1": 132.6,
    "F2": 193.8,
    "F3": 254.9,
    "F4": 316.1,
    "F5": 377.2,
    "F6": 438.4,
    "F7": 499.5,
}


def _count(variant, num_classes=1000):
    model = NFNet(variant=variant, num_classes=num_classes)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    return num_params(shapes["params"])


@pytest.mark.parametrize("variant", sorted(PUBLISHED_PARAMS_M))
def test_param_counts_match_paper_and_timm(variant, timm):
    n = _count(variant)
    published = PUBLISHED_PARAMS_M[variant] * 1e6
    assert abs(n - published) / published < 0.01, f"{variant}: {n} params vs published {published:.0f}"
    if variant != "F7":  # timm has dm_nfnet_f0..f6; count its parameters without allocating them
        ref = timm.create_model(f"dm_nfnet_f{variant[1]}", pretrained=False, device="meta")
        assert n == sum(p.numel() for p in ref.parameters())


def test_nonlinearity_constants(timm):
    import torch  # the `timm` fixture has skipped without it

    # The Haiku code's `base.nonlinearities` (deepmind-research nfnets/base.py), as published there.
    published = {
        "gelu": 1.7015043497085571,
        "relu": 1.7139588594436646,
        "silu": 1.7881293296813965,
        "tanh": 1.5939117670059204,
        "sigmoid": 4.803835391998291,
        "elu": 1.2716004848480225,
        "softplus": 1.9203323125839233,
    }
    for name, gamma in published.items():
        assert GAMMA[name] == gamma
    from timm.models.nfnet import _nonlin_gamma

    for name, gamma in _nonlin_gamma.items():
        if name != "log_softmax":
            assert GAMMA[name] == gamma, name
    x = torch.linspace(-6, 6, 1001)
    for name, fn in [("gelu", torch.nn.functional.gelu), ("relu", torch.relu), ("silu", torch.nn.functional.silu)]:
        ours = np.asarray(scaled_activation(name)(jnp.asarray(x.numpy())))
        np.testing.assert_allclose(ours, fn(x).numpy() * published[name], rtol=1e-6, atol=2e-6)  # float32 erf: ~1e-6
    # What gamma is for: act(x) * gamma has ~unit second moment about its mean for x ~ N(0, 1).
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()
    for name in ("gelu", "relu", "silu", "tanh"):
        y = np.asarray(scaled_activation(name)(jnp.asarray(nodes, jnp.float32)), np.float64)
        var = np.sum(weights * y**2) - np.sum(weights * y) ** 2
        assert abs(var - 1.0) < 0.01, (name, var)


def test_deepmind_weight_standardisation():
    """ws_style="deepmind" is the Haiku formula (w - mean) * gain * rsqrt(max(var * fan_in, 1e-4)), 'SAME' conv."""
    torch = pytest.importorskip("torch", reason="the reference is torch's conv2d: pip install -e '.[interop]'")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 7, 4)).astype(np.float32)
    conv = WSConv2D(6, 3, ws_style="deepmind", eps=1e-4)
    params = {}
    params["kernel"] = (0.003 * rng.standard_normal((3, 3, 4, 6)) + 0.1).astype(np.float32)
    params["kernel"][..., 0] = 1e-4 * rng.standard_normal((3, 3, 4))  # var * fan_in below eps: the max() branch
    params["gain"] = rng.uniform(0.5, 1.5, 6).astype(np.float32)
    params["bias"] = rng.standard_normal(6).astype(np.float32)
    w = params["kernel"].astype(np.float64)
    mean, var = w.mean((0, 1, 2), keepdims=True), w.var((0, 1, 2), keepdims=True)
    w_std = (w - mean) * params["gain"] / np.sqrt(np.maximum(var * 36, 1e-4))
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)),
        torch.from_numpy(w_std.transpose(3, 2, 0, 1).astype(np.float32)),
        torch.from_numpy(params["bias"]),
        padding=1,
    )
    out = jax.jit(conv.apply)({"params": params}, x)
    np.testing.assert_allclose(np.asarray(out), ref.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_param_axis_names():
    model = NFNet(num_classes=5, depths=(1, 1, 1, 1), widths=(32, 64, 64, 64), stem_width=16, group_size=16)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 33, 31, 3)))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))[0]
    assert len(leaves) == 4 * 3 + 4 * (5 * 3 + 4 + 1) + 3 + 2  # stem, blocks (5 convs, SE, skipinit), final, head
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == len(leaf.value.shape), name
        if name.endswith("['kernel']") and len(leaf.value.shape) == 4:
            assert leaf.names == ("conv_h", "conv_w", "conv_in", "conv_out"), name
    assert boxed["stage0_block0"]["skipinit_gain"].value.shape == ()


def test_scanned_stages_layout_and_gradient():
    """A stage's blocks after the first are one scan: parameters stacked on a leading "layers" axis; the
    whole network (strided transition blocks' average pool included) is differentiable."""
    model = NFNet(num_classes=5, depths=(1, 3, 1, 2), widths=(32, 64, 64, 64), stem_width=16, group_size=16)
    x = jnp.asarray(_images(2, 33, 31))
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    assert {k for k in boxed if k.startswith("stage")} == {
        "stage0_block0",
        "stage1_block0",
        "stage1_blocks",
        "stage2_block0",
        "stage3_block0",
        "stage3_blocks",
    }
    conv1 = boxed["stage1_blocks"]["conv1"]["kernel"]
    assert conv1.names == ("layers", "conv_h", "conv_w", "conv_in", "conv_out") and conv1.value.shape[0] == 2
    assert boxed["stage1_blocks"]["skipinit_gain"].names == ("layers",)
    assert boxed["stage3_blocks"]["skipinit_gain"].value.shape == (1,) and "downsample" not in boxed["stage3_blocks"]
    params = jax.tree.map(lambda a: a + 0.5, nn.meta.unbox(model.init(jax.random.PRNGKey(0), x)["params"]))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x)["logits"])))(params)
    assert float(jnp.abs(grads["stage1_blocks"]["conv1"]["kernel"][1]).max()) > 0
    assert float(jnp.abs(grads["stem_conv1"]["kernel"]).max()) > 0


def test_bfloat16_compute_keeps_float32_params_and_pooled():
    model = NFNet(dtype="bfloat16", num_classes=3, depths=(1, 1, 1, 1), widths=(32, 64, 64, 64), group_size=16)
    x = jnp.zeros((2, 33, 31, 3))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(nn.meta.unbox(params))} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), nn.meta.unbox(params), x)
    assert out["features"].dtype == jnp.bfloat16 and out["features"].shape == (2, 2, 1, 128)
    assert out["pooled"].dtype == jnp.float32 and out["logits"].dtype == jnp.float32


def test_convert_hf_and_forward_commands(converted, timm_tiny, tmp_path):
    """The command-line path: `vlm-jax convert-hf` on the timm directory, then `vlm-jax forward`."""
    from conftest import convert_and_forward

    _, _, images, ref = converted
    out = convert_and_forward(timm_tiny[1], tmp_path, pixel_values=images.transpose(0, 3, 1, 2))
    assert _max_diff(out["pooled"], ref["pooled"]) <= 1e-4
    assert _max_diff(out["logits"], ref["logits"]) <= 1e-4
