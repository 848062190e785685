"""Caption metrics: BLEU and CIDEr-D against hand computations."""

import math

import pytest

from vlm_jax.evaluators.captioning import caption_scores, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A red, small Circle!") == "a red small circle"


def test_bleu1_is_unigram_precision_times_the_brevity_penalty():
    scores = caption_scores(["A red circle."], [["a red circle on blue"]])
    # every predicted word is in the reference (precision 1); 3 words against 5: BP = exp(1 - 5/3)
    assert scores["bleu1"] == pytest.approx(math.exp(1 - 5 / 3), rel=1e-6)


def test_cider_d_and_bleu4_by_hand():
    refs = [["a red circle on blue"], ["two green squares here", "green squares"]]
    scores = caption_scores(["red circle on blue", "two green squares here"], refs)
    # The two items share no word: every n-gram has document frequency 1, the same idf, so each cosine is
    # sqrt(shared n-grams / reference n-grams) when all the prediction's n-grams are in the reference.
    # pycocoevalcap measures length in bigrams; the penalty is exp(-delta^2 / (2 * 6^2)).
    # Item 1: n-grams 4/5, 3/4, 2/3, 1/2 of the reference; lengths 3 against 4.
    first = 10 * math.exp(-1 / 72) * (math.sqrt(4 / 5) + math.sqrt(3 / 4) + math.sqrt(2 / 3) + math.sqrt(1 / 2)) / 4
    # Item 2, averaged over its two references: the identical one gives 1 at every n; "green squares" gives
    # 2 / sqrt(4 * 2) for unigrams, 1 / sqrt(3 * 1) for bigrams, nothing longer, lengths 3 against 1.
    second = 10 * (1 + math.exp(-4 / 72) * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4) / 2
    assert scores["cider"] == pytest.approx((first + second) / 2, rel=1e-6)
    # BLEU: every predicted n-gram is in a reference (precision 1 for n = 1..4); 8 words against the closest
    # reference lengths 5 + 4 = 9: brevity penalty exp(1 - 9/8).
    assert scores["bleu4"] == pytest.approx(math.exp(1 - 9 / 8), rel=1e-6)
    with pytest.raises(ValueError):
        caption_scores(["x"], [])
