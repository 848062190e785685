"""InternVL (transformers' `InternVLForConditionalGeneration`) -> `vlm-jax convert-hf` -> the `internvl` system:
logits equal transformers'; and InternVL's tiling of real photos equals transformers' image processor's.

Tiny random-weight references (no download), saved with `save_pretrained`, every weight perturbed so no norm or
layer scale is a no-op: an InternViT-6B-style tower (RMSNorm, RMSNorm over all heads' queries and keys, no q/k/v
bias) with a Qwen2 LM and a tied head, and an InternViT-300M-style tower (LayerNorm, q/k/v biases) tapped at
`vision_feature_layer=-2` with a LLaMA LM and its own head. 32 px tiles of patch 4: 64 patches, pixel-shuffled to
16 features per tile. Row 0 holds two images (3 tiles and 1 tile), row 1 (left-padded) one image of 2 tiles, each
image `<img>` + 16 x tiles placeholders + `</img>` as InternVL's processor writes it; `pixel_values` [6, 3, 32, 32]
in batch order. Float32 logits are compared on the real tokens.
"""

import numpy as np
import pytest

from conftest import convert_and_forward, perturb
from vlm_jax import models
from vlm_jax.interop.convert import to_system_config

torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
transformers = pytest.importorskip(
    "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
)


PAD, BOS, IMG_START, IMG_END, IMAGE = 0, 1, 7, 8, 110
TILE_TOKENS = (32 // 4 // 2) ** 2
SIX_B = dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False)
THREE_HUNDRED_M = dict(norm_type="layer_norm", use_qk_norm=False, attention_bias=True)
QWEN2 = dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
LLAMA = dict(QWEN2, model_type="llama")


def internvl(vision, text, seed, **options):
    vision = dict(
        vision, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=32,
        patch_size=4,
    )  # fmt: skip
    text = dict(text, vocab_size=120, num_hidden_layers=2, max_position_embeddings=256)
    config = transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, **options)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return perturb(transformers.InternVLForConditionalGeneration(config), seed)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    words = lambda n: rng.integers(10, IMAGE, n).tolist()  # noqa: E731
    image = lambda tiles: [IMG_START, *[IMAGE] * (TILE_TOKENS * tiles), IMG_END]  # noqa: E731
    full = [BOS, *words(3), *image(3), *words(2), *image(1), *words(4)]
    short = [BOS, *words(2), *image(2), *words(5)]
    pad = len(full) - len(short)
    return {
        "input_ids": np.array([full, [PAD] * pad + short], np.int64),
        "attention_mask": np.array([[1] * len(full), [0] * pad + [1] * len(short)], np.int64),
        "pixel_values": rng.normal(size=(6, 3, 32, 32)).astype(np.float32),
    }


def reference(model, feed):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}, use_cache=False).logits.numpy()


def diff_on_real_tokens(got, want, feed):
    real = feed["attention_mask"].astype(bool)
    assert got.shape == want.shape
    return float(np.max(np.abs(got[real] - want[real])))


@pytest.mark.parametrize(
    "vision, text, options, tied, tap",
    [
        (SIX_B, QWEN2, {}, True, None),
        (THREE_HUNDRED_M, LLAMA, dict(vision_feature_layer=-2, tie_word_embeddings=False), False, -2),
    ],
    ids=["internvit6b-style-qwen2-tied", "internvit300m-style-llama-penultimate"],
)
def test_internvl_logits_match(tmp_path, vision, text, options, tied, tap):
    model = internvl(vision, text, 3, **options)
    model.save_pretrained(str(tmp_path / "hf"))
    feed = inputs()
    want = reference(model, feed)
    config, params = to_system_config(str(tmp_path / "hf"))
    got = models.build(config).forward(params, feed)["logits"]
    assert config.model.image_tokens == TILE_TOKENS and config.model.feature_layer == tap
    assert config.model.lm.tie_embeddings == tied
    assert config.model.encoder_kwargs.qk_norm == vision["use_qk_norm"]
    assert np.abs(want).max() > 1.0  # the logits are not trivially small
    assert diff_on_real_tokens(got, want, feed) <= 1e-4


def test_internvl_logits_match_through_the_command_line(tmp_path):
    model = internvl(SIX_B, QWEN2, 4)
    model.save_pretrained(str(tmp_path / "hf"))
    feed = inputs(seed=1)
    got = convert_and_forward(tmp_path / "hf", tmp_path, **feed)["logits"]
    assert diff_on_real_tokens(got, reference(model, feed), feed) <= 1e-4


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
        (dict(downsample_ratio=0.3), "downsample_ratio"),
    ],
)
def test_settings_we_do_not_implement_are_refused(tmp_path, change, match):
    import json

    from vlm_jax.errors import UserError

    internvl(SIX_B, QWEN2, 5).save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    json.dump({**json.load(open(path)), **change}, open(path, "w"))
    with pytest.raises(UserError, match=match):
        to_system_config(str(tmp_path / "hf"))
