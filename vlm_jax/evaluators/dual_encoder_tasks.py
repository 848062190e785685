"""Evaluations of a dual encoder (CLIP / SigLIP, `vlm_jax/models/dual_encoder.py`) on `vlm-jax data build`
folders, on the built-in dataset, and on real images that ship inside installed packages (no download).

`config.eval_tasks = {task: source}` turns them on (`DualEncoder.evaluate`); `config.eval_examples` is the
number of records a folder task reads, `config.eval_options = {task: {option: value}}` overrides the
keyword arguments of a task function below. Images are resized and normalised and texts tokenized by the
training pipeline's own `PairsPreprocessor` (data_pipelines/pairs.py).

| task | source | scores | metrics (`task prefix/`) | chance |
|---|---|---|---|---|
| retrieval | a `pairs` folder | image<->text retrieval among its first `eval_examples` records (equal captions count as the same text) | `retrieval/{i2t,t2i}_recall@{1,5,10}` | about k / N |
| zero_shot_builtin | the built-in `captions/validation` (or `test`) folder | its one-object records (a held-out (colour, shape), `tasks.HELD_OUT`) classified among all 40 (colour, shape) classes by a prompt ensemble over sizes and backgrounds | `zero_shot/top1`, `top5`, `colour_accuracy`, `shape_accuracy` (of the predicted class) | 1/40, 5/40, 1/8, 1/5 |
| digits | "sklearn" | scikit-learn's 8x8 handwritten digits: nearest class prototype (mean of k support embeddings) over seeded episodes; k = 0 classifies by the prompt "the digit {name}." | `digits/{k}shot_accuracy` | 1/10 |
| photos | "skimage" | image<->text retrieval over 10 scikit-image sample photos with one hand-written description each | `photos/{i2t,t2i}_recall@{1,5}` | 1/10, 5/10 |

A task name may also be a named variant "KIND/NAME" ("retrieval/test": metrics `retrieval/test/...`), as
the generative evaluations' names may.

Every task returns (metrics, samples); samples (images, prompt, prediction, reference, correct) feed the
run report (`vlm_jax/report.py`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines.sources import iter_records, read_records
from vlm_jax.errors import UserError
from vlm_jax.evaluators.contrastive import class_embeddings, retrieval_recall_relevant, zero_shot_accuracy


class Embedder:
    """L2-normalised embeddings of images and texts by one dual encoder, in fixed-size batches (one compilation
    per tower), preprocessed as the training pipeline does (`PairsPreprocessor` of `config.data`).

    With a mesh, batches are split over its data-parallel axes (every process passes the same rows).
    """

    def __init__(self, system: Any, params: Any, config: Any, batch_size: int = 64, mesh=None, rules=None):
        from data_pipelines.pairs import PairsPreprocessor
        from vlm_jax import sharding
        from vlm_jax.encoders.two_tower import TwoTower

        self.preprocessor = PairsPreprocessor(config.data)
        self.image_size = self.preprocessor.size
        self.params = params
        module = system.module
        self._sharding: Callable[[int], Any] | None = None
        shards, out = 1, None
        if mesh is not None:
            rules = tuple(tuple(r) for r in (rules or sharding.DEFAULT_RULES))
            self._sharding = lambda ndim: sharding.batch_sharding(mesh, rules, ndim)
            shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, rules))
            out = NamedSharding(mesh, PartitionSpec())  # replicated: every process can read the embeddings
        self.batch_size = -(-batch_size // shards) * shards
        apply = module.apply
        self._images = jax.jit(lambda p, x: apply({"params": p}, x, method=TwoTower.embed_images), out_shardings=out)
        self._texts = jax.jit(lambda p, t: apply({"params": p}, t, method=TwoTower.embed_texts), out_shardings=out)

    def pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Preprocessed float32 [size, size, 3] images -> [N, dim] embeddings."""
        return self._run(self._images, pixels)

    def ids(self, ids: Sequence[np.ndarray]) -> np.ndarray:
        """Token id rows (`PairsPreprocessor.encode_text`) -> [N, dim] embeddings."""
        return self._run(self._texts, ids)

    def images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 [H, W, 3] images -> [N, dim] embeddings (resized and normalised as in training)."""
        return self._run(self._images, images, self.preprocessor.image)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> [N, dim] embeddings (bos + ids + eos, cut / padded as in training)."""
        return self._run(self._texts, texts, self.preprocessor.encode_text)

    def _run(self, fn: Callable, rows: Sequence, prepare: Callable | None = None) -> np.ndarray:
        if not len(rows):
            raise ValueError("nothing to embed.")
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = [prepare(r) if prepare else r for r in rows[start : start + self.batch_size]]
            n = len(chunk)
            batch = np.stack(chunk + [chunk[-1]] * (self.batch_size - n))  # a fixed shape: one compilation
            if self._sharding is not None:
                batch = jax.make_array_from_callback(batch.shape, self._sharding(batch.ndim), lambda i: batch[i])
            out.append(np.asarray(jax.device_get(fn(self.params, batch)), np.float64)[:n])
        return np.concatenate(out)


def _sample(image: Any, prompt: str, prediction: str, reference: str, task: str) -> dict[str, Any]:
    return dict(
        images=[image], prompt=prompt, prediction=prediction, reference=reference, correct=prediction == reference,
        task=task,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- retrieval


def retrieval(embedder: Embedder, records: Sequence[dict], ks=(1, 5, 10)) -> tuple[dict[str, float], list[dict]]:
    """Image<->text recall@k among `records` (pairs); records the training pipeline would skip are skipped."""
    from data_pipelines.packing import SKIP

    kept = [(r, ex) for r in records for ex in [embedder.preprocessor.example(r)] if SKIP not in ex]
    if len(kept) < 2:
        raise UserError(f"retrieval needs at least 2 usable pairs records; got {len(kept)}.")
    captions = [str(r["caption"]) for r, _ in kept]
    image_embeds = embedder.pixels([ex["images"] for _, ex in kept])
    text_embeds = embedder.ids([ex["texts"] for _, ex in kept])
    relevant = np.array(captions)[:, None] == np.array(captions)[None, :]  # equal captions are equally right
    metrics = retrieval_recall_relevant(image_embeds, text_embeds, relevant, ks)
    best = np.argmax(image_embeds @ text_embeds.T, axis=1)
    samples = [
        _sample(r["images"][0], "(best caption among all)", captions[best[i]], captions[i], "retrieval")
        for i, (r, _) in enumerate(kept[:8])
    ]
    return {f"retrieval/{k}": v for k, v in metrics.items()}, samples


# --------------------------------------------------------------------------- zero-shot on the built-in data


def builtin_classes() -> tuple[tuple[str, str], ...]:
    """The 40 (colour, shape) classes of the built-in dataset (`tasks.ALL_COMBOS`)."""
    from data_pipelines.builtin import tasks

    return tasks.ALL_COMBOS


def builtin_prompts(colour: str, shape: str) -> list[str]:
    """A class's prompt ensemble in the built-in captions' own one-object style, over sizes and backgrounds:
    "one shape on gray: a small red circle." (the caption of such a scene without a written word)."""
    from data_pipelines.builtin import scenes

    return [f"one shape on {bg}: a {size} {colour} {shape}." for bg in scenes.BACKGROUNDS for size in scenes.SIZES]


def single_object_records(records: Iterator[dict], limit: int) -> list[tuple[dict, tuple[str, str]]]:
    """The first `limit` records whose scene has exactly one object, with that object's (colour, shape).

    Built-in evaluation splits draw a scene's first object from the held-out pairs, so in validation and test
    every one of these is a combination training never showed."""
    chosen, seen_scene = [], False
    for record in records:
        scene = record.get("scene")
        if not isinstance(scene, dict) or "objects" not in scene:
            continue
        seen_scene = True
        if len(scene["objects"]) == 1:
            obj = scene["objects"][0]
            chosen.append((record, (obj["colour"], obj["shape"])))
            if len(chosen) >= limit:
                break
    if not seen_scene:
        raise UserError("zero_shot_builtin reads the built-in captions folders; these records have no scene metadata.")
    if not chosen:
        raise UserError("zero_shot_builtin found no record with exactly one object.")
    return chosen


def classify(image_embeds: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray, classes) -> dict[str, float]:
    """Top-1 / top-5 accuracy over `classes` ((colour, shape) pairs), and the colour and shape accuracy of the
    predicted (top-1) class."""
    labels = np.asarray(labels)
    metrics = zero_shot_accuracy(image_embeds, class_embeds, labels, ks=(1, 5))
    predicted = np.argmax(np.asarray(image_embeds) @ np.asarray(class_embeds).T, axis=1)
    for part, name in ((0, "colour"), (1, "shape")):
        right = [classes[p][part] == classes[t][part] for p, t in zip(predicted, labels)]
        metrics[f"{name}_accuracy"] = float(np.mean(right))
    return metrics


def zero_shot_builtin(embedder: Embedder, records: Sequence[tuple[dict, tuple[str, str]]]):
    """Zero-shot classification of one-object built-in scenes among all 40 (colour, shape) classes."""
    from data_pipelines import image_ops
    from data_pipelines.builtin import tasks

    classes = builtin_classes()
    prompts = [builtin_prompts(*c) for c in classes]
    text_embeds = embedder.texts([p for row in prompts for p in row]).reshape(len(classes), len(prompts[0]), -1)
    class_embeds = class_embeddings(text_embeds)
    images = [rec["images"][0] for rec, _ in records]
    image_embeds = embedder.images([image_ops.decode(b) for b in images])
    labels = np.array([classes.index(combo) for _, combo in records])
    metrics = classify(image_embeds, class_embeds, labels, classes)
    metrics["records"] = float(len(records))
    metrics["held_out_fraction"] = float(np.mean([combo in tasks.HELD_OUT for _, combo in records]))
    predicted = np.argmax(image_embeds @ class_embeds.T, axis=1)
    samples = [
        _sample(images[i], "(one of 40 colour-shape classes)", " ".join(classes[predicted[i]]), " ".join(combo),
                "zero_shot")
        for i, (_, combo) in enumerate(records[:8])
    ]  # fmt: skip
    return {f"zero_shot/{k}": v for k, v in metrics.items()}, samples


# ------------------------------------------------------------------------------------ handwritten digits

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits (they ship inside the package; `real_images.digits`): uint8
    [N, 8, 8] white ink on black as scikit-learn stores them (values 0..16 scaled to 0..255, as the few-shot
    episodes of `data_pipelines/real_images.py` render them), and the labels [N]."""
    from data_pipelines import real_images

    images, targets = real_images.digits()
    return np.rint(np.asarray(images, np.float64) * (255 / 16)).astype(np.uint8), np.asarray(targets, np.int64)


def upscale_grey(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w] -> uint8 [size, size, 3]: nearest-neighbour upscaling, grey copied to R, G and B."""
    rows = np.arange(size) * image.shape[0] // size
    cols = np.arange(size) * image.shape[1] // size
    return np.repeat(image[rows][:, cols][..., None], 3, axis=-1)


def digit_episodes(labels: np.ndarray, max_shots: int, episodes: int, queries_per_class: int, seed: int = 0):
    """Seeded episodes: per class, `max_shots` support and `queries_per_class` query indices, disjoint.

    Returns (support [episodes, classes, max_shots], query [episodes, classes * queries_per_class], query labels
    of the same shape). The support of k shots is the first k of each row, so every k sees the same queries.
    """
    classes = np.unique(labels)
    support = np.zeros((episodes, len(classes), max_shots), np.int64)
    query = np.zeros((episodes, len(classes), queries_per_class), np.int64)
    for e in range(episodes):
        rng = np.random.default_rng([seed, e])
        for c, label in enumerate(classes):
            pool = rng.permutation(np.flatnonzero(labels == label))
            if len(pool) < max_shots + queries_per_class:
                raise UserError(f"class {label} has {len(pool)} examples; an episode needs {max_shots} + "
                                f"{queries_per_class}.")  # fmt: skip
            support[e, c], query[e, c] = pool[:max_shots], pool[max_shots : max_shots + queries_per_class]
    query = query.reshape(episodes, -1)
    return support, query, labels[query]


def prototype_accuracy(embeds: np.ndarray, support: np.ndarray, query: np.ndarray, query_labels, classes) -> float:
    """Accuracy of nearest-prototype classification: prototypes are the normalised means of the support
    embeddings of each class (support [episodes, classes, k] indices into `embeds`; `classes` the label of each
    support row)."""
    classes = np.asarray(classes)
    right = []
    for e in range(len(support)):
        protos = embeds[support[e]].mean(axis=1)
        protos /= np.linalg.norm(protos, axis=-1, keepdims=True)
        predicted = classes[np.argmax(embeds[query[e]] @ protos.T, axis=1)]
        right.append(predicted == np.asarray(query_labels[e]))
    return float(np.mean(right))


def digits(embedder: Embedder, shots=(0, 1, 2, 4), episodes: int = 20, queries_per_class: int = 5, seed: int = 0):
    """k-shot classification of scikit-learn's digits (10 classes) from image embeddings, over seeded episodes."""
    images, labels = load_digits()
    shots = tuple(int(k) for k in shots)
    support, query, query_labels = digit_episodes(labels, max(max(shots), 1), episodes, queries_per_class, seed)
    needed = np.unique(np.concatenate([support.ravel(), query.ravel()]))
    rows = embedder.images([upscale_grey(images[i], embedder.image_size) for i in needed])
    embeds = np.zeros((len(labels), rows.shape[1]))
    embeds[needed] = rows
    classes = np.unique(labels)
    metrics = {}
    for k in shots:
        if k == 0:
            class_embeds = embedder.texts([f"the digit {DIGIT_NAMES[c]}." for c in classes])
            predicted = classes[np.argmax(embeds[query.ravel()] @ class_embeds.T, axis=1)]
            metrics[f"digits/{k}shot_accuracy"] = float(np.mean(predicted == query_labels.ravel()))
        else:
            accuracy = prototype_accuracy(embeds, support[:, :, :k], query, query_labels, classes)
            metrics[f"digits/{k}shot_accuracy"] = accuracy
    k = max(shots)
    samples = []
    if k > 0:  # the first episode's first queries, by the largest k
        protos = embeds[support[0, :, :k]].mean(axis=1)
        predicted = classes[np.argmax(embeds[query[0]] @ protos.T, axis=1)]
        for q in range(0, len(query[0]), queries_per_class)[:8]:
            image = upscale_grey(images[query[0, q]], embedder.image_size)
            samples.append(
                _sample(image, f"({k}-shot prototype)", str(predicted[q]), str(query_labels[0, q]), "digits")
            )
    return metrics, samples


# ------------------------------------------------------------------------------------ scikit-image photos

PHOTOS = {
    "astronaut": "a smiling astronaut in an orange space suit in front of a flag.",
    "chelsea": "the face of a tabby cat.",
    "coffee": "a cup of coffee on a red saucer.",
    "rocket": "a rocket on its launch pad at dusk.",
    "hubble_deep_field": "many small galaxies in the darkness of space.",
    "immunohistochemistry": "stained tissue under a microscope, brown cells on blue.",
    "retina": "the red disc of a retina with its blood vessels.",
    "camera": "a black and white photo of a man with a camera on a tripod.",
    "coins": "rows of old coins on a dark background.",
    "page": "a page of printed text.",
}
"""scikit-image sample photos (files of the package, `real_images.PHOTOS`) and one hand-written description each."""


def load_photos() -> list[np.ndarray]:
    """The `PHOTOS` images as uint8 [H, W, 3] (grey photos copied to RGB; `real_images.photo`)."""
    from data_pipelines import real_images

    return [real_images.photo(name) for name in PHOTOS]


def photos(embedder: Embedder, ks=(1, 5)) -> tuple[dict[str, float], list[dict]]:
    """Image<->text retrieval over the scikit-image photos and their descriptions."""
    images, descriptions = load_photos(), list(PHOTOS.values())
    image_embeds, text_embeds = embedder.images(images), embedder.texts(descriptions)
    metrics = retrieval_recall_relevant(image_embeds, text_embeds, np.eye(len(images), dtype=bool), ks)
    best = np.argmax(image_embeds @ text_embeds.T, axis=1)
    samples = [
        _sample(image, "(best of the descriptions)", descriptions[b], d, "photos")
        for image, b, d in zip(images, best, descriptions)
    ]
    return {f"photos/{k}": v for k, v in metrics.items()}, samples[:8]


# ------------------------------------------------------------------------------------------------ dispatch

PACKAGED = {"digits": "sklearn", "photos": "skimage"}
"""Tasks on images shipped in an installed package -> the source name `eval_tasks` gives them."""
TASKS = {"retrieval": "retrieval", "zero_shot_builtin": "zero_shot", "digits": "digits", "photos": "photos"}
"""Task kind -> the prefix of its metrics."""


def _options(fn: Callable, task: str, options: dict) -> dict:
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("embedder", "records")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
        raise UserError(f"eval_options.{task} has no option {', '.join(unknown)}; {takes}.")
    return dict(options)


def _kind(name: str) -> tuple[str, str]:
    kind, slash, variant = name.partition("/")
    if kind not in TASKS or (slash and not variant.strip()):
        raise UserError(
            f"dual-encoder evaluation task {name!r} is not one of {', '.join(TASKS)} "
            "(or KIND/NAME, e.g. 'retrieval/test')."
        )
    return kind, variant


def evaluate(
    embedder: Embedder, tasks: dict[str, str], limit: int, options: dict[str, dict] | None = None
) -> tuple[dict[str, float], list[dict]]:
    """Runs each task {name: source} (folder tasks on at most `limit` records); (all metrics, samples).

    A name is a task kind of `TASKS` or a named variant "KIND/NAME" (as the generative evaluations allow), so
    one run can score several folders of one kind: "retrieval/test" reports `retrieval/test/i2t_recall@1`.
    `options` {name: {keyword: value}} are passed to the task's function (e.g. digits' `episodes`).
    """
    options = dict(options or {})
    for name in (*tasks, *options):  # every name checked before anything runs
        _kind(name)
    metrics, samples = {}, []
    for name, source in tasks.items():
        kind, variant = _kind(name)
        opts = dict(options.get(name) or {})
        if kind in PACKAGED:
            if source != PACKAGED[kind]:
                raise UserError(f"eval_tasks.{name} must be {PACKAGED[kind]!r} (its images ship in that package).")
            run = digits if kind == "digits" else photos
            task_metrics, task_samples = run(embedder, **_options(run, name, opts))
        elif kind == "retrieval":
            records = read_records(source, limit, "pairs")
            task_metrics, task_samples = retrieval(embedder, records, **_options(retrieval, name, opts))
        else:
            records = single_object_records(iter_records(source, "pairs"), limit)
            task_metrics, task_samples = zero_shot_builtin(embedder, records, **_options(zero_shot_builtin, name, opts))
        prefix = TASKS[kind] + "/"
        if variant:
            task_metrics = {f"{prefix}{variant}/{k[len(prefix) :]}": v for k, v in task_metrics.items()}
        metrics.update(task_metrics)
        samples += [dict(sample, task=name) for sample in task_samples]
    return metrics, samples


def builtin_eval_tasks(root: str) -> dict[str, str]:
    """`config.eval_tasks` of a dual encoder trained on the built-in captions (`root` = a `build.ensure()`
    folder): retrieval and zero-shot on its validation captions, digits and photos."""
    folder = f"{root}/captions/validation"
    return {"retrieval": folder, "zero_shot_builtin": folder, **PACKAGED}
