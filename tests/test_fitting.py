"""The rules that fit an example into a row's token and image budgets."""

import numpy as np
import pytest

from data_pipelines.fitting import fit, image_spans

IMG, OPEN, CLOSE = 9, 7, 8


def example(layout):
    """ids from a layout string: 't' text token, 'I' placeholder, '<' / '>' wrappers."""
    table = {"t": 1, "I": IMG, "<": OPEN, ">": CLOSE}
    ids = np.array([table[c] for c in layout])
    return ids, ids == 1


def check_no_orphans(fitted, ids_layout_tokens, tokens_per_image):
    """Every kept image's placeholders are all there; no other placeholder remains."""
    assert (fitted.ids == IMG).sum() == sum(tokens_per_image[i] for i in fitted.kept_images)


def test_spans_include_wrappers_and_split_adjacent_images():
    ids, _ = example("tt<II>tIIIIt")
    assert image_spans(ids, IMG, [2, 2, 2], (OPEN, CLOSE)) == [(2, 6), (7, 9), (9, 11)]
    with pytest.raises(ValueError, match="placeholder tokens for images needing"):
        image_spans(ids, IMG, [2, 2], (OPEN, CLOSE))


def test_length_cut_inside_a_span_drops_that_image_whole():
    ids, predict = example("tt<III>ttt<III>tt")
    spans = image_spans(ids, IMG, [3, 3], (OPEN, CLOSE))
    fitted = fit(ids, predict, None, spans, [1, 1], max_tokens=12, max_slots=8)
    assert fitted.kept_images == [0] and fitted.truncated
    assert list(fitted.ids) == [1, 1, OPEN, IMG, IMG, IMG, CLOSE, 1, 1, 1]  # cut moved back to the span start
    check_no_orphans(fitted, ids, [3, 3])


def test_image_budget_removes_extra_images_and_keeps_their_text():
    ids, predict = example("tItItItIt")
    spans = image_spans(ids, IMG, [1, 1, 1, 1])
    fitted = fit(ids, predict, None, spans, [1, 1, 1, 1], max_tokens=100, max_slots=2)
    assert fitted.kept_images == [0, 1]
    assert list(fitted.ids) == [1, IMG, 1, IMG, 1, 1, 1]
    # Slots per image can exceed one (tiles): a 3-tile image does not fit a budget of 2.
    fitted = fit(ids, predict, None, spans, [3, 1, 1, 1], max_tokens=100, max_slots=2)
    assert fitted.kept_images == [1, 2]


def test_random_window_never_starts_inside_a_span():
    ids, predict = example("tttt<IIII>tttt<IIII>tttt")
    spans = image_spans(ids, IMG, [4, 4], (OPEN, CLOSE))
    for seed in range(50):
        fitted = fit(ids, predict, None, spans, [1, 1], max_tokens=10, max_slots=5, rng=np.random.default_rng(seed))
        assert len(fitted.ids) <= 10
        check_no_orphans(fitted, ids, [4, 4])
        # Wrappers come in pairs around complete spans.
        assert (fitted.ids == OPEN).sum() == (fitted.ids == CLOSE).sum() == len(fitted.kept_images)


def test_short_example_is_untouched():
    ids, predict = example("tt<I>tt")
    spans = image_spans(ids, IMG, [1], (OPEN, CLOSE))
    fitted = fit(ids, predict, predict.copy(), spans, [1], max_tokens=50, max_slots=1)
    assert list(fitted.ids) == list(ids) and fitted.kept_images == [0] and not fitted.truncated
    np.testing.assert_array_equal(fitted.prefix_mask, predict)
