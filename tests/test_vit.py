"""ViT: variant table, published parameter counts, position embeddings, pooling, QK-norm, layer scale, taps,
the convolutional stem."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.encoders.vit import ConvStem, ViT, decode_variant, posemb_sincos_2d, resample_posemb
from vlm_jax.errors import UserError

TINY = dict(variant="", width=48, depth=2, mlp_dim=64, num_heads=3, patch_size=8, image_size=32)


def test_decode_variant():
    # big_vision models/vit.py decode_variant (Ti..G, So400m); OpenCLIP ViT-bigG-14.json;
    # OpenGVLab InternViT-6B-448px-V1-5 and InternViT-300M-448px config.json.
    expected = {
        "Ti/16": (192, 12, 768, 3, 16),
        "S/32": (384, 12, 1536, 6, 32),
        "B/16": (768, 12, 3072, 12, 16),
        "L/14": (1024, 24, 4096, 16, 14),
        "So400m/14": (1152, 27, 4304, 16, 14),
        "H/14": (1280, 32, 5120, 16, 14),
        "g/14": (1408, 40, 6144, 16, 14),
        "G/14": (1664, 48, 8192, 16, 14),
        "bigG/14": (1664, 48, 8192, 16, 14),
        "InternViT-6B/14": (3200, 48, 12800, 25, 14),
        "InternViT-300M/14": (1024, 24, 4096, 16, 14),
    }
    for name, (w, d, m, h, p) in expected.items():
        assert decode_variant(name) == dict(width=w, depth=d, mlp_dim=m, num_heads=h, patch_size=p), name
    assert decode_variant("InternViT-6B")["patch_size"] == 14
    for bad in ("Q/16", "B", "B/x"):
        with pytest.raises(UserError):
            decode_variant(bad)


def _count(module, res):
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)))


@pytest.mark.parametrize(
    "variant,published,tol",
    [
        # Dosovitskiy et al. 2021 (ViT), Table 1: Base 86M, Large 307M, Huge 632M (one count per size;
        # the L/16 image tower without a classifier is 303.3M, 1.2% under the table's 307M).
        ("B/16", 86e6, 0.01),
        ("L/16", 307e6, 0.015),
        ("H/14", 632e6, 0.01),
        # Zhai et al. 2022 (Scaling Vision Transformers), Table 2: g/14 1011M, G/14 1843M.
        ("g/14", 1011e6, 0.01),
        ("G/14", 1843e6, 0.01),
    ],
)
def test_published_parameter_counts(variant, published, tol):
    n = _count(ViT(variant, image_size=224, pool="cls", posemb="learn"), 224)
    print(variant, n)
    assert abs(n - published) / published <= tol, (variant, n, published)


def test_sincos2d_matches_formula():
    # MoCo v3 / big_vision posemb_sincos_2d: for grid position (y, x) and k < D/4,
    # omega_k = 1 / 10000**(k / (D/4 - 1)); embedding = [sin(x w), cos(x w), sin(y w), cos(y w)].
    h, w, d = 3, 5, 16
    pe = posemb_sincos_2d(h, w, d)
    q = d // 4
    for yy in range(h):
        for xx in range(w):
            row = pe[yy * w + xx]
            for k in range(q):
                om = 1.0 / 10000 ** (k / (q - 1))
                assert row[k] == pytest.approx(math.sin(xx * om), abs=1e-6)
                assert row[q + k] == pytest.approx(math.cos(xx * om), abs=1e-6)
                assert row[2 * q + k] == pytest.approx(math.sin(yy * om), abs=1e-6)
                assert row[3 * q + k] == pytest.approx(math.cos(yy * om), abs=1e-6)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("new_hw", [(5, 3), (2, 7), (4, 4)])
def test_resample_posemb_matches_torch_interpolate(method, new_hw):
    torch = pytest.importorskip("torch", reason="the reference is torch's interpolate: pip install -e '.[interop]'")
    grid = np.random.default_rng(0).normal(size=(4, 4, 6)).astype(np.float32)
    out = resample_posemb(jnp.asarray(grid.reshape(1, 16, 6)), (4, 4), new_hw, method)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=new_hw, mode=method, align_corners=False
    )
    ref = ref[0].permute(1, 2, 0).reshape(1, -1, 6).numpy()
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def _init(model, images, seed=0):
    """Boxed random params of the model's shapes (numpy-filled: faster than compiling `init`)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)


def _apply(model, variables, images):
    return jax.jit(model.apply)(variables, images)


def _patches(images, p):
    b, h, w, c = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def test_layer_scale_zero_makes_blocks_identity():
    # With layer scale 0 every block is the identity: tokens = patch projection + sincos posemb.
    model = ViT(**TINY, posemb="sincos2d", pool="gap", final_norm=False, layer_scale=0.0, taps=(0, -1))
    images = np.random.default_rng(1).normal(size=(2, 40, 24, 3)).astype(np.float32)
    variables = _init(model, images)
    params = nn.unbox(variables["params"])
    assert "pos_embedding" not in params and "cls" not in params
    for name in ("ls1", "ls2"):
        params["layers"][name] = jnp.zeros_like(params["layers"][name])
    out = _apply(model, {"params": params}, images)
    kernel = np.asarray(params["patch_embed"]["kernel"]).reshape(-1, 48)
    expected = _patches(images, 8) @ kernel + np.asarray(params["patch_embed"]["bias"]) + posemb_sincos_2d(5, 3, 48)
    np.testing.assert_allclose(np.asarray(out["tokens"]), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["taps"][0]), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["pooled"]), expected.mean(1), atol=1e-5)
    # A non-zero layer scale does change the output.
    params["layers"]["ls1"] = params["layers"]["ls1"] + 0.5
    out2 = _apply(model, {"params": params}, images)
    assert float(jnp.max(jnp.abs(out2["tokens"] - expected))) > 1e-2


def test_pool_modes_shapes_and_logical_names():
    images = jnp.ones((2, 40, 24, 3))  # non-square 5x3 grid from a 4x4 posemb grid
    for pool, n_tokens in (("cls", 16), ("gap", 15), ("map", 15), ("none", 15)):
        model = ViT(**TINY, pool=pool)
        variables = _init(model, images)
        out = _apply(model, variables, images)
        assert out["tokens"].shape == (2, n_tokens, 48), pool
        assert ("pooled" in out) == (pool != "none")
        if pool != "none":
            assert out["pooled"].shape == (2, 48)
        boxes = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert all(isinstance(b, nn.Partitioned) and len(b.names) == b.value.ndim for b in boxes), pool
        layer_boxes = jax.tree.leaves(variables["params"]["layers"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert all(b.names[0] == "layers" and b.value.shape[0] == 2 for b in layer_boxes)
    with pytest.raises(UserError):
        jax.eval_shape(ViT(**TINY, taps=(2,)).init, jax.random.key(0), images)


def test_qk_norm_makes_attention_invariant_to_query_scale():
    # LayerNorm on queries/keys removes their scale: scaling the query projection (kernel and bias)
    # leaves a QK-normed model unchanged but changes a plain one.
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    outs = {}
    for qk in (True, False):
        model = ViT(**TINY, qk_norm=qk, pool="gap")
        params = nn.unbox(_init(model, images)["params"])
        apply = jax.jit(model.apply)
        base = apply({"params": params}, images)["pooled"]
        params["layers"]["attn"]["query"] = jax.tree.map(lambda x: 3.0 * x, params["layers"]["attn"]["query"])
        scaled = apply({"params": params}, images)["pooled"]
        outs[qk] = float(jnp.max(jnp.abs(base - scaled)))
        if qk:
            assert "query_norm" in params["layers"]["attn"]
    assert outs[True] < 1e-4 and outs[False] > 1e-3, outs


def test_remat_and_taps_equal_unrematted():
    images = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    plain = ViT(**TINY, taps=(-2, -1))
    variables = _init(plain, images)
    a = _apply(plain, variables, images)
    b = _apply(ViT(**TINY, taps=(-2, -1), remat="full"), variables, images)
    for key in ("tokens", "pooled"):
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(a["taps"][-2]), np.asarray(b["taps"][-2]), atol=1e-6)
    # The last tap is the pre-norm hidden state whose final norm gives the tokens.
    assert float(jnp.max(jnp.abs(a["taps"][-1] - a["tokens"]))) > 1e-3


def test_conv_stem_matches_torch_convolutions():
    torch = pytest.importorskip("torch", reason="the reference is torch's conv2d: pip install -e '.[interop]'")
    # torch's conv2d is the reference: 4x4 stride-4 (no padding), exact GELU, 3x3 padding 1, exact GELU.
    images = np.random.default_rng(4).normal(size=(2, 24, 16, 3)).astype(np.float32)
    stem = ConvStem(channels=5)
    params = nn.unbox(_init(stem, images)["params"])
    out = np.asarray(jax.jit(stem.apply)({"params": params}, images))

    def conv(x, layer, padding, stride):
        kernel = torch.from_numpy(np.array(params[layer]["kernel"])).permute(3, 2, 0, 1)  # HWIO -> OIHW
        bias = torch.from_numpy(np.array(params[layer]["bias"]))
        return torch.nn.functional.gelu(torch.nn.functional.conv2d(x, kernel, bias, stride, padding))

    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    ref = conv(conv(x, "conv1", 0, 4), "conv2", 1, 1).permute(0, 2, 3, 1).numpy()
    assert out.shape == (2, 6, 4, 5)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_conv_stem_vit_keeps_the_patch_grid():
    # stem="conv" tokenises the same grid as stem="patch": patch_embed reads (p/4)x(p/4) stem cells.
    images = np.random.default_rng(5).normal(size=(2, 40, 24, 3)).astype(np.float32)
    model = ViT(**TINY, stem="conv", stem_width=12, pool="gap")
    variables = _init(model, images)
    params = nn.unbox(variables["params"])
    assert params["patch_embed"]["kernel"].shape == (2, 2, 12, 48)
    assert params["stem"]["conv1"]["kernel"].shape == (4, 4, 3, 12)
    assert params["pos_embedding"].shape == (1, 16, 48)  # image_size 32 / patch 8
    out = _apply(model, variables, images)
    assert (
        out["tokens"].shape
        == _apply(ViT(**TINY, pool="gap"), _init(ViT(**TINY, pool="gap"), images), images)["tokens"].shape
        == (2, 15, 48)
    )
    boxes = jax.tree.leaves(variables["params"]["stem"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(b, nn.Partitioned) and len(b.names) == b.value.ndim for b in boxes)
    # A token sees only its own patch through the stem's 3x3 conv and its neighbours' border cells: changing
    # pixels of the last patch row leaves the first patch row's patch embeddings unchanged.
    no_blocks = ViT(**TINY, stem="conv", stem_width=12, pool="gap", final_norm=False, layer_scale=0.0)
    v = nn.unbox(_init(no_blocks, images)["params"])
    for name in ("ls1", "ls2"):
        v["layers"][name] = jnp.zeros_like(v["layers"][name])
    changed = images.copy()
    changed[:, 32:] += 1.0
    a, b = (np.asarray(_apply(no_blocks, {"params": v}, x)["tokens"]) for x in (images, changed))
    np.testing.assert_allclose(a[:, : 3 * 3], b[:, : 3 * 3], atol=1e-6)
    assert np.abs(a[:, -3:] - b[:, -3:]).max() > 1e-3
    for bad in (dict(stem="conv", patch_size=6), dict(stem="pixels")):
        with pytest.raises(UserError):
            jax.eval_shape(ViT(**{**TINY, **bad}).init, jax.random.key(0), images)
