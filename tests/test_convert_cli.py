"""`vlm-jax convert-hf` then `vlm-jax forward`: the command-line path a user takes to prove parity."""

import numpy as np
import pytest

from conftest import convert_and_forward, perturb
from vlm_jax import cli

VISION = dict(
    hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=80, image_size=32, patch_size=8
)


def test_siglip_through_the_command_line(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
    transformers = pytest.importorskip(
        "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
    )
    text = dict(
        vocab_size=99,
        hidden_size=48,
        num_attention_heads=3,
        num_hidden_layers=2,
        intermediate_size=80,
        max_position_embeddings=16,
        pad_token_id=1,
        projection_size=40,
    )
    vision = dict(VISION, hidden_size=40, num_attention_heads=5, intermediate_size=72)
    torch.manual_seed(0)
    model = perturb(transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)), 3)
    model.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    ids = np.array([[4, 10, 20, 5, 1, 1, 1, 1], [4, 30, 40, 50, 60, 70, 5, 1]], np.int64)
    pixels = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    out = convert_and_forward(tmp_path / "hf", tmp_path, input_ids=ids, pixel_values=pixels)
    assert "(dual_encoder)" in capsys.readouterr().out
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
    for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        diff = np.max(np.abs(out[name] - getattr(ref, name).numpy()))
        assert diff <= 1e-4, (name, diff)


def test_clip_and_clip_vision_through_the_command_line(tmp_path):
    torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
    transformers = pytest.importorskip(
        "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
    )
    text = dict(
        vocab_size=99,
        hidden_size=40,
        num_attention_heads=5,
        num_hidden_layers=2,
        intermediate_size=72,
        max_position_embeddings=16,
        bos_token_id=4,
        eos_token_id=5,
        pad_token_id=1,
    )
    clip = perturb(
        transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=24)), 5
    )
    clip.save_pretrained(str(tmp_path / "clip"), safe_serialization=True)
    ids = np.array([[4, 10, 20, 5, 1, 1], [4, 30, 40, 50, 60, 5]], np.int64)
    pixels = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    (tmp_path / "a").mkdir()
    out = convert_and_forward(tmp_path / "clip", tmp_path / "a", input_ids=ids, pixel_values=pixels)
    with torch.no_grad():
        ref = clip(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
    assert np.max(np.abs(out["logits_per_image"] - ref.logits_per_image.numpy())) <= 1e-4

    tower = perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), 6)
    tower.save_pretrained(str(tmp_path / "vision"), safe_serialization=True)
    (tmp_path / "b").mkdir()
    out = convert_and_forward(tmp_path / "vision", tmp_path / "b", pixel_values=pixels)
    with torch.no_grad():
        ref = tower(pixel_values=torch.from_numpy(pixels))
    assert np.max(np.abs(out["pooled"] - ref.pooler_output.numpy())) <= 1e-4
    assert np.max(np.abs(out["last_hidden_state"] - ref.last_hidden_state.numpy())) <= 1e-4


def test_convert_hf_rejects_what_it_cannot_read(tmp_path, capsys):
    assert cli.main(["convert-hf", "--hf_dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    assert cli.main(["convert-hf", "--hf_dir", str(tmp_path / "gpt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
