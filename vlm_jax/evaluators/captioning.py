"""Caption metrics: CIDEr-D and BLEU-1..4 from pycocoevalcap (the COCO caption evaluation code).

Texts are tokenised here (lower case, punctuation removed, split on
whitespace) instead of by pycocoevalcap's PTBTokenizer, which needs a Java
runtime; for plain English captions the two agree up to punctuation handling.
CIDEr's document frequencies come from the references of the evaluated set,
as in the COCO evaluation.
"""

from __future__ import annotations

import re
from typing import Sequence

_PUNCTUATION = re.compile(r"[^\w\s]")


def tokenize(text: str) -> str:
    """Lower-cased words of `text` joined by single spaces (the form the scorers split on)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"cider", "bleu1".."bleu4"} of one predicted caption per item against its reference captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists.")
    if not predictions:
        return {"cider": 0.0, **{f"bleu{n}": 0.0 for n in range(1, 5)}}
    res = {i: [tokenize(p) or "<empty>"] for i, p in enumerate(predictions)}
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), **{f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}}
