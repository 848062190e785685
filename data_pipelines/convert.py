"""`vlm-jax data build`: user JSONL (pairs / llava / interleaved) -> ArrayRecord shards with encoded images.

Input shapes are in docs/data.md. Image paths are relative to the input file's
folder (or absolute). Every line either becomes one record or is skipped with a
counted reason; nothing is dropped silently:

* skipped: `invalid_json`, `not_an_object`, `missing_field`, `bad_field_type`,
  `empty_text`, `missing_image_file`, `unreadable_image_file`,
  `placeholder_mismatch` (llava: `<image>` markers != images), and the image
  reasons of `image_ops.BadImage` (`corrupt_image`, `empty_image`, ...) for
  pairs and llava records;
* repaired (written, and counted): `invalid_utf8` (undecodable bytes become
  U+FFFD), `dropped_image:<reason>` (interleaved documents lose a bad image and
  keep their text).
"""

from __future__ import annotations

import collections
import json
import os
import sys
from typing import Any, Iterator

from data_pipelines import image_ops
from data_pipelines.sources import FORMATS, write_index, write_shards
from vlm_jax.errors import UserError


class Skip(Exception):
    """A line that cannot become a record; `reason` is its counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _lines(path: str, format: str, counts: collections.Counter) -> Iterator[Any]:
    """Parsed JSON objects of the input (JSONL; for llava also a JSON array file)."""
    with open(path, "rb") as f:
        raw = f.read()
    if format == "llava" and raw.lstrip()[:1] == b"[":
        text = raw.decode("utf-8", errors="replace")
        try:
            yield from json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} starts like a JSON array but is not valid JSON ({e}).") from None
        return
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", errors="replace")
            counts["repaired:invalid_utf8"] += 1
        try:
            yield json.loads(text)
        except json.JSONDecodeError:
            yield Skip("invalid_json")


def _read_image(path: str, base: str) -> bytes:
    full = path if os.path.isabs(path) else os.path.join(base, path)
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
    """One parsed input object -> a record with image bytes (raises Skip)."""
    if isinstance(obj, Skip):
        raise obj
    if not isinstance(obj, dict):
        raise Skip("not_an_object")
    if format == "pairs":
        if "image" not in obj or "caption" not in obj:
            raise Skip("missing_field")
        if not isinstance(obj["image"], str):
            raise Skip("bad_field_type")
        return {"images": [_read_image(obj["image"], base)], "caption": _text(obj["caption"])}
    if format == "llava":
        turns = obj.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise Skip("missing_field")
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt", "system"):
                raise Skip("bad_field_type")
            _text(turn.get("value"))
        paths = obj.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise Skip("bad_field_type")
        markers = sum(t["value"].count("<image>") for t in turns)
        if markers != len(paths):
            raise Skip("placeholder_mismatch")
        return {"images": [_read_image(p, base) for p in paths], "conversations": turns}
    # interleaved
    texts, images = obj.get("texts"), obj.get("images")
    if not isinstance(texts, list) or not isinstance(images, list):
        raise Skip("missing_field")
    if len(texts) != len(images):
        raise Skip("placeholder_mismatch")
    out_texts, out_images = [], []
    for text, image in zip(texts, images):
        if (text is None) == (image is None):
            raise Skip("bad_field_type")  # each position holds exactly one of a text and an image
        if image is None:
            if not isinstance(text, str):
                raise Skip("bad_field_type")
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
    if not os.path.isfile(input_path):
        raise UserError(f"the input file {input_path} does not exist.")
    base = os.path.dirname(os.path.abspath(input_path))
    counts: collections.Counter = collections.Counter()

    def records() -> Iterator[dict[str, Any]]:
        lines = _lines(input_path, format, counts)
        for obj in tqdm(lines, desc="records", unit="rec", disable=not progress, file=sys.stderr):
            try:
                yield to_record(obj, format, base, counts)
            except Skip as e:
                counts[f"skipped:{e.reason}"] += 1

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
