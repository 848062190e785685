"""Scoring generated answers: VQA exact match after the VQA benchmark's normalisation, and grounding boxes.

`normalize_answer` follows the official VQA evaluation's answer processing
(lower case; punctuation removed, except that a period between digits stays;
number words zero..ten become digits; articles dropped; common contractions
restored to their apostrophe form), so "Two." and "2" match. Boxes are read
from Qwen-VL grounding text, `<box>(x1,y1),(x2,y2)</box>` with coordinates
normalised to [0, 1000) (`data_pipelines.templates.qwen_box` writes them).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "im": "i'm",
                 "ive": "i've", "youre": "you're", "thats": "that's", "whats": "what's", "its": "it's"}  # fmt: skip
_BOX = re.compile(r"<box>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*</box>")


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s']", " ", text)  # punctuation, but keep 2.5
    words = []
    for word in text.replace("'", "").split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answer after `normalize_answer`."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers.")
    if not answers:
        return 0.0
    return float(np.mean([normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]))


def parse_box(text: str, width: float, height: float) -> tuple[float, float, float, float] | None:
    """The first `<box>(x1,y1),(x2,y2)</box>` of `text` as a pixel box (x1, y1, x2, y2), or None."""
    match = _BOX.search(text)
    if match is None:
        return None
    x1, y1, x2, y2 = (int(v) for v in match.groups())
    return x1 / 1000 * width, y1 / 1000 * height, x2 / 1000 * width, y2 / 1000 * height


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (corners inclusive of area, i.e. continuous)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def grounding_scores(
    predictions: Sequence[str], boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[float, float]]
) -> dict[str, float]:
    """Mean IoU and accuracy@0.5 of predicted grounding texts against pixel boxes (no box in the text = IoU 0)."""
    ious = []
    for text, box, (width, height) in zip(predictions, boxes, sizes, strict=True):
        predicted = parse_box(text, width, height)
        ious.append(0.0 if predicted is None else box_iou(predicted, box))
    ious = np.asarray(ious, np.float64)
    return {
        "mean_iou": float(ious.mean()) if len(ious) else 0.0,
        "acc@0.5": float((ious >= 0.5).mean()) if len(ious) else 0.0,
    }
