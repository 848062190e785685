"""Caption metrics: BLEU against a hand computation, CIDEr ordering."""

import math

import pytest

from vlm_jax.evaluators.captioning import caption_scores, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A red, small Circle!") == "a red small circle"


def test_bleu1_is_unigram_precision_times_the_brevity_penalty():
    scores = caption_scores(["A red circle."], [["a red circle on blue"]])
    # every predicted word is in the reference (precision 1); 3 words against 5: BP = exp(1 - 5/3)
    assert scores["bleu1"] == pytest.approx(math.exp(1 - 5 / 3), rel=1e-6)


def test_cider_ranks_the_right_caption_first():
    refs = [["a red circle on blue", "a small red circle"], ["two green squares", "green squares, two of them"]]
    right = caption_scores(["a red circle", "two green squares"], refs)
    swapped = caption_scores(["two green squares", "a red circle"], refs)
    assert right["cider"] > 1.0 > swapped["cider"] and right["bleu4"] > swapped["bleu4"]
    with pytest.raises(ValueError):
        caption_scores(["x"], [])
