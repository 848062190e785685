"""Where records come from: ArrayRecord shards (the on-disk format), TFDS data sources, in-memory lists.

A *record* is a dict in one of the user-data shapes of docs/design.md, with
images as their encoded bytes instead of paths:

* pairs:       {"images": [bytes], "caption": str}
* llava:       {"images": [bytes, ...], "conversations": [{"from": "human"|"gpt", "value": str}, ...]}
* interleaved: {"texts": [str | None, ...], "images": [bytes | None, ...]}  (aligned lists)

On disk each record is one msgpack message in an ArrayRecord shard; a folder
written by `vlm-jax data build` (`write_shards`, `write_index`) holds
`index.json` and `data-NNNNN.array_record` files.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import msgpack
import numpy as np

from vlm_jax.errors import UserError

FORMATS = ("pairs", "llava", "interleaved")
INDEX_FILE = "index.json"


def encode_record(record: dict[str, Any]) -> bytes:
    """A record as one msgpack message (bytes stay bytes, text stays text)."""
    return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of `encode_record`. Text that is not valid UTF-8 comes back as bytes (the pipeline repairs it)."""
    return msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape")


def write_shards(records: Iterable[dict[str, Any]], out_dir: str, records_per_shard: int = 10_000) -> dict[str, Any]:
    """Writes `records` (consumed lazily, in order) as `data-NNNNN.array_record` shards of `out_dir`, one msgpack
    message per record; returns {"records", "images", "bytes", "shards"}. No record, no shard file. The
    writer of `vlm-jax data build`, the built-in dataset and the real-image few-shot episodes."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(out_dir, exist_ok=True)
    shards: list[str] = []
    writer, in_shard, written, images, nbytes = None, 0, 0, 0, 0
    try:
        for record in records:
            if writer is None or in_shard >= records_per_shard:
                if writer is not None:
                    writer.close()
                shards.append(f"data-{len(shards):05d}.array_record")
                writer, in_shard = ArrayRecordWriter(os.path.join(out_dir, shards[-1]), "group_size:1"), 0
            data = encode_record(record)
            writer.write(data)
            in_shard += 1
            written += 1
            nbytes += len(data)
            images += sum(1 for image in record["images"] if image is not None)
    finally:
        if writer is not None:
            writer.close()
    return {"records": written, "images": images, "bytes": nbytes, "shards": shards}


def write_index(out_dir: str, index: dict[str, Any]) -> None:
    """Writes a folder's `index.json` (format, records, images, bytes, shards, skipped, repaired, source, ...)."""
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)


def iter_records(path: str, want_format: str) -> Iterator[dict[str, Any]]:
    """The records of a `vlm-jax data build` folder in order (for evaluators); it must hold `want_format` records."""
    source = ArrayRecordSource(path)
    if source.format != want_format:
        raise UserError(f"{path} holds {source.format} records; this evaluation reads {want_format} records.")
    for i in range(len(source)):
        yield source[i]


def read_records(path: str, limit: int, want_format: str) -> list[dict[str, Any]]:
    """The first `limit` records of a folder, which must hold `want_format` records."""
    return list(itertools.islice(iter_records(path, want_format), limit))


def shard_paths(directory: str) -> tuple[list[str], dict[str, Any]]:
    """(shard file paths, index) of a `vlm-jax data build` folder, with one clear error if anything is missing."""
    index_path = os.path.join(directory, INDEX_FILE)
    if not os.path.isdir(directory):
        raise UserError(f"the data folder {directory} does not exist.")
    if not os.path.isfile(index_path):
        raise UserError(f"{index_path} is missing; point the config at a folder written by `vlm-jax data build`.")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{index_path} cannot be read ({e}).") from None
    paths = [os.path.join(directory, name) for name in index.get("shards", [])]
    for path in paths:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise UserError(f"the shard {path} listed in {index_path} is missing or unreadable.")
    if not paths:
        raise UserError(f"{index_path} lists no shards.")
    return paths, index


class ArrayRecordSource:
    """Random access to the records of a `vlm-jax data build` folder (a grain RandomAccessDataSource)."""

    def __init__(self, directory: str):
        import grain

        paths, self.index = shard_paths(directory)
        self.format = self.index.get("format")
        self._source = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return decode_record(self._source[i])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self)} {self.format} records)"


class TfdsSource:
    """A locally prepared TFDS dataset read with `tfds.data_source` (random access; nothing is downloaded).

    With `fields` empty the dataset's features must be the record features of
    a format (`data_pipelines.tfds_records`: the built-in builder's, or
    `VlmJaxRecords`' over `data build` folders); `format` is that format and
    item i is the record its example i carries, equal to the ArrayRecord
    record it was made from. A non-empty `fields` reads any image-text
    dataset as pairs: it maps "image" and "caption" to top-level feature
    keys; images may be encoded bytes or decoded arrays (arrays are
    re-encoded as PNG).
    """

    def __init__(self, name: str, split: str, data_dir: str | None, fields: dict[str, str]):
        import tensorflow_datasets as tfds

        from data_pipelines import tfds_records

        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types for a dataset that is not prepared
            raise UserError(f"the TFDS dataset {name!r} (split {split!r}) is not prepared in {data_dir}: {e}") from None
        self.fields = dict(fields)
        features = self._source.dataset_info.features
        self.format = "pairs" if self.fields else tfds_records.format_of(features)
        if self.format is None:
            raise UserError(
                f"the TFDS dataset {name!r} has the features {', '.join(sorted(features.keys()))}, not the record "
                "features of pairs, llava or interleaved (docs/data.md, TFDS); set data.tfds.fields to read it as pairs."
            )
        self._from_example = tfds_records.record_from_example

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self._source[i]
        if not self.fields:
            return self._from_example(example, self.format)
        image = example[self.fields.get("image", "image")]
        text = example[self.fields.get("caption", "caption")]
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="surrogateescape")
        return {"images": [_as_encoded(image)], "caption": text}

    def __repr__(self) -> str:
        return f"TfdsSource({len(self)} {self.format} records)"


def _as_encoded(image: Any) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class ListSource:
    """Records held in memory (tests, small experiments)."""

    def __init__(self, records: Sequence[dict[str, Any]], format: str):
        if format not in FORMATS:
            raise UserError(f"data format {format!r} is not one of {', '.join(FORMATS)}.")
        self.records = list(records)
        self.format = format

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.records[i]
