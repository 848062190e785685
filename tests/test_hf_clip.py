"""Parity of converted transformers CLIP / SigLIP checkpoints with the PyTorch reference models.

Each test builds a tiny random-weight model in PyTorch (odd widths: 40 and 48 with
5 and 3 heads), saves it with `save_pretrained`, converts the directory with
`vlm_jax.interop.hf_clip.load_hf_dir` and compares outputs in float32. Inputs
use a resolution different from the config's (and non-square grids), so learned
position embeddings are resampled as transformers' `interpolate_pos_encoding=True` does.
"""

import json
import os

import jax
import numpy as np
import pytest

from conftest import perturb
from vlm_jax.encoders.two_tower import TwoTower, logits_per_image
from vlm_jax.encoders.vit import ViT
from vlm_jax.errors import UserError
from vlm_jax.interop.hf_clip import load_hf_dir

torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
transformers = pytest.importorskip(
    "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
)
from safetensors.numpy import load_file, save_file  # noqa: E402

TOL = 1e-4


def _save(model, path):
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def _maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _images(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)  # NCHW


@pytest.mark.parametrize("eos_token_id", [5, 2])
def test_clip_model_parity(tmp_path, eos_token_id):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=40,
            num_attention_heads=5,
            num_hidden_layers=2,
            intermediate_size=72,
            max_position_embeddings=16,
            bos_token_id=4,
            eos_token_id=eos_token_id,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=48,
            num_attention_heads=3,
            num_hidden_layers=2,
            intermediate_size=80,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
    )
    model = perturb(transformers.CLIPModel(cfg), 1)
    path = _save(model, tmp_path / "clip")

    # eos=5: pooled at the first 5 (pad after it); eos=2 (legacy): pooled at the argmax of the ids.
    if eos_token_id == 5:
        ids = np.array([[4, 10, 20, 5, 1, 1, 1], [4, 30, 40, 50, 60, 70, 5]], np.int64)
    else:
        ids = np.array([[4, 10, 98, 11, 1, 1, 1], [4, 30, 40, 50, 60, 97, 12]], np.int64)
    mask = np.array([[1, 1, 1, 1, 0, 0, 0], [1] * 7], np.int64)
    pixels = _images((2, 3, 40, 24), 0)  # grid 5x3 from the config's 4x4
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(pixels),
            interpolate_pos_encoding=True,
        )

    kind, kwargs, params = load_hf_dir(path)
    assert kind == "two_tower" and kwargs["projection"] == "clip"
    module = TwoTower(**kwargs)
    out = jax.jit(module.apply)({"params": params}, pixels.transpose(0, 2, 3, 1), ids.astype(np.int32), mask)
    diffs = {
        "image_embeds": _maxdiff(out["image_embeds"], ref.image_embeds),
        "text_embeds": _maxdiff(out["text_embeds"], ref.text_embeds),
        "logits_per_image": _maxdiff(logits_per_image(out), ref.logits_per_image),
    }
    print("CLIPModel eos", eos_token_id, diffs)
    assert max(diffs.values()) <= TOL, diffs
    assert out["logit_bias"] is None


def test_siglip_model_parity(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=48,
            num_attention_heads=3,
            num_hidden_layers=2,
            intermediate_size=80,
            max_position_embeddings=16,
            projection_size=40,
            bos_token_id=4,
            eos_token_id=5,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=40,
            num_attention_heads=5,
            num_hidden_layers=2,
            intermediate_size=72,
            image_size=32,
            patch_size=8,
        ),
    )
    model = perturb(transformers.SiglipModel(cfg), 2)
    path = _save(model, tmp_path / "siglip")

    ids = np.array([[4, 10, 20, 5, 1, 1, 1], [4, 30, 40, 50, 60, 70, 5]], np.int64)
    mask = np.array([[1, 1, 1, 1, 0, 0, 0], [1] * 7], np.int64)
    pixels = _images((3, 3, 48, 32), 1)  # grid 6x4 from the config's 4x4
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            pixel_values=torch.from_numpy(pixels),
            interpolate_pos_encoding=True,
        )

    kind, kwargs, params = load_hf_dir(path)
    assert kind == "two_tower" and kwargs["projection"] == "siglip"
    out = jax.jit(TwoTower(**kwargs).apply)(
        {"params": params}, pixels.transpose(0, 2, 3, 1), ids.astype(np.int32), mask
    )
    diffs = {
        "image_embeds": _maxdiff(out["image_embeds"], ref.image_embeds),
        "text_embeds": _maxdiff(out["text_embeds"], ref.text_embeds),
        "logits_per_image": _maxdiff(logits_per_image(out), ref.logits_per_image),
    }
    print("SiglipModel", diffs)
    assert max(diffs.values()) <= TOL, diffs
    assert abs(float(out["logit_bias"]) - float(model.logit_bias.detach())) <= 1e-6


@pytest.mark.parametrize("cls_name", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_clip_vision_parity_and_taps(tmp_path, cls_name):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=48,
        num_attention_heads=3,
        num_hidden_layers=3,
        intermediate_size=80,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )
    model = perturb(getattr(transformers, cls_name)(cfg), 3)
    path = _save(model, tmp_path / "vision")
    keys = load_file(os.path.join(path, "model.safetensors"))
    # The two classes save different key layouts (with / without the inner vision_model. prefix).
    assert any(k.startswith("vision_model.") for k in keys) == (cls_name == "CLIPVisionModelWithProjection")

    pixels = _images((2, 3, 40, 40), 2)  # 5x5 grid from the config's 4x4
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(pixels), interpolate_pos_encoding=True, output_hidden_states=True)

    kind, kwargs, params = load_hf_dir(path)
    assert kind == "vit"
    module = ViT(**{**kwargs, "taps": (-2, 0, 2)})
    out = jax.jit(module.apply)({"params": params}, pixels.transpose(0, 2, 3, 1))
    # transformers' hidden_states[0] is the embedding output; hidden_states[i + 1] follows block i.
    diffs = {
        "tokens": _maxdiff(out["tokens"], ref.last_hidden_state),
        "tap-2": _maxdiff(out["taps"][-2], ref.hidden_states[-2]),
        "tap0": _maxdiff(out["taps"][0], ref.hidden_states[1]),
        "tap2": _maxdiff(out["taps"][2], ref.hidden_states[3]),
    }
    if cls_name == "CLIPVisionModel":
        diffs["pooled"] = _maxdiff(out["pooled"], ref.pooler_output)
    else:
        diffs["image_embeds"] = _maxdiff(out["embeds"], ref.image_embeds)
    print(cls_name, diffs)
    assert max(diffs.values()) <= TOL, diffs


def _tiny_vision_dir(tmp_path):
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=40, image_size=16, patch_size=8
    )
    return _save(transformers.CLIPVisionModel(cfg), tmp_path / "v")


def test_legacy_config_form_loads_the_same(tmp_path):
    # Older CLIP configs nest the towers as `text_config_dict` / `vision_config_dict` and omit defaults.
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=99, hidden_size=40, num_attention_heads=5, num_hidden_layers=1, intermediate_size=72
        ),
        vision_config=dict(
            hidden_size=48, num_attention_heads=3, num_hidden_layers=1, intermediate_size=80, patch_size=32
        ),
        projection_dim=24,
    )
    path = _save(transformers.CLIPModel(cfg), tmp_path / "clip")
    kind, kwargs, params = load_hf_dir(path)
    config_file = os.path.join(path, "config.json")
    new = json.load(open(config_file))
    new["text_config_dict"] = {k: v for k, v in new.pop("text_config").items() if k != "max_position_embeddings"}
    new["vision_config_dict"] = {
        k: v for k, v in new.pop("vision_config").items() if k not in ("image_size", "hidden_act")
    }
    with open(config_file, "w") as f:
        json.dump(new, f)
    kind2, kwargs2, params2 = load_hf_dir(path)
    assert (kind2, kwargs2) == (kind, kwargs)
    assert kwargs2["text"]["max_len"] == 77 and kwargs2["vision"]["image_size"] == 224
    assert kwargs2["vision"]["mlp_act"] == "quick_gelu"
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_absent_tensor_raises_user_error(tmp_path):
    path = _tiny_vision_dir(tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["post_layernorm.weight"]
    save_file(tensors, file)
    with pytest.raises(UserError, match="lacks tensor 'post_layernorm.weight'"):
        load_hf_dir(path)


def test_bad_directories_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        load_hf_dir(str(tmp_path / "nope"))
    path = _tiny_vision_dir(tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg, "architectures": ["BertModel"], "model_type": "bert"}, f)
    with pytest.raises(UserError, match="unsupported architecture"):
        load_hf_dir(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(UserError, match="no \\*.safetensors"):
        load_hf_dir(path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(UserError, match="no config.json"):
        load_hf_dir(path)
