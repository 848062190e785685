"""LLaVA (transformers' `LlavaForConditionalGeneration`) -> `vlm-jax convert-hf` -> the `llava` system: logits equal
transformers'.

Tiny random-weight references (no download), saved with `save_pretrained`: a 3-block CLIP tower of width 48, a
LLaMA (or Mistral, with a window shorter than the rows) LM with grouped-query attention. Two rows, row 0 with two
images and row 1 with one, row 1 left-padded; each image expanded to its placeholder run as transformers' processor
does; `pixel_values` [num_images, 3, H, W] in batch order. Float32 logits are compared on the real tokens.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from conftest import convert_and_forward, perturb
from vlm_jax import models
from vlm_jax.errors import UserError
from vlm_jax.interop.convert import to_system_config
from vlm_jax.interop.hf_llava import TEXT_MODELS

torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
transformers = pytest.importorskip(
    "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
)
from safetensors.numpy import load_file, save_file  # noqa: E402

VISION = dict(
    hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=3, image_size=32, patch_size=8
)
LLAMA = dict(
    model_type="llama",
    vocab_size=120,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
MISTRAL = dict(LLAMA, model_type="mistral", sliding_window=12)  # rows are 42 tokens long
PAD, BOS, IMAGE = 0, 1, 110
GRID = (32 // 8) ** 2  # patch features per image


def llava(text, seed, **options):
    config = transformers.LlavaConfig(
        vision_config=VISION, text_config=text, image_token_id=IMAGE, projector_hidden_act="gelu", **options
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return perturb(transformers.LlavaForConditionalGeneration(config), seed)


def inputs(image_tokens, seed=0):
    """Row 0: text, image, text, image, text; row 1 (left-padded): text, image, text."""
    rng = np.random.default_rng(seed)
    words = lambda n: rng.integers(3, IMAGE, n).tolist()  # noqa: E731
    image = [IMAGE] * image_tokens
    full = [BOS, *words(3), *image, *words(2), *image, *words(4)]
    short = [BOS, *words(2), *image, *words(5)]
    pad = len(full) - len(short)
    return {
        "input_ids": np.array([full, [PAD] * pad + short], np.int64),
        "attention_mask": np.array([[1] * len(full), [0] * pad + [1] * len(short)], np.int64),
        "pixel_values": rng.normal(size=(3, 3, 32, 32)).astype(np.float32),
    }


def reference(model, feed):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}, use_cache=False).logits.numpy()


def converted(hf_dir, feed):
    """(config, logits) of the converted checkpoint (`convert.to_system_config`, then the system's forward)."""
    config, params = to_system_config(str(hf_dir))
    return config, models.build(config).forward(params, feed)["logits"]


@pytest.fixture(scope="module")
def llama_llava(tmp_path_factory):
    """(model, directory) of the LLaMA LLaVA with transformers' default feature settings, saved once."""
    model = llava(LLAMA, 1)
    path = tmp_path_factory.mktemp("llava") / "hf"
    model.save_pretrained(str(path))
    return model, path


def diff_on_real_tokens(got, want, feed):
    real = feed["attention_mask"].astype(bool)
    assert got.shape == want.shape
    return float(np.max(np.abs(got[real] - want[real])))


@pytest.mark.parametrize(
    "text, options, image_tokens",
    [
        (MISTRAL, dict(multimodal_projector_bias=False), GRID),
        (
            dict(LLAMA, tie_word_embeddings=True),
            dict(vision_feature_select_strategy="full", vision_feature_layer=-1),
            GRID + 1,
        ),
    ],
    ids=["mistral-sliding-window-projector-without-bias", "llama-tied-class-token-kept-last-layer"],
)
def test_llava_variants_logits_match(tmp_path, text, options, image_tokens):
    model = llava(text, 2, **options)
    model.save_pretrained(str(tmp_path / "hf"))
    feed = inputs(image_tokens)
    want = reference(model, feed)
    config, got = converted(tmp_path / "hf", feed)
    assert config.model.image_tokens == image_tokens
    assert config.model.lm.tie_embeddings == bool(text.get("tie_word_embeddings"))  # the saved head is re-tied
    assert np.abs(want).max() > 1.0  # the logits are not trivially small
    assert diff_on_real_tokens(got, want, feed) <= 1e-4


def test_llava_logits_match_through_the_command_line(tmp_path, llama_llava):
    model, path = llama_llava
    feed = inputs(GRID)
    want = reference(model, feed)
    got = convert_and_forward(path, tmp_path, **feed)["logits"]
    assert np.abs(want).max() > 1.0
    assert diff_on_real_tokens(got, want, feed) <= 1e-4
    # The images reach the text after them: other pixels, other logits there.
    moved = reference(model, dict(feed, pixel_values=feed["pixel_values"] + 1.0))
    first = feed["input_ids"][0].tolist().index(IMAGE)
    assert np.abs(moved[0, first:] - want[0, first:]).max() > 1e-3


LAYOUTS = {
    "hub": [("vision_tower.", "vision_tower.vision_model.")],
    "in_memory": [
        ("vision_tower.", "model.vision_tower.vision_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("image_newline", "model.image_newline"),  # LLaVA-NeXT's
    ],
}


def relayout(path, other, layout):
    """A copy of the saved LLaVA(-NeXT) directory `path` in `other` with llava-hf's hub key layout or transformers'
    in-memory names (`LAYOUTS`) and a config as llava-hf's hub configs are (`image_token_id` for the
    `image_token_index` transformers 5 writes, default vision settings left out); returns `other`."""

    def rename(key):
        for old, new in LAYOUTS[layout]:
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    tensors = load_file(str(path / "model.safetensors"))
    other.mkdir()
    save_file({rename(k): v for k, v in tensors.items()}, str(other / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    assert "image_token_index" in config  # what transformers 5 writes; the newer name is read too
    config["image_token_id"] = config.pop("image_token_index")
    for default in ("hidden_act", "layer_norm_eps", "num_channels"):  # llava-hf's configs leave these out
        del config["vision_config"][default]
    (other / "config.json").write_text(json.dumps(config))
    return other


@pytest.mark.parametrize("layout", ["hub", "in_memory"])
def test_other_key_layouts_and_older_configs_convert_to_the_same_params(tmp_path, llama_llava, layout):
    """llava-hf's hub layout (`vision_tower.vision_model.*`) and transformers' in-memory names (`model.*`, `lm_head`),
    with a config in the older form (`image_token_index`, default vision settings left out)."""
    _, path = llama_llava
    other = relayout(path, tmp_path / layout, layout)
    want_config, want = to_system_config(str(path))
    got_config, got = to_system_config(str(other))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert got_config.model.to_dict() == want_config.model.to_dict()


def test_text_defaults_are_transformers_defaults():
    """Keys llava-hf's configs omit take the values transformers' config classes give them."""
    for model_type, (_, defaults) in TEXT_MODELS.items():
        reference_config = transformers.AutoConfig.for_model(model_type)
        assert {k: getattr(reference_config, k) for k in defaults} == defaults


@pytest.mark.parametrize(
    "change, match",
    [
        ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
        ({"vision_feature_layer": [-2, -1]}, "several layers"),
        ({"vision_feature_layer": 0}, "patch embeddings"),
        ({"vision_feature_layer": -5}, "not an index"),
        ({"vision_feature_select_strategy": "cls"}, "'default' or 'full'"),
        ({"text_config": dict(LLAMA, model_type="qwen2")}, "'qwen2' language model"),
        ({"vision_config": dict(VISION, model_type="siglip_vision_model")}, "vision tower"),
        ({"image_token_index": 120}, "outside the vocabulary"),
    ],
)
def test_settings_we_do_not_implement_are_refused(tmp_path, llama_llava, change, match):
    _, path = llama_llava
    shutil.copytree(path, tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=match):
        to_system_config(str(tmp_path / "hf"))
