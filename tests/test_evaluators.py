"""Retrieval recall and zero-shot accuracy on hand-made embeddings with known answers."""

import numpy as np
import pytest

from vlm_jax.evaluators.contrastive import class_embeddings, retrieval_recall, zero_shot_accuracy


def unit(*rows):
    x = np.array(rows, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_retrieval_recall_counts_ranks_in_both_directions():
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    # Texts 0,1 describe image 0; text 2 image 1; text 3 image 2 (but it looks like image 1).
    texts = unit([0.9, 0.1, 0], [0.2, 1, 0], [0, 1, 0.1], [0, 1, 0.5])
    m = retrieval_recall(images, texts, np.array([0, 0, 1, 2]), ks=(1, 2))
    # image->text: image 0's best text is text 0 (hit); image 1's best is text 2 (hit);
    # image 2's best is text 3 (hit) -> R@1 = 1.
    assert m["i2t_recall@1"] == 1.0
    # text->image: text 0 -> image 0 (hit); text 1 -> image 1 (miss, rank 2); text 2 -> image 1 (hit);
    # text 3 -> image 1 first, image 2 second (miss at 1, hit at 2).
    assert m["t2i_recall@1"] == pytest.approx(2 / 4) and m["t2i_recall@2"] == 1.0


def test_zero_shot_with_a_prompt_ensemble():
    prompts = np.array([[[1, 0.2], [1, -0.2]], [[0, 1], [0.1, 1]]])  # 2 classes x 2 prompts
    classes = class_embeddings(prompts)
    np.testing.assert_allclose(classes[0], [1, 0], atol=1e-12)
    images = unit([1, 0.3], [0.2, 1], [1, 1.2])
    acc = zero_shot_accuracy(images, classes, np.array([0, 1, 0]), ks=(1, 2))
    assert acc == {"top1": pytest.approx(2 / 3), "top2": 1.0}
