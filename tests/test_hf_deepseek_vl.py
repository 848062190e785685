"""DeepSeek-VL (transformers' `DeepseekVLHybridForConditionalGeneration` and `DeepseekVLForConditionalGeneration`)
-> `vlm-jax convert-hf` -> the `deepseek_vl` system: logits equal transformers'.

Tiny random-weight references (no download), saved with `save_pretrained`, every weight perturbed so no norm, the
SAM relative-position tables, the zero-initialised positions or `high_res_vision_alpha` is a no-op. The SigLIP
tower reads 32 px images (patch 8: 16 features per image); the hybrid model's SAM tower 64 px images (patch 8:
an 8 x 8 grid, windows of 3 so the windows are zero-padded as in SAM-B's 64 / 14, global attention in layers 1
and 3), its features resized to 16 x 16 and downsampled twice to the SigLIP grid. Row 0 holds two images, row 1
(left-padded) one; `pixel_values` [3, 3, 32, 32] and `high_res_pixel_values` [3, 3, 64, 64] in batch order.
Float32 logits are compared on the real tokens.
"""

import json

import numpy as np
import pytest

from conftest import convert_and_forward, perturb
from vlm_jax import models
from vlm_jax.errors import UserError
from vlm_jax.interop.convert import to_system_config

torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
transformers = pytest.importorskip(
    "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
)


PAD, BOS, IMAGE = 0, 1, 110
TOKENS = (32 // 8) ** 2
TEXT = dict(
    vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
VISION = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
SAM = dict(
    hidden_size=32, output_channels=8, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=8,
    window_size=3, global_attn_indexes=[1, 3], mlp_dim=48,
)  # fmt: skip


def deepseek_vl(hybrid, seed, vision=None, **options):
    vision = dict(VISION, **(vision or {}))
    if hybrid:
        config = transformers.DeepseekVLHybridConfig(
            text_config=TEXT, vision_config=vision, high_res_vision_config=SAM, image_token_id=IMAGE, **options
        )
        cls = transformers.DeepseekVLHybridForConditionalGeneration
    else:
        config = transformers.DeepseekVLConfig(text_config=TEXT, vision_config=vision, image_token_id=IMAGE, **options)
        cls = transformers.DeepseekVLForConditionalGeneration
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return perturb(cls(config), seed)


def inputs(hybrid, seed=0):
    rng = np.random.default_rng(seed)
    words = lambda n: rng.integers(10, IMAGE, n).tolist()  # noqa: E731
    full = [BOS, *words(3), *[IMAGE] * TOKENS, *words(2), *[IMAGE] * TOKENS, *words(4)]
    short = [BOS, *words(2), *[IMAGE] * TOKENS, *words(5)]
    pad = len(full) - len(short)
    feed = {
        "input_ids": np.array([full, [PAD] * pad + short], np.int64),
        "attention_mask": np.array([[1] * len(full), [0] * pad + [1] * len(short)], np.int64),
        "pixel_values": rng.normal(size=(3, 3, 32, 32)).astype(np.float32),
    }
    if hybrid:
        feed["high_res_pixel_values"] = rng.normal(size=(3, 3, 64, 64)).astype(np.float32)
    return feed


def reference(model, feed):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}, use_cache=False).logits.numpy()


def diff_on_real_tokens(got, want, feed):
    real = feed["attention_mask"].astype(bool)
    assert got.shape == want.shape
    return float(np.max(np.abs(got[real] - want[real])))


@pytest.mark.parametrize(
    "hybrid, vision, options, tied",
    [
        (True, {}, {}, True),
        (False, dict(vision_use_head=True), dict(tie_word_embeddings=False), False),
    ],
    ids=["hybrid-sam-tied", "siglip-only-untied-with-unused-head"],
)
def test_deepseek_vl_logits_match(tmp_path, hybrid, vision, options, tied):
    model = deepseek_vl(hybrid, 3, vision, **options)
    model.save_pretrained(str(tmp_path / "hf"))
    feed = inputs(hybrid)
    want = reference(model, feed)
    config, params = to_system_config(str(tmp_path / "hf"))
    assert config.model.image_tokens == TOKENS and config.model.lm.tie_embeddings == tied
    assert bool(config.model.sam) == hybrid and "map_head" not in params["vision"]
    if hybrid:  # the alpha-weighted second neck contributes (no silent zero)
        assert abs(float(params["high_res"]["alpha"][0])) > 1e-3
    got = models.build(config).forward(params, feed)["logits"]
    assert np.abs(want).max() > 1.0  # the logits are not trivially small
    assert diff_on_real_tokens(got, want, feed) <= 1e-4


def test_hybrid_logits_match_through_the_command_line(tmp_path):
    model = deepseek_vl(True, 4)
    model.save_pretrained(str(tmp_path / "hf"))
    feed = inputs(True, seed=1)
    got = convert_and_forward(tmp_path / "hf", tmp_path, **feed)["logits"]
    assert diff_on_real_tokens(got, reference(model, feed), feed) <= 1e-4


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(global_attn_indexes=[1, 2]), "every k-th layer"),
        (dict(use_rel_pos=False), "use_rel_pos"),
        (dict(hidden_act="relu"), "hidden_act"),
    ],
)
def test_sam_settings_we_do_not_implement_are_refused(tmp_path, change, match):
    deepseek_vl(True, 5).save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    config = json.load(open(path))
    config["high_res_vision_config"].update(change)
    json.dump(config, open(path, "w"))
    with pytest.raises(UserError, match=match):
        to_system_config(str(tmp_path / "hf"))


def test_hybrid_forward_refuses_missing_high_res_pixels(tmp_path):
    deepseek_vl(True, 6).save_pretrained(str(tmp_path / "hf"))
    config, params = to_system_config(str(tmp_path / "hf"))
    feed = inputs(True)
    del feed["high_res_pixel_values"]
    with pytest.raises(UserError, match="high_res_pixel_values"):
        models.build(config).forward(params, feed)
