"""Idefics3 through the in-sequence system contract: the 8B size, tiles of packed examples kept apart, the
template's tile layout and grids, and the tiny model trained on split images, evaluated and answering."""

import io
import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, packed_slots, train_briefly
from data_pipelines import image_ops, templates
from data_pipelines.pipeline import GrainPipeline
from vlm_jax import cli, models
from vlm_jax.config_lib import load_config
from vlm_jax.errors import ConfigError


def test_8b_parameter_count_matches_the_published_total():
    """HuggingFaceM4/Idefics3-8B-Llama3: 8.46B parameters (the hub's safetensors count on its model page)."""
    config = load_config(os.path.join(REPO, "configs/idefics3.py:variant=8b"))
    system = models.build(config)
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert abs(count / 8.46e9 - 1) < 0.02
    assert system.image_tokens == 169  # 26 x 26 SigLIP patches of a 364 px tile, pixel-shuffled by 2
    assert config.data.max_images == 17  # a 4 x 4 grid and the global image


@pytest.mark.parametrize(
    "change, match",
    [
        ({"template_options": {"tile_tokens": 64, "tiles_per_side": 2}}, "tile_tokens"),
        ({"template_options": {"tile_tokens": 16, "tiles_per_side": 3}}, "longest_edge"),
        ({"image": {"mode": "idefics3", "size": 64, "longest_edge": 128}}, "tile size"),
    ],
)
def test_data_settings_that_disagree_with_the_model_are_refused(change, match):
    config = load_config(os.path.join(REPO, "configs/idefics3.py:variant=tiny"))
    for key, value in change.items():  # replaced whole: an update would move the shared FieldReferences too
        setattr(config.data, key, value)
    with pytest.raises(ConfigError, match=match):
        models.build(config)


@pytest.fixture(scope="module")
def tiny():
    config = load_config(os.path.join(REPO, "configs/idefics3.py:variant=tiny"))
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
        """bos, then per tile `<fake>` + 2 text ids (a `<row_r_col_c>` stand-in) + its placeholders, then text."""
        tokens = [1]
        for _ in range(tiles):
            tokens += [7, *rng.integers(10, 250, 2), *[image_id] * system.image_tokens]
        tokens += rng.integers(10, 250, size=text_len).tolist()
        return np.asarray(tokens, np.int32), rng.normal(size=(tiles, 32, 32, 3)).astype(np.float32)

    a, b = example(2, 9), example(1, 12)  # two tiles (a split image's tile and its global image) and one
    length = len(a[0]) + len(b[0]) + 3
    logits = jax.jit(system.logits)
    both = np.asarray(logits(params, packed([a, b], length)))[0]
    alone_a = np.asarray(logits(params, packed([a], length)))[0]
    alone_b = np.asarray(logits(params, packed([b], length)))[0]
    na, nb = len(a[0]), len(b[0])
    np.testing.assert_allclose(both[:na], alone_a[:na], atol=1e-5, rtol=0)
    np.testing.assert_allclose(both[na : na + nb], alone_b[:nb], atol=1e-5, rtol=0)
    # Another image for example b: nothing of example a moves, b's text does.
    b2 = (b[0], rng.normal(size=(1, 32, 32, 3)).astype(np.float32))
    changed = np.asarray(logits(params, packed([a, b2], length)))[0]
    np.testing.assert_array_equal(changed[:na], both[:na])
    assert np.abs(changed[na : na + nb] - both[na : na + nb]).max() > 1e-3
    # Each of a's tiles reaches its own placeholders: changing a's second tile leaves everything before it.
    a2 = (a[0], np.stack([a[1][0], rng.normal(size=(32, 32, 3)).astype(np.float32)]))
    moved = np.asarray(logits(params, packed([a2, b], length)))[0]
    second = 1 + 3 + system.image_tokens + 3  # bos, tile 1 with its 3 leading ids, tile 2's 3 leading ids
    np.testing.assert_array_equal(moved[:second], both[:second])
    assert np.abs(moved[second:na] - both[second:na]).max() > 1e-3


def test_template_writes_each_images_grid_and_refuses_ambiguous_counts(spm_tokenizer):
    """Placeholders per tile at the right places, "<row_r_col_c>" text between tiles, targets only on the
    answer and its end of utterance (eos); counts alone are refused unless the grid is certain."""
    record = {"images": [b"", b""], "question": "What is it?", "answer": "a cat"}
    out = templates.render(
        "idefics3", spm_tokenizer, record, [16 * 7, 16], tile_tokens=16, grids=[(2, 3), (0, 0)]
    )  # fmt: skip
    image = spm_tokenizer.token_id("<image>")
    fake, glob = spm_tokenizer.token_id("<fake_token_around_image>"), spm_tokenizer.token_id("<global-img>")
    ids = out.ids.tolist()
    assert ids.count(image) == 16 * 8 and out.num_images == 2
    assert ids.count(fake) == 6 + 2 + 2 and ids.count(glob) == 2
    text = spm_tokenizer.decode([i for i in ids if i != image])
    assert text.index("<row_1_col_1>") < text.index("<row_1_col_3>") < text.index("<row_2_col_1>")
    assert "<row_3_col_1>" not in text and "User:<fake_token_around_image><row_1_col_1>" in text
    assert "<global-img><fake_token_around_image>What is it?</s>\nAssistant: a cat</s>" in text  # eos for the EOU
    assert spm_tokenizer.decode(out.ids[out.predict].tolist()).strip().startswith("a cat")
    assert out.ids[out.predict][-1] == spm_tokenizer.eos_id
    # From counts alone: an unsplit image and the square grid are certain, a 1 x 2 or 2 x 1 grid is not.
    assert templates.idefics3_grids([16, 16 * 5], 16, 2) == [(0, 0), (2, 2)]
    with pytest.raises(templates.RenderError, match="grid"):
        templates.idefics3_grids([16 * 3], 16, 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny Idefics3 trained for a few steps on a small built-in dataset through `vlm-jax train`."""
    return train_briefly(tmp_path_factory, "idefics3.py:data=builtin,scale=0.02")


def test_tiny_idefics3_trains_on_split_images_evaluates_and_answers(trained, tmp_path, capsys, monkeypatch):
    workdir, status, cache, config = trained
    assert status == 0
    metrics = open(os.path.join(workdir, "report", "index.html")).read()
    assert "vqa_accuracy" in metrics and "cider" in metrics
    monkeypatch.setenv("VLM_JAX_CACHE", cache)
    capsys.readouterr()
    assert cli.main(["eval", "--config", config, "--workdir", workdir, "--config.eval_examples=8"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["step"] == 4 and {"vqa_accuracy", "cider"} <= set(scores)
    image = tmp_path / "square.png"  # 48 x 48: longest side to 64, a 2 x 2 grid of 32 px tiles and the global image
    Image.new("RGB", (48, 48), (220, 20, 20)).save(image)
    capsys.readouterr()
    argv = ["generate", "--checkpoint", workdir, "--image", str(image), "--prompt", "What colour is the shape?"]
    out = tmp_path / "out.jsonl"
    assert cli.main(argv + ["--max_new_tokens", "6", "--out", str(out)]) == 0
    line = json.loads(out.read_text())
    assert 1 <= len(line["tokens"]) <= 6 and "<image>" not in line["text"]
    # A wide image: a 1 x 2 grid, which its placeholder count alone would not tell from other grids; the prompt
    # gets the grid from the image (generate.PromptFormat), so it is rendered, not refused.
    wide = tmp_path / "wide.png"  # 96 x 24: longest side 64 -> 64 x 16 -> 64 x 32, one row of two tiles
    Image.new("RGB", (96, 24), (20, 20, 220)).save(wide)
    argv[4] = str(wide)
    assert cli.main(argv + ["--max_new_tokens", "3", "--out", str(out)]) == 0
    assert 1 <= len(json.loads(out.read_text())["tokens"]) <= 3


def test_pipeline_splits_each_image_and_writes_its_own_grid(spm_model_path):
    """Pairs records of wide, tall, square and tiny images through the Grain pipeline: each example's media slots
    are its image's tiles and global image (`image_ops.idefics3_grid` of its size, the grid transformers'
    processor gives: tests/test_hf_idefics3.py), its text holds exactly that grid's `<row_r_col_c>` tags in
    order, and 16 placeholders per slot."""
    sizes = {"wide": (20, 60), "tall": (60, 20), "square": (40, 40), "tiny": (10, 10)}
    rng = np.random.default_rng(0)
    records = []
    for name, (h, w) in sizes.items():
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
        records.append({"images": [buffer.getvalue()], "caption": f"a {name} picture"})
    config = load_config(os.path.join(REPO, "configs/idefics3.py:variant=tiny"))
    config.data.update(
        source="memory", format="pairs", records={"train": records, "validation": records}, tokenizer=spm_model_path
    )
    config.data.update(seq_len=256, max_images=5, shuffle=False)
    config.batch_size = 4
    pipe = GrainPipeline(config, "validation")
    tok = pipe.tokenizer
    batch = next(pipe)
    image = tok.token_id("<image>")
    seen = set()
    for row, segment in {(r, int(batch["segment_ids"][r, i])) for r, i in zip(*np.nonzero(batch["segment_ids"]))}:
        mine = batch["segment_ids"][row] == segment
        ids = batch["tokens"][row][mine]
        slots = int(np.count_nonzero(batch["image_segment_ids"][row] == segment))
        text = tok.decode([int(i) for i in ids if i != image])
        name = re.search(r"a (\w+) picture", text).group(1)
        rows, cols = image_ops.idefics3_grid(*sizes[name], 32, 64)
        assert slots == rows * cols + 1 and np.count_nonzero(ids == image) == 16 * slots
        tags = re.findall(r"<row_(\d)_col_(\d)>", text)
        assert tags == [(str(r), str(c)) for r in range(1, rows + 1) for c in range(1, cols + 1)]
        seen.add((rows, cols))
    assert seen == {(1, 2), (2, 1), (2, 2)}
