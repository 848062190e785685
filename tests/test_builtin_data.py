"""The built-in dataset: deterministic, held-out splits, answers true to the pixels, readable by the pipeline."""

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_lm
from data_pipelines.builtin import build, scenes, tasks
from data_pipelines.pipeline import GrainPipeline
from data_pipelines.sources import ArrayRecordSource, encode_record
from vlm_jax import cli
from vlm_jax.config_lib import ConfigDict

SIZES = {task: {"train": 24, "validation": 8, "test": 8} for task in tasks.TASKS}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("builtin"))
    return out, build.build(out, sizes=SIZES, workers=1)


def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def object_mask(image, scene, colour):
    """Pixels of exactly the scene's shade of `colour` (none if no object has it), outside the text's box
    (anti-aliased text may hit any colour)."""
    shades = [o["rgb"] for o in scene["objects"] if o["colour"] == colour]
    if not shades:
        return np.zeros(image.shape[:2], bool)
    mask = np.all(image == shades[0], axis=-1)
    if scene["text_box"] is not None:
        x0, y0, x1, y1 = scene["text_box"]
        mask[y0:y1, x0:x1] = False
    return mask


def mask_box(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def shape_from_pixels(mask, box):
    """Classifies a drawn shape from its mask inside its box (square, circle, triangle, diamond, cross)."""
    x0, y0, x1, y1 = box
    inside = mask[y0:y1, x0:x1]
    fill = inside.mean()
    if fill > 0.95:
        return "square"
    if fill > 0.7:
        return "circle"
    if inside[-1].mean() > 0.8:
        return "triangle"
    return "cross" if inside[0].mean() > 0.25 else "diamond"  # a bar's end, or a diamond's tip


def all_records(out, task, split):
    source = ArrayRecordSource(os.path.join(out, task, split))
    return [source[i] for i in range(len(source))]


def record_scenes(record):
    return record["scenes"] if "scenes" in record else [record["scene"]]


def test_records_and_builds_are_deterministic(built, tmp_path):
    for task in tasks.TASKS:
        a, b = tasks.make_record(task, "validation", 3), tasks.make_record(task, "validation", 3)
        assert encode_record(a) == encode_record(b)
        assert encode_record(a) != encode_record(tasks.make_record(task, "validation", 3, seed=1))
    out, _ = built
    again = str(tmp_path / "again")
    sizes = {"captions": {"train": 24}, "fewshot": {"validation": 8}}
    build.build(again, sizes=sizes, workers=2)  # in parallel processes: the same bytes
    for task, split in (("captions", "train"), ("fewshot", "validation")):
        name = "data-00000.array_record"
        assert (
            open(os.path.join(out, task, split, name), "rb").read()
            == open(os.path.join(again, task, split, name), "rb").read()
        )


def test_shades_keep_their_colour_names():
    # Every object is painted in its own shade, which is nearest to its named palette colour; the background
    # is a shade of its named background; the pixels are those shades.
    rng = np.random.default_rng(0)
    shades = {name: [scenes.shade(rng, rgb) for _ in range(200)] for name, rgb in scenes.COLOURS.items()}
    assert all(len({tuple(s) for s in values}) > 100 for values in shades.values())  # shades vary
    for i in range(100):
        record = tasks.make_record("captions", "train", i)
        scene, image = record["scene"], pixels(record["images"][0])
        assert list(image[0, 0]) == scene["background_rgb"]
        base = np.array(scenes.BACKGROUNDS[scene["background"]])
        assert np.all(np.abs(np.array(scene["background_rgb"]) - base) <= 0.15 * base + scenes.CHANNEL_JITTER + 1)
        for obj in scene["objects"]:
            assert scenes.nearest_colour(obj["rgb"]) == obj["colour"]
            x0, y0, x1, y1 = obj["box"]
            assert list(image[(y0 + y1) // 2, (x0 + x1) // 2]) == obj["rgb"]


def test_held_out_pairs_never_in_train_and_lead_every_evaluation_scene(built):
    out, manifest = built
    assert manifest["held_out"] == [list(p) for p in tasks.HELD_OUT]
    held = set(tasks.HELD_OUT)
    for task in set(tasks.TASKS) - {"recall"}:  # recall episodes are text only
        for record in all_records(out, task, "train"):
            for scene in record_scenes(record):
                assert not {(o["colour"], o["shape"]) for o in scene["objects"]} & held
        for split in ("validation", "test"):
            for record in all_records(out, task, split):
                leading = record_scenes(record)[-1:] if task == "fewshot" else record_scenes(record)
                for scene in leading:
                    first = scene["objects"][0]
                    assert (first["colour"], first["shape"]) in held
    # Every held-out pair is met in evaluation, and the train split still sees every colour and shape.
    seen = {
        (s["objects"][0]["colour"], s["objects"][0]["shape"])
        for i in range(200)
        for s in [tasks.make_record("captions", "test", i)["scene"]]
    }
    assert seen == held
    train = {(o["colour"], o["shape"]) for r in all_records(out, "captions", "train") for o in r["scene"]["objects"]}
    assert {c for c, _ in train} == set(scenes.COLOURS) and {s for _, s in train} == set(scenes.SHAPES)


def test_grounding_boxes_are_the_drawn_objects(built):
    out, _ = built
    records = all_records(out, "grounding", "train") + all_records(out, "grounding", "validation")
    records += [tasks.make_record("grounding", "test", i, image_size=96) for i in range(20)]
    for record in records:
        scene, image = record["scene"], pixels(record["images"][0])
        size = scene["size"]
        target = scene["objects"][0]
        assert record["box"] == target["box"] and record["ref"] == f"the {target['colour']} {target['shape']}"
        mask = object_mask(image, scene, target["colour"])
        assert mask_box(mask) == record["box"]  # the object's pixels touch all four sides of its box, no more
        # The answer is Qwen-VL's [0, 1000) form of the same box, the conversation's last turn.
        ref, *coords = re.fullmatch(
            r"<ref>(.+)</ref><box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>", record["answer"]
        ).groups()
        assert ref == record["ref"] and record["conversations"][-1]["value"] == record["answer"]
        back = [int(c) / 1000 * size for c in coords]
        assert np.allclose(back, record["box"], atol=size / 1000)
        assert record["conversations"][0]["value"] == f"<image>\nWhere is {ref}?"


def test_vqa_answers_are_true_of_the_pixels():
    kinds = set()
    for split in ("train", "test"):
        for i in range(60):
            record = tasks.make_record("vqa", split, i)
            scene, image, answer = record["scene"], pixels(record["images"][0]), record["answer"]
            kind = record["question_type"]
            kinds.add(kind)
            target = scene["objects"][0]
            mask = object_mask(image, scene, target["colour"])
            box = mask_box(mask)
            assert record["conversations"][1]["value"] == answer
            if kind == "colour":
                cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
                assert list(image[cy, cx]) == target["rgb"] and scenes.nearest_colour(image[cy, cx]) == answer
                assert target["shape"] in record["question"]
            elif kind == "shape":
                assert shape_from_pixels(mask, box) == answer
            elif kind == "size":
                assert box[2] - box[0] == round(scene["size"] * scenes.SIZES[answer])
            elif kind == "count":
                outside_text = image.copy()
                if scene["text_box"] is not None:
                    x0, y0, x1, y1 = scene["text_box"]
                    outside_text[y0:y1, x0:x1] = scene["background_rgb"]
                values, counts = np.unique(outside_text.reshape(-1, 3), axis=0, return_counts=True)
                present = [v for v, n in zip(values, counts) if n > 10 and list(v) != scene["background_rgb"]]
                assert tasks.NUMBERS[len(present)] == answer
            elif kind == "relation":
                words = re.fullmatch(
                    r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", record["question"]
                )
                other = mask_box(object_mask(image, scene, words.group(4)))
                (ax, ay), (bx, by) = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in (box, other)]
                holds = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}
                assert answer == ("yes" if holds[words.group(3)] else "no")
                dominant = "horizontal" if abs(ax - bx) >= abs(ay - by) else "vertical"
                assert (words.group(3) in ("left of", "right of")) == (dominant == "horizontal")
            elif kind == "text":
                x0, y0, x1, y1 = scene["text_box"]
                alone = pixels(scenes.render({**scene, "objects": []}))  # the word on the plain background
                assert np.array_equal(image[y0:y1, x0:x1], alone[y0:y1, x0:x1])
                assert (alone != scene["background_rgb"]).any() and answer in scenes.WORDS
    assert kinds == set(tasks.QUESTION_TYPES)


def test_objects_texts_name_the_drawn_object():
    for split in ("train", "validation"):
        for i in range(30):
            record = tasks.make_record("objects", split, i)
            (obj,) = record["scene"]["objects"]
            image = pixels(record["images"][0])
            colour, shape = re.fullmatch(r"a (\w+) (\w+)\.", record["caption"]).groups()
            mask = object_mask(image, record["scene"], colour)
            box = mask_box(mask)
            assert scenes.nearest_colour(image[(box[1] + box[3]) // 2, (box[0] + box[2]) // 2]) == colour
            assert shape_from_pixels(mask, box) == shape
            assert ((colour, shape) in tasks.HELD_OUT) == (split == "validation")


def test_every_word_of_the_dataset_is_one_tokenizer_piece(tmp_path):
    """The tokenizer (build.TOKENIZER_VOCAB pieces) keeps each word of the corpus whole, so copying a word is
    copying one id (the few-shot recall of the main job relies on it). A 3% build has every word (at 512
    pieces 32 of its 86 words are split, "right" and "above" among them); `<ref>`-style tags are special tokens."""
    import sentencepiece as spm

    build.build(str(tmp_path), scale=0.03, workers=1)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    words = set()
    for line in open(tmp_path / build.CORPUS):
        words.update(re.findall(r"(?<![<\w/])[A-Za-z]+", line))
    assert len(words) == 86  # the templates' and scenes' words, the made-up words, numbers: every one counted
    assert sorted(w for w in words if len(sp.encode(w)) != 1) == []


def test_captions_and_chat_describe_the_scene(built):
    out, _ = built
    for record in all_records(out, "captions", "validation"):
        scene = record["scene"]
        caption = record["caption"]
        assert caption.startswith(f"{tasks.NUMBERS[len(scene['objects'])]} shape")
        for obj in scene["objects"]:
            assert f"a {obj['size']} {obj['colour']} {obj['shape']}" in caption
        assert (f"the word {scene['text']} is written." in caption) == (scene["text"] is not None)
    for record in all_records(out, "chat", "train"):
        turns = record["conversations"]
        assert 4 <= len(turns) <= 6 and turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert [t["value"] for t in turns[1::2]] == record["answers"]
    document = all_records(out, "interleaved", "train")[0]
    assert len(document["texts"]) == len(document["images"])
    captions = [t for t, i in zip(document["texts"], document["images"]) if t is not None and i is None][1:-1]
    assert captions == [tasks.caption(s) for s in document["scenes"]]


def test_fewshot_answers_follow_the_episode_mapping_which_varies(built):
    out, _ = built
    mappings = set()
    for split in ("train", "validation", "test"):
        records = all_records(out, "fewshot", split)
        if split != "train":
            assert [r["k"] for r in records] == [0, 1, 2, 4] * 2
        for record in records:
            colours = [s["objects"][0]["colour"] for s in record["scenes"]]
            sentences = [re.fullmatch(r"This is a (\w+) (\w+)\.", t) for t in record["texts"] if t is not None]
            named, words = [m.group(1) for m in sentences], [m.group(2) for m in sentences]
            assert len(colours) == len(words) == record["k"] + 1 and named == colours  # each names its colour
            assert all(record["mapping"][c] == w for c, w in zip(colours, words))
            assert record["answer"] == words[-1] == record["mapping"][colours[-1]]
            assert sorted(record["candidates"]) == sorted(record["mapping"].values())
            assert record["texts"][-1] == f"{record['query_prefix']} {colours[-1]} {record['answer']}."
            mappings.add(tuple(sorted(record["mapping"].items())))
    assert len(mappings) > 30  # a fresh mapping per episode
    by_colour = {}
    for mapping in mappings:
        for colour, word in mapping:
            by_colour.setdefault(colour, set()).add(word)
    assert all(len(words) > 1 for words in by_colour.values())


def test_recall_episodes_are_text_that_repeats_each_colours_word(built, spm_model_path):
    out, _ = built
    records = all_records(out, "recall", "train")
    for record in records:
        assert record["images"] == [None] * len(record["texts"]) and 3 <= len(record["texts"]) <= 9
        sentences = [re.fullmatch(r"This is a (\w+) (\w+)\.", t) for t in record["texts"]]
        assert 2 <= len(record["mapping"]) <= 3 and len(set(record["mapping"].values())) == len(record["mapping"])
        assert all(record["mapping"][m.group(1)] == m.group(2) for m in sentences)
    config = pipeline_config(os.path.join(out, "recall", "train"), spm_model_path, "flamingo")
    pipeline = GrainPipeline(config, "train")
    batch = next(pipeline)  # text-only documents: targets in every packed example, no images, nothing skipped
    assert_every_example_has_targets(batch)
    assert not (batch["image_segment_ids"] > 0).any()
    assert not any(k.startswith("skipped/") for k in pipeline.stats())


def assert_every_example_has_targets(batch):
    """Each packed example of the batch has target tokens, and padding has none."""
    mask, segments = batch["loss_mask"] > 0, batch["segment_ids"]
    assert not mask[segments == 0].any()
    for row in range(len(segments)):
        for s in range(1, int(segments[row].max()) + 1):
            assert mask[row][segments[row] == s].any(), (row, s)


def pipeline_config(path, tokenizer, template):
    c = tiny_lm()
    c.batch_size = 4
    c.model.image_tokens = 2
    c.data = ConfigDict(
        dict(
            name="grain",
            source="array_record",
            train_path=path,
            tokenizer=tokenizer,
            template=template,
            seq_len=384,
            max_images=6,
            packing_bins=4,
            image=dict(mode="fixed", size=16, method="bilinear", normalization="siglip", max_aspect_ratio=4.0),
            interleaved=dict(max_tokens=384, max_images=6),
        )
    )
    return c


@pytest.mark.parametrize(
    "task,template",
    [
        ("captions", "flamingo"),
        ("vqa", "llava"),
        ("grounding", "qwen_vl"),
        ("chat", "llava"),
        ("interleaved", "flamingo"),
        ("fewshot", "flamingo"),
    ],
)
def test_every_task_feeds_the_grain_pipeline(built, spm_model_path, task, template):
    out, _ = built
    pipeline = GrainPipeline(pipeline_config(os.path.join(out, task, "train"), spm_model_path, template), "train")
    batch = next(pipeline)
    assert batch["tokens"].shape == (4, 384) and batch["images"].shape == (4, 6, 16, 16, 3)
    assert_every_example_has_targets(batch)
    assert (batch["image_segment_ids"] > 0).any()
    assert not any(k.startswith("skipped/") for k in pipeline.stats())


def test_ensure_builds_once_then_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_JAX_CACHE", str(tmp_path))
    path = build.ensure(scale=0.001)
    assert path.startswith(str(tmp_path / "builtin" / build.VERSION))
    manifest = json.load(open(os.path.join(path, build.MANIFEST)))
    assert manifest["records"]["vqa"] == {"train": 10, "validation": 4, "test": 4}
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temporary folder left

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(build, "build", fail)
    assert build.ensure(scale=0.001) == path
    with pytest.raises(AssertionError, match="rebuilt"):
        build.ensure(scale=0.002)  # other arguments, another folder


def test_cli_builtin_prints_records_per_task_and_split(tmp_path, capsys):
    assert cli.main(["data", "builtin", "--out", str(tmp_path / "d"), "--scale", "0.001", "--image_size", "48"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"fewshot\s+interleaved\s+6\s+4\s+4", out) and "held out of train" in out
    assert ArrayRecordSource(str(tmp_path / "d" / "vqa" / "test")).format == "llava"
    assert cli.main(["data", "builtin", "--out", str(tmp_path / "e"), "--image_size", "16"]) == 2
    assert "at least 40 pixels" in capsys.readouterr().err


def test_tfds_builder_prepares_the_same_records(tmp_path):
    import tensorflow_datasets as tfds

    from data_pipelines.builtin import tfds_builder
    from data_pipelines.sources import TfdsSource

    sizes = build.default_sizes(0.001)
    build.build(str(tmp_path / "ar"), sizes={t: sizes[t] for t in ("captions", "vqa", "fewshot")}, workers=1)
    for task in ("captions", "vqa", "fewshot"):
        config = tfds_builder.BuiltinConfig(name=f"{task}_tiny", task=task, scale=0.001)
        tfds_builder.VlmJaxBuiltin(config=config, data_dir=str(tmp_path / "tfds")).download_and_prepare()
        format = tasks.TASKS[task][0]
        for split in ("train", "validation"):
            source = tfds.data_source(f"vlm_jax_builtin/{task}_tiny", split=split, data_dir=str(tmp_path / "tfds"))
            expected = all_records(str(tmp_path / "ar"), task, split)
            assert len(source) == len(expected)
            for i in range(3):
                assert tfds_builder.record_from_example(source[i], format) == expected[i]
    # The captions config feeds the pipeline's TFDS source: the whole record, as the ArrayRecord source gives it.
    captions = TfdsSource("vlm_jax_builtin/captions_tiny", "test", str(tmp_path / "tfds"), {})
    assert captions[0] == all_records(str(tmp_path / "ar"), "captions", "test")[0]
