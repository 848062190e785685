"""Zero-shot classification and image<->text retrieval from (L2-normalised) embeddings."""

from __future__ import annotations

import numpy as np


def retrieval_recall(
    image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k in both directions; text i describes image `text_to_image[i]` (several texts per image allowed).

    image->text: an image counts as found at k if any of its texts is among its
    k most similar texts; text->image: if its image is among the k most
    similar images (`retrieval_recall_relevant` with one image per text).
    """
    text_to_image = np.asarray(text_to_image)
    relevant = text_to_image[None, :] == np.arange(np.shape(image_embeds)[0])[:, None]
    return retrieval_recall_relevant(image_embeds, text_embeds, relevant, ks)


def class_embeddings(prompt_embeds: np.ndarray) -> np.ndarray:
    """[classes, prompts, dim] -> [classes, dim]: CLIP's prompt ensemble (mean of normalised embeddings, renormalised)."""
    e = np.asarray(prompt_embeds, np.float64)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    mean = e.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def zero_shot_accuracy(image_embeds: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict:
    """Top-k accuracy of classifying each image as its most similar class embedding."""
    sims = np.asarray(image_embeds, np.float64) @ np.asarray(class_embeds, np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")
    hits = order == np.asarray(labels)[:, None]
    return {f"top{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks if k <= sims.shape[1]}


def retrieval_recall_relevant(
    image_embeds: np.ndarray, text_embeds: np.ndarray, relevant: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k in both directions with any number of right answers: `relevant[i, t]` says text t describes image i.

    image->text: image i counts as found at k if any text relevant to it is
    among its k most similar texts; text->image: if any image relevant to it is
    among its k most similar images. Ties keep the lower index first. It also
    scores texts shared by several images (equal captions of different
    records) fairly.
    """
    sims = np.asarray(image_embeds, np.float64) @ np.asarray(text_embeds, np.float64).T  # [images, texts]
    relevant = np.asarray(relevant, bool)
    if relevant.shape != sims.shape:
        raise ValueError(f"relevant has shape {relevant.shape}; the similarities have {sims.shape}.")

    def first_hit(scores: np.ndarray, rel: np.ndarray) -> np.ndarray:
        hits = np.take_along_axis(rel, np.argsort(-scores, axis=1, kind="stable"), axis=1)
        return np.where(hits.any(axis=1), hits.argmax(axis=1), scores.shape[1])  # no relevant item: never found

    i2t, t2i = first_hit(sims, relevant), first_hit(sims.T, relevant.T)
    metrics = {}
    for k in ks:
        metrics[f"i2t_recall@{k}"] = float(np.mean(i2t < k))
        metrics[f"t2i_recall@{k}"] = float(np.mean(t2i < k))
    return metrics
