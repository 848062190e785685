"""Qwen2-VL / Qwen2.5-VL through the system contract: paper sizes, packed rows of native-resolution images kept
apart, and the native-resolution preprocessing of real photos against transformers' image processor."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, train_briefly
from data_pipelines import image_ops
from data_pipelines import native_resolution as nr
from vlm_jax import cli, models
from vlm_jax.config_lib import load_config


def param_count(variant):
    system = models.build(load_config(os.path.join(REPO, f"configs/qwen2_vl.py:variant={variant}")))
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


# Published totals: the hub's safetensors counts of Qwen/Qwen2-VL-2B-Instruct (2.21B), -7B-Instruct (8.29B; "8.3B"
# in arXiv:2409.12191) and -72B-Instruct (73.4B), and of Qwen/Qwen2.5-VL-3B-Instruct (3.75B), -7B-Instruct (8.29B)
# and -72B-Instruct (73.4B) (Qwen2.5-VL: arXiv:2502.13923).
@pytest.mark.parametrize(
    "variant, published",
    [
        ("2b", 2.21e9),
        ("7b", 8.29e9),
        ("72b", 73.4e9),
        ("2.5-3b", 3.75e9),
        ("2.5-7b", 8.29e9),
        ("2.5-72b", 73.4e9),
    ],
)
def test_paper_size_parameter_counts(variant, published):
    assert abs(param_count(variant) / published - 1) < 0.02


def test_the_vision_transformer_is_675m():
    """arXiv:2409.12191 sec. 2.1: "a Vision Transformer (ViT) with approximately 675 million parameters": the
    checkpoint's whole `visual` module of the 7B, the ViT (631M) with the merger into the 3584-wide LM (45M)."""
    system = models.build(load_config(os.path.join(REPO, "configs/qwen2_vl.py:variant=7b")))
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    visual = sum(int(np.prod(x.shape)) for part in ("vision", "merger") for x in jax.tree.leaves(shapes[part]))
    assert abs(visual / 675e6 - 1) < 0.02


@pytest.fixture(scope="module", params=["tiny", "tiny-2.5"])
def tiny(request):
    system = models.build(load_config(os.path.join(REPO, f"configs/qwen2_vl.py:variant={request.param}")))
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), system.dummy_batch(1)))
    return system, params


def example(rng, image_id, grid, text_len):
    """(tokens, grid, patches) of one example: bos, an image's merged tokens, text."""
    tokens = [1, 7, *[image_id] * nr.merged_tokens(grid), 8, *rng.integers(10, 250, size=text_len)]
    return np.asarray(tokens, np.int32), grid, rng.normal(size=(grid[1] * grid[2], 1176)).astype(np.float32)


def packed(examples, image_id, length, max_patches=256):
    """A one-row batch of `examples` in order: segments 1, 2, ..., each example's patches after the last's."""
    batch = {
        "tokens": np.zeros((1, length), np.int32),
        "segment_ids": np.zeros((1, length), np.int32),
        "positions": np.zeros((1, 3, length), np.int32),
        "patches": np.zeros((1, max_patches, 1176), np.float32),
        "patch_positions": np.zeros((1, max_patches, 2), np.int32),
        "patch_groups": np.zeros((1, max_patches), np.int32),
        "patch_segment_ids": np.zeros((1, max_patches), np.int32),
    }
    start = at = 0
    for s, (tokens, grid, patches) in enumerate(examples, 1):
        span, n = slice(start, start + len(tokens)), len(patches)
        batch["tokens"][0, span], batch["segment_ids"][0, span] = tokens, s
        batch["positions"][0, :, span] = nr.mrope_positions(tokens, [grid], image_id)
        batch["patches"][0, at : at + n], batch["patch_positions"][0, at : at + n] = patches, nr.patch_positions(grid)
        batch["patch_groups"][0, at : at + n], batch["patch_segment_ids"][0, at : at + n] = s, s
        start, at = start + len(tokens), at + n
    return batch


def test_a_packed_row_equals_its_examples_run_alone(tiny):
    system, params = tiny
    rng, image_id = np.random.default_rng(0), system.module.image_token_id
    a, b = example(rng, image_id, (1, 8, 4), 9), example(rng, image_id, (1, 4, 8), 12)  # 8 merged tokens each
    length = len(a[0]) + len(b[0]) + 3
    logits = jax.jit(system.logits)
    both = np.asarray(logits(params, packed([a, b], image_id, length)))[0]
    alone_a = np.asarray(logits(params, packed([a], image_id, length)))[0]
    alone_b = np.asarray(logits(params, packed([b], image_id, length)))[0]
    na, nb = len(a[0]), len(b[0])
    np.testing.assert_allclose(both[:na], alone_a[:na], atol=1e-5, rtol=0)
    np.testing.assert_allclose(both[na : na + nb], alone_b[:nb], atol=1e-5, rtol=0)
    # Another image for b: nothing of a moves (its patches attend only among themselves), b's text does.
    b2 = (b[0], b[1], rng.normal(size=b[2].shape).astype(np.float32))
    changed = np.asarray(logits(params, packed([a, b2], image_id, length)))[0]
    np.testing.assert_array_equal(changed[:na], both[:na])
    assert np.abs(changed[na : na + nb] - both[na : na + nb]).max() > 1e-3


def sample_photos():
    from sklearn.datasets import load_sample_images

    return load_sample_images().images  # china.jpg and flower.jpg, 427 x 640 photographs


# Awkward sizes cut from the photos (and one resized up past max_pixels).
@pytest.mark.parametrize("crop", [(427, 640), (97, 640), (427, 61), (211, 211), (13, 601), (1500, 2000)])
def test_preprocessing_of_real_photos_matches_transformers_processor(crop):
    pytest.importorskip("transformers", reason="the reference is transformers' processor: pip install -e '.[interop]'")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil()
    h, w = crop
    for photo in sample_photos():
        image = np.asarray(Image.fromarray(photo).resize((w, h), Image.BICUBIC)) if h > 427 else photo[:h, :w]
        want = processor(image, return_tensors="np")
        resized = nr.resize(image)
        patches, grid = nr.patchify(image_ops.normalize(resized, "clip"))
        assert grid == tuple(want["image_grid_thw"][0])
        assert grid[1] * grid[2] * 14 * 14 <= nr.MAX_PIXELS and resized.shape[0] % 28 == resized.shape[1] % 28 == 0
        np.testing.assert_allclose(patches, want["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("grid", [(1, 4, 6), (1, 10, 2), (2, 4, 4)])
def test_patch_positions_equal_transformers(grid):
    torch = pytest.importorskip("torch", reason="the reference takes a PyTorch tensor: pip install -e '.[interop]'")
    pytest.importorskip("transformers", reason="the reference is transformers' function: pip install -e '.[interop]'")
    from transformers.vision_utils import get_vision_position_ids

    want = get_vision_position_ids(torch.tensor([grid]), 2).numpy()
    np.testing.assert_array_equal(nr.patch_positions(grid), want)


def test_cached_generation_equals_the_full_forward(tiny):
    """Two prompts with images of different native sizes, left-padded into one batch, decode with the KV cache
    and M-RoPE positions continuing past each prompt's largest exactly as re-running the whole sequence does
    (its positions computed afresh for every length)."""
    import ml_collections

    from vlm_jax import generate

    system, params = tiny
    image_id = system.module.image_token_id

    class Pieces:  # the one piece `batch_of` looks up: the template's placeholder
        def token_id(self, piece):
            assert piece == "<|image_pad|>"
            return image_id

    settings = ml_collections.ConfigDict(dict(mode="native", min_pixels=0, max_pixels=1 << 30, normalization="clip"))
    fmt = generate.PromptFormat(Pieces(), "qwen2_vl", 0, 0, settings)
    rng = np.random.default_rng(3)
    prompts = []
    for grid, text in (((1, 4, 8), 5), ((1, 6, 2), 2)):
        tokens, grid, patches = example(rng, image_id, grid, text)
        prompts.append({"tokens": tokens.tolist(), "images": [(patches, grid)], "encoded": [], "feature_index": None})
    steps = 4
    out = generate.generate(system, params, generate.batch_of(prompts, fmt), generate.Sampling(max_new_tokens=steps))
    logits = jax.jit(system.logits)
    for row, prompt in enumerate(prompts):
        seq, grid = list(prompt["tokens"]), prompt["images"][0][1]
        length = len(seq) + steps
        for _ in range(steps):
            n = len(seq)
            batch = packed([(np.asarray(seq + [0] * (length - n)), grid, prompt["images"][0][0])], image_id, length)
            batch["segment_ids"][0, n:] = 0
            seq.append(int(np.argmax(np.asarray(logits(params, batch))[0, n - 1])))
        assert out[row].tolist() == seq[-steps:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny Qwen2-VL trained for a few steps on a small built-in dataset through `vlm-jax train`."""
    return train_briefly(tmp_path_factory, "qwen2_vl.py:data=builtin,scale=0.02")


def test_tiny_qwen2_vl_trains_on_packed_native_rows_evaluates_and_answers(trained, tmp_path, capsys, monkeypatch):
    from data_pipelines.pipeline import GrainPipeline
    from vlm_jax import prerequisites

    workdir, status, cache, config = trained
    assert status == 0
    monkeypatch.setenv("VLM_JAX_CACHE", cache)
    # The pipeline's rows: two budgets (192 tokens, 256 patches), several examples per row, each example's
    # placeholders exactly its patches' merged tokens, M-RoPE positions restarting in every example.
    resolved = prerequisites.resolve(load_config(config))
    row = next(iter(GrainPipeline(resolved, "train").rows))
    segments, patch_segments = row["segment_ids"], row["patch_segment_ids"]
    assert row["positions"].shape == (3, 192) and row["patches"].shape == (256, 1176) and segments.max() >= 2
    for s in range(1, int(segments.max()) + 1):
        mine = segments == s
        assert (row["tokens"][mine] == resolved.model.image_token_id).sum() == (patch_segments == s).sum() // 4
        assert row["positions"][:, mine][:, 0].tolist() == [0, 0, 0]
    capsys.readouterr()
    assert cli.main(["eval", "--config", config, "--workdir", workdir, "--config.eval_examples=8"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["step"] == 4 and {"vqa_accuracy", "cider"} <= set(scores)
    image = tmp_path / "wide.png"  # 200 x 60: resized to 196 x 56, 14 x 4 patches, 14 LM tokens
    Image.new("RGB", (200, 60), (220, 20, 20)).save(image)
    argv = ["generate", "--checkpoint", workdir, "--image", str(image), "--prompt", "What colour is the shape?"]
    out = tmp_path / "out.jsonl"
    assert cli.main(argv + ["--max_new_tokens", "6", "--out", str(out)]) == 0
    assert 1 <= len(json.loads(out.read_text())["tokens"]) <= 6


def test_native_rows_hold_images_and_videos_of_their_own_sizes(spm_model_path, spm_tokenizer):
    """Through the Grain pipeline: a wide image and a 6-frame video (3 frame pairs) per record, at native
    resolution: each example's placeholders are its merged tokens, a video's frame pairs are separate attention
    groups with temporal positions stepping by 1, and rows never split an example."""
    import io

    from ml_collections import ConfigDict

    from data_pipelines.pipeline import GrainPipeline

    def png(value, size):
        buffer = io.BytesIO()
        Image.new("RGB", size, (value, 255 - value, 7)).save(buffer, format="PNG")
        return buffer.getvalue()

    video = [png(20 * f, (60, 60)) for f in range(6)]
    records = [
        {"images": [png(10 * i, (120, 50)), video], "caption": f"number {i} and a short video"} for i in range(6)
    ]
    config = load_config(os.path.join(REPO, "configs/qwen2_vl.py:variant=tiny"))
    config.batch_size = 2
    config.data = ConfigDict(
        dict(
            config.data.to_dict(),
            source="memory",
            format="pairs",
            records={"train": records, "validation": records},
            tokenizer=spm_model_path,
            seq_len=256,  # an example is ~125 tokens (chat, 8 + 12 placeholders)
            max_patches=160,  # two examples of 32 + 48 patches
            image=dict(config.data.image.to_dict(), video_frames=6, video_min_pixels=56 * 56, video_max_pixels=56 * 56),
        )
    )
    row = next(iter(GrainPipeline(config, "train").rows))
    pad = spm_tokenizer.token_id("<|image_pad|>")
    image_grid, video_grid = (1, 4, 8), (3, 4, 4)  # 120 x 50 -> 112 x 56; frames 60 x 60 -> 56 x 56
    per_example = nr.merged_tokens(image_grid) + nr.merged_tokens(video_grid)
    segments, patch_segments, groups = row["segment_ids"], row["patch_segment_ids"], row["patch_groups"]
    assert segments.max() >= 2
    for s in range(1, int(segments.max()) + 1):
        mine = segments == s
        assert (row["tokens"][mine] == pad).sum() == per_example
        assert (patch_segments == s).sum() == 32 + 48
        assert len(np.unique(groups[patch_segments == s])) == 1 + 3  # the image, then one group per frame pair
        video_tokens = np.flatnonzero(mine & (row["tokens"] == pad))[nr.merged_tokens(image_grid) :]
        temporal = row["positions"][0, video_tokens]
        assert sorted(set(np.diff(np.unique(temporal)).tolist())) == [1]  # frame pairs step the temporal axis by 1
