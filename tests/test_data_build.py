"""`vlm-jax data build` and the record sources: every line is written or counted, nothing vanishes."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import convert, sources
from vlm_jax import cli
from vlm_jax.errors import UserError


def png(color=(255, 0, 0), size=(6, 4)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "red.png").write_bytes(png())
    (tmp_path / "blue.png").write_bytes(png((0, 0, 255)))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "green.png").write_bytes(png((0, 255, 0)))
    return tmp_path


def write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")


def test_pairs_written_skipped_and_repaired_are_all_counted(folder):
    write_lines(
        folder / "pairs.jsonl",
        [
            {"image": "red.png", "caption": "a red square"},
            {"image": "sub/green.png", "caption": "a green square"},
            {"image": str(folder / "blue.png"), "caption": "a blue square"},  # absolute path
            {"image": "missing.png", "caption": "nothing"},
            {"image": "broken.jpg", "caption": "broken"},
            {"image": "red.png", "caption": "   "},
            {"image": "red.png"},
            b"{not json",
            b'{"image": "red.png", "caption": "caf\xe9 bad utf8"}',
            [1, 2],
        ],
    )
    summary = convert.build(
        "pairs", str(folder / "pairs.jsonl"), str(folder / "out"), records_per_shard=2, progress=False
    )
    assert summary["records"] == 4 and summary["images"] == 4
    assert summary["skipped"] == {
        "missing_image_file": 1,
        "corrupt_image": 1,
        "empty_text": 1,
        "missing_field": 1,
        "invalid_json": 1,
        "not_an_object": 1,
    }
    assert summary["repaired"] == {"invalid_utf8": 1}
    assert len(summary["shards"]) == 2
    assert json.load(open(folder / "out" / "index.json"))["records"] == 4

    source = sources.ArrayRecordSource(str(folder / "out"))
    records = [source[i] for i in range(len(source))]
    assert [r["caption"] for r in records] == ["a red square", "a green square", "a blue square", "caf\ufffd bad utf8"]
    assert records[0]["images"] == [png()] and records[1]["images"] == [png((0, 255, 0))]


def test_llava_json_array_and_placeholder_mismatch(folder):
    data = [
        {
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}],
        },
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},  # text only
        {"image": "red.png", "conversations": [{"from": "human", "value": "No marker"}, {"from": "gpt", "value": "x"}]},
        {"image": "red.png", "conversations": [{"from": "robot", "value": "<image>"}]},
    ]
    (folder / "llava.json").write_text(json.dumps(data))
    summary = convert.build("llava", str(folder / "llava.json"), str(folder / "out"), progress=False)
    assert summary["records"] == 2
    assert summary["skipped"] == {"placeholder_mismatch": 1, "bad_field_type": 1}
    source = sources.ArrayRecordSource(str(folder / "out"))
    assert source[1]["images"] == [] and source[0]["conversations"][1]["value"] == "Red."


def test_interleaved_drops_a_bad_image_and_keeps_the_text(folder):
    write_lines(
        folder / "docs.jsonl",
        [
            {"texts": ["Intro", None, "Middle", None, "End"], "images": [None, "red.png", None, "broken.jpg", None]},
            {"texts": ["a", "b"], "images": [None]},
            {"texts": [None], "images": ["red.png"]},
        ],
    )
    summary = convert.build("interleaved", str(folder / "docs.jsonl"), str(folder / "out"), progress=False)
    assert summary["records"] == 1
    assert summary["repaired"] == {"dropped_image:corrupt_image": 1}
    assert summary["skipped"] == {"placeholder_mismatch": 1, "empty_text": 1}
    record = sources.ArrayRecordSource(str(folder / "out"))[0]
    assert record["texts"] == ["Intro", None, "Middle", "End"] and record["images"] == [None, png(), None, None]


def test_cli_build_prints_the_summary(folder, capsys):
    write_lines(folder / "p.jsonl", [{"image": "red.png", "caption": "red"}, {"image": "nope.png", "caption": "x"}])
    assert (
        cli.main(["data", "build", "--format", "pairs", "--input", str(folder / "p.jsonl"), "--out", str(folder / "o")])
        == 0
    )
    out = capsys.readouterr().out
    assert "Wrote 1 pairs records with 1 images" in out and "Skipped 1: missing_image_file=1" in out
    assert (
        cli.main(
            ["data", "build", "--format", "pairs", "--input", str(folder / "none.jsonl"), "--out", str(folder / "o")]
        )
        == 2
    )
    assert "the input file" in capsys.readouterr().err


def test_missing_or_unreadable_sources_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        sources.ArrayRecordSource(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="index.json is missing"):
        sources.ArrayRecordSource(str(tmp_path))
    (tmp_path / "index.json").write_text(json.dumps({"format": "pairs", "shards": ["data-00000.array_record"]}))
    with pytest.raises(UserError, match="data-00000.array_record listed in .* is missing or unreadable"):
        sources.ArrayRecordSource(str(tmp_path))


def test_tfds_source_reads_a_locally_prepared_dataset(tmp_path):
    import tensorflow_datasets as tfds

    class VlmJaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Tensor(shape=(), dtype=np.object_), "caption": tfds.features.Text()}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(3)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": png((i * 50, 0, 0)), "caption": f"caption {i}"}

    VlmJaxTinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = sources.TfdsSource(
        "vlm_jax_tiny_captions", "train", str(tmp_path), {"image": "image", "caption": "caption"}
    )
    records = sorted((source[i] for i in range(len(source))), key=lambda r: r["caption"])
    assert [r["caption"] for r in records] == ["caption 0", "caption 1", "caption 2"]
    assert records[2]["images"] == [png((100, 0, 0))]
    with pytest.raises(UserError, match="is not prepared"):
        sources.TfdsSource("vlm_jax_no_such_dataset", "train", str(tmp_path), {})


def test_records_round_trip_bytes_and_bad_text():
    record = {"images": [b"\x00\x01"], "caption": "ok"}
    assert sources.decode_record(sources.encode_record(record)) == record
    assert os.path.basename(sources.INDEX_FILE) == "index.json"
