"""Records as TFDS examples: one TFDS feature spec per record format, converted exactly both ways.

    prepare("mine", {"train": TRAIN_DIR}, DIR)          # a `vlm-jax data build` folder per split, as TFDS
    source = TfdsSource("vlm_jax_records/mine", "train", DIR, {})   # source[i] == ArrayRecordSource(TRAIN_DIR)[i]

Features by record format (images are the encoded bytes, untouched; text is
stored as its UTF-8 bytes):

* pairs:       image (bytes), caption, metadata
* llava:       images (bytes [n]), conversations (sequence of {from, value}), metadata
* interleaved: texts [n], images (bytes [n]), metadata; position i is an image iff images[i] is not b""
  (its text is then ""), else a text (its image b"")

`metadata` is the JSON of the record's other fields (the built-in tasks' task,
scene, answer, ...; "{}" for `data build` records). `to_example` refuses, with
one sentence, a record these features cannot carry exactly (a pair without
exactly one image, a chat turn with keys beyond from / value, a video, an
interleaved position with both or neither of a text and an image, metadata
that does not survive JSON), so `record_from_example(to_example(r)) == r`
for every record it accepts. A dataset whose features are one of these specs
is read by the pipeline's `TfdsSource` in that record format.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines.sources import FORMATS, ArrayRecordSource
from vlm_jax.errors import UserError

_FIELDS = {"pairs": ("images", "caption"), "llava": ("images", "conversations"), "interleaved": ("texts", "images")}
_KEYS = {"pairs": {"image", "caption"}, "llava": {"images", "conversations"}, "interleaved": {"texts", "images"}}


def features(format: str) -> tfds.features.FeaturesDict:
    """The TFDS features of `format`'s records."""
    encoded = tfds.features.Tensor(shape=(None,), dtype=np.object_)
    if format == "pairs":
        spec = {"image": tfds.features.Tensor(shape=(), dtype=np.object_), "caption": tfds.features.Text()}
    elif format == "llava":
        turn = {"from": tfds.features.Text(), "value": tfds.features.Text()}
        spec = {"images": encoded, "conversations": tfds.features.Sequence(turn)}
    elif format == "interleaved":
        spec = {"texts": tfds.features.Sequence(tfds.features.Text()), "images": encoded}
    else:
        raise UserError(f"data format {format!r} is not one of {', '.join(FORMATS)}.")
    return tfds.features.FeaturesDict({**spec, "metadata": tfds.features.Text()})


def format_of(spec: tfds.features.FeaturesDict) -> str | None:
    """The record format whose features `spec` has (by feature names), or None."""
    names = set(spec.keys())
    return next((f for f, keys in _KEYS.items() if names == keys | {"metadata"}), None)


def _utf8(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise UserError(f"{what} is {type(text).__name__}, not text.")
    return text.encode("utf-8", errors="surrogateescape")  # msgpack's reading of bad UTF-8, kept exactly


def _image(data: Any, what: str) -> bytes:
    if not isinstance(data, bytes) or not data:
        raise UserError(f"{what} is not the encoded bytes of one image (a video or an empty image has no TFDS form).")
    return data


def to_example(record: dict[str, Any], format: str) -> dict[str, Any]:
    """`record` in the features of `format`; one UserError for a record they cannot carry exactly."""
    missing = [k for k in _FIELDS[format] if k not in record]
    if missing:
        raise UserError(f"this {format} record lacks {', '.join(missing)}.")
    other = {k: v for k, v in record.items() if k not in _FIELDS[format]}
    try:
        metadata = json.dumps(other, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"the fields {', '.join(sorted(other))} of this {format} record are not JSON ({e}).") from None
    if json.loads(metadata) != other:
        raise UserError(f"the fields {', '.join(sorted(other))} of this {format} record change through JSON.")
    example = {"metadata": metadata.encode("utf-8", errors="surrogateescape")}
    images = record["images"]
    if format == "pairs":
        if not isinstance(images, list) or len(images) != 1:
            raise UserError(f"a pairs record has one image, not {images!r:.60}.")
        return {**example, "image": _image(images[0], "its image"), "caption": _utf8(record["caption"], "its caption")}
    if format == "llava":
        turns = []
        for turn in record["conversations"]:
            if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
                raise UserError(f"a llava turn has the keys from and value only, not {turn!r:.80}.")
            turns.append({k: _utf8(turn[k], f"a turn's {k}") for k in ("from", "value")})
        encoded = [_image(image, "a llava image") for image in images]
        return {**example, "images": np.array(encoded, dtype=object).reshape(-1), "conversations": turns}
    texts = record["texts"]
    if len(texts) != len(images):
        raise UserError(f"an interleaved record has {len(texts)} texts and {len(images)} images; they are aligned.")
    for text, image in zip(texts, images):
        if (text is None) == (image is None):
            raise UserError("each position of an interleaved record holds exactly one of a text and an image.")
    return {
        **example,
        "texts": [b"" if t is None else _utf8(t, "an interleaved text") for t in texts],
        "images": np.array([b"" if i is None else _image(i, "an interleaved image") for i in images], object),
    }


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8", errors="surrogateescape")


def record_from_example(example: dict[str, Any], format: str) -> dict[str, Any]:
    """Inverse of `to_example` for an example read back from TFDS (numpy arrays and bytes)."""
    record = json.loads(_text(example["metadata"]))
    if format == "pairs":
        record.update(images=[bytes(example["image"])], caption=_text(example["caption"]))
    elif format == "llava":
        turns = example["conversations"]
        record.update(
            images=[bytes(i) for i in example["images"]],
            conversations=[{"from": _text(f), "value": _text(v)} for f, v in zip(turns["from"], turns["value"])],
        )
    else:
        images = [bytes(i) or None for i in example["images"]]
        texts = [None if image else _text(t) for t, image in zip(example["texts"], images)]
        record.update(texts=texts, images=images)
    return record


@dataclasses.dataclass(eq=False)
class RecordsConfig(tfds.core.BuilderConfig):
    """`folders`: split name -> `vlm-jax data build` folder (all of one record format)."""

    folders: dict[str, str] = dataclasses.field(default_factory=dict)


class VlmJaxRecords(tfds.core.GeneratorBasedBuilder):
    """`vlm-jax data build` folders as a TFDS dataset: example i of a split is record i of its folder."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIG_CLS = RecordsConfig
    code_path = epath.Path(__file__)  # TFDS 4.9.10 would look the file up with importlib_resources, not installed

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")  # random access with tfds.data_source
        super().__init__(**kwargs)

    def _sources(self) -> dict[str, ArrayRecordSource]:
        if not self.builder_config.folders:
            raise UserError(f"the TFDS config {self.builder_config.name!r} names no `data build` folder.")
        sources = {split: ArrayRecordSource(path) for split, path in self.builder_config.folders.items()}
        formats = {s.format for s in sources.values()}
        if len(formats) != 1:
            raise UserError(
                f"the folders of one TFDS dataset hold one record format, not {', '.join(sorted(formats))}."
            )
        return sources

    def _info(self) -> tfds.core.DatasetInfo:
        format = next(iter(self._sources().values())).format
        return tfds.core.DatasetInfo(builder=self, features=features(format), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(source) for split, source in self._sources().items()}

    def _generate_examples(self, source: ArrayRecordSource) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in range(len(source)):
            yield i, to_example(source[i], source.format)


def prepare(name: str, folders: dict[str, str], data_dir: str):
    """Prepares the `data build` folders (split -> folder) as `vlm_jax_records/NAME` in `data_dir` (nothing is
    written if it is prepared already); returns (that TFDS name, {split: examples})."""
    if not re.fullmatch(r"[\w+\-.]+", name) or not all(re.fullmatch(r"\w+", split) for split in folders):
        raise UserError(
            f"a TFDS config name is letters, digits and _ + - . and split names are words; got {name!r}, {list(folders)}."
        )
    builder = VlmJaxRecords(config=RecordsConfig(name=name, folders=dict(folders)), data_dir=data_dir)
    builder.download_and_prepare()
    return f"vlm_jax_records/{name}", {split: info.num_examples for split, info in builder.info.splits.items()}
