"""TFDS as a source: the same records through TFDS and through ArrayRecord give the same records and batches."""

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tiny_lm
from data_pipelines import convert, tfds_records
from data_pipelines.builtin import build
from data_pipelines.pipeline import GrainPipeline
from data_pipelines.sources import FORMATS, ArrayRecordSource, TfdsSource, write_index, write_shards
from vlm_jax import cli
from vlm_jax.config_lib import ConfigDict
from vlm_jax.errors import UserError


def png(red: int, size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (red, 255 - red, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def chat(i: int, images: int) -> dict:
    """A llava line with `images` images (0: a text-only chat)."""
    question = "<image>\n" * images + f"what is number {i}?"
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": f"a cat {i}"}]
    return {"image": [f"{i % 3}.png"] * images, "conversations": turns}


LINES = {
    "pairs": [{"image": f"{i % 3}.png", "caption": f"number {i} cat é"} for i in range(12)],
    "llava": [chat(i, i % 3) for i in range(12)],
    # An empty text at a text position, which a rule "empty text means image" would lose.
    "interleaved": [{"texts": ["", None, f"number {i} cat", None], "images": [None, "0.png", None, "2.png"]} for i in range(12)],
}  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """{format: `data build` folder}, and the TFDS data folder holding each as `vlm_jax_records/FORMAT`."""
    root = tmp_path_factory.mktemp("tfds_records")
    for i in range(3):
        (root / f"{i}.png").write_bytes(png(100 * i))
    folders = {}
    for format in FORMATS:
        (root / f"{format}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in LINES[format]))
        folders[format] = str(root / format)
        convert.build(format, str(root / f"{format}.jsonl"), folders[format], records_per_shard=5, progress=False)
        tfds_records.prepare(format, {"train": folders[format]}, str(root / "tfds"))
    return folders, str(root / "tfds")


def config_for(source: str, spm_model_path: str, **data) -> ConfigDict:
    c = tiny_lm()
    c.batch_size = 4
    c.model.image_tokens = 2
    c.data = ConfigDict(
        dict(
            name="grain",
            source=source,
            tokenizer=spm_model_path,
            template="flamingo",
            seq_len=64,
            max_images=4,
            packing_bins=4,
            image=dict(mode="fixed", size=8, method="bilinear", normalization="siglip", max_aspect_ratio=20.0),
            **data,
        )
    )
    return c


@pytest.mark.parametrize("format", FORMATS)
def test_tfds_gives_the_array_record_records_and_batches(prepared, spm_model_path, format):
    folders, data_dir = prepared
    array_record = ArrayRecordSource(folders[format])
    tfds_source = TfdsSource(f"vlm_jax_records/{format}", "train", data_dir, {})
    assert tfds_source.format == array_record.format == format
    assert [tfds_source[i] for i in range(len(tfds_source))] == [array_record[i] for i in range(len(array_record))]
    assert len(array_record) == 12

    tfds = dict(name=f"vlm_jax_records/{format}", data_dir=data_dir, train_split="train")
    from_tfds = GrainPipeline(config_for("tfds", spm_model_path, tfds=tfds), "train")
    from_folder = GrainPipeline(config_for("array_record", spm_model_path, train_path=folders[format]), "train")
    for _ in range(3):  # 12 rows: every record at least once, shuffled by the seed
        a, b = next(from_tfds), next(from_folder)
        assert a.keys() == b.keys() and (a["segment_ids"] > 0).any() and (a["image_segment_ids"] > 0).any()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert from_tfds.stats() == from_folder.stats()


def test_records_the_features_cannot_carry_are_one_clear_error():
    image = png(9)
    cases = [
        ({"images": [image, image], "caption": "two"}, "pairs", "a pairs record has one image"),
        ({"images": [[image, image]], "conversations": []}, "llava", "a video or an empty image"),
        ({"images": [], "conversations": [{"from": "human", "value": "x", "loss": 0}]}, "llava", "from and value"),
        ({"texts": [None], "images": [None]}, "interleaved", "exactly one of a text and an image"),
        ({"texts": ["a"], "images": [None], "scene": b"raw"}, "interleaved", "the fields scene .* are not JSON"),
        ({"texts": ["a"], "images": [None], "counts": {1: 2}}, "interleaved", "change through JSON"),
        ({"caption": "no image"}, "pairs", "lacks images"),
    ]
    for record, format, message in cases:
        with pytest.raises(UserError, match=message):
            tfds_records.to_example(record, format)


def test_a_dataset_without_record_features_or_fields_is_one_clear_error(tmp_path):
    import tensorflow_datasets as tfds

    class VlmJaxTinyLabels(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Tensor(shape=(), dtype=np.object_), "label": tfds.features.Text()}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield 0, {"image": png(1), "label": "one"}

    VlmJaxTinyLabels(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    with pytest.raises(UserError, match="has the features image, label, not the record features"):
        TfdsSource("vlm_jax_tiny_labels", "train", str(tmp_path), {})
    source = TfdsSource("vlm_jax_tiny_labels", "train", str(tmp_path), {"image": "image", "caption": "label"})
    assert source.format == "pairs" and source[0] == {"images": [png(1)], "caption": "one"}


def tfds_config_of_the_docs(tmp_path) -> str:
    """docs/data.md's TFDS config, saved as a file (the docs' own text: a test of what they say)."""
    with open(os.path.join(REPO, "docs", "data.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    (block,) = [b for b in blocks if 'c.data.source = "tfds"' in b]
    path = tmp_path / "tfds_flamingo.py"
    path.write_text(block)
    return str(path)


def test_the_documented_commands_prepare_and_train_from_tfds(prepared, spm_model_path, tmp_path, capsys):
    folders, _ = prepared
    data_dir = str(tmp_path / "tfds")
    argv = ["data", "tfds", "--data_dir", data_dir, "--builtin", "captions", "vqa", "--scale", "0.001"]
    assert cli.main(argv + ["--image_size", "48"]) == 0
    assert (
        cli.main(["data", "tfds", "--data_dir", data_dir, "--name", "mine", "--split", f"train={folders['llava']}"])
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(r"vlm_jax_builtin/captions-x0.001-px48-seed0 in .*: train 5, validation 4, test 4 examples", out)
    assert re.search(r"vlm_jax_records/mine in .*: train 12 examples", out)

    # The built-in builder's records are the ArrayRecord build's, for a pairs and a llava task.
    sizes = build.default_sizes(0.001)
    build.build(str(tmp_path / "ar"), image_size=48, sizes={t: sizes[t] for t in ("captions", "vqa")}, workers=1)
    for task, split in (("captions", "train"), ("vqa", "validation")):
        source = TfdsSource(f"vlm_jax_builtin/{task}-x0.001-px48-seed0", split, data_dir, {})
        expected = ArrayRecordSource(str(tmp_path / "ar" / task / split))
        assert source.format == expected.format
        assert [source[i] for i in range(len(source))] == [expected[i] for i in range(len(expected))]

    # The docs' config reads it through the pipeline (`data stats` runs the configured training pipeline).
    config = f"{tfds_config_of_the_docs(tmp_path)}:name=vlm_jax_builtin/vqa-x0.001-px48-seed0,data_dir={data_dir}"
    assert cli.main(["data", "stats", "--config", f"{config},tokenizer={spm_model_path}"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["records"] == sizes["vqa"]["train"] == 10 and stats["skipped"] == {} and stats["rows"] > 0

    assert cli.main(["data", "tfds", "--data_dir", data_dir, "--builtin", "nope"]) == 2
    assert "unknown built-in task 'nope'" in capsys.readouterr().err
    assert cli.main(["data", "tfds", "--data_dir", data_dir, "--name", "x", "--split", "train"]) == 2
    assert "--split SPLIT=FOLDER" in capsys.readouterr().err
    assert cli.main(["data", "tfds", "--data_dir", data_dir, "--builtin", "vqa", "--split", "train=x"]) == 2
    assert "--split goes with --name" in capsys.readouterr().err
    assert cli.main(["data", "tfds", "--data_dir", data_dir, "--builtin", "vqa", "--scale", "0"]) == 2
    assert "must be positive, got 0.0" in capsys.readouterr().err
    assert (
        cli.main(["data", "tfds", "--data_dir", data_dir, "--name", "a/b", "--split", f"train={folders['llava']}"]) == 2
    )
    assert "got 'a/b'" in capsys.readouterr().err
    # A record the features cannot carry stops the preparation with its one sentence.
    written = write_shards(
        [{"images": [], "conversations": [{"from": "human", "value": "hi", "weight": 0}]}], str(tmp_path / "bad")
    )
    write_index(str(tmp_path / "bad"), {"format": "llava", **written})
    assert (
        cli.main(["data", "tfds", "--data_dir", data_dir, "--name", "bad", "--split", f"train={tmp_path / 'bad'}"]) == 2
    )
    assert "a llava turn has the keys from and value only" in capsys.readouterr().err
