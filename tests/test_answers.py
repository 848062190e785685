"""Answer scoring: VQA normalisation, exact match, grounding boxes (hand-computed references)."""

import pytest

from data_pipelines.templates import qwen_box
from vlm_jax.evaluators.answers import box_iou, exact_match, grounding_scores, normalize_answer, parse_box


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("Two.", "2"),
        ("The red circle!", "red circle"),
        ("2.5", "2.5"),
        ("1,000 dogs", "1000 dogs"),
        ("Dont know", "don't know"),
        ("  YES\n", "yes"),
        ("an apple, a pear", "apple pear"),
    ],
)
def test_answers_are_normalised_as_the_vqa_evaluation_does(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_counts_normalised_equality():
    assert exact_match(["Two", "blue.", "square"], ["2", "Blue", "circle"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_boxes_round_trip_through_qwen_text_and_score_by_iou():
    text = "it is " + qwen_box(8, 16, 40, 48, 64, 64, ref="the red circle")
    x1, y1, x2, y2 = parse_box(text, 64, 64)
    assert max(abs(x1 - 8), abs(y1 - 16), abs(x2 - 40), abs(y2 - 48)) < 64 / 1000 + 1e-9
    assert parse_box("no box here", 64, 64) is None
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    scores = grounding_scores([text, "nothing", qwen_box(0, 0, 32, 64, 64, 64)], [(8, 16, 40, 48)] * 3, [(64, 64)] * 3)
    # third box: (0,0,32,64) vs (8,16,40,48): intersection 24 x 32 = 768, union 2048 + 1024 - 768 = 2304
    assert scores["acc@0.5"] == pytest.approx(1 / 3)
    # (0.064 px of quantisation in the 1000-grid: 63.936 for 64)
    want = (box_iou(parse_box(text, 64, 64), (8, 16, 40, 48)) + 0 + 768 / 2304) / 3
    assert scores["mean_iou"] == pytest.approx(want, rel=1e-3)
