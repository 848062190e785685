"""Projectors and token merges of `vlm_jax/connectors/`, against transformers' modules, torch and hand computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.internvl.modeling_internvl import InternVLModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector

from vlm_jax.connectors.projector import LinearProjector, MLPProjector
from vlm_jax.connectors.token_merge import ConcatProjector, concat_tokens, pixel_shuffle
from vlm_jax.errors import UserError

VISION, TEXT = 12, 20
TINY_VISION = dict(hidden_size=VISION, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
TINY_TEXT = dict(hidden_size=TEXT, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)


def _params_from_torch(module: torch.nn.Module) -> dict:
    """A torch module of `nn.Linear`s -> params by the same names (weight [out, in] -> kernel [in, out])."""
    params: dict = {}
    for key, value in module.state_dict().items():
        name, leaf = key.rsplit(".", 1)
        value = value.detach().numpy()
        params.setdefault(name, {})["kernel" if leaf == "weight" else "bias"] = value.T if leaf == "weight" else value
    return params


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)  # non-zero biases too
    return module


def _features(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _apply(module, params, x):
    return np.asarray(module.apply({"params": params}, jnp.asarray(x)))


def test_linear_projector_is_paligemmas_projector_under_the_same_param_names():
    config = transformers.PaliGemmaConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, projection_dim=TEXT)
    ref = _perturbed(PaliGemmaMultiModalProjector(config), 0)
    x = _features((2, 5, VISION))
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_apply(LinearProjector(TEXT), _params_from_torch(ref), x), want, atol=1e-5)


def test_mlp_projector_is_llavas_mlp2x_gelu_under_the_same_param_names():
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **TINY_VISION),
        text_config=dict(model_type="llama", **TINY_TEXT),
    )
    assert config.projector_hidden_act == "gelu"  # exact GELU, as LLaVA-1.5's nn.GELU()
    ref = _perturbed(LlavaMultiModalProjector(config), 1)
    x = _features((2, 7, VISION), seed=1) * 3  # wide enough that exact and tanh GELU differ
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got = _apply(MLPProjector(TEXT), _params_from_torch(ref), x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    tanh = _apply(MLPProjector(TEXT, act="gelu_tanh"), _params_from_torch(ref), x)
    assert np.max(np.abs(tanh - want)) > 1e-4


def test_deeper_mlp_projector_matches_numpy_and_names_its_axes():
    model = MLPProjector(6, depth=3, act="silu")
    x = _features((4, VISION), seed=2)
    boxed = model.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    assert sorted(boxed) == ["linear_1", "linear_2", "linear_3"]
    assert [boxed[f"linear_{i}"]["kernel"].names for i in (1, 2, 3)] == [
        (None, "mlp"),
        ("mlp", "mlp"),
        ("mlp", "embed"),
    ]
    params = jax.tree.map(np.asarray, nn.meta.unbox(boxed))
    params = jax.tree.map(lambda p: p + _features(p.shape, seed=p.size), params)  # non-zero biases
    h = x
    for i in (1, 2, 3):
        h = h @ params[f"linear_{i}"]["kernel"] + params[f"linear_{i}"]["bias"]
        if i < 3:
            h = h / (1 + np.exp(-h))  # silu
    np.testing.assert_allclose(_apply(model, params, x), h, atol=1e-5)
    assert LinearProjector(6).init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]["linear"]["kernel"].names == (
        None,
        "embed",
    )


def test_projector_options_are_checked():
    x = jnp.zeros((2, VISION))
    with pytest.raises(UserError, match="unknown activation 'swish_beta'"):
        MLPProjector(4, act="swish_beta").init(jax.random.PRNGKey(0), x)
    with pytest.raises(UserError, match="depth >= 1"):
        MLPProjector(4, depth=0).init(jax.random.PRNGKey(0), x)
    params = LinearProjector(4, use_bias=False).init(jax.random.PRNGKey(0), x)["params"]
    assert set(params["linear"]) == {"kernel"}


def test_concat_tokens_merges_runs_of_consecutive_tokens_as_minigpt_v2():
    tokens = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2, 8, 3)  # token t of row b = [t*3, t*3+1, t*3+2] + 24b
    merged = np.asarray(concat_tokens(jnp.asarray(tokens)))
    assert merged.shape == (2, 2, 12)
    np.testing.assert_array_equal(
        merged[0, 0], np.concatenate([tokens[0, 0], tokens[0, 1], tokens[0, 2], tokens[0, 3]])
    )
    np.testing.assert_array_equal(
        merged[1, 1], np.concatenate([tokens[1, 4], tokens[1, 5], tokens[1, 6], tokens[1, 7]])
    )
    with pytest.raises(UserError, match="9 visual tokens cannot be merged in groups of 4"):
        concat_tokens(jnp.zeros((1, 9, 3)))


def test_concat_projector_matches_minigpt_v2s_view_then_linear():
    x = _features((2, 16, VISION), seed=3)
    ref = _perturbed(torch.nn.Linear(4 * VISION, TEXT), 4)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).view(2, 16 // 4, 4 * VISION)).numpy()
    params = {"linear": {"kernel": ref.weight.detach().numpy().T, "bias": ref.bias.detach().numpy()}}
    got = _apply(ConcatProjector(TEXT), params, x)
    assert got.shape == (2, 4, TEXT)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_pixel_shuffle_is_transformers_internvl_pixel_shuffle():
    x = _features((2, 6, 4, 5), seed=5)  # non-square grid: rows and columns cannot be confused
    with torch.no_grad():
        want = InternVLModel.pixel_shuffle(None, torch.from_numpy(x), scale_factor=0.5).numpy()
    got = np.asarray(pixel_shuffle(jnp.asarray(x)))
    assert got.shape == (2, 3, 2, 20)
    np.testing.assert_array_equal(got, want)
    # By hand: output token (i, j) = the 2x2 block at rows 2i, 2i+1 and columns 2j, 2j+1, row-major.
    block = [x[1, 2, 2], x[1, 2, 3], x[1, 3, 2], x[1, 3, 3]]
    np.testing.assert_array_equal(got[1, 1, 1], np.concatenate(block))


def _internvl_v1_reference(x: np.ndarray) -> np.ndarray:
    """InternVL's first pixel shuffle (scale 0.5), step by step in NumPy: v2 without the final transpose."""
    n, a, b, c = x.shape
    y = x.reshape(n, a, b // 2, 2 * c).transpose(0, 2, 1, 3)  # split columns into pairs, then rows outer
    return y.reshape(n, b // 2, a // 2, 4 * c)  # pair rows: each token holds a 2x2 block; grid is [cols, rows]


def test_pixel_shuffle_v1_keeps_internvls_transposed_grid():
    x = _features((1, 4, 6, 3), seed=6)
    got = np.asarray(pixel_shuffle(jnp.asarray(x), version="v1"))
    np.testing.assert_array_equal(got, _internvl_v1_reference(x))
    assert got.shape == (1, 3, 2, 12)
    with pytest.raises(UserError, match="a 5x6 feature grid cannot be pixel-shuffled by 2"):
        pixel_shuffle(jnp.zeros((1, 5, 6, 3)))
    with pytest.raises(UserError, match="version 'v3'"):
        pixel_shuffle(jnp.asarray(x), version="v3")
