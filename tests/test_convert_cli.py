"""`vlm-jax convert-hf` then `vlm-jax forward`: the command-line path a user takes to prove parity."""

import numpy as np
import torch
import transformers

from vlm_jax import cli


def tiny_siglip(path):
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=48,
            num_attention_heads=3,
            num_hidden_layers=2,
            intermediate_size=80,
            max_position_embeddings=16,
            pad_token_id=1,
            projection_size=40,
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
    model = transformers.SiglipModel(cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path), safe_serialization=True)
    return model


def test_convert_hf_and_forward_match_transformers(tmp_path, capsys):
    model = tiny_siglip(tmp_path / "hf")
    assert cli.main(["convert-hf", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "vj")]) == 0
    assert "(dual_encoder)" in capsys.readouterr().out
    ids = np.array([[4, 10, 20, 5, 1, 1, 1, 1], [4, 30, 40, 50, 60, 70, 5, 1]], np.int64)
    pixels = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input_ids=ids, pixel_values=pixels)
    args = [
        "forward",
        "--checkpoint",
        str(tmp_path / "vj"),
        "--inputs",
        str(tmp_path / "in.npz"),
        "--out",
        str(tmp_path / "out.npz"),
    ]
    assert cli.main(args) == 0
    out = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
    for name in ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text"):
        diff = np.max(np.abs(out[name] - getattr(ref, name).numpy()))
        assert diff <= 1e-4, (name, diff)


def test_convert_hf_rejects_what_it_cannot_read(tmp_path, capsys):
    assert cli.main(["convert-hf", "--hf_dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    assert cli.main(["convert-hf", "--hf_dir", str(tmp_path / "gpt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def forward(checkpoint, inputs, out):
    return cli.main(["forward", "--checkpoint", str(checkpoint), "--inputs", str(inputs), "--out", str(out)])


def perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_clip_and_clip_vision_through_the_command_line(tmp_path):
    vision = dict(
        hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=80, image_size=32, patch_size=8
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
    clip = perturbed(
        transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)), 5
    )
    clip.save_pretrained(str(tmp_path / "clip"), safe_serialization=True)
    ids = np.array([[4, 10, 20, 5, 1, 1], [4, 30, 40, 50, 60, 5]], np.int64)
    pixels = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", input_ids=ids, pixel_values=pixels)
    assert cli.main(["convert-hf", "--hf_dir", str(tmp_path / "clip"), "--out", str(tmp_path / "clip_vj")]) == 0
    assert forward(tmp_path / "clip_vj", tmp_path / "in.npz", tmp_path / "out.npz") == 0
    out = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        ref = clip(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
    assert np.max(np.abs(out["logits_per_image"] - ref.logits_per_image.numpy())) <= 1e-4

    tower = perturbed(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)), 6)
    tower.save_pretrained(str(tmp_path / "vision"), safe_serialization=True)
    assert cli.main(["convert-hf", "--hf_dir", str(tmp_path / "vision"), "--out", str(tmp_path / "vision_vj")]) == 0
    assert forward(tmp_path / "vision_vj", tmp_path / "in.npz", tmp_path / "vout.npz") == 0
    out = np.load(tmp_path / "vout.npz")
    with torch.no_grad():
        ref = tower(pixel_values=torch.from_numpy(pixels))
    assert np.max(np.abs(out["pooled"] - ref.pooler_output.numpy())) <= 1e-4
    assert np.max(np.abs(out["last_hidden_state"] - ref.last_hidden_state.numpy())) <= 1e-4
