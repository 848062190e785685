"""Model-free baselines on tiny hand-made record sets, against values computed by hand in the comments."""

import io

import pytest
from PIL import Image

from data_pipelines.sources import write_index, write_shards
from vlm_jax.errors import UserError
from vlm_jax.evaluators import baselines


def vqa(question_type, answer, as_turn=True):
    """A llava-format VQA record; the answer is its gpt turn, or (as_turn=False) its "answer" field."""
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": answer}]
    record = {"images": [], "conversations": turns if as_turn else turns[:1], "question_type": question_type}
    return record if as_turn else {**record, "answer": answer}


# Majority training answer per type, after VQA normalisation:
#   colour: "red", "Red.", "red", "blue" -> red 3 of 4;  count: "2", "two", "3" -> 2 twice of 3.
#   over all types: red 3, 2 2, blue 1, 3 1 -> red (for a type training never saw).
VQA_TRAIN = [vqa("colour", a) for a in ("red", "Red.", "red", "blue")] + [vqa("count", a) for a in ("2", "two", "3")]
VQA_EVAL = [
    vqa("colour", "red"),  # guess red: right
    vqa("colour", "blue", as_turn=False),  # guess red: wrong
    vqa("count", "Two"),  # guess 2, "Two" normalises to 2: right
    vqa("count", "3"),  # guess 2: wrong
    vqa("count", "2", as_turn=False),  # guess 2: right
    vqa("shape", "circle"),  # no shape in training: guess red (overall majority): wrong
]


def test_majority_answer_per_question_type():
    # colour 1 of 2, count 2 of 3, shape 0 of 1; all: 3 of 6.
    assert baselines.majority_answer_scores(VQA_TRAIN, VQA_EVAL) == {
        "vqa_accuracy": 0.5,
        "vqa_accuracy/colour": 0.5,
        "vqa_accuracy/count": 2 / 3,
        "vqa_accuracy/shape": 0.0,
    }
    assert baselines.majority_answer_accuracy(VQA_TRAIN, VQA_EVAL) == 0.5


def test_majority_answer_without_question_types():
    untyped = lambda answers: [{"images": [], "answer": a} for a in answers]  # noqa: E731
    # training majority: "yes" ("yes", "Yes") 2 of 3; on eval [yes, no, no]: 1 of 3, and no per-type metric.
    scores = baselines.majority_answer_scores(untyped(["yes", "no", "Yes"]), untyped(["yes", "no", "no"]))
    assert scores == {"vqa_accuracy": pytest.approx(1 / 3)}


def pair(colour, caption, size=(8, 8)):
    """A pairs record: a solid-colour PNG (its 16x16 thumbnail is that colour everywhere) and its caption."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return {"images": [buffer.getvalue()], "caption": caption}


CAPTION_TRAIN = [
    pair((255, 0, 0), "red square on white"),
    pair((0, 0, 255), "blue circle near black"),
    pair((100, 100, 105), "grey blob in fog"),
]
# Squared distance per thumbnail pixel (256 pixels all alike, so the factor 256 does not change the order):
#   (200,0,0):     red 55^2 = 3025;  blue 200^2+255^2;  grey 100^2+100^2+105^2 = 31025 -> red caption.
#   (100,100,255): blue 100^2+100^2 = 20000;  grey 150^2 = 22500;  red far -> blue caption
#                  (the L1 distance would pick grey: 150 against 200).
#   (0,0,200):     blue 55^2 = 3025;  grey 100^2+100^2+95^2 = 29025 -> blue caption, against "green triangle ...".
CAPTION_EVAL = [
    pair((200, 0, 0), "red square on white", size=(24, 10)),
    pair((100, 100, 255), "blue circle near black", size=(5, 3)),
    pair((0, 0, 200), "green triangle under tree"),
]
# The three references share no word, so every n-gram has document frequency 1 (idf log 3 > 0):
#   CIDEr-D: the two identical captions score 10 (cosine 1 for n = 1..4, equal lengths), the third 0 -> 20/3.
#   BLEU (over the corpus): right n-grams 8/12, 6/9, 4/6, 2/3 = 2/3 each; 12 words against 12, brevity 1
#   -> BLEU-1..4 = 2/3.
CAPTION_SCORES = {"cider": 20 / 3, **{f"bleu{n}": 2 / 3 for n in range(1, 5)}}


def test_nearest_training_caption():
    scores = baselines.nearest_caption_scores(CAPTION_TRAIN, CAPTION_EVAL)
    assert scores == pytest.approx(CAPTION_SCORES, rel=1e-6)


def folder(path, fmt, records):
    """A `vlm-jax data build` folder of `records`."""
    index = write_shards(records, str(path))
    write_index(str(path), {"format": fmt, **index})
    return str(path)


def test_evaluate_reads_the_folders_and_the_evaluated_count(tmp_path):
    train = {
        "vqa": folder(tmp_path / "vqa", "llava", VQA_TRAIN),
        "captions": folder(tmp_path / "cap", "pairs", CAPTION_TRAIN),
    }
    evals = {
        "vqa": folder(tmp_path / "vqa_eval", "llava", VQA_EVAL),
        "captions": folder(tmp_path / "cap_eval", "pairs", CAPTION_EVAL),
    }
    # vqa on its first 3 records (red right, blue wrong, Two right): colour 1/2, count 1/1, all 2/3;
    # captions on all 3 (limits): the scores above.
    scores = baselines.evaluate(train, evals, 3, {"captions": 5})
    expected = {"vqa_accuracy": 2 / 3, "vqa_accuracy/colour": 0.5, "vqa_accuracy/count": 1.0, **CAPTION_SCORES}
    assert scores == pytest.approx({f"baseline/{k}": v for k, v in expected.items()}, rel=1e-6)
    # limits[vqa] = 6: all six records, 3 of 6 right.
    assert baselines.evaluate({"vqa": train["vqa"]}, evals, 3, {"vqa": 6})["baseline/vqa_accuracy"] == 0.5
    with pytest.raises(UserError, match="no baseline 'fewshot'"):
        baselines.evaluate({"fewshot": train["vqa"]}, evals, 3)
    with pytest.raises(UserError, match="which eval_tasks does not evaluate"):
        baselines.evaluate({"vqa": train["vqa"]}, {}, 3)
    with pytest.raises(UserError, match="holds pairs records"):  # a captions folder named as the vqa training set
        baselines.evaluate({"vqa": train["captions"]}, evals, 3)
