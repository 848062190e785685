"""Multimodal sequence packing with Grain, and the bookkeeping of skipped records.

Examples arrive as dicts of per-example arrays: `tokens`, `targets`,
`loss_mask` (length n), optionally `prefix_mask` and `feature_index` (LLaVA-NeXT's
feature order, relative to the example's own slots), and `images` [k, H, W, C]
(k media slots: images, tiles or frames; k may be 0) — or, at native resolution
(Qwen2-VL), `patches` [n, 1176] with `patch_positions`, `patch_groups` and the
example's M-RoPE `mrope_positions` [length, 3]. Grain's first-fit packer
(`grain.experimental.FirstFitPackIterDataset`) places whole examples into rows
of `seq_len` tokens and `max_images` media slots (or `max_patches` patches): an example that does not fit
either budget goes to a later row, never split. Because Grain writes one
segment id per example into every packed feature, the image slots of a row
carry the same segment ids as the example's tokens, so an image can only ever
reach the text of its own example.
"""

from __future__ import annotations

import collections
from typing import Any

import grain
import numpy as np

from vlm_jax.errors import UserError

SKIP = "_skip"  # key of a processed record that is to be dropped; its value is the reason
REPAIRS = "_repairs"  # key listing the repairs made to a kept record


class CountSkips(grain.IterDataset):
    """Drops records marked `{SKIP: reason}` and counts skips and repairs per reason (state is checkpointed).

    If `max_consecutive_skips` records in a row are skipped, the data or the
    config is broken (say, a row too short for any example): it raises one
    clear error with the reasons instead of looping forever.
    """

    def __init__(self, parent: grain.IterDataset, max_consecutive_skips: int = 1000):
        super().__init__(parent)
        self.max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> "CountSkipsIterator":
        return CountSkipsIterator(self._parent.__iter__(), self.max_consecutive_skips)


class CountSkipsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive_skips: int):
        super().__init__(parent)
        self.counts: collections.Counter = collections.Counter()
        self.max_consecutive_skips = max_consecutive_skips

    def __next__(self) -> dict[str, Any]:
        recent: collections.Counter = collections.Counter()
        while True:
            example = next(self._parent)
            if SKIP in example:
                self.counts[f"skipped/{example[SKIP]}"] += 1
                recent[example[SKIP]] += 1
                if sum(recent.values()) >= self.max_consecutive_skips:
                    reasons = ", ".join(f"{k}={v}" for k, v in recent.most_common())
                    raise UserError(
                        f"the last {self.max_consecutive_skips} records were all skipped ({reasons}); "
                        "check the data and the data config (seq_len, max_images, template)."
                    )
                continue
            for reason in example.pop(REPAIRS, ()):
                self.counts[f"repaired/{reason}"] += 1
            self.counts["records"] += 1
            return example

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "counts": dict(self.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.counts = collections.Counter(state["counts"])


def pack(
    examples: grain.IterDataset,
    seq_len: int,
    max_images: int,
    num_bins: int,
    seed: int,
    with_prefix_mask: bool = False,
    with_feature_index: bool = False,
    max_patches: int = 0,
) -> grain.IterDataset:
    """Packs examples into rows in the batch format (one row per element; batch afterwards). `max_patches` > 0:
    native-resolution examples (`mrope_positions`, `patches`, `patch_positions`, `patch_groups`), packed under
    `max_patches` patches per row in place of `max_images` media slots."""
    sequence_keys = ["tokens", "targets", "loss_mask"] + (["prefix_mask"] if with_prefix_mask else [])
    sequence_keys += ["feature_index"] if with_feature_index else []
    sequence_keys += ["mrope_positions"] if max_patches else []
    length_struct = {k: seq_len for k in sequence_keys}
    if max_patches:
        length_struct.update(patches=max_patches, patch_positions=max_patches, patch_groups=max_patches)
    else:
        length_struct["images"] = max_images
    packed = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct=length_struct, num_packing_bins=num_bins, seed=seed, shuffle_bins=True
    )
    return packed.map(_to_batch_format)


def _to_batch_format(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {
        "tokens": np.asarray(row["tokens"], np.int32),
        "targets": np.asarray(row["targets"], np.int32),
        "loss_mask": np.asarray(row["loss_mask"], np.float32),
        "segment_ids": np.asarray(row["tokens_segment_ids"], np.int32),
        "positions": np.asarray(row["tokens_positions"], np.int32),
    }
    if "patches" in row:
        out["positions"] = np.asarray(row["mrope_positions"], np.int32).T  # [3, L], per example as computed
        segments = np.asarray(row["patches_segment_ids"], np.int32)
        # Attention groups: (example, image within it) -> 1, 2, ... in row order; padding 0.
        key = segments.astype(np.int64) << 32 | np.asarray(row["patch_groups"], np.int64)
        starts = (segments > 0) & np.concatenate([[True], key[1:] != key[:-1]])
        out.update(
            patches=np.asarray(row["patches"], np.float32),
            patch_positions=np.asarray(row["patch_positions"], np.int32),
            patch_groups=np.where(segments > 0, np.cumsum(starts), 0).astype(np.int32),
            patch_segment_ids=segments,
        )
    else:
        out["images"] = np.asarray(row["images"], np.float32)
        out["image_segment_ids"] = np.asarray(row["images_segment_ids"], np.int32)
    if "prefix_mask" in row:
        out["prefix_mask"] = np.asarray(row["prefix_mask"], bool)
    if "feature_index" in row:
        out["feature_index"] = np.asarray(row["feature_index"], np.int32)
    return out
