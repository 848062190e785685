"""InternVL through the in-sequence system contract: paper sizes, tiles of packed examples kept apart, InternVL's
tiling of real photos against transformers' processor, and the tiny model trained, evaluated and answering."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, packed_slots, train_briefly
from data_pipelines import image_ops
from vlm_jax import cli, models
from vlm_jax.config_lib import load_config


def param_count(variant):
    system = models.build(load_config(os.path.join(REPO, f"configs/internvl.py:variant={variant}")))
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


# Published totals. InternVL-Chat-V1-5: "26B" in the paper (arXiv:2404.16821, sec. 3.1) and 25.5B on its model
# card (OpenGVLab/InternVL-Chat-V1-5). Mini-InternVL-Chat-4B-V1-5: 4.2B (its model card, seed document S002).
# InternVL2: the "#Param" column of the InternVL2 blog (internvl.github.io/blog/2024-07-02-InternVL-2.0) and of
# each OpenGVLab/InternVL2-* card: 1B 0.9B (938M as the hub's safetensors count), 2B 2.2B, 4B 4.2B, 8B 8.1B,
# 26B 25.5B.
@pytest.mark.parametrize(
    "variant, published",
    [
        ("1.5", 25.5e9),
        ("mini-4b", 4.2e9),
        ("2-1b", 0.938e9),
        ("2-2b", 2.2e9),
        ("2-4b", 4.2e9),
        ("2-8b", 8.1e9),
        ("2-26b", 25.5e9),
    ],
)
def test_paper_size_parameter_counts(variant, published):
    assert abs(param_count(variant) / published - 1) < 0.02


def test_paper_tiles_give_256_tokens_and_13_slots():
    config = load_config(os.path.join(REPO, "configs/internvl.py:variant=1.5"))
    system = models.build(config)
    assert system.image_tokens == 256  # arXiv:2404.16821 sec. 3.3: a 448 x 448 tile is 256 visual tokens
    assert config.data.max_images == 13  # 12 tiles and the thumbnail: at most 13 x 256 = 3,328 tokens (sec. 3.3)
    assert config.model.encoder_kwargs.depth == 45  # InternViT-6B without its last 3 layers (sec. 3.2)


@pytest.fixture(scope="module")
def tiny():
    config = load_config(os.path.join(REPO, "configs/internvl.py:variant=tiny"))
    config.data.max_images = 4
    system = models.build(config)
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), system.dummy_batch(1)))
    return system, params


def packed(examples, length):
    """`packed_slots` of (tokens, images [k, 32, 32, 3]) examples in 4 media slots."""
    return packed_slots(examples, length, slots=4, image_size=32)


def test_a_packed_row_equals_its_examples_run_alone(tiny):
    system, params = tiny
    rng = np.random.default_rng(0)
    image_id = system.module.image_token_id

    def example(tiles, text_len):
        tokens = [1, *[image_id] * (system.image_tokens * tiles), *rng.integers(10, 250, size=text_len)]
        return np.asarray(tokens, np.int32), rng.normal(size=(tiles, 32, 32, 3)).astype(np.float32)

    a, b = example(2, 9), example(1, 12)  # two tiles (2 x 16 placeholders) and one tile
    length = len(a[0]) + len(b[0]) + 3
    logits = jax.jit(system.logits)
    both = np.asarray(logits(params, packed([a, b], length)))[0]
    alone_a = np.asarray(logits(params, packed([a], length)))[0]
    alone_b = np.asarray(logits(params, packed([b], length)))[0]
    na, nb = len(a[0]), len(b[0])
    np.testing.assert_allclose(both[:na], alone_a[:na], atol=1e-5, rtol=0)
    np.testing.assert_allclose(both[na : na + nb], alone_b[:nb], atol=1e-5, rtol=0)
    # Another tile for example b: nothing of example a moves, b's text does.
    b2 = (b[0], rng.normal(size=(1, 32, 32, 3)).astype(np.float32))
    changed = np.asarray(logits(params, packed([a, b2], length)))[0]
    np.testing.assert_array_equal(changed[:na], both[:na])
    assert np.abs(changed[na : na + nb] - both[na : na + nb]).max() > 1e-3
    # Each of a's tiles reaches its own placeholders: changing a's second tile moves a's text after it.
    a2 = (a[0], np.stack([a[1][0], rng.normal(size=(32, 32, 3)).astype(np.float32)]))
    moved = np.asarray(logits(params, packed([a2, b], length)))[0]
    second = 1 + 2 * system.image_tokens
    np.testing.assert_array_equal(moved[: 1 + system.image_tokens], both[: 1 + system.image_tokens])
    assert np.abs(moved[second:na] - both[second:na]).max() > 1e-3


def sample_photos():
    from sklearn.datasets import load_sample_images

    return load_sample_images().images  # china.jpg and flower.jpg, 427 x 640 photographs


# Awkward sizes cut from the photos: very wide and very tall strips, a prime-sided square, sizes just off a tile.
@pytest.mark.parametrize("crop", [(427, 640), (97, 640), (427, 61), (211, 211), (449, 447), (300, 450), (13, 601)])
@pytest.mark.parametrize("max_tiles", [12, 40])
def test_tiles_of_real_photos_match_transformers_processor(crop, max_tiles):
    pytest.importorskip(
        "transformers", reason="the reference is transformers' GotOcr2 image processor: pip install -e '.[interop]'"
    )
    from transformers.image_utils import PILImageResampling, SizeDict
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    h, w = crop
    for photo in sample_photos():
        image = np.asarray(Image.fromarray(photo).resize((w, h), Image.BICUBIC)) if h > 427 else photo[:h, :w]
        ours = image_ops.internvl_tiles(image, tile_size=448, min_tiles=1, max_tiles=max_tiles)
        processor = GotOcr2ImageProcessorPil(crop_to_patches=True, size={"height": 448, "width": 448})
        theirs = processor.crop_image_to_patches(
            np.moveaxis(image, -1, 0), 1, max_tiles, patch_size=SizeDict(height=448, width=448),
            resample=PILImageResampling.BICUBIC,
        )  # fmt: skip
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, np.moveaxis(b, 0, -1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny InternVL trained for a few steps on a small built-in dataset through `vlm-jax train`."""
    return train_briefly(tmp_path_factory, "internvl.py:data=builtin,scale=0.02")


def test_tiny_internvl_trains_on_tiles_evaluates_and_answers(trained, tmp_path, capsys, monkeypatch):
    workdir, status, cache, config = trained
    assert status == 0
    metrics = open(os.path.join(workdir, "report", "index.html")).read()
    assert "vqa_accuracy" in metrics and "cider" in metrics
    monkeypatch.setenv("VLM_JAX_CACHE", cache)
    capsys.readouterr()
    assert cli.main(["eval", "--config", config, "--workdir", workdir, "--config.eval_examples=8"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["step"] == 4 and {"vqa_accuracy", "cider"} <= set(scores)
    image = tmp_path / "wide.png"  # 96 x 32: three 32 px tiles side by side and the thumbnail
    Image.new("RGB", (96, 32), (220, 20, 20)).save(image)
    capsys.readouterr()
    argv = ["generate", "--checkpoint", workdir, "--image", str(image), "--prompt", "What colour is the shape?"]
    out = tmp_path / "out.jsonl"
    assert cli.main(argv + ["--max_new_tokens", "6", "--out", str(out)]) == 0
    line = json.loads(out.read_text())
    assert 1 <= len(line["tokens"]) <= 6 and "<IMG_CONTEXT>" not in line["text"]


def test_phi3_style_answers_stop_at_its_end_of_turn(spm_tokenizer):
    """Mini-InternVL's Phi-3 chat ends each answer with `<|end|>` (templates.internvl, style "phi3"); generation
    stops there (and at eos), where the InternLM2 style stops at `<|im_end|>`."""
    from data_pipelines import templates

    config = load_config(os.path.join(REPO, "configs/internvl.py:variant=tiny"))
    internlm2 = set(models.build(config).stop_tokens(spm_tokenizer))
    config.data.template_options = {"style": "phi3"}
    phi3 = set(models.build(config).stop_tokens(spm_tokenizer))
    assert phi3 - internlm2 == {spm_tokenizer.token_id("<|end|>")}
    eos = spm_tokenizer.eos_id
    assert phi3 == {eos, spm_tokenizer.token_id("<|end|>")} and internlm2 == {eos, spm_tokenizer.token_id("<|im_end|>")}
    rendered = templates.render("internvl", spm_tokenizer, {"images": [b""], "caption": "a cat"}, [4], style="phi3")
    answer_end = [i for i, p in zip(rendered.ids, rendered.predict) if p][-1]
    assert answer_end == spm_tokenizer.token_id("<|end|>")  # what the model learns to emit last
