"""DeepSeek-VL through the in-sequence system contract: paper-size parameter counts, 576 features per image,
images of packed examples kept apart, DeepSeek-VL's padded views and chat template against transformers', and
the tiny hybrid model trained, evaluated and answering through the command line."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, packed_slots, train_briefly
from data_pipelines import image_ops, templates
from vlm_jax import cli, models
from vlm_jax.config_lib import load_config
from vlm_jax.errors import ConfigError, UserError


def config(arg):
    return load_config(os.path.join(REPO, f"configs/deepseek_vl.py:{arg}"))


def param_count(variant):
    system = models.build(config(f"variant={variant}"))
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def transformers_count(variant):
    """transformers' own count of the matching model, built on the meta device (no memory): the configs that
    transformers' conversion scripts write for deepseek-ai/deepseek-vl-7b-chat and -1.3b-chat
    (`convert_deepseek_vl_hybrid_weights_to_hf.py`, `convert_deepseek_vl_weights_to_hf.py`: SigLIP-L/16 at 384 px
    without its head, SAM-B for 7B, the LLM shapes), with untied heads, as DeepSeek LLM's checkpoints have them."""
    import torch
    import transformers

    text = dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=30, vocab_size=102400
    )
    if variant == "1.3b":
        text.update(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_hidden_layers=24)
    vision = dict(
        hidden_size=1024, intermediate_size=4096, image_size=384, patch_size=16, hidden_act="gelu",
        vision_use_head=False, num_attention_heads=16, num_hidden_layers=24,
    )  # fmt: skip
    with torch.device("meta"):
        if variant == "7b":
            sam = dict(hidden_size=768, image_size=1024, patch_size=16, num_attention_heads=12, num_hidden_layers=12)
            cfg = transformers.DeepseekVLHybridConfig(
                text_config=text, vision_config=vision, high_res_vision_config=sam, tie_word_embeddings=False
            )
            model = transformers.DeepseekVLHybridForConditionalGeneration(cfg)
        else:
            cfg = transformers.DeepseekVLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
            model = transformers.DeepseekVLForConditionalGeneration(cfg)
    return sum(p.numel() for p in model.parameters())


# Published totals: the parameter counts the Hugging Face hub shows for deepseek-ai/deepseek-vl-7b-chat (7.34B)
# and deepseek-ai/deepseek-vl-1.3b-chat (1.98B), from their safetensors metadata, as recalled (no network here to
# re-read them); the paper (arXiv:2403.05525) names the models by their LLM sizes only. transformers' count of the
# same architecture is the exact cross-check.
@pytest.mark.parametrize("variant, published", [("7b", 7.34e9), ("1.3b", 1.98e9)])
def test_paper_size_parameter_counts(variant, published):
    pytest.importorskip(
        "torch", reason="transformers' model (built on the meta device) is PyTorch: pip install -e '.[interop]'"
    )
    pytest.importorskip("transformers", reason="the reference is transformers' model: pip install -e '.[interop]'")
    count = param_count(variant)
    assert count == transformers_count(variant)
    assert abs(count / published - 1) < 0.02


def test_paper_sizes_give_576_features_from_siglip_and_sam_b():
    seven = config("variant=7b")
    assert models.build(seven).image_tokens == 576  # 384 px / patch 16 = 24 x 24 (arXiv:2403.05525 sec. 3.1)
    assert seven.model.image_size == 1024 and seven.model.sam.variant == "B"
    one = config("variant=1.3b")
    assert models.build(one).image_tokens == 576 and not one.model.sam and one.model.image_size == 384


def test_inconsistent_settings_are_refused():
    c = config("variant=tiny")
    c.model.image_tokens = 17
    with pytest.raises(ConfigError, match="image_tokens"):
        models.build(c)
    c = config("variant=tiny")
    c.model.sam.global_layers = (1, 2)
    with pytest.raises(UserError, match="every k-th layer"):
        models.build(c)
    with pytest.raises(ConfigError, match="stage"):
        config("variant=7b,stage=4")


@pytest.fixture(scope="module")
def tiny():
    c = config("variant=tiny")
    c.data.max_images = 2
    system = models.build(c)
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), system.dummy_batch(1)))
    # alpha starts at 0 (as in transformers): make the second neck count, so every path is exercised.
    params["high_res"]["alpha"] = np.ones(1, np.float32)
    return system, params


def packed(examples, length):
    """`packed_slots` of (tokens, images [k, 64, 64, 3]) examples in 2 media slots."""
    return packed_slots(examples, length, slots=2, image_size=64)


def test_a_packed_row_equals_its_examples_run_alone(tiny):
    system, params = tiny
    rng = np.random.default_rng(0)
    image_id, n = system.module.image_token_id, system.image_tokens

    def example(text_len):
        tokens = [1, *[image_id] * n, *rng.integers(10, 250, size=text_len)]
        return np.asarray(tokens, np.int32), rng.normal(size=(1, 64, 64, 3)).astype(np.float32)

    a, b = example(9), example(12)
    length = len(a[0]) + len(b[0]) + 3
    logits = jax.jit(system.logits)
    both = np.asarray(logits(params, packed([a, b], length)))[0]
    alone_a = np.asarray(logits(params, packed([a], length)))[0]
    alone_b = np.asarray(logits(params, packed([b], length)))[0]
    na, nb = len(a[0]), len(b[0])
    np.testing.assert_allclose(both[:na], alone_a[:na], atol=1e-5, rtol=0)
    np.testing.assert_allclose(both[na : na + nb], alone_b[:nb], atol=1e-5, rtol=0)
    # Another image for example b: nothing of example a moves, b's text does.
    b2 = (b[0], rng.normal(size=(1, 64, 64, 3)).astype(np.float32))
    changed = np.asarray(logits(params, packed([a, b2], length)))[0]
    np.testing.assert_array_equal(changed[:na], both[:na])
    assert np.abs(changed[na : na + nb] - both[na : na + nb]).max() > 1e-3


def sample_photo():
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[0]  # china.jpg, a 427 x 640 photograph


@pytest.mark.parametrize("crop", [(427, 640), (300, 97), (211, 211)])
def test_padded_views_match_transformers_processor(crop):
    """data.image.mode="deepseek_vl" (`image_ops.pad_to_square`) gives transformers' high-resolution pixels:
    the longer side resized to 1024, centred on a square of the CLIP mean colour, CLIP-normalised."""
    pytest.importorskip(
        "transformers", reason="the reference is transformers' image processor: pip install -e '.[interop]'"
    )
    from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
        DeepseekVLHybridImageProcessorPil,
    )

    image = sample_photo()[: crop[0], : crop[1]]
    ours = image_ops.normalize(image_ops.pad_to_square(image, 1024, "clip"), "clip")
    theirs = DeepseekVLHybridImageProcessorPil()(Image.fromarray(image), return_tensors="np")
    np.testing.assert_allclose(ours, theirs["high_res_pixel_values"][0].transpose(1, 2, 0), atol=1e-5)


def test_the_derived_siglip_view_is_transformers_within_one_pixel_level():
    """The hybrid model derives its 384 px SigLIP view from the 1024 px slot (`DeepseekVLModel.low_res_view`);
    transformers' processor (as its conversion script configures it for deepseek-vl-7b-chat: bilinear, mean and
    std 0.5) resizes the padded uint8 image instead. On a real photo the two agree within one uint8 level
    (2 / 255 after the 0.5 / 0.5 normalisation)."""
    pytest.importorskip(
        "transformers", reason="the reference is transformers' image processor: pip install -e '.[interop]'"
    )
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling
    from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import (
        DeepseekVLHybridImageProcessorPil,
    )

    processor = DeepseekVLHybridImageProcessorPil(
        image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD, resample=PILImageResampling.BILINEAR
    )
    theirs = processor(Image.fromarray(sample_photo()), return_tensors="np")
    module = models.build(config("variant=7b")).module
    ours = np.asarray(module.low_res_view(theirs["high_res_pixel_values"].transpose(0, 2, 3, 1)))
    assert np.abs(ours - theirs["pixel_values"].transpose(0, 2, 3, 1)).max() < 2 / 255


def test_chat_template_is_deepseek_vls(spm_tokenizer):
    """The "deepseek_vl" template's text is DeepSeek-VL's conversation ("deepseek" style), the image markers
    its `<image_placeholder>` runs, the answers and their eos the only targets."""
    record = {
        "images": [b""],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A ball."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    out = templates.render("deepseek_vl", spm_tokenizer, record, 3, system="Be brief.")
    placeholder = spm_tokenizer.token_id("<image_placeholder>")
    assert list(out.ids).count(placeholder) == 3 and out.ids[0] == spm_tokenizer.bos_id
    text = spm_tokenizer.decode([i for i in out.ids[1:] if i not in (placeholder, spm_tokenizer.eos_id)])
    # (" User": sentencepiece's dummy prefix starts the text chunk after the eos id; DeepSeek's byte-level BPE
    # has none, and the string between the turns is "<eos>User: ".)
    assert text == "Be brief.\n\nUser: What is it?\n\nAssistant: A ball. User: Colour?\n\nAssistant: Red."
    targets = [int(i) for i, p in zip(out.ids, out.predict) if p]
    assert spm_tokenizer.decode([i for i in targets if i != spm_tokenizer.eos_id]).split() == ["A", "ball.", "Red."]
    assert targets.count(spm_tokenizer.eos_id) == 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny hybrid DeepSeek-VL trained for a few steps on a small built-in dataset through `vlm-jax train`."""
    return train_briefly(tmp_path_factory, "deepseek_vl.py:data=builtin,scale=0.02")


def test_tiny_deepseek_vl_trains_evaluates_and_answers(trained, tmp_path, capsys, monkeypatch):
    workdir, status, cache, arg = trained
    assert status == 0
    metrics = open(os.path.join(workdir, "report", "index.html")).read()
    assert "vqa_accuracy" in metrics and "cider" in metrics
    monkeypatch.setenv("VLM_JAX_CACHE", cache)
    capsys.readouterr()
    assert cli.main(["eval", "--config", arg, "--workdir", workdir, "--config.eval_examples=8"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["step"] == 4 and {"vqa_accuracy", "cider"} <= set(scores)
    image = tmp_path / "wide.png"  # 96 x 32: padded to a square, as DeepSeek-VL's processor does
    Image.new("RGB", (96, 32), (220, 20, 20)).save(image)
    argv = ["generate", "--checkpoint", workdir, "--image", str(image), "--prompt", "What colour is the shape?"]
    out = tmp_path / "out.jsonl"
    assert cli.main(argv + ["--max_new_tokens", "6", "--out", str(out)]) == 0
    line = json.loads(out.read_text())
    assert 1 <= len(line["tokens"]) <= 6 and "<image_placeholder>" not in line["text"]
