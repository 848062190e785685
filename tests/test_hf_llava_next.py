"""LLaVA-NeXT (transformers' `LlavaNextForConditionalGeneration`) -> `vlm-jax convert-hf` -> the `llava` system with
AnyRes: logits equal transformers'.

Tiny random-weight references (no download), saved with `save_pretrained`: `test_hf_llava`'s 3-block CLIP tower of
width 48 on 32-pixel views (4 x 4 features each) and its LLaMA (or Mistral) LM with grouped-query attention, plus
AnyRes grid pinpoints of 2 or 4 tiles and the learned `image_newline`. The inputs come from transformers' own
`LlavaNextProcessor` (a word-level tokenizer built in memory): two rows, row 0 with two images and row 1 with one,
left-padded; images of awkward sizes, so the feature grids are unpadded differently; `pixel_values`
[images, views, 3, 32, 32] zero-padded to the most views, `image_sizes` [images, 2]. Float32 logits are compared
on the real tokens.
"""

import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from test_image_ops import photo_crop

from conftest import convert_and_forward, perturb
from vlm_jax import models
from vlm_jax.errors import UserError
from vlm_jax.interop.convert import to_system_config
from vlm_jax.interop.hf_llava_next import DEFAULT_PINPOINTS

pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
transformers = pytest.importorskip(
    "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
)
from test_hf_llava import LLAMA, MISTRAL, VISION, diff_on_real_tokens, reference, relayout  # noqa: E402

PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # (height, width): 2 or 4 tiles of 32 pixels
IMAGE = 110  # "<image>": the id the processor's tokenizer gives it, inside the LM's 120 rows
WORDS = 108  # text pieces w2 .. w109
TEXTS = ["w3 w4 w5 <image> w6 w7 <image> w8 w9 w10 w11", "w12 w13 <image> w14 w15 w16"]


def llava_next(text, seed, **options):
    config = transformers.LlavaNextConfig(
        vision_config=VISION, text_config=text, image_token_id=IMAGE, image_grid_pinpoints=PINPOINTS, **options
    )
    config._attn_implementation = "eager"
    return perturb(transformers.LlavaNextForConditionalGeneration(config), seed)


def processor():
    """transformers' LlavaNextProcessor for the tiny model: 32-pixel views, patch 8, the class token dropped
    ("default"), a left-padding word-level tokenizer whose `<image>` is IMAGE."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    vocab = {"<pad>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 2 + WORDS)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", pad_token="<pad>", padding_side="left"
    )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    images = LlavaNextImageProcessorPil(
        image_grid_pinpoints=PINPOINTS, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    out = transformers.LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    assert out.image_token_id == IMAGE
    return out


def inputs(seed=0):
    """The processor's batch: row 0 two noise images (45 x 80, 70 x 30; 4 and 2 tiles), row 1 (left-padded) a
    cropped photo (57 x 44, 4 tiles, unpadded left and right)."""
    rng = np.random.default_rng(seed)
    noise = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    images = [[noise(45, 80), noise(70, 30)], [Image.fromarray(photo_crop("chelsea", 30, 120, 57, 44))]]
    out = processor()(images=images, text=TEXTS, return_tensors="np", padding=True)
    feed = {k: np.asarray(v) for k, v in out.items()}
    assert feed["pixel_values"].shape == (3, 5, 3, 32, 32) and not feed["pixel_values"][1, 3:].any()
    assert feed["attention_mask"][1, 0] == 0 and feed["attention_mask"][0].all()  # row 1 is left-padded
    return feed


@pytest.fixture(scope="module")
def llama_next(tmp_path_factory):
    """(model, directory) of the LLaMA LLaVA-NeXT, saved once."""
    model = llava_next(LLAMA, 1)
    path = tmp_path_factory.mktemp("llava_next") / "hf"
    model.save_pretrained(str(path))
    return model, path


@pytest.mark.parametrize("text", [LLAMA, MISTRAL], ids=["llama", "mistral-sliding-window"])
def test_llava_next_logits_match(tmp_path, text):
    model = llava_next(text, 2)
    model.save_pretrained(str(tmp_path / "hf"))
    feed = inputs()
    want = reference(model, feed)
    config, params = to_system_config(str(tmp_path / "hf"))
    system = models.build(config)
    got = system.forward(params, feed)["logits"]
    assert np.abs(want).max() > 1.0  # the logits are not trivially small
    assert diff_on_real_tokens(got, want, feed) <= 1e-4
    # The image_newline features take part: without them the logits after the first image differ.
    dropped = system.forward(dict(params, image_newline=0 * params["image_newline"]), feed)
    first = feed["input_ids"][0].tolist().index(IMAGE)
    assert np.abs(dropped["logits"][0, first:] - want[0, first:]).max() > 1e-3


def test_llava_next_logits_match_through_the_command_line(tmp_path, llama_next):
    model, path = llama_next
    feed = inputs(1)
    want = reference(model, feed)
    got = convert_and_forward(path, tmp_path, **feed)["logits"]
    assert np.abs(want).max() > 1.0
    assert diff_on_real_tokens(got, want, feed) <= 1e-4


def test_converted_config_is_anyres_with_llava_next_layout(llama_next):
    model, path = llama_next
    config, params = to_system_config(str(path))
    assert config.model.image_newline and config.model.image_tokens == 16
    assert config.data.image.to_dict() == dict(
        mode="anyres",
        size=32,
        grid_pinpoints=PINPOINTS,
        anyres_layout="llava_next",
        normalization="clip",
        method="bicubic",
        max_aspect_ratio=20.0,
    )
    assert config.data.max_images == 5  # the base view and the 4 tiles of 64 x 64
    np.testing.assert_array_equal(params["image_newline"], model.model.image_newline.detach().numpy())


@pytest.mark.parametrize("layout", ["hub", "in_memory"])
def test_other_key_layouts_convert_to_the_same_params(tmp_path, llama_next, layout):
    _, path = llama_next
    other = relayout(path, tmp_path / layout, layout)
    want_config, want = to_system_config(str(path))
    got_config, got = to_system_config(str(other))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert got_config.model.to_dict() == want_config.model.to_dict()


def test_a_config_without_pinpoints_takes_transformers_default(tmp_path, llama_next):
    assert DEFAULT_PINPOINTS == transformers.LlavaNextConfig().image_grid_pinpoints
    _, path = llama_next
    shutil.copytree(path, tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    del config["image_grid_pinpoints"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    # The default's 336-pixel grids do not fit this tower's 32-pixel views: the error shows which were read.
    with pytest.raises(UserError, match=r"\[336, 672\] is not a grid of whole 32-pixel tiles"):
        to_system_config(str(tmp_path / "hf"))


@pytest.mark.parametrize(
    "change, drop, match",
    [
        ({"vision_feature_select_strategy": "full"}, None, "class token"),
        ({"image_grid_pinpoints": [[32, 48]]}, None, r"\[32, 48\] is not a grid of whole 32-pixel tiles"),
        ({"image_grid_pinpoints": [32, 64]}, None, "not a list of"),
        ({}, "image_newline", "no LLaVA-NeXT image_newline"),
        ({"projector_hidden_act": "relu"}, None, "gelu"),
    ],
    ids=["full-strategy", "pinpoint-not-whole-tiles", "pinpoints-not-pairs", "no-image-newline", "relu-projector"],
)
def test_settings_we_do_not_implement_are_refused(tmp_path, llama_next, change, drop, match):
    from safetensors.numpy import load_file, save_file

    _, path = llama_next
    shutil.copytree(path, tmp_path / "hf")
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    if drop:
        tensors = load_file(str(path / "model.safetensors"))
        del tensors[drop]
        save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(UserError, match=match):
        to_system_config(str(tmp_path / "hf"))
