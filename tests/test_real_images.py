"""Few-shot episodes on real images (scikit-learn digits, scikit-image photos): the built-in fewshot format,
deterministic, true to the packages' pixels, written by `vlm-jax data fewshot`, scored by the fewshot evaluator."""

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from data_pipelines import real_images, templates
from data_pipelines.builtin import build, tasks
from data_pipelines.sources import ArrayRecordSource, encode_record
from vlm_jax import cli, models
from vlm_jax.errors import UserError

SENTENCE = re.compile(r"This is a ([a-z]+)\.")


def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def shown(record):
    return [image for image in record["images"] if image is not None]


@pytest.mark.parametrize("source", real_images.SOURCES)
def test_episodes_have_the_builtin_fewshot_format(source):
    builtin = tasks.make_record("fewshot", "validation", 0)
    for index in range(8):
        record = real_images.episode(source, index)
        assert set(record) - {"source", "items"} == set(builtin) - {"scenes"}
        k = record["k"]
        assert k == (0, 1, 2, 4)[index % 4] and len(record["items"]) == k + 1
        assert record["texts"][0::2] == [None] * (k + 1) and record["images"][1::2] == [None] * (k + 1)
        assert all(isinstance(image, bytes) for image in record["images"][0::2])
        assert record["task"] == "fewshot" and record["source"] == source
        assert record["query_prefix"] == builtin["query_prefix"] == "This is a"
        labels, words = list(record["mapping"]), list(record["mapping"].values())
        assert len(set(labels)) == 2 and set(labels) <= set(real_images.classes(source))
        assert words == record["candidates"] and len(set(words)) == 2 and set(words) <= set(tasks.NONSENSE)
        said = [SENTENCE.fullmatch(text).group(1) for text in record["texts"][1::2]]
        assert said == [record["mapping"][item["label"]] for item in record["items"]]
        assert record["answer"] == said[-1] == record["mapping"][record["items"][-1]["label"]]
        assert all(pixels(png).shape == (64, 64, 3) for png in shown(record))


def test_episodes_are_deterministic_and_seeded():
    for source in real_images.SOURCES:
        a = encode_record(real_images.episode(source, 5, seed=3, image_size=32))
        assert a == encode_record(real_images.episode(source, 5, seed=3, image_size=32))
        assert a != encode_record(real_images.episode(source, 5, seed=4, image_size=32))
        assert a != encode_record(real_images.episode(source, 9, seed=3, image_size=32))  # same k, other episode


def test_support_and_query_images_are_distinct_samples():
    for source in real_images.SOURCES:
        for index in range(3, 40, 4):  # 4-shot episodes: five images each
            record = real_images.episode(source, index, image_size=16)
            keys = [json.dumps(item, sort_keys=True) for item in record["items"]]
            assert len(set(keys)) == len(keys)
            assert len(set(shown(record))) == len(keys)


def test_digit_pixels_are_the_scikit_learn_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen = 0
    for size in (64, 32):
        for index in range(6):
            record = real_images.episode("digits", index, image_size=size)
            for png, item in zip(shown(record), record["items"]):
                image = pixels(png)
                assert image.shape == (size, size, 3)
                assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
                block = size // 8
                assert (image[..., 0] == np.repeat(np.repeat(image[::block, ::block, 0], block, 0), block, 1)).all()
                small = image[..., 0].reshape(8, block, 8, block).mean(axis=(1, 3))
                np.testing.assert_array_equal(np.rint(small * 16 / 255), digits.images[item["index"]])
                assert str(digits.target[item["index"]]) == item["label"]
                seen += 1
    assert seen > 20


def test_photo_pixels_are_crops_of_the_scikit_image_photos():
    import skimage.data
    from skimage.transform import resize

    for index in range(4):
        record = real_images.episode("photos", index)
        for png, item in zip(shown(record), record["items"]):
            photo = np.asarray(getattr(skimage.data, item["label"])())
            photo = np.repeat(photo[..., None], 3, -1) if photo.ndim == 2 else photo
            x0, y0, x1, y1 = item["box"]
            side = min(photo.shape[:2])
            assert x1 - x0 == y1 - y0 and 0.6 * side - 1 <= x1 - x0 <= 0.9 * side + 1
            crop = photo[y0:y1, x0:x1, :3]
            expected = resize(crop[:, ::-1] if item["flip"] else crop, (64, 64), anti_aliasing=True) * 255
            mirrored = resize(crop if item["flip"] else crop[:, ::-1], (64, 64), anti_aliasing=True) * 255
            error = np.abs(pixels(png) - expected).mean()
            assert error < 4, (item, error)
            assert error < np.abs(pixels(png) - mirrored).mean()


def test_bad_arguments_are_one_clear_sentence(tmp_path):
    with pytest.raises(UserError, match="not one of digits, photos"):
        real_images.episode("faces", 0)
    with pytest.raises(UserError, match="at least 8 pixels"):
        real_images.write("digits", str(tmp_path / "a"), 4, image_size=4)
    with pytest.raises(UserError, match="at least 1, got 0"):
        real_images.write("photos", str(tmp_path / "b"), 0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Episode folders written by the command, a built-in fewshot folder and the built-in tokenizer."""
    root = tmp_path_factory.mktemp("real")
    for source in real_images.SOURCES:
        argv = ["data", "fewshot", "--source", source, "--out", str(root / source), "--episodes", "8"]
        assert cli.main(argv) == 0
    build.build(str(root / "builtin"), sizes={"fewshot": {"train": 20, "validation": 4}}, workers=1)
    return root


def test_the_command_writes_a_readable_folder(folders, tmp_path, capsys):
    for source in real_images.SOURCES:
        folder = str(folders / source)
        data = ArrayRecordSource(folder)
        assert data.format == "interleaved" and len(data) == 8
        for index in range(8):
            assert encode_record(data[index]) == encode_record(real_images.episode(source, index))
        index_json = json.load(open(os.path.join(folder, "index.json")))
        assert index_json["records"] == 8 and index_json["episodes_per_k"] == {"0": 2, "1": 2, "2": 2, "4": 2}
        assert index_json["images"] == 2 * (1 + 2 + 3 + 5)
    argv = ["data", "fewshot", "--source", "digits", "--out", str(tmp_path / "x")]
    assert cli.main(argv + ["--episodes", "0"]) == 2
    assert cli.main(argv + ["--image_size", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "vlm-jax data: the number of few-shot episodes must be at least 1, got 0.",
        "vlm-jax data: few-shot episode images need at least 8 pixels, got 5.",
    ]


def test_ensure_writes_once_then_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_JAX_CACHE", str(tmp_path))
    path = real_images.ensure("digits", episodes=4, image_size=16)
    assert path == str(tmp_path / "real_images" / real_images.VERSION / "digits-seed0-px16-n4")
    assert len(ArrayRecordSource(path)) == 4 and os.listdir(os.path.dirname(path)) == [os.path.basename(path)]

    def fail(*args, **kwargs):
        raise AssertionError("rewritten")

    monkeypatch.setattr(real_images, "write", fail)
    assert real_images.ensure("digits", episodes=4, image_size=16) == path
    with pytest.raises(AssertionError, match="rewritten"):
        real_images.ensure("digits", episodes=5, image_size=16)


@pytest.fixture(scope="module")
def generator(folders):
    from vlm_jax.config_lib import load_config
    from vlm_jax.evaluators import generative
    from vlm_jax.prerequisites import resolve

    spm = folders / "builtin" / "spm.model"
    config = resolve(load_config(os.path.join(REPO, f"configs/flamingo.py:variant=tiny,tokenizer={spm}")))
    config.model.image_size = config.data.image.size = 64
    config.data.seq_len, config.data.max_images = 128, 6
    return generative.Generator(models.build(config), None, config)


def test_prompts_render_like_the_builtin_episodes(folders, generator):
    from vlm_jax.evaluators import generative

    for name in ("builtin/fewshot/validation", "digits", "photos"):
        for record in generative.read_records(str(folders / name), 100, "interleaved"):
            rendered = [int(i) for i in templates.render("flamingo", generator.tokenizer, record, 1).ids]
            prompt = generative.fewshot_prompt(generator, record)
            assert rendered[: len(prompt["tokens"])] == prompt["tokens"]
            rest = generator.tokenizer.decode(rendered[len(prompt["tokens"]) :], skip_control=True)
            words = re.findall(r"[a-z]+", rest)  # the built-in episodes name the colour before the word
            assert words[0 if name in real_images.SOURCES else 1] == record["answer"]
            assert len(prompt["images"]) == record["k"] + 1
            assert all(image.shape == (64, 64, 3) for image in prompt["images"])


def test_named_fewshot_variants_score_oracles_1_and_wrong_answers_0(folders, generator, monkeypatch):
    from vlm_jax.evaluators import generative

    runs = {
        "fewshot": str(folders / "builtin" / "fewshot" / "validation"),
        "fewshot/digits": str(folders / "digits"),
        "fewshot/photos": str(folders / "photos"),
    }
    answers = [[r["answer"] for r in generative.read_records(path, 100, "interleaved")] for path in runs.values()]
    for oracle in (True, False):
        calls = iter([[a + "." if oracle else "nothing" for a in batch] for batch in answers])
        monkeypatch.setattr(generative.Generator, "__call__", lambda self, prompts, max_new_tokens: next(calls))
        metrics, samples = generative.evaluate(generator, runs, 100)
        shots = {f"fewshot_{k}shot_accuracy" for k in (0, 1, 2, 4)}
        assert set(metrics) == shots | {f"{name}/{m}" for name in ("digits", "photos") for m in shots}
        assert set(metrics.values()) == {1.0 if oracle else 0.0}
        assert [s["task"] for s in samples] == ["fewshot"] * 4 + ["fewshot/digits"] * 8 + ["fewshot/photos"] * 8
        assert all(s["correct"] is oracle for s in samples)
    for bad in ("digits", "fewshot/", "fewshots/digits"):
        with pytest.raises(UserError, match="KIND/NAME"):
            generative.evaluate(generator, {bad: runs["fewshot/digits"]}, 100)
