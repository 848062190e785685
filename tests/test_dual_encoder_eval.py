"""Dual-encoder evaluations (vlm_jax/evaluators/dual_encoder_tasks.py): each metric reaches 1 with oracle
embeddings and falls to chance (or 0) with wrong ones; record selection, episodes and the system's evaluate."""

import re

import jax
import numpy as np
import pytest

from conftest import REPO
from data_pipelines import image_ops
from data_pipelines.builtin import build, scenes, tasks
from data_pipelines.pairs import PairsPreprocessor, builtin_captions_config
from data_pipelines.sources import read_records
from data_pipelines.tokenizer import Tokenizer
from vlm_jax.config_lib import ConfigDict, load_config
from vlm_jax.errors import UserError
from vlm_jax.evaluators import dual_encoder_tasks as det
from vlm_jax.evaluators.contrastive import retrieval_recall, retrieval_recall_relevant
from vlm_jax.train import trainer as trainer_lib

COMBOS = [(c, s) for c in scenes.COLOURS for s in scenes.SHAPES]  # the 40 classes, enumerated here independently


def one_hot(index, size):
    out = np.zeros(size)
    out[index] = 1.0
    return out


class FakeEmbedder:
    """Stands in for `Embedder`: images and texts are embedded by lookup functions written in the tests."""

    def __init__(self, image_fn, text_fn, image_size=16):
        self.image_size = image_size
        self.image_fn, self.text_fn = image_fn, text_fn

    def images(self, images):
        return np.stack([self.image_fn(np.asarray(i)) for i in images])

    def texts(self, texts):
        return np.stack([self.text_fn(t) for t in texts])


def test_recall_with_shared_captions_by_hand():
    images = np.eye(3)
    # texts 0, 1 are the same caption (of images 0 and 1); text 2 is image 2's. Text 1 looks most like image 2.
    texts = np.array([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0], [0.0, 0.0, 1.0]])
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    relevant = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    m = retrieval_recall_relevant(images, texts, relevant, ks=(1, 2))
    # image 0: best text 0 (relevant) hit. image 1: sims to texts = [.45, .45, 0] -> text 0 first, relevant: hit.
    # image 2: sims [0, .89, 1] -> text 2 first: hit.  -> i2t@1 = 1.
    assert m["i2t_recall@1"] == 1.0
    # text 0 -> image 0 (hit); text 1 -> image 2 first (.89), then image 1 (.45): miss at 1, hit at 2;
    # text 2 -> image 2 (hit).
    assert m["t2i_recall@1"] == pytest.approx(2 / 3) and m["t2i_recall@2"] == 1.0
    # One text per image: the same numbers as the one-to-one function.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    assert retrieval_recall_relevant(a, b, np.eye(12, dtype=bool)) == retrieval_recall(a, b, np.arange(12))


def test_retrieval_task_oracle_and_shuffled():
    config = ConfigDict(dict(image_size=16, text_len=8, normalization="siglip", tokenizer=""))
    prep = PairsPreprocessor(config)
    records = [tasks.make_record("captions", "validation", i) for i in range(12)]
    records.append(dict(records[5], caption=records[3]["caption"]))  # two images share a caption
    captions = sorted({r["caption"] for r in records})
    assert len(captions) == 12

    class Fake:
        preprocessor = prep

        def __init__(self, shift):
            self.shift = shift

        def pixels(self, pixels):  # images in record order: one-hot of their caption (shifted: the wrong one)
            return np.stack([one_hot((captions.index(r["caption"]) + self.shift) % len(captions), 40)
                             for r in records])  # fmt: skip

        def ids(self, ids):
            return np.stack([one_hot(captions.index(r["caption"]), 40) for r in records])

    oracle, _ = det.retrieval(Fake(0), records)
    assert all(v == 1.0 for v in oracle.values()), oracle
    wrong, samples = det.retrieval(Fake(1), records)
    assert wrong["retrieval/i2t_recall@1"] == 0.0 and wrong["retrieval/t2i_recall@1"] == 0.0
    assert samples[0]["correct"] is False and samples[0]["reference"] == records[0]["caption"]


def test_single_object_records_are_held_out_combos():
    records = [tasks.make_record("captions", "validation", i) for i in range(60)]
    chosen = det.single_object_records(iter(records), limit=1000)
    expected = [r for r in records if len(r["scene"]["objects"]) == 1]
    assert 5 < len(chosen) == len(expected)
    for (record, combo), want in zip(chosen, expected):
        assert record is want and combo == (want["scene"]["objects"][0]["colour"], want["scene"]["objects"][0]["shape"])
        assert combo in tasks.HELD_OUT  # never in any train image
        assert want["caption"].startswith("one shape on ")
    assert len(det.single_object_records(iter(records), limit=3)) == 3
    train = [tasks.make_record("captions", "train", i) for i in range(60)]
    assert not any(combo in tasks.HELD_OUT for _, combo in det.single_object_records(iter(train), 1000))
    with pytest.raises(UserError, match="scene metadata"):
        det.single_object_records(iter([{"caption": "a", "images": [b""]}]), 10)


def test_zero_shot_builtin_oracle_and_wrong_classes():
    records = det.single_object_records((tasks.make_record("captions", "validation", i) for i in range(40)), 100)
    truth = {image_ops.decode(r["images"][0]).tobytes(): combo for r, combo in records}

    def text_fn(prompt):
        size, colour, shape = re.fullmatch(r"one shape on \w+: a (\w+) (\w+) (\w+)\.", prompt).groups()
        assert size in scenes.SIZES
        return one_hot(COMBOS.index((colour, shape)), 40)

    oracle = FakeEmbedder(lambda image: one_hot(COMBOS.index(truth[image.tobytes()]), 40), text_fn)
    metrics, _ = det.zero_shot_builtin(oracle, records)
    assert metrics["zero_shot/top1"] == 1.0 and metrics["zero_shot/colour_accuracy"] == 1.0
    assert metrics["zero_shot/shape_accuracy"] == 1.0 and metrics["zero_shot/held_out_fraction"] == 1.0
    assert metrics["zero_shot/records"] == len(records)

    # Each image looks like the same colour with the next shape: colour always right, shape and class never.
    def next_shape(image):
        colour, shape = truth[image.tobytes()]
        return one_hot(COMBOS.index((colour, scenes.SHAPES[(scenes.SHAPES.index(shape) + 1) % 5])), 40)

    metrics, samples = det.zero_shot_builtin(FakeEmbedder(next_shape, text_fn), records)
    assert metrics["zero_shot/top1"] == 0.0 and metrics["zero_shot/shape_accuracy"] == 0.0
    assert metrics["zero_shot/colour_accuracy"] == 1.0
    assert samples[0]["correct"] is False


def test_classify_colour_and_shape_accuracy_by_hand():
    classes = (("red", "circle"), ("red", "square"), ("blue", "circle"), ("blue", "square"))
    class_embeds = np.eye(4)
    labels = np.array([0, 1, 2, 3])
    # Predicted: red circle (right), blue square for red square, red circle for blue circle, blue circle for
    # blue square.
    images = np.eye(4)[[0, 3, 0, 2]]
    m = det.classify(images, class_embeds, labels, classes)
    assert m["top1"] == 0.25
    assert m["colour_accuracy"] == pytest.approx(2 / 4)  # rows 0 and 3
    assert m["shape_accuracy"] == pytest.approx(3 / 4)  # rows 0, 1, 2


def test_digit_episodes_are_deterministic_and_disjoint():
    _, labels = det.load_digits()
    support, query, query_labels = det.digit_episodes(labels, max_shots=4, episodes=3, queries_per_class=5, seed=7)
    again = det.digit_episodes(labels, max_shots=4, episodes=3, queries_per_class=5, seed=7)
    other = det.digit_episodes(labels, max_shots=4, episodes=3, queries_per_class=5, seed=8)
    for a, b in zip((support, query, query_labels), again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(support, other[0])
    assert support.shape == (3, 10, 4) and query.shape == (3, 50)
    for e in range(3):
        assert not set(support[e].ravel()) & set(query[e].ravel())
        assert len(set(support[e].ravel())) == 40 and len(set(query[e].ravel())) == 50
        for c in range(10):
            assert (labels[support[e, c]] == c).all()
        np.testing.assert_array_equal(query_labels[e], labels[query[e]])
        assert (np.bincount(query_labels[e], minlength=10) == 5).all()
    assert not np.array_equal(support[0], support[1])


def test_prototype_accuracy_oracle_constant_and_shuffled():
    _, labels = det.load_digits()
    support, query, query_labels = det.digit_episodes(labels, 2, episodes=30, queries_per_class=5)
    classes = np.arange(10)
    oracle = np.eye(10)[labels]
    assert det.prototype_accuracy(oracle, support, query, query_labels, classes) == 1.0
    constant = np.ones((len(labels), 4)) / 2  # every prototype ties: the first class wins -> 1 query in 10
    assert det.prototype_accuracy(constant, support, query, query_labels, classes) == pytest.approx(0.1)
    shuffled = np.eye(10)[np.random.default_rng(0).permutation(labels)] + 1e-3  # no relation to the digit
    assert abs(det.prototype_accuracy(shuffled, support, query, query_labels, classes) - 0.1) < 0.06


def test_digits_task_with_an_oracle_embedder():
    images, labels = det.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and labels.max() == 9
    up = det.upscale_grey(images[5], 16)
    np.testing.assert_array_equal(up[..., 0], np.kron(images[5], np.ones((2, 2), np.uint8)))
    assert up.shape == (16, 16, 3) and (up[..., 0] == up[..., 2]).all()
    by_pixels = {}
    for image, label in zip(images, labels):
        by_pixels.setdefault(image.tobytes(), label)

    def image_fn(image):  # undo the 2x nearest upscaling, look the digit up
        return one_hot(by_pixels[np.ascontiguousarray(image[::2, ::2, 0]).tobytes()], 10)

    def text_fn(text):
        return one_hot(det.DIGIT_NAMES.index(re.fullmatch(r"the digit (\w+)\.", text).group(1)), 10)

    metrics, samples = det.digits(FakeEmbedder(image_fn, text_fn), shots=(0, 1, 4), episodes=2, queries_per_class=2)
    assert metrics == {"digits/0shot_accuracy": 1.0, "digits/1shot_accuracy": 1.0, "digits/4shot_accuracy": 1.0}
    assert samples and all(s["correct"] for s in samples)
    rolled = FakeEmbedder(image_fn, lambda t: np.roll(text_fn(t), 1))  # every prompt names the wrong digit
    assert det.digits(rolled, shots=(0,), episodes=2, queries_per_class=2)[0]["digits/0shot_accuracy"] == 0.0


def test_photos_load_offline_and_score():
    images = det.load_photos()
    assert len(images) == len(det.PHOTOS) == 10 and len(set(det.PHOTOS.values())) == 10
    assert all(i.dtype == np.uint8 and i.ndim == 3 and i.shape[2] == 3 for i in images)
    index = {i.tobytes(): n for n, i in enumerate(images)}
    descriptions = list(det.PHOTOS.values())
    oracle = FakeEmbedder(lambda i: one_hot(index[i.tobytes()], 10), lambda t: one_hot(descriptions.index(t), 10))
    metrics, _ = det.photos(oracle)
    assert all(v == 1.0 for v in metrics.values()) and "photos/i2t_recall@5" in metrics
    wrong = FakeEmbedder(lambda i: one_hot((index[i.tobytes()] + 1) % 10, 10), oracle.text_fn)
    metrics, _ = det.photos(wrong, ks=(1,))
    assert metrics == {"photos/i2t_recall@1": 0.0, "photos/t2i_recall@1": 0.0}


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("builtin_dual"))
    sizes = {"captions": {"train": 16, "validation": 40}, "vqa": {"validation": 4}}
    build.build(out, sizes=sizes, workers=1)
    return out


def test_system_evaluate_end_to_end_on_a_tiny_build(tiny_build):
    config = load_config(f"{REPO}/configs/siglip.py:variant=tiny")
    config.data = ConfigDict(builtin_captions_config(tiny_build, 32, 16, "siglip"))
    config.model.text.vocab_size = Tokenizer(config.data.tokenizer).vocab_size  # resolving reads it so too
    del config.zero_shot
    config.mesh, config.batch_size, config.eval_steps, config.eval_examples = "data=8", 8, 1, 16
    config.eval_tasks = {**det.builtin_eval_tasks(tiny_build), "retrieval/again": f"{tiny_build}/captions/validation"}
    config.eval_options = {"digits": {"episodes": 1, "queries_per_class": 1, "shots": (0, 1)}}
    run = trainer_lib.Trainer(config)
    params = run.init(jax.random.key(0)).params
    metrics = trainer_lib.evaluate(run, params)
    expected = {
        "retrieval/i2t_recall@1", "retrieval/t2i_recall@10", "zero_shot/top1", "zero_shot/colour_accuracy",
        "zero_shot/shape_accuracy", "digits/0shot_accuracy", "digits/1shot_accuracy", "photos/i2t_recall@1",
    }  # fmt: skip
    assert expected <= set(metrics) and "loss" in metrics  # their values: the oracle / by-hand tests above
    # zero-shot reads the first eval_examples (16) one-object scenes of the 40 validation records
    validation = read_records(f"{tiny_build}/captions/validation", 40, "pairs")
    assert metrics["zero_shot/records"] == min(16, sum(len(r["scene"]["objects"]) == 1 for r in validation))
    assert metrics["zero_shot/held_out_fraction"] == 1.0
    assert {s["task"] for s in run.system.eval_samples} == set(config.eval_tasks)
    assert metrics["retrieval/again/t2i_recall@5"] == metrics["retrieval/t2i_recall@5"]  # a named variant

    # The evaluator's embeddings are the system's own: an image embedded alone equals its batched embedding.
    embedder = det.Embedder(run.system, params, config, batch_size=8, mesh=run.mesh, rules=run.rules)
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.uint8)
    batched = embedder.images(list(pixels))
    direct = run.system.embed(jax.device_get(params), {"images": embedder.preprocessor.image(pixels[1])[None],
                                       "texts": embedder.preprocessor.encode_text("a red circle")[None]})  # fmt: skip
    np.testing.assert_allclose(batched[1], np.asarray(direct["image_embeds"][0]), atol=1e-5)
    np.testing.assert_allclose(embedder.texts(["a red circle"])[0], np.asarray(direct["text_embeds"][0]), atol=1e-5)

    for tasks_, message in (
        ({"digits": "mnist"}, "must be 'sklearn'"),
        ({"captioning": tiny_build}, "not one of"),
        ({"retrieval/": tiny_build}, "not one of"),
        ({"retrieval": f"{tiny_build}/vqa/validation"}, "holds llava records"),
    ):
        with pytest.raises(UserError, match=message):
            det.evaluate(embedder, tasks_, 4)
    with pytest.raises(UserError, match="no option"):
        det.evaluate(embedder, {"photos": "skimage"}, 4, {"photos": {"episodes": 3}})
