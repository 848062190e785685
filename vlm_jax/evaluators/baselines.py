"""Model-free baselines that a trained model must beat (computed from the data alone).

* VQA majority answer: per question type, the most common training answer, predicted for every question of
  that type (exact match as `answers.exact_match`).
* Nearest training caption: each evaluation image gets the caption of its nearest training image (L2 distance
  of 16x16 RGB thumbnails), scored with CIDEr-D and BLEU like a generated caption.

`evaluate` scores them on the records a system's evaluation reads (`config.eval_baselines = {kind: train
folder}` beside `config.eval_tasks`), as metrics "baseline/{name}" next to the model's "{name}".
"""

from __future__ import annotations

import collections
import io
from typing import Sequence

import numpy as np
from PIL import Image

from data_pipelines.sources import read_records
from vlm_jax.errors import UserError
from vlm_jax.evaluators.answers import exact_match, normalize_answer
from vlm_jax.evaluators.captioning import caption_scores

TRAIN_RECORDS = 20_000  # training records a baseline reads at most


def _answer(record: dict) -> str:
    return record.get("answer") or next(t["value"] for t in record["conversations"] if t["from"] == "gpt")


def majority_answer_scores(train: Sequence[dict], evaluation: Sequence[dict]) -> dict[str, float]:
    """`vqa_accuracy` (and `vqa_accuracy/{type}`) of the per-question-type majority training answer (one type if
    records have none)."""
    by_type = collections.defaultdict(collections.Counter)
    for record in train:
        by_type[record.get("question_type")][normalize_answer(_answer(record))] += 1
    overall = sum(by_type.values(), collections.Counter())
    guesses = []
    for record in evaluation:
        counts = by_type.get(record.get("question_type")) or overall
        guesses.append(counts.most_common(1)[0][0])
    answers = [_answer(r) for r in evaluation]
    scores = {"vqa_accuracy": exact_match(guesses, answers)}
    types = [r.get("question_type") for r in evaluation]
    for kind in sorted({t for t in types if t}):
        chosen = [i for i, t in enumerate(types) if t == kind]
        scores[f"vqa_accuracy/{kind}"] = exact_match([guesses[i] for i in chosen], [answers[i] for i in chosen])
    return scores


def majority_answer_accuracy(train: Sequence[dict], evaluation: Sequence[dict]) -> float:
    """Exact match of the per-question-type majority training answer (one type if records have none)."""
    return majority_answer_scores(train, evaluation)["vqa_accuracy"]


def _thumbnail(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((16, 16), Image.BILINEAR), np.float32).ravel()


def nearest_caption_scores(train: Sequence[dict], evaluation: Sequence[dict]) -> dict[str, float]:
    """Caption metrics of the nearest training image's caption for each evaluation image (pairs records)."""
    bank = np.stack([_thumbnail(r["images"][0]) for r in train])
    predictions = []
    for record in evaluation:
        distances = np.sum((bank - _thumbnail(record["images"][0])) ** 2, axis=1)
        predictions.append(train[int(np.argmin(distances))]["caption"])
    return caption_scores(predictions, [[r["caption"]] for r in evaluation])


BASELINES = {"vqa": ("llava", majority_answer_scores), "captions": ("pairs", nearest_caption_scores)}
"""kind -> (record format, fn(train records, evaluation records) -> metrics)."""


def evaluate(
    train_folders: dict[str, str], eval_folders: dict[str, str], limit: int, limits: dict[str, int] | None = None
) -> dict[str, float]:
    """"baseline/{metric}" for each kind in `train_folders` ({"vqa": DIR, "captions": DIR}: `data build`
    folders of training records), on the first `limit` (`limits[kind]` where given) records of
    `eval_folders[kind]`, as the model is."""
    out = {}
    for kind, train_folder in train_folders.items():
        if kind not in BASELINES:
            raise UserError(f"eval_baselines has no baseline {kind!r}; there are {', '.join(BASELINES)}.")
        if kind not in eval_folders:
            raise UserError(f"eval_baselines names {kind!r}, which eval_tasks does not evaluate.")
        fmt, run = BASELINES[kind]
        scores = run(read_records(train_folder, TRAIN_RECORDS, fmt), read_records(eval_folders[kind], int((limits or {}).get(kind, limit)), fmt))
        out.update({f"baseline/{name}": float(value) for name, value in scores.items()})
    return out
