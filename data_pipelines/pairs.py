"""Image-text pair batches for dual encoders (`data.name = "pairs"`): images [B, H, W, 3] and texts [B, Lt].

Batches also carry `labels` [B] (a record's class index, -1 if it has none),
which only zero-shot evaluation reads.

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
from data_pipelines.pipeline import BatchIteratorBase, in_workers, make_source, records_dataset, repair_text
from data_pipelines.tokenizer import Tokenizer


def pairs_source(config: ml_collections.ConfigDict, split: str):
    data = config.data
    if data.source == "shapes":
        return shapes.ShapesSource(
            split, int(data[f"{split}_size"]), int(data.get("dataset_seed", 0)), int(data.raw_size)
        )
    return make_source(data, split)


class PairsPreprocessor:
    """What a dual encoder sees of a pair: the image resized to `data.image_size` and normalised
    (`data.normalization`), the caption as bos + ids + eos cut / padded to `data.text_len`.

    The training pipeline and the evaluators (`vlm_jax/evaluators/dual_encoder_tasks.py`) share it.
    """

    def __init__(self, data: ml_collections.ConfigDict):
        self.tokenizer = Tokenizer(data.get("tokenizer") or shapes.tokenizer_path())
        self.size, self.text_len = int(data.image_size), int(data.text_len)
        self.normalization = data.normalization

    def image(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [size, size, 3] (bicubic resize ignoring the aspect ratio, then normalised)."""
        return image_ops.normalize(image_ops.fixed_resolution(image, self.size), self.normalization)

    def encode_text(self, text: str) -> np.ndarray:
        """bos + text + eos, cut and padded to `text_len` (what the text tower sees)."""
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text)][: self.text_len - 1] + [self.tokenizer.eos_id]
        out = np.full(self.text_len, self.tokenizer.pad_id, np.int32)
        out[: len(ids)] = ids
        return out

    def example(self, record: dict[str, Any]) -> dict[str, Any]:
        """A pairs record -> {"images", "texts", "labels", REPAIRS}, or {SKIP: reason} for a record to drop."""
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
        if len(self.tokenizer.encode(caption)) + 2 > self.text_len:
            repairs.append("truncated")
        label = np.int32(record.get("label", -1))  # class index for zero-shot evaluation; -1 = none
        return {"images": self.image(image), "texts": self.encode_text(caption), "labels": label, REPAIRS: repairs}


class PairsPipeline(BatchIteratorBase):
    """Iterator of this host's contrastive batches; checkpointable (`get_state` / `set_state`)."""

    def __init__(self, config, split: str, process_index: int = 0, process_count: int = 1, repeat: bool | None = None):
        self.source = pairs_source(config, split)
        self.preprocessor = PairsPreprocessor(config.data)
        training = split == "train"
        ds = records_dataset(config, self.source, process_index, process_count, training if repeat is None else repeat)
        examples = CountSkips(
            ds.map(self.preprocessor.example).to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
        )
        self._iterator = iter(
            in_workers(examples.batch(config.batch_size // process_count, drop_remainder=True), config.data)
        )
        super().__init__(self._iterator)

    def encode_text(self, text: str) -> np.ndarray:
        """bos + text + eos, cut and padded to `text_len` (`PairsPreprocessor.encode_text`)."""
        return self.preprocessor.encode_text(text)


def builtin_captions_config(root: str, image_size: int, text_len: int, normalization: str) -> dict:
    """The `data` section of a dual-encoder config that trains on the built-in dataset's `captions` task
    (`root` = a `data_pipelines.builtin.build.ensure()` folder, with its own SentencePiece model)."""
    from data_pipelines.builtin import build

    return dict(
        name="pairs",
        source="array_record",
        train_path=f"{root}/captions/train",
        validation_path=f"{root}/captions/validation",
        image_size=image_size,
        text_len=text_len,
        normalization=normalization,
        tokenizer=f"{root}/{build.TOKENIZER}.model",
        shuffle=True,
        worker_count=0,  # Grain worker processes preparing batches; 0 = in the training process
    )
