"""IDEFICS (transformers' Flamingo reproduction) -> `vlm-jax convert-hf` -> `vlm-jax forward`: logits equal transformers'.

A tiny random-weight `IdeficsForVisionText2Text` (no download) with non-zero
gates; two images per row, text before the first image, padding in one row,
and IDEFICS's own processor functions building the image attention mask.
"""

import types

import numpy as np
import pytest

from conftest import convert_and_forward, perturb
from vlm_jax import cli

torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
transformers = pytest.importorskip(
    "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
)
from transformers.models.idefics.processing_idefics import (  # noqa: E402
    image_attention_mask_for_packed_input_ids_pt,
    incremental_to_binary_attention_mask,
)

VOCAB, PAD, BOS, EOS = 100, 0, 1, 2
FAKE, IMAGE = VOCAB, VOCAB + 1  # the two additional tokens: <fake_token_around_image>, <image>


def idefics(interval, use_resampler, alpha_type, qk_norms):
    config = transformers.IdeficsConfig(
        vocab_size=VOCAB,
        additional_vocab_size=2,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        cross_layer_interval=interval,
        qk_layer_norms=qk_norms,
        alpha_type=alpha_type,
        use_resampler=use_resampler,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        vision_config=dict(
            embed_dim=32, image_size=30, patch_size=10, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
        ),
        perceiver_config=dict(
            resampler_n_latents=4,
            resampler_depth=2,
            resampler_n_heads=2,
            resampler_head_dim=12,  # inner width 24, not the vision width 32
            qk_layer_norms_perceiver=qk_norms,
        ),
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return perturb(transformers.IdeficsForVisionText2Text(config), 1, scale=0.3)  # gates too: none is 0


def inputs(right_pad, seed=0):
    """Two rows with two images each (text first); row 2 is shorter and padded."""
    rng = np.random.default_rng(seed)
    words = lambda n: rng.integers(3, VOCAB, n).tolist()  # noqa: E731
    full = [BOS, *words(3), FAKE, IMAGE, FAKE, *words(4), FAKE, IMAGE, FAKE, *words(3)]
    short = [BOS, *words(2), FAKE, IMAGE, FAKE, *words(2), EOS, *words(1), FAKE, IMAGE, FAKE, *words(2)]
    pad = [PAD] * (len(full) - len(short))
    row2, mask2 = (
        (short + pad, [1] * len(short) + [0] * len(pad))
        if right_pad
        else (pad + short, [0] * len(pad) + [1] * len(short))
    )
    ids = torch.tensor([full, row2])
    tokenizer = types.SimpleNamespace(convert_tokens_to_ids=lambda token: IMAGE, eos_token_id=EOS)
    incremental, _ = image_attention_mask_for_packed_input_ids_pt(ids, tokenizer)
    image_mask = incremental_to_binary_attention_mask(incremental.clone(), "pt", num_classes=2)
    return {
        "input_ids": ids.numpy(),
        "attention_mask": np.array([[1] * len(full), mask2]),
        "pixel_values": rng.normal(size=(2, 2, 3, 30, 30)).astype(np.float32),
        "image_attention_mask": image_mask.numpy(),
    }


@pytest.mark.parametrize(
    "interval, use_resampler, alpha_type, qk_norms, right_pad",
    [(1, True, "float", False, False), (2, False, "vector", True, True)],
    ids=["resampler-every-layer-left-pad", "vision-tokens-vector-gates-qk-norms-right-pad"],
)
def test_idefics_logits_match_through_the_command_line(
    tmp_path, interval, use_resampler, alpha_type, qk_norms, right_pad
):
    model = idefics(interval, use_resampler, alpha_type, qk_norms)
    model.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    feed = inputs(right_pad)
    with torch.no_grad():
        torch_inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
        want = model(**torch_inputs, use_cache=False).logits.numpy()
    got = convert_and_forward(tmp_path / "hf", tmp_path, **feed)["logits"]
    assert got.shape == want.shape == (2, feed["input_ids"].shape[1], VOCAB + 2)
    real = feed["attention_mask"].astype(bool)
    assert np.abs(want).max() > 1.0  # the logits are not trivially small
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)  # float32: |logits| reach ~5
    # Without IDEFICS's processor mask, the mask comes from the <image> tokens: the same for row 1, which has no
    # end-of-sequence token (after which IDEFICS's processor stops attending to images).
    without = {k: v for k, v in feed.items() if k != "image_attention_mask"}
    np.savez(tmp_path / "no_mask.npz", **without)
    args = ["forward", "--checkpoint", str(tmp_path / "converted"), "--inputs", str(tmp_path / "no_mask.npz")]
    assert cli.main([*args, "--out", str(tmp_path / "no_mask_out.npz")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "no_mask_out.npz")["logits"][0], want[0], atol=1e-4, rtol=1e-4)
    # The gates are open: the images matter for the text after them.
    before_first_image = feed["input_ids"][0].tolist().index(IMAGE)
    with torch.no_grad():
        torch_inputs["pixel_values"] = torch_inputs["pixel_values"] + 1.0
        moved = model(**torch_inputs, use_cache=False).logits.numpy()
    assert np.abs(moved[0, before_first_image:] - want[0, before_first_image:]).max() > 1e-3
