"""Image-text pair batches for dual encoders (`data.name = "pairs"`): images [B, H, W, 3] and texts [B, Lt].

    source -> shuffle(seed) -> this host's shard -> repeat -> decode, resize, normalise,
    tokenize (bos + caption + eos, cut / padded to text_len) -> drop and count bad records -> batch

No packing: every row is one pair, as contrastive losses need. Sources are
those of the Grain pipeline plus `shapes` (the procedural dataset of
`data_pipelines/shapes.py`). Like the Grain pipeline, the iterator state is
checkpointed with the model and bad records are skipped and counted.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np

from data_pipelines import image_ops, shapes
from data_pipelines.packing import REPAIRS, SKIP, CountSkips
from data_pipelines.pipeline import counts_of, make_source, records_dataset, repair_text
from data_pipelines.tokenizer import Tokenizer


def pairs_source(config: ml_collections.ConfigDict, split: str):
    data = config.data
    if data.source == "shapes":
        return shapes.ShapesSource(
            split, int(data[f"{split}_size"]), int(data.get("dataset_seed", 0)), int(data.raw_size)
        )
    return make_source(data, split)


class PairsPipeline:
    """Iterator of this host's contrastive batches; checkpointable (`get_state` / `set_state`)."""

    def __init__(self, config, split: str, process_index: int = 0, process_count: int = 1, repeat: bool | None = None):
        data = config.data
        self.source = pairs_source(config, split)
        self.tokenizer = Tokenizer(data.get("tokenizer") or shapes.tokenizer_path())
        self.size, self.text_len = int(data.image_size), int(data.text_len)
        self.normalization = data.normalization
        training = split == "train"
        ds = records_dataset(config, self.source, process_index, process_count, training if repeat is None else repeat)
        examples = CountSkips(
            ds.map(self._process).to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
        )
        self._iterator = iter(examples.batch(config.batch_size // process_count, drop_remainder=True))

    def _process(self, record: dict[str, Any]) -> dict[str, Any]:
        repairs: list[str] = []
        caption = repair_text(record.get("caption", ""), repairs)
        if not caption.strip():
            return {SKIP: "empty_text"}
        images = record.get("images") or [None]
        try:
            image = image_ops.decode(images[0]) if images[0] is not None else None
        except image_ops.BadImage as e:
            return {SKIP: e.reason}
        if image is None:
            return {SKIP: "missing_image"}
        pixels = image_ops.normalize(image_ops.fixed_resolution(image, self.size), self.normalization)
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(caption)][: self.text_len - 1] + [self.tokenizer.eos_id]
        texts = np.full(self.text_len, self.tokenizer.pad_id, np.int32)
        texts[: len(ids)] = ids
        if len(ids) == self.text_len and len(self.tokenizer.encode(caption)) + 2 > self.text_len:
            repairs.append("truncated")
        return {"images": pixels, "texts": texts, REPAIRS: repairs}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)

    def stats(self) -> dict[str, int]:
        return counts_of(self._iterator)
