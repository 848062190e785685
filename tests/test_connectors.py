"""Projectors and token merges of `vlm_jax/connectors/` against transformers' modules and torch (the same
names, the same numbers). Their checks against NumPy and by hand, which need no PyTorch, are in
tests/test_connectors_core.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.connectors.projector import LinearProjector, MLPProjector
from vlm_jax.connectors.token_merge import ConcatProjector, pixel_shuffle

torch = pytest.importorskip("torch", reason="the references are PyTorch modules: pip install -e '.[interop]'")
transformers = pytest.importorskip(
    "transformers", reason="the references are transformers' modules: pip install -e '.[interop]'"
)
from transformers.models.internvl.modeling_internvl import InternVLModel  # noqa: E402
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector  # noqa: E402
from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector  # noqa: E402

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
