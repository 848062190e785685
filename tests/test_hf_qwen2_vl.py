"""Qwen2-VL and Qwen2.5-VL (transformers' `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`)
-> `vlm-jax convert-hf` -> the `qwen2_vl` system: logits equal transformers', M-RoPE positions included.

Tiny random-weight references (no download), saved with `save_pretrained`, every weight perturbed: a 3-block
vision tower of width 32 (Qwen2.5-VL: 56 px windows, full attention in block 1 only, RMSNorm, gated MLP), the
merger, a 2-layer Qwen2 LM with M-RoPE sections (2, 3, 3). Two rows: row 0 with images of 4 x 6 and 2 x 2
patches, row 1 (left-padded) with one of 8 x 4, each image `<|vision_start|>` + one `<|image_pad|>` per merged
token + `<|vision_end|>` as the processor writes it; `pixel_values` [patches, 1176] in batch order with
`image_grid_thw` and `mm_token_type_ids`, as transformers takes them. transformers computes the M-RoPE positions
itself (`get_rope_index`); the converted model computes its own from the same inputs.
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


IMAGE, VIDEO, START, END = 5, 6, 7, 8
GRIDS = [(1, 4, 6), (1, 2, 2), (1, 8, 4)]
TEXT = dict(
    vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=96, max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
)  # fmt: skip
IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def qwen2_vl(seed):
    vision = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    config = transformers.Qwen2VLConfig(vision_config=vision, text_config=TEXT, **IDS)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return perturb(transformers.Qwen2VLForConditionalGeneration(config), seed)


def qwen25_vl(seed):
    vision = dict(
        depth=3, hidden_size=32, out_hidden_size=64, num_heads=2, intermediate_size=48, window_size=56,
        fullatt_block_indexes=[1],
    )  # fmt: skip
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=TEXT, **IDS)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return perturb(transformers.Qwen2_5_VLForConditionalGeneration(config), seed)


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    words = lambda n: rng.integers(10, 100, n).tolist()  # noqa: E731
    image = lambda g: [START] + [IMAGE] * (g[0] * g[1] * g[2] // 4) + [END]  # noqa: E731
    full = [1, *words(3), *image(GRIDS[0]), *words(2), *image(GRIDS[1]), *words(4)]
    short = [1, *words(2), *image(GRIDS[2]), *words(3)]
    pad = len(full) - len(short)
    ids = np.array([full, [0] * pad + short], np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.array([[1] * len(full), [0] * pad + [1] * len(short)], np.int64),
        "pixel_values": rng.normal(size=(sum(t * h * w for t, h, w in GRIDS), 1176)).astype(np.float32),
        "image_grid_thw": np.array(GRIDS, np.int64),
        "mm_token_type_ids": (ids == IMAGE).astype(np.int64),
    }


def reference(model, feed):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}, use_cache=False).logits.numpy()


def diff_on_real_tokens(got, want, feed):
    real = feed["attention_mask"].astype(bool)
    assert got.shape == want.shape
    return float(np.max(np.abs(got[real] - want[real])))


@pytest.mark.parametrize("make", [qwen2_vl, qwen25_vl], ids=["qwen2-vl", "qwen2.5-vl"])
def test_logits_match(tmp_path, make):
    model = make(3)
    model.save_pretrained(str(tmp_path / "hf"))
    feed = inputs()
    want = reference(model, feed)
    config, params = to_system_config(str(tmp_path / "hf"))
    system = models.build(config)
    assert tuple(config.model.lm.mrope_sections) == (2, 3, 3)
    assert np.abs(want).max() > 1.0  # the logits are not trivially small
    assert diff_on_real_tokens(system.forward(params, feed)["logits"], want, feed) <= 1e-4
    if make is qwen25_vl:  # the windows matter: attending over whole images gives other logits
        config.model.vision.window_merge = 0
        wrong = models.build(config).forward(params, feed)["logits"]
        assert diff_on_real_tokens(wrong, want, feed) > 1e-3


def test_logits_match_through_the_command_line(tmp_path):
    model = qwen2_vl(4)
    model.save_pretrained(str(tmp_path / "hf"))
    feed = inputs(seed=1)
    got = convert_and_forward(tmp_path / "hf", tmp_path, **feed)["logits"]
    assert diff_on_real_tokens(got, reference(model, feed), feed) <= 1e-4


def test_rope_positions_equal_transformers_get_rope_index():
    from data_pipelines import native_resolution as nr

    model, feed = qwen2_vl(5), inputs(seed=2)
    want, _ = model.model.get_rope_index(
        torch.from_numpy(feed["input_ids"]),
        torch.from_numpy(feed["mm_token_type_ids"]),
        image_grid_thw=torch.from_numpy(feed["image_grid_thw"]),
        attention_mask=torch.from_numpy(feed["attention_mask"]),
    )
    for row, grids in ((0, GRIDS[:2]), (1, GRIDS[2:])):
        real = feed["attention_mask"][row].astype(bool)
        got = nr.mrope_positions(feed["input_ids"][row][real], grids, IMAGE)
        np.testing.assert_array_equal(got, want[:, row, real].numpy())


def video_inputs(seed=0):
    """Row 0: an image (4 x 6 patches) then a video of 2 frame pairs (4 x 4); row 1 (left-padded): a video of 3
    frame pairs (2 x 4). Videos are `<|vision_start|>` + `<|video_pad|>` per merged token + `<|vision_end|>`."""
    rng = np.random.default_rng(seed)
    words = lambda n: rng.integers(10, 100, n).tolist()  # noqa: E731
    span = lambda pad, g: [START] + [pad] * (g[0] * g[1] * g[2] // 4) + [END]  # noqa: E731
    image, videos = (1, 4, 6), [(2, 4, 4), (3, 2, 4)]
    full = [1, *words(2), *span(IMAGE, image), *words(2), *span(VIDEO, videos[0]), *words(3)]
    short = [1, *words(2), *span(VIDEO, videos[1]), *words(2)]
    pad = len(full) - len(short)
    ids = np.array([full, [0] * pad + short], np.int64)
    patches = lambda grids: rng.normal(size=(sum(t * h * w for t, h, w in grids), 1176)).astype(np.float32)  # noqa: E731
    return {
        "input_ids": ids,
        "attention_mask": np.array([[1] * len(full), [0] * pad + [1] * len(short)], np.int64),
        "pixel_values": patches([image]),
        "image_grid_thw": np.array([image], np.int64),
        "pixel_values_videos": patches(videos),
        "video_grid_thw": np.array(videos, np.int64),
        "mm_token_type_ids": (ids == IMAGE).astype(np.int64) + 2 * (ids == VIDEO),
    }


@pytest.mark.parametrize("make", [qwen2_vl, qwen25_vl], ids=["qwen2-vl", "qwen2.5-vl"])
def test_video_logits_match(tmp_path, make):
    """Videos: each frame pair one temporal patch attending within itself, temporal M-RoPE positions stepping
    by 1 (Qwen2-VL) or by seconds per frame pair x tokens_per_second (Qwen2.5-VL, here 0.5 s and 1.5 s)."""
    model = make(6)
    model.save_pretrained(str(tmp_path / "hf"))
    feed = video_inputs()
    if make is qwen25_vl:
        feed["second_per_grid_ts"] = np.array([0.5, 1.5], np.float32)
    want = reference(model, feed)
    config, params = to_system_config(str(tmp_path / "hf"))
    assert config.model.video_token_id == VIDEO
    got = models.build(config).forward(params, feed)["logits"]
    assert diff_on_real_tokens(got, want, feed) <= 1e-4


def test_video_patches_equal_transformers_video_processor_layout():
    """`Qwen2VLVideoProcessor.patchify`'s view / permute, transcribed in torch (its module needs torchvision,
    which is not installed): frames padded to pairs by repeating the last, then (t, h/2, w/2, 2, 2, channel,
    frame, row, column)."""
    from data_pipelines import native_resolution as nr

    frames = np.random.default_rng(0).normal(size=(5, 56, 84, 3)).astype(np.float32)  # odd: the last repeats
    got, grid = nr.patchify(frames)
    videos = torch.from_numpy(np.moveaxis(frames, -1, 1)[None].copy())
    videos = torch.cat((videos, videos[:, -1:]), dim=1)  # 5 -> 6 frames
    want = videos.view(1, 3, 2, 3, 2, 2, 14, 3, 2, 14).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(1, 72, 1176)
    assert grid == (3, 4, 6)
    np.testing.assert_array_equal(got, want[0].numpy())
