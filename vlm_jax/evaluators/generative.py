"""Generative evaluations of any text-generating system on `vlm-jax data build` folders (and the built-in data).

Each task reads records of one format, builds prompts the way the system's
template (`System.template`, with its `image_tokens` per image) renders the
training data — everything before the first training target —, generates
greedily (`vlm_jax/generate.py`) until one of the system's stop tokens, and
scores the continuation. The prompts below are the "flamingo" template's;
LLaVA's are its chat turns ending in "ASSISTANT:", PaliGemma's its prefix:

| task | records | prompt -> continuation | metrics |
|---|---|---|---|
| vqa | llava (first turn; answer = metadata "answer" or the gpt turn) | `<s><image>Question:{q} Short answer:` -> answer | exact match (VQA normalisation), per "question_type" |
| captions | pairs | `<s><image>` -> caption | CIDEr-D, BLEU-1..4 |
| grounding | llava with metadata "box" | `<s><image>Question:{q} Short answer:` -> `<ref>..</ref><box>..</box>` | mean IoU, acc@0.5 |
| fewshot | interleaved with metadata "k", "answer", "candidates", "query_prefix" | the k examples, then `<image>{query_prefix}` -> "[class] word." | accuracy per k (the first candidate word generated); interleaved templates only |

`evaluate` runs {task: folder}; a task is one of these kinds or a named
variant "KIND/NAME" ("fewshot/digits", "fewshot/photos": the few-shot
episodes on real images of `data_pipelines/real_images.py`), whose metrics
are prefixed with NAME ("digits/fewshot_2shot_accuracy"). Prompts are
left-padded to one length and batches to one size, so each task compiles
once. Every task returns (metrics, samples); samples (images, prompt,
prediction, reference, correct, task) feed the run report.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np

from data_pipelines import templates
from data_pipelines.sources import read_records
from data_pipelines.templates import IMAGE_MARKER
from vlm_jax import generate
from vlm_jax.errors import UserError
from vlm_jax.evaluators.answers import exact_match, grounding_scores, normalize_answer
from vlm_jax.evaluators.captioning import caption_scores

# Generation budget per task kind: enough for every reference of the built-in data (tests/test_generative_eval.py).
MAX_NEW_TOKENS = {"vqa": 8, "captions": 64, "grounding": 32, "fewshot": 10}


class Generator:
    """Batched greedy generation for one system and its parameters, with the system's template, image tokens
    and stop tokens and its data config's tokenizer and image preprocessing."""

    def __init__(self, system: Any, params: Any, config: Any, batch_size: int = 16, prompt_len: int = 0):
        from data_pipelines.tokenizer import Tokenizer

        self.system, self.params = system, params
        self.tokenizer = Tokenizer(config.data.tokenizer)
        self.fmt = generate.PromptFormat.of(system, self.tokenizer)
        self.template, self.template_options = system.template, system.template_options
        # Media slots per prompt row, or at native resolution (Qwen2-VL) the row's patch budget.
        self.slots = int(config.data.max_patches) if self.fmt.native else int(config.data.get("max_images", 1))
        self.batch_size = batch_size
        self.prompt_len = prompt_len or int(config.data.seq_len)
        self.stop = system.stop_tokens(self.tokenizer)

    def prompt(self, record: dict, encoded_images: Sequence[bytes], cut=None) -> dict:
        """A prompt of `record` rendered by the system's template (with as many placeholders per image as its
        views give) up to its first training target, or through `cut(rendered ids)`; its images preprocessed
        as in training; the encoded images (for the run report)."""

        def render(counts: list[int], **extra) -> list[int]:
            options = {**self.template_options, **extra}  # extra: per-image options such as Idefics3's grids
            if cut is None:
                return templates.prompt_before_answer(self.template, self.tokenizer, record, counts, **options)
            rendered = templates.render(self.template, self.tokenizer, record, counts, **options)
            return cut([int(i) for i in rendered.ids])

        return self.fmt.prompt(encoded_images, render)

    def __call__(self, prompts: Sequence[dict], max_new_tokens: int) -> list[str]:
        """Texts generated for prompts {"tokens": [...], "images": [arrays]} (stop tokens removed)."""
        settings = generate.Sampling(max_new_tokens=max_new_tokens, stop_tokens=self.stop)
        texts = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            filler = len(chunk)
            chunk += [chunk[-1]] * (self.batch_size - filler)  # a fixed batch shape: one compilation
            batch = generate.batch_of(chunk, self.fmt, self.prompt_len, self.slots)
            out = generate.generate(self.system, self.params, batch, settings)
            for row in out[:filler]:
                ids = [int(t) for t in row if t != generate.PAD and t not in self.stop]
                texts.append(self.tokenizer.decode(ids, skip_control=True).strip())
        return texts


def question_prompt(gen: Generator, record: dict) -> tuple[dict, str, str]:
    """(prompt, question, answer) of a llava record's first turn: `<s><image>Question:{q} Short answer:`."""
    turns = record["conversations"]
    first = [next(t for t in turns if t["from"] == "human"), next(t for t in turns if t["from"] == "gpt")]
    answer = record.get("answer") or first[1]["value"]
    question = first[0]["value"].replace(IMAGE_MARKER, "").strip()
    images = record["images"][: first[0]["value"].count(IMAGE_MARKER)]
    return gen.prompt({"images": images, "conversations": first}, images), question, answer


def _sample(prompt: dict, text: str, prediction: str, reference: Any, correct: bool | None, task: str) -> dict:
    return dict(
        images=prompt["encoded"], prompt=text, prediction=prediction, reference=reference, correct=correct, task=task
    )


def vqa(gen: Generator, records: Sequence[dict]) -> tuple[dict[str, float], list[dict]]:
    prompts, questions, answers = zip(*(question_prompt(gen, r) for r in records))
    predictions = gen(prompts, max_new_tokens=MAX_NEW_TOKENS["vqa"])
    metrics = {"vqa_accuracy": exact_match(predictions, answers)}
    types = [r.get("question_type") for r in records]
    for kind in sorted({t for t in types if t}):
        chosen = [i for i, t in enumerate(types) if t == kind]
        metrics[f"vqa_accuracy/{kind}"] = exact_match([predictions[i] for i in chosen], [answers[i] for i in chosen])
    samples = [
        _sample(p, q, pred, a, normalize_answer(pred) == normalize_answer(a), "vqa")
        for p, q, pred, a in zip(prompts, questions, predictions, answers)
    ]
    return metrics, samples


def caption_prompt(gen: Generator, record: dict) -> dict:
    """`<s><image>` of a pairs record (the caption follows in training)."""
    return gen.prompt(record, record["images"])


def captions(gen: Generator, records: Sequence[dict]) -> tuple[dict[str, float], list[dict]]:
    prompts = [caption_prompt(gen, r) for r in records]
    predictions = gen(prompts, max_new_tokens=MAX_NEW_TOKENS["captions"])
    references = [[r["caption"]] for r in records]
    scores = caption_scores(predictions, references)
    metrics = {"cider": scores["cider"], "bleu4": scores["bleu4"], "bleu1": scores["bleu1"]}
    samples = [
        _sample(p, "(caption)", pred, ref[0], None, "captions")
        for p, pred, ref in zip(prompts, predictions, references)
    ]
    return metrics, samples


def grounding(gen: Generator, records: Sequence[dict]) -> tuple[dict[str, float], list[dict]]:
    prompts, questions, answers = zip(*(question_prompt(gen, r) for r in records))
    predictions = gen(prompts, max_new_tokens=MAX_NEW_TOKENS["grounding"])
    sides = [_image_side(r) for r in records]  # boxes are in the source image's pixels
    scores = grounding_scores(predictions, [r["box"] for r in records], [(s, s) for s in sides])
    metrics = {"grounding_iou": scores["mean_iou"], "grounding_acc@0.5": scores["acc@0.5"]}
    samples = [
        _sample(p, q, pred, a, None, "grounding") for p, q, pred, a in zip(prompts, questions, predictions, answers)
    ]
    return metrics, samples


def _image_side(record: dict) -> float:
    """The side in pixels of a record's (square) source image, from its scene metadata or its PNG header."""
    scene = record.get("scene") or {}
    if "size" in scene:
        return float(scene["size"])
    import io

    from PIL import Image

    return float(Image.open(io.BytesIO(record["images"][0])).size[0])


def fewshot_prompt(gen: Generator, record: dict) -> dict:
    """The episode's examples, then `<image>{query_prefix}` (the query's word follows in training): the template's
    rendering of the record with the query text cut to its prefix, without the stop tokens that close it
    (`<|endofchunk|></s>` in the "flamingo" template)."""
    texts = list(record["texts"])
    last_text = max(i for i, t in enumerate(texts) if t is not None)
    texts[last_text] = record["query_prefix"]
    episode = {"texts": texts, "images": record["images"]}

    def without_stop(ids: list[int]) -> list[int]:
        while ids and ids[-1] in gen.stop:
            ids = ids[:-1]
        return ids

    return gen.prompt(episode, record["images"], cut=without_stop)


def fewshot(gen: Generator, records: Sequence[dict]) -> tuple[dict[str, float], list[dict]]:
    prompts = [fewshot_prompt(gen, r) for r in records]
    references = [r["answer"] for r in records]
    shots = [int(r["k"]) for r in records]
    generated = gen(prompts, max_new_tokens=MAX_NEW_TOKENS["fewshot"])
    predictions = [_first_candidate(t, r["candidates"]) for t, r in zip(generated, records)]
    correct = [p == normalize_answer(a) for p, a in zip(predictions, references)]
    metrics = {}
    for k in sorted(set(shots)):
        chosen = [c for c, s in zip(correct, shots) if s == k]
        metrics[f"fewshot_{k}shot_accuracy"] = float(np.mean(chosen))
    samples = [
        _sample(p, f"{k}-shot episode", pred, a, c, "fewshot")
        for p, k, pred, a, c in zip(prompts, shots, predictions, references, correct)
    ]
    return metrics, samples


def _first_candidate(text: str, candidates: Sequence[str]) -> str:
    """The first generated word that is one of the episode's words ("red dax." -> "dax"), else the first word:
    the built-in episodes name the class before the word, the real-image ones do not."""
    words = re.findall(r"[a-z0-9']+", normalize_answer(text))
    known = {normalize_answer(c) for c in candidates}
    return next((w for w in words if w in known), words[0] if words else "")


TASKS: dict[str, tuple[str, Callable]] = {
    "vqa": ("llava", vqa),
    "captions": ("pairs", captions),
    "grounding": ("llava", grounding),
    "fewshot": ("interleaved", fewshot),
}


def evaluate(
    gen: Generator, tasks: dict[str, str], limit: int, limits: dict[str, int] | None = None
) -> tuple[dict[str, float], list[dict]]:
    """Runs each task {name: folder} on its first `limit` records (`limits[name]` where given); (all metrics,
    a few samples per task).

    A name is a kind of `TASKS` ("fewshot") or a named variant "KIND/NAME" ("fewshot/digits"), so one run
    can score several folders of one kind: a variant's metrics are prefixed with its name
    ("digits/fewshot_2shot_accuracy"), and its samples' task is the whole name."""
    limits = dict(limits or {})
    unknown = sorted(set(limits) - set(tasks))
    if unknown:
        raise UserError(f"eval_examples_per_task names {unknown[0]!r}, which is not one of eval_tasks.")
    for name in tasks:  # every name checked before anything runs
        kind, slash, variant = name.partition("/")
        if kind not in TASKS or (slash and not variant.strip()):
            raise UserError(
                f"evaluation task {name!r} is not one of {', '.join(TASKS)} (or KIND/NAME, e.g. 'fewshot/digits')."
            )
        if TASKS[kind][0] not in templates.supported_formats(gen.template):
            raise UserError(
                f"evaluation task {name!r} reads {TASKS[kind][0]} records, which the {gen.template} template "
                "cannot render."
            )
    metrics, samples = {}, []
    for name, path in tasks.items():
        kind, _, variant = name.partition("/")
        fmt, run = TASKS[kind]
        task_metrics, task_samples = run(gen, read_records(path, int(limits.get(name, limit)), fmt))
        metrics.update({f"{variant}/{k}" if variant else k: v for k, v in task_metrics.items()})
        samples += [dict(sample, task=name) for sample in task_samples[:8]]
    return metrics, samples


def evaluate_system(system: Any, params: Any, config: Any) -> dict[str, float]:
    """A text-generating system's evaluations (its `evaluate`, run by `vlm-jax eval` and every `eval_every` steps).

    `config.eval_tasks` = {task: folder}, each on its first `config.eval_examples` records
    (`config.eval_examples_per_task` = {task: n} overrides); the last samples stay in `system.eval_samples` for
    the report. `config.eval_baselines` = {kind: train folder} adds the model-free "baseline/..." scores of
    `evaluators/baselines.py` on the same records (computed once per system)."""
    from vlm_jax.evaluators import baselines

    tasks = dict(config.get("eval_tasks") or {})
    if not tasks:
        return {}
    limit = int(config.get("eval_examples", 64))
    per_task = dict(config.get("eval_examples_per_task") or {})
    metrics, system.eval_samples = evaluate(Generator(system, params, config), tasks, limit, per_task)
    if config.get("eval_baselines"):
        if getattr(system, "_baselines", None) is None:
            system._baselines = baselines.evaluate(dict(config.eval_baselines), tasks, limit, per_task)
        metrics.update(system._baselines)
    return metrics
