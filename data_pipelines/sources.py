"""Where records come from: ArrayRecord shards (the on-disk format), TFDS data sources, in-memory lists.

A *record* is a dict in one of the user-data shapes of docs/design.md, with
images as their encoded bytes instead of paths:

* pairs:       {"images": [bytes], "caption": str}
* llava:       {"images": [bytes, ...], "conversations": [{"from": "human"|"gpt", "value": str}, ...]}
* interleaved: {"texts": [str | None, ...], "images": [bytes | None, ...]}  (aligned lists)

On disk each record is one msgpack message in an ArrayRecord shard; a folder
written by `vlm-jax data build` holds `index.json` and
`data-XXXXX-of-YYYYY.array_record` files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

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

    `fields` maps record keys to TFDS feature keys, e.g. {"image": "image",
    "caption": "caption"}; images may be encoded bytes or decoded arrays
    (arrays are re-encoded as PNG so every source yields the same record shape).
    """

    def __init__(self, name: str, split: str, data_dir: str | None, fields: dict[str, str], format: str = "pairs"):
        import tensorflow_datasets as tfds

        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types for a dataset that is not prepared
            raise UserError(f"the TFDS dataset {name!r} (split {split!r}) is not prepared in {data_dir}: {e}") from None
        self.format = format
        self.fields = dict(fields)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self._source[i]
        image = example[self.fields.get("image", "image")]
        text = example[self.fields.get("caption", "caption")]
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="surrogateescape")
        return {"images": [_as_encoded(image)], "caption": text}


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
