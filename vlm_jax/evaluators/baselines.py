"""Model-free baselines that a trained model must beat (computed from the data alone).

* VQA majority answer: per question type, the most common training answer, predicted for every question of
  that type (exact match as `answers.exact_match`).
* Nearest training caption: each evaluation image gets the caption of its nearest training image (L2 distance
  of 16x16 grey thumbnails), scored with CIDEr-D and BLEU like a generated caption.
"""

from __future__ import annotations

import collections
import io
from typing import Sequence

import numpy as np
from PIL import Image

from vlm_jax.evaluators.answers import exact_match, normalize_answer
from vlm_jax.evaluators.captioning import caption_scores


def _answer(record: dict) -> str:
    return record.get("answer") or next(t["value"] for t in record["conversations"] if t["from"] == "gpt")


def majority_answer_accuracy(train: Sequence[dict], evaluation: Sequence[dict]) -> float:
    """Exact match of the per-question-type majority training answer (one type if records have none)."""
    by_type = collections.defaultdict(collections.Counter)
    for record in train:
        by_type[record.get("question_type")][normalize_answer(_answer(record))] += 1
    overall = sum(by_type.values(), collections.Counter())
    guesses = []
    for record in evaluation:
        counts = by_type.get(record.get("question_type")) or overall
        guesses.append(counts.most_common(1)[0][0])
    return exact_match(guesses, [_answer(r) for r in evaluation])


def _thumbnail(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((16, 16), Image.BILINEAR), np.float32).ravel()


def nearest_caption_scores(train: Sequence[dict], evaluation: Sequence[dict]) -> dict[str, float]:
    """Caption metrics of the nearest training image's caption for each evaluation image (pairs records)."""
    bank = np.stack([_thumbnail(r["images"][0]) for r in train])
    predictions = []
    for record in evaluation:
        distances = np.sum((bank - _thumbnail(record["images"][0])) ** 2, axis=1)
        predictions.append(train[int(np.argmin(distances))]["caption"])
    return caption_scores(predictions, [[r["caption"]] for r in evaluation])
