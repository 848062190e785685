"""A deterministic synthetic token stream for language-model training and tests.

Each row is packed with several "documents". A document is an arithmetic
progression of token ids modulo the vocabulary (start and stride drawn at
random, stride in 1..4), so after its first two tokens every next token is
predictable from the context: a model that learns in-context induction drives
the loss far below log(vocab). Token 0 is padding.

Row r of global batch s is drawn from a generator seeded by (seed, split, s, r),
so any process can produce exactly its own rows, and the iterator state is
just the next batch index.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from vlm_jax.errors import ConfigError

_SPLIT_IDS = {"train": 0, "validation": 1}


class SyntheticTokens(grain.DatasetIterator):
    """Iterator of packed LM batches; config keys: data.seq_len, data.min_doc_len, batch_size, seed, model.vocab_size.

    A `grain.DatasetIterator` without parents, so Grain's checkpoint handler saves its state like any pipeline's."""

    def __init__(self, config, split: str, process_index: int = 0, process_count: int = 1):
        super().__init__()
        if split not in _SPLIT_IDS:
            raise ConfigError(f"split {split!r} is not one of {sorted(_SPLIT_IDS)}.")
        self.seed = int(config.seed)
        self.split = _SPLIT_IDS[split]
        self.seq_len = int(config.data.seq_len)
        self.min_doc_len = int(config.data.get("min_doc_len", 8))
        self.vocab = int(config.model.vocab_size)
        self.local_batch = config.batch_size // process_count
        self.first_row = process_index * self.local_batch
        self.next_batch = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._row(self.next_batch, self.first_row + i) for i in range(self.local_batch)]
        self.next_batch += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self.next_batch}

    def set_state(self, state: dict[str, Any]) -> None:
        self.next_batch = int(state["next_batch"])

    def _row(self, batch_index: int, row: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split, batch_index, row])
        length = self.seq_len + 1  # inputs and shifted targets come from one sequence
        seq = np.zeros(length, np.int32)
        seg = np.zeros(length, np.int32)
        pos = np.zeros(length, np.int32)
        start, segment = 0, 0
        while length - start >= self.min_doc_len:
            doc_len = int(rng.integers(self.min_doc_len, max(self.min_doc_len, length - start) + 1))
            first, stride = rng.integers(1, self.vocab), rng.integers(1, 5)
            segment += 1
            seq[start : start + doc_len] = 1 + (first - 1 + stride * np.arange(doc_len)) % (self.vocab - 1)
            seg[start : start + doc_len] = segment
            pos[start : start + doc_len] = np.arange(doc_len)
            start += doc_len
        tokens, targets = seq[:-1], seq[1:]
        segment_ids = seg[:-1]
        # A target counts only if it continues the same document.
        loss_mask = ((seg[:-1] == seg[1:]) & (segment_ids > 0)).astype(np.float32)
        return {
            "tokens": tokens,
            "targets": np.where(loss_mask > 0, targets, 0).astype(np.int32),
            "loss_mask": loss_mask,
            "segment_ids": segment_ids,
            "positions": pos[:-1],
        }
