"""Fitting one tokenized example into a packed row's budgets without ever orphaning an image.

An example is a token sequence `ids` with per-token `predict` (training
target) flags, in which every image occupies one contiguous *span*: its
placeholder tokens, plus the `<img>` / `</img>` style wrapper tokens around
them if the template uses them. The rules, applied in this order:

1. **Window** (interleaved documents, Flamingo / M3W style): a window of at most
   `max_tokens` tokens starts at a random token that is not inside a span.
2. **Image budget**: only the first images whose slots fit `max_slots` are
   kept; the spans of the others are removed from the text (their
   placeholders go with them; the surrounding text stays).
3. **Length**: the sequence is cut to `max_tokens`; if the cut falls inside a
   span, it moves to the span's start, so that image is dropped whole.

So a placeholder is never left without its image, nor an image without its
placeholders.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Fitted:
    """An example after fitting: the kept tokens and which images (by index) survived."""

    ids: np.ndarray
    predict: np.ndarray
    prefix_mask: np.ndarray | None
    kept_images: list[int]
    truncated: bool


def image_spans(
    ids: np.ndarray, placeholder_id: int, tokens_per_image: list[int], wrapper_ids: tuple[int, ...] = ()
) -> list[tuple[int, int]]:
    """[start, end) of each image's span, in order; image i owns `tokens_per_image[i]` placeholders.

    Consecutive placeholders are shared out in order, so adjacent images split
    one run. A wrapper token directly before or after a span belongs to it.
    """
    positions = np.flatnonzero(ids == placeholder_id)
    if len(positions) != sum(tokens_per_image):
        raise ValueError(f"{len(positions)} placeholder tokens for images needing {sum(tokens_per_image)}.")
    spans, cursor = [], 0
    for count in tokens_per_image:
        chunk = positions[cursor : cursor + count]
        cursor += count
        if count and not (np.diff(chunk) == 1).all():
            raise ValueError("an image's placeholder tokens are not contiguous.")
        start, end = int(chunk[0]), int(chunk[-1]) + 1
        if start > 0 and ids[start - 1] in wrapper_ids:
            start -= 1
        if end < len(ids) and ids[end] in wrapper_ids:
            end += 1
        spans.append((start, end))
    return spans


def fit(
    ids: np.ndarray,
    predict: np.ndarray,
    prefix_mask: np.ndarray | None,
    spans: list[tuple[int, int]],
    slots: list[int],
    max_tokens: int,
    max_slots: int,
    rng: np.random.Generator | None = None,
) -> Fitted:
    """Applies the window (if `rng` is given and the example is too long), image-budget and length rules."""
    n = len(ids)
    keep = np.zeros(n, bool)
    start = 0
    if rng is not None and n > max_tokens:
        start = int(rng.integers(0, n - max_tokens + 1))
        for s, e in spans:  # never start inside a span
            if s < start < e:
                start = s
    keep[start:] = True
    candidates, used = [], 0
    for i, ((s, e), k) in enumerate(zip(spans, slots)):
        if s < start:
            keep[s:e] = False  # before the window
        elif used + k <= max_slots:
            candidates.append(i)
            used += k
        else:
            keep[s:e] = False  # over the image budget: its placeholders go too
    index = np.flatnonzero(keep)
    cut = index[:max_tokens]
    kept_images = []
    for i in candidates:
        s, e = spans[i]
        if not len(cut):
            break
        if s <= cut[-1] < e - 1:  # the cut falls inside this span: drop the image whole
            cut = cut[cut < s]
            break
        if e - 1 <= cut[-1]:
            kept_images.append(i)
    truncated = len(cut) < n
    return Fitted(
        ids=ids[cut],
        predict=predict[cut],
        prefix_mask=None if prefix_mask is None else prefix_mask[cut],
        kept_images=kept_images,
        truncated=bool(truncated),
    )
