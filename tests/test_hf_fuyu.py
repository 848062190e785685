"""Fuyu (transformers' `FuyuForCausalLM`) and its LM Persimmon (`PersimmonForCausalLM`) -> `vlm-jax convert-hf` ->
`vlm-jax forward`: logits equal transformers' (tiny random weights, no download).

Persimmon: partial rotary (factor 0.5 and 0.25), per-head query/key LayerNorm on and off, squared-ReLU MLP with
biases, fused query_key_value. Fuyu: patches in raster order through `vision_embed_tokens`, placed at the
`image_token_id` placeholders, a `|NEWLINE|` token after each row of patches, `<s>` after the image (the layout
`FuyuProcessor` writes), two rows with one image each, the second left-padded.
"""

import json
import math
import shutil

import numpy as np
import pytest

from conftest import convert_and_forward, perturb
from vlm_jax.errors import UserError

torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
transformers = pytest.importorskip(
    "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
)


PERSIMMON = dict(
    vocab_size=120,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,  # head_dim 12: RoPE on 6 dims (factor 0.5) or 4 (1 / 3)
    max_position_embeddings=64,
    layer_norm_eps=1e-5,
)


def persimmon(seed, fraction=0.5, qk_layernorm=True, theta=25000.0):
    config = transformers.PersimmonConfig(
        **PERSIMMON,
        qk_layernorm=qk_layernorm,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": fraction},
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return perturb(transformers.PersimmonForCausalLM(config), seed)


@pytest.mark.parametrize("fraction, qk_layernorm", [(0.5, True), (1 / 3, False)], ids=["half-qkln", "third-no-qkln"])
def test_persimmon_logits_match_through_the_command_line(tmp_path, fraction, qk_layernorm):
    model = persimmon(3, fraction, qk_layernorm)
    model.save_pretrained(str(tmp_path / "hf"))
    ids = np.array([[1, 17, 42, 99, 5, 8, 13, 70, 3], [0, 0, 1, 64, 9, 33, 2, 11, 4]], np.int64)
    mask = np.array([[1] * 9, [0, 0] + [1] * 7], np.int64)  # left padding in row 2
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = convert_and_forward(tmp_path / "hf", tmp_path, input_ids=ids, attention_mask=mask)["logits"]
    keep = mask.astype(bool)
    assert np.abs(want).max() > 1.0
    assert np.max(np.abs(got[keep] - want[keep])) <= 1e-4


PATCH = 4  # patches of 4 x 4 x 3 = 48 values
CANVAS = {"height": 16, "width": 24}  # the image processor's size: the converted canvas is 24 px, 6 x 6 patches
PAD, BOS, BOA, SPEAKER, NEWLINE = 0, 1, 5, 100, 101


def fuyu(seed):
    config = transformers.FuyuConfig(
        text_config=dict(
            PERSIMMON, model_type="persimmon", rope_parameters={"rope_type": "default", "rope_theta": 900.0}
        ),
        patch_size=PATCH,
        image_token_id=SPEAKER,
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return perturb(transformers.FuyuForCausalLM(config), seed)


def image_processor():
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    return FuyuImageProcessorPil(size=CANVAS, patch_size={"height": PATCH, "width": PATCH})


def save(model, path):
    """save_pretrained with the image processor's preprocessor_config.json, plus the tokenizer.json piece the
    converter reads the image-newline id from."""
    model.save_pretrained(str(path))
    image_processor().save_pretrained(str(path))
    (path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": NEWLINE, "content": "|NEWLINE|"}]}))
    return path


def processed(images):
    """[(patches [rows * cols, 48], rows, cols)] of PIL images, as FuyuProcessor._process_images makes them: the
    image processor scales each down to fit 16 x 24 and pads it, then each is cropped to its own whole patches
    and patchified."""
    proc = image_processor()
    out = proc(images, return_tensors="np")
    result = []
    for i, canvas in enumerate(np.asarray(out["images"])):
        h = min(CANVAS["height"], math.ceil(out["image_unpadded_heights"][i][0] / PATCH) * PATCH)
        w = min(CANVAS["width"], math.ceil(out["image_unpadded_widths"][i][0] / PATCH) * PATCH)
        patches = proc.patchify_image(canvas[..., :h, :w], proc.patch_size).reshape(-1, PATCH * PATCH * 3)
        result.append((patches.astype(np.float32), h // PATCH, w // PATCH))
    return result


def image_run(rows, cols):
    """One image's ids as FuyuProcessor.replace_image_token writes them: rows of |SPEAKER| x cols then |NEWLINE|,
    then <s>."""
    return ([SPEAKER] * cols + [NEWLINE]) * rows + [BOS]


def inputs(seed=0):
    """Row 0: a tall image (16 x 10 px after scaling: 4 rows of 3 patches), a second, small one (9 x 14 px, not
    scaled: 3 rows of 4), prompt, <0x04>, answer; row 1 (left-padded): a wide image (scaled to 10 x 24: 3 rows of
    6 patches), a shorter prompt, <0x04>. Patches from transformers' image processor, as FuyuProcessor crops
    and patchifies them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shapes = [(30, 20), (9, 14), (25, 60)]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    (a, ra, ca), (b, rb, cb), (c, rc, cc) = processed(images)
    assert [(ra, ca), (rb, cb), (rc, cc)] == [(4, 3), (3, 4), (3, 6)]
    words = lambda n: rng.integers(6, 99, n).tolist()  # noqa: E731
    full = image_run(ra, ca) + words(2) + image_run(rb, cb) + words(5) + [BOA] + words(3)
    short = image_run(rc, cc) + words(2) + [BOA]
    pad = len(full) - len(short)
    return {
        "input_ids": np.array([full, [PAD] * pad + short], np.int64),
        "attention_mask": np.array([[1] * len(full), [0] * pad + [1] * len(short)], np.int64),
        # every image's patches in batch order, [patches, p * p * 3], as FuyuProcessor's pixel_values
        "pixel_values": np.concatenate([a, b, c]),
    }


def reference(model, feed):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}, use_cache=False).logits.numpy()


@pytest.fixture(scope="module")
def saved_fuyu(tmp_path_factory):
    """(model, directory) of a tiny random Fuyu, saved once."""
    model = fuyu(5)
    return model, save(model, tmp_path_factory.mktemp("fuyu") / "hf")


def diff_on_real_tokens(got, want, feed):
    real = feed["attention_mask"].astype(bool)
    assert got.shape == want.shape
    return float(np.max(np.abs(got[real] - want[real])))


def test_fuyu_logits_match_through_the_command_line(tmp_path, saved_fuyu):
    model, path = saved_fuyu
    feed = inputs()
    want = reference(model, feed)
    got = convert_and_forward(path, tmp_path, **feed)["logits"]
    assert np.abs(want).max() > 1.0
    assert diff_on_real_tokens(got, want, feed) <= 1e-4
    # The patches reach the text after them (other pixels, other logits), and the rows' order matters.
    moved = reference(model, dict(feed, pixel_values=feed["pixel_values"][::-1].copy()))
    assert np.abs(moved[0, -3:] - want[0, -3:]).max() > 1e-3


def test_the_older_image_patches_input_gives_the_same_logits(saved_fuyu):
    """transformers' deprecated `image_patches` name, with a leading batch dim; image_patches_indices (which
    transformers no longer takes) is refused."""
    from vlm_jax import models
    from vlm_jax.interop.convert import to_system_config

    _, path = saved_fuyu
    config, params = to_system_config(str(path))
    system = models.build(config)
    feed = inputs()
    got = system.forward(params, feed)["logits"]
    patches = feed.pop("pixel_values")[None]
    np.testing.assert_array_equal(system.forward(params, dict(feed, image_patches=patches))["logits"], got)
    with pytest.raises(UserError, match="does not read the inputs image_patches_indices"):
        system.forward(params, dict(feed, image_patches=patches, image_patches_indices=np.zeros((2, 3), np.int64)))


def test_flat_configs_and_in_memory_key_names_convert_to_the_same_params(tmp_path, saved_fuyu):
    """adept/fuyu-8b's flat config (text keys at the top level) and transformers' in-memory key names."""
    from safetensors.numpy import load_file, save_file

    from vlm_jax.interop.convert import to_system_config

    _, path = saved_fuyu
    other = tmp_path / "flat"
    other.mkdir()
    renames = (
        ("vision_embed_tokens.", "model.vision_embed_tokens."),
        ("language_model.model.", "model.language_model."),
    )
    renames += (("language_model.lm_head.", "lm_head."),)

    def rename(key):
        return next((new + key[len(old) :] for old, new in renames if key.startswith(old)), key)

    tensors = load_file(str(path / "model.safetensors"))
    save_file({rename(k): v for k, v in tensors.items()}, str(other / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config.update(text, rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"])
    (other / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "preprocessor_config.json"):
        shutil.copy(path / name, other / name)
    want_config, want = to_system_config(str(path))
    got_config, got = to_system_config(str(other))
    import jax

    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert got_config.model.to_dict() == want_config.model.to_dict()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_channels": 1}, "num_channels"),
        ({"text_config": dict(PERSIMMON, model_type="persimmon", hidden_act="gelu")}, "relu2"),
        ({"image_token_id": 500}, "outside the vocabulary"),
        ({"tokenizer.json": None}, "no tokenizer.json"),
        ({"preprocessor_config.json": {"size": {"shortest_edge": 10}}}, "is not {'height': H, 'width': W}"),
    ],
)
def test_settings_we_do_not_implement_are_refused(tmp_path, saved_fuyu, change, match):
    from vlm_jax.interop.convert import to_system_config

    _, path = saved_fuyu
    shutil.copytree(path, tmp_path / "hf")
    files = {k: v for k, v in change.items() if k.endswith(".json")}
    for name, content in files.items():
        if content is None:
            (tmp_path / "hf" / name).unlink()
        else:
            (tmp_path / "hf" / name).write_text(json.dumps(content))
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({**config, **{k: v for k, v in change.items() if k not in files}})
    )
    with pytest.raises(UserError, match=match):
        to_system_config(str(tmp_path / "hf"))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda ids: ids.__setitem__((0, 3), SPEAKER), "rows of the same number of image tokens"),  # a 4-patch row
        (lambda ids: ids.__setitem__((0, 0), NEWLINE), "rows of the same number of image tokens"),  # an empty row
    ],
    ids=["uneven-rows", "row-without-patches"],
)
def test_forward_refuses_image_tokens_not_laid_out_as_fuyu_processor_writes(saved_fuyu, edit, match):
    from vlm_jax import models
    from vlm_jax.interop.convert import to_system_config

    _, path = saved_fuyu
    config, params = to_system_config(str(path))
    feed = inputs()
    ids = feed["input_ids"].copy()
    edit(ids)
    with pytest.raises(UserError, match=match):
        models.build(config).forward(params, dict(feed, input_ids=ids))


def test_forward_refuses_an_image_larger_than_the_canvas(saved_fuyu):
    from vlm_jax import models
    from vlm_jax.interop.convert import to_system_config

    _, path = saved_fuyu
    config, params = to_system_config(str(path))
    assert config.model.image_size == 24 and config.model.image_tokens == 36  # the processor's longer side
    ids = np.array([image_run(1, 7) + [7, BOA]], np.int64)
    patches = np.zeros((7, PATCH * PATCH * 3), np.float32)
    with pytest.raises(UserError, match="does not fit this model's canvas of 6 x 6 patches"):
        models.build(config).forward(params, {"input_ids": ids, "pixel_values": patches})
