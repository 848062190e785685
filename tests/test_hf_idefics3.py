"""Idefics3 (transformers' `Idefics3ForConditionalGeneration`) -> `vlm-jax convert-hf` -> the `idefics3` system:
logits equal transformers'; the connector's pixel shuffle equals `Idefics3Connector.pixel_shuffle`; Idefics3's
resize and split of real photos equals transformers' image processor's; and the prompt layout equals
`Idefics3Processor.replace_image_token`'s.

The tiny random-weight reference (no download) is saved with `save_pretrained`, every weight perturbed so no norm
is a no-op: a 3-layer SigLIP tower on 32 px tiles of patch 4 (8 x 8 patches, pixel-shuffled by 2 to 16 features
per tile), a bias-free connector, a 2-layer LLaMA LM with its own head and Llama 3.1's "llama3" RoPE scaling (as
Idefics3-8B's Llama 3.1 has; an original context of 64 so the scaled frequencies matter at these lengths). Row 0 holds a split image (2 x 2 tiles and
the global image, `<fake_token_around_image><row_r_col_c>` pieces between the tiles as ordinary ids) and an unsplit
one; row 1 (left-padded) one split image of 1 x 2 tiles, its pixel_values row padded with all-zero images as the
processor pads. Float32 logits are compared on the real tokens.
"""

import json
import types

import numpy as np
import pytest

from conftest import convert_and_forward, perturb
from data_pipelines import templates
from vlm_jax import models
from vlm_jax.errors import UserError
from vlm_jax.interop.convert import to_system_config

torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
transformers = pytest.importorskip(
    "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
)


PAD, BOS, FAKE, GLOBAL, IMAGE = 0, 1, 7, 8, 110
TILE_TOKENS = (32 // 4 // 2) ** 2


def idefics3(seed, **options):
    vision = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=4
    )
    text = dict(
        model_type="llama", vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    )  # fmt: skip
    config = transformers.Idefics3Config(
        vision_config=vision, text_config=text, image_token_id=IMAGE, scale_factor=2, **options
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return perturb(transformers.Idefics3ForConditionalGeneration(config), seed)


def image_ids(rows, cols, rng):
    """One image's ids as `Idefics3Processor` lays them out, with random ids standing in for `<row_r_col_c>` and
    the newlines (they are ordinary text to the model)."""
    glob = [FAKE, GLOBAL, *[IMAGE] * TILE_TOKENS, FAKE]
    if rows == 0:
        return glob
    out = []
    for _ in range(rows):
        for _ in range(cols):
            out += [FAKE, *rng.integers(10, 100, 3).tolist(), *[IMAGE] * TILE_TOKENS]
        out.append(13)  # "\n"
    return out + [13, *glob]


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    words = lambda n: rng.integers(10, IMAGE, n).tolist()  # noqa: E731
    full = [BOS, *words(3), *image_ids(2, 2, rng), *words(2), *image_ids(0, 0, rng), *words(4)]
    short = [BOS, *words(2), *image_ids(1, 2, rng), *words(5)]
    pad = len(full) - len(short)
    pixels = np.zeros((2, 6, 3, 32, 32), np.float32)
    pixels[0] = rng.normal(size=(6, 3, 32, 32))  # 4 tiles + global, then the unsplit image
    pixels[1, :3] = rng.normal(size=(3, 3, 32, 32))  # 2 tiles + global, then 3 padding images
    return {
        "input_ids": np.array([full, [PAD] * pad + short], np.int64),
        "attention_mask": np.array([[1] * len(full), [0] * pad + [1] * len(short)], np.int64),
        "pixel_values": pixels,
    }


def reference(model, feed):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}, use_cache=False).logits.numpy()


def diff_on_real_tokens(got, want, feed):
    real = feed["attention_mask"].astype(bool)
    assert got.shape == want.shape
    return float(np.max(np.abs(got[real] - want[real])))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("idefics3") / "hf"
    model = idefics3(3)
    model.save_pretrained(str(path))
    return model, path


def test_idefics3_logits_match(saved):
    model, path = saved
    feed = inputs()
    want = reference(model, feed)
    config, params = to_system_config(str(path))
    assert config.model.image_tokens == TILE_TOKENS and not config.model.lm.tie_embeddings
    assert config.model.connector.kind == "pixel_shuffle_linear"
    assert config.model.lm.rope_scaling.rope_type == "llama3"
    got = models.build(config).forward(params, feed)["logits"]
    assert np.abs(want).max() > 1.0  # the logits are not trivially small
    assert diff_on_real_tokens(got, want, feed) <= 1e-4


def test_idefics3_logits_match_through_the_command_line(saved, tmp_path):
    model, path = saved
    feed = inputs(seed=1)
    feed["pixel_attention_mask"] = np.ones((2, 6, 32, 32), np.int64)  # the processor's, all ones on whole tiles
    got = convert_and_forward(path, tmp_path, **feed)["logits"]
    assert diff_on_real_tokens(got, reference(model, feed), feed) <= 1e-4


def test_padded_tiles_are_refused(saved):
    _, path = saved
    feed = inputs()
    mask = np.ones((2, 6, 32, 32), np.int64)
    mask[0, 1, 20:] = 0  # a real tile with padding rows
    config, params = to_system_config(str(path))
    with pytest.raises(UserError, match="pixel_attention_mask"):
        models.build(config).forward(params, {**feed, "pixel_attention_mask": mask})


def test_settings_we_do_not_implement_are_refused(saved, tmp_path):
    _, path = saved
    for change, match in [
        (dict(scale_factor=3), "scale_factor"),
        (dict(text_config={"model_type": "mistral"}), "mistral"),
    ]:
        work = tmp_path / str(change["scale_factor"] if "scale_factor" in change else "text")
        work.mkdir()
        for f in path.iterdir():
            (work / f.name).symlink_to(f)
        (work / "config.json").unlink()
        json.dump({**json.load(open(path / "config.json")), **change}, open(work / "config.json", "w"))
        with pytest.raises(UserError, match=match):
            to_system_config(str(work))


def test_pixel_shuffle_equals_idefics3_connectors():
    import jax.numpy as jnp

    from vlm_jax.connectors.token_merge import pixel_shuffle

    x = np.random.default_rng(0).normal(size=(2, 36, 5)).astype(np.float32)  # a 6 x 6 grid of 5 channels
    connector = types.SimpleNamespace()  # `pixel_shuffle` reads nothing of its module
    want = transformers.models.idefics3.modeling_idefics3.Idefics3Connector.pixel_shuffle(
        connector, torch.from_numpy(x), 2
    ).numpy()
    got = np.asarray(pixel_shuffle(jnp.asarray(x).reshape(2, 6, 6, 5), 2, "v2")).reshape(2, 9, 20)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows, cols", [(0, 0), (1, 1), (2, 3), (4, 1), (4, 4)])
def test_prompt_layout_equals_the_processors(rows, cols):
    """`templates.idefics3_image_text` with each `<image>` expanded to a tile's placeholders is the string
    transformers' `Idefics3Processor.replace_image_token` writes for an image split into rows x cols."""
    processor = types.SimpleNamespace(
        fake_image_token="<fake_token_around_image>", image_token="<image>", global_image_tag="<global-img>",
        image_seq_len=169,
    )  # fmt: skip
    want = transformers.Idefics3Processor.replace_image_token(processor, {"rows": [[rows]], "cols": [[cols]]}, 0)
    got = templates.idefics3_image_text(rows, cols).replace("<image>", "<image>" * 169)
    assert got == want


def sample_photos():
    from sklearn.datasets import load_sample_images

    return load_sample_images().images  # china.jpg and flower.jpg, 427 x 640 photographs


# Awkward sizes cut from the photos: wide and tall strips, a prime-sided square, sizes just off a tile, tiny ones;
# at Idefics3's sizes (364 px tiles, longest edge 1456) and the tiny config's (32 px tiles, longest edge 64).
@pytest.mark.parametrize("tile, longest", [(364, 4 * 364), (32, 64)])
def test_tiles_of_real_photos_match_transformers_image_processor(tile, longest):
    from PIL import Image
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from data_pipelines import image_ops

    processor = Idefics3ImageProcessorPil(
        size={"longest_edge": longest}, max_image_size={"longest_edge": tile}, do_rescale=False, do_normalize=False
    )
    grids = set()
    for h, w in [(427, 640), (97, 640), (427, 61), (211, 211), (449, 447), (13, 601), (30, 20)]:
        for photo in sample_photos():
            image = np.asarray(Image.fromarray(photo).resize((w, h), Image.BICUBIC)) if h > 427 else photo[:h, :w]
            ours = image_ops.idefics3_tiles(image, tile, longest)
            theirs = processor(images=[[image]], return_row_col_info=True, return_tensors=None)
            pixels = np.asarray(theirs["pixel_values"])[0]
            grid = (theirs["rows"][0][0], theirs["cols"][0][0])
            assert image_ops.idefics3_grid(h, w, tile, longest) == grid
            assert len(ours) == len(pixels) == grid[0] * grid[1] + 1
            for a, b in zip(ours, pixels):
                np.testing.assert_array_equal(a, np.moveaxis(b, 0, -1).astype(np.uint8))
            grids.add(grid)
    assert len(grids) >= 3  # wide, tall and square grids were all exercised
