"""`vlm-jax data build`: user JSONL (pairs / llava / interleaved) -> ArrayRecord shards with encoded images.

Input shapes are in docs/data.md. Image paths are relative to the input file's
folder (or absolute). Every line either becomes one record or is skipped with a
counted reason; nothing is dropped silently:

* skipped: `invalid_json` (also a line nested too deeply to parse), `not_an_object`, `missing_field`,
  `bad_field_type`, `empty_text`, `missing_image_file`, `image_is_a_directory`, `unreadable_image_file`,
  `placeholder_mismatch` (llava: `<image>` markers != images; pairs and interleaved: a text holding an
  `<image>` marker, which no template can place), and the image reasons of `image_ops.BadImage`
  (`corrupt_image`, `empty_image`, `unsupported_format`, `absurd_aspect_ratio`, `image_too_large`) for
  pairs and llava records;
* repaired (written, and counted per record): `invalid_utf8` (bytes that are not UTF-8, or lone surrogates
  written as JSON escapes, become U+FFFD), `dropped_image:<reason>` (interleaved documents lose a bad
  image and keep their text).

Images that decode are kept as they are (CMYK, 16-bit, palette with transparency, animated GIF, EXIF-rotated
photos: the pipeline converts them, `image_ops.decode`). A leading UTF-8 byte-order mark is ignored.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from typing import Any, Iterator

from data_pipelines import image_ops
from data_pipelines.sources import FORMATS, write_index, write_shards
from data_pipelines.templates import IMAGE_MARKER
from vlm_jax.errors import UserError


class Skip(Exception):
    """A line that cannot become a record; `reason` is its counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _lines(path: str, format: str) -> Iterator[Any]:
    """Parsed JSON objects of the input (JSONL; for llava also a JSON array file), or `Skip`s for lines that are
    not JSON. Bytes that are not UTF-8 reach the strings as lone surrogates (`surrogateescape`): `_valid_text`
    repairs them in the records that are written, and image paths keep their original bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (some editors write one)
        raw = raw[3:]
    if format == "llava" and raw.lstrip()[:1] == b"[":
        text = raw.decode("utf-8", errors="surrogateescape")
        try:
            items = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise UserError(f"{path} starts like a JSON array but is not valid JSON ({e}).") from None
        if isinstance(items, list):
            yield from items
            return
        raise UserError(f"{path} starts like a JSON array but is not one.")
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            yield json.loads(line.decode("utf-8", errors="surrogateescape"))
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply to parse
            yield Skip("invalid_json")


def _valid_text(text: str) -> str:
    """`text` as valid UTF-8: bytes that were not UTF-8 (surrogate-escaped) and other lone surrogates become
    U+FFFD; unchanged (the same object) when it already is valid."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = bytearray()
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as `surrogateescape` carries it
            out.append(code - 0xDC00)
        elif 0xD800 <= code <= 0xDFFF:  # a lone surrogate from a JSON escape such as "\ud800"
            out += "\ufffd".encode("utf-8")
        else:
            out += ch.encode("utf-8")
    return out.decode("utf-8", errors="replace")


def _repair_record(record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(record with every text valid UTF-8, whether any text changed)."""
    changed = False

    def fix(text):
        nonlocal changed
        if not isinstance(text, str):
            return text
        fixed = _valid_text(text)
        changed |= fixed is not text
        return fixed

    out = dict(record)
    if "caption" in out:
        out["caption"] = fix(out["caption"])
    if "conversations" in out:
        out["conversations"] = [{"from": t["from"], "value": fix(t["value"])} for t in out["conversations"]]
    if "texts" in out:
        out["texts"] = [fix(t) for t in out["texts"]]
    return out, changed


def _read_image(path: str, base: str) -> bytes:
    if not path:
        raise Skip("missing_image_file")
    full = path if os.path.isabs(path) else os.path.join(base, path)
    if os.path.isdir(full):
        raise Skip("image_is_a_directory")
    if not os.path.isfile(full):
        raise Skip("missing_image_file")
    try:
        with open(full, "rb") as f:
            data = f.read()
    except OSError:
        raise Skip("unreadable_image_file") from None
    try:
        image_ops.decode(data)
    except image_ops.BadImage as e:
        raise Skip(e.reason) from None
    return data


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise Skip("bad_field_type")
    if not value.strip():
        raise Skip("empty_text")
    return value


def to_record(obj: Any, format: str, base: str, counts: collections.Counter) -> dict[str, Any]:
    """One parsed input object -> a record with image bytes (raises Skip). Repairs are added to `counts`; `build`
    keeps them only for records that are written."""
    if isinstance(obj, Skip):
        raise obj
    if not isinstance(obj, dict):
        raise Skip("not_an_object")
    if format == "pairs":
        if "image" not in obj or "caption" not in obj:
            raise Skip("missing_field")
        if not isinstance(obj["image"], str):
            raise Skip("bad_field_type")
        caption = _text(obj["caption"])
        if IMAGE_MARKER in caption:  # the pair's one image goes before its caption; a marker has no image
            raise Skip("placeholder_mismatch")
        return {"images": [_read_image(obj["image"], base)], "caption": caption}
    if format == "llava":
        if "conversations" not in obj:
            raise Skip("missing_field")
        turns = obj["conversations"]
        if not isinstance(turns, list):
            raise Skip("bad_field_type")
        if not turns:
            raise Skip("empty_text")
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt", "system"):
                raise Skip("bad_field_type")
            _text(turn.get("value"))
        paths = obj.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise Skip("bad_field_type")
        markers = sum(t["value"].count(IMAGE_MARKER) for t in turns)
        if markers != len(paths):
            raise Skip("placeholder_mismatch")
        images = [_read_image(p, base) for p in paths]
        return {"images": images, "conversations": [{"from": t["from"], "value": t["value"]} for t in turns]}
    # interleaved
    if "texts" not in obj or "images" not in obj:
        raise Skip("missing_field")
    texts, images = obj["texts"], obj["images"]
    if not isinstance(texts, list) or not isinstance(images, list):
        raise Skip("bad_field_type")
    if len(texts) != len(images):
        raise Skip("placeholder_mismatch")
    out_texts, out_images = [], []
    for text, image in zip(texts, images):
        if (text is None) == (image is None):
            raise Skip("bad_field_type")  # each position holds exactly one of a text and an image
        if image is None:
            if not isinstance(text, str):
                raise Skip("bad_field_type")
            if IMAGE_MARKER in text:  # images are the list's own positions, never markers in the text
                raise Skip("placeholder_mismatch")
            out_texts.append(text)
            out_images.append(None)
            continue
        if not isinstance(image, str):
            raise Skip("bad_field_type")
        try:
            data = _read_image(image, base)
        except Skip as e:
            counts[f"repaired:dropped_image:{e.reason}"] += 1
            continue
        out_texts.append(None)
        out_images.append(data)
    if not any(t and t.strip() for t in out_texts):
        raise Skip("empty_text")
    return {"texts": out_texts, "images": out_images}


def build(format: str, input_path: str, out_dir: str, records_per_shard: int = 10_000, progress: bool = True) -> dict:
    """Converts `input_path` to ArrayRecord shards in `out_dir`; returns the summary (also in index.json)."""
    from tqdm import tqdm

    if format not in FORMATS:
        raise UserError(f"--format {format!r} is not one of {', '.join(FORMATS)}.")
    if os.path.isdir(input_path):
        raise UserError(f"--input {input_path} is a folder; give the JSONL file itself.")
    if not os.path.isfile(input_path):
        raise UserError(f"the input file {input_path} does not exist.")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is an existing file; give a folder to write the shards to.")
    base = os.path.dirname(os.path.abspath(input_path))
    counts: collections.Counter = collections.Counter()

    def records() -> Iterator[dict[str, Any]]:
        lines = _lines(input_path, format)
        for obj in tqdm(lines, desc="records", unit="rec", disable=not progress, file=sys.stderr):
            repairs: collections.Counter = collections.Counter()
            try:
                record, repaired = _repair_record(to_record(obj, format, base, repairs))
            except Skip as e:
                counts[f"skipped:{e.reason}"] += 1
                continue
            counts.update(repairs)
            if repaired:
                counts["repaired:invalid_utf8"] += 1
            yield record

    written = write_shards(records(), out_dir, records_per_shard)
    if not written["records"]:
        raise UserError(
            f"no record of {input_path} could be converted (problems: {_describe(counts) or 'empty file'})."
        )
    summary = {
        "format": format,
        **written,
        "skipped": {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("skipped:")},
        "repaired": {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("repaired:")},
        "source": os.path.abspath(input_path),
    }
    write_index(out_dir, summary)
    return summary


def _describe(counts: collections.Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def summary_text(summary: dict, out_dir: str) -> str:
    """One line per fact, for the command's output."""
    lines = [
        f"Wrote {summary['records']} {summary['format']} records with {summary['images']} images "
        f"({summary['bytes'] / 1e6:.1f} MB) in {len(summary['shards'])} shard(s) to {out_dir}",
        f"Skipped {sum(summary['skipped'].values())}: "
        + (", ".join(f"{k}={v}" for k, v in sorted(summary["skipped"].items())) or "none"),
        f"Repaired {sum(summary['repaired'].values())}: "
        + (", ".join(f"{k}={v}" for k, v in sorted(summary["repaired"].items())) or "none"),
    ]
    return "\n".join(lines)
