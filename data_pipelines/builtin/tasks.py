"""The built-in dataset's tasks: scenes -> records in the `vlm-jax data build` formats, plus evaluator metadata.

Record `index` of (task, split) is a pure function of (seed, task, split,
index, image_size) (`make_record`), so the ArrayRecord build, the TFDS builder
and any test regenerate exactly the same bytes. Every record carries the
fields its format needs (sources.py) and metadata the templates ignore:
"task", and per task:

| task | format | text | metadata |
|---|---|---|---|
| captions | pairs | "two shapes on gray: a small red circle and a large blue square. the red circle is left of the blue square." | scene |
| objects | pairs | "a red circle." (one object) | scene |
| vqa | llava | human "<image>\\nWhat colour is the square?", gpt "red" | question, question_type, answer, scene |
| grounding | llava | human "<image>\\nWhere is the red circle?", gpt "<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>" | ref, box (pixels), answer, scene |
| chat | llava | 2-3 turns of caption / VQA / grounding questions about one image | question_types, answers, scene |
| interleaved | interleaved | "Here are three pictures." <img> caption <img> caption ... "Altogether there are five shapes." | scenes |
| fewshot | interleaved | <img> "This is a red dax." x k, then <img> "This is a blue blicket." | k, candidates, answer, query_prefix, mapping, scenes |
| recall | interleaved, text only | "This is a red dax." "This is a blue wug." "This is a red dax." ... (3-9 sentences, 2-3 colours) | mapping |

Question types (vqa, chat): colour, shape, size, count, relation (yes/no:
the true relation of two objects or its opposite), text (the written word);
chat adds caption and grounding. Grounding boxes follow `templates.qwen_box`
(Qwen-VL: integers in [0, 1000) of the image side); "box" is [x0, y0, x1, y1]
in pixels with x1, y1 exclusive.

Few-shot episodes: each episode draws two colours and two made-up words
(`NONSENSE`) and pairs them at random, so the word of a colour can only be
read from the episode's own examples. k context images (one object each of a
random shape, its colour drawn uniformly from the two) are followed by a query
image; every image's sentence names its colour, then its word ("This is a
red dax."), and the answer is the word of the query's colour. A model
continuing the query's "This is a" must see the colour (the image) and recall
which word went with it (the context). With k = 0 the answer cannot be known;
a model that knows the colour and copies the word that followed it in the
context scores 1 - 0.5 ** k in expectation (0, 50, 75, 94% for k = 0, 1, 2, 4).
Training episodes have k = 1..4; validation and test cycle k = 0, 1, 2, 4
(`EVAL_SHOTS`). The sentences name the colour because the binding is then
learnable in minutes: with plain "This is a dax." sentences the main job's
model copied a context word without matching colours (49-52% at every k on
200 episodes each; docs/evaluation.md), and colours rather than shapes because
a model that learns in minutes sees colours far better than shapes.

Splits hold out (colour, shape) combinations: `HELD_OUT` pairs never appear in
train (no object of any train image has one); in validation and test the
first object of every scene (and every few-shot query) has a held-out pair,
and the questions and grounding of vqa / grounding records are about that
object, so their accuracy measures generalisation to unseen combinations.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from data_pipelines.builtin import scenes
from data_pipelines.templates import IMAGE_MARKER, qwen_box

SPLITS = ("train", "validation", "test")
# One per colour; every shape is held out with at least one colour and keeps 5+ colours in train.
HELD_OUT = (
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "cross"),
    ("purple", "diamond"),
    ("orange", "circle"),
    ("white", "square"),
    ("black", "triangle"),
)
ALL_COMBOS = tuple((c, s) for c in scenes.COLOURS for s in scenes.SHAPES)
TRAIN_COMBOS = tuple(combo for combo in ALL_COMBOS if combo not in HELD_OUT)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
QUESTION_TYPES = ("colour", "shape", "size", "count", "relation", "text")
CHAT_TYPES = (*QUESTION_TYPES, "caption", "grounding")
CAPTION_QUESTION = "Describe the image."
NONSENSE = ("dax", "blicket", "wug", "toma", "fep", "zorp", "kiki", "bouba", "gazzer", "mip", "tufa", "plonk")
FEWSHOT_PREFIX = "This is a"
EVAL_SHOTS = (0, 1, 2, 4)


def _combos(split: str) -> dict[str, Any]:
    """`scenes.sample` options of a split: train never sees HELD_OUT; evaluation scenes start with one."""
    if split == "train":
        return {"combos": TRAIN_COMBOS}
    return {"combos": ALL_COMBOS, "first_combos": HELD_OUT}


def name(obj: dict[str, Any]) -> str:
    """The referring expression of an object: "the red circle"."""
    return f"the {obj['colour']} {obj['shape']}"


def caption(scene: dict[str, Any]) -> str:
    """The deterministic caption: count and background, objects left to right, the first two's relation, the word."""
    objects = sorted(scene["objects"], key=lambda o: scenes.centre(o)[0])
    names = [f"a {o['size']} {o['colour']} {o['shape']}" for o in objects]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    noun = "shape" if len(objects) == 1 else "shapes"
    text = f"{NUMBERS[len(objects)]} {noun} on {scene['background']}: {listing}."
    if len(objects) > 1:
        text += f" {name(objects[0])} is {scenes.relation(objects[0], objects[1])} {name(objects[1])}."
    if scene["text"] is not None:
        text += f" the word {scene['text']} is written."
    return text


def question(scene: dict[str, Any], kind: str, target: dict[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) of type `kind` about `target` (an object of the scene)."""
    if kind == "colour":
        return f"What colour is the {target['shape']}?", target["colour"]
    if kind == "shape":
        return f"What shape is the {target['colour']} object?", target["shape"]
    if kind == "size":
        return f"Is {name(target)} small or large?", target["size"]
    if kind == "count":
        return "How many shapes are there?", NUMBERS[len(scene["objects"])]
    if kind == "relation":
        others = [o for o in scene["objects"] if o is not target]
        other = others[int(rng.integers(len(others)))]
        true = scenes.relation(target, other)
        asked = true if rng.random() < 0.5 else scenes.OPPOSITE[true]
        return f"Is {name(target)} {asked} {name(other)}?", "yes" if asked == true else "no"
    if kind == "text":
        return "What word is written in the image?", scene["text"]
    if kind == "caption":
        return CAPTION_QUESTION, caption(scene)
    if kind == "grounding":
        return f"Where is {name(target)}?", grounding_answer(scene, target)
    raise ValueError(f"unknown question type {kind!r}.")


def grounding_answer(scene: dict[str, Any], target: dict[str, Any]) -> str:
    """`<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>` with Qwen-VL's [0, 1000) coordinates."""
    return qwen_box(*target["box"], scene["size"], scene["size"], ref=name(target))


def _chat(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    """LLaVA conversations with the image marker at the start of the first question."""
    out = []
    for i, (q, a) in enumerate(turns):
        out.append({"from": "human", "value": (IMAGE_MARKER + "\n" if i == 0 else "") + q})
        out.append({"from": "gpt", "value": a})
    return out


def objects(rng: np.random.Generator, split: str, index: int, image_size: int) -> dict[str, Any]:
    """One object named by its colour and shape ("a red circle."): the main job's contrastive pretraining reads
    these, as texts that differ in one word often make an encoder tell shapes apart (captions of whole scenes
    differ in so many words that it need not), and more than texts with sizes and positions did
    (docs/evaluation.md)."""
    png, scene = scenes.generate(rng, image_size, num_objects=1, text=False, **_combos(split))
    obj = scene["objects"][0]
    return {"images": [png], "caption": f"a {obj['colour']} {obj['shape']}.", "task": "objects", "scene": scene}


def captions(rng: np.random.Generator, split: str, index: int, image_size: int) -> dict[str, Any]:
    png, scene = scenes.generate(rng, image_size, **_combos(split))
    return {"images": [png], "caption": caption(scene), "task": "captions", "scene": scene}


def vqa(rng: np.random.Generator, split: str, index: int, image_size: int) -> dict[str, Any]:
    kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]  # balanced types
    num_objects = int(rng.integers(2, 4)) if kind == "relation" else None
    png, scene = scenes.generate(
        rng, image_size, num_objects=num_objects, text=True if kind == "text" else None, **_combos(split)
    )
    q, a = question(scene, kind, scene["objects"][0], rng)
    return {
        "images": [png],
        "conversations": _chat([(q, a)]),
        "task": "vqa",
        "question": q,
        "question_type": kind,
        "answer": a,
        "scene": scene,
    }


def grounding(rng: np.random.Generator, split: str, index: int, image_size: int) -> dict[str, Any]:
    png, scene = scenes.generate(rng, image_size, **_combos(split))
    target = scene["objects"][0]
    q, a = question(scene, "grounding", target, rng)
    return {
        "images": [png],
        "conversations": _chat([(q, a)]),
        "task": "grounding",
        "ref": name(target),
        "box": list(target["box"]),
        "answer": a,
        "scene": scene,
    }


def chat(rng: np.random.Generator, split: str, index: int, image_size: int) -> dict[str, Any]:
    png, scene = scenes.generate(rng, image_size, **_combos(split))
    kinds = [
        k
        for k in CHAT_TYPES
        if not (k == "relation" and len(scene["objects"]) < 2) and not (k == "text" and scene["text"] is None)
    ]
    chosen = [kinds[i] for i in rng.choice(len(kinds), size=int(rng.integers(2, 4)), replace=False)]
    turns = []
    for kind in chosen:
        target = scene["objects"][int(rng.integers(len(scene["objects"])))]
        turns.append(question(scene, kind, target, rng))
    return {
        "images": [png],
        "conversations": _chat(turns),
        "task": "chat",
        "question_types": chosen,
        "answers": [a for _, a in turns],
        "scene": scene,
    }


def interleaved(rng: np.random.Generator, split: str, index: int, image_size: int) -> dict[str, Any]:
    n = int(rng.integers(2, 5))
    texts: list[str | None] = [f"Here are {NUMBERS[n]} pictures."]
    images: list[bytes | None] = [None]
    described = []
    for _ in range(n):
        png, scene = scenes.generate(rng, image_size, **_combos(split))
        texts += [None, caption(scene)]
        images += [png, None]
        described.append(scene)
    total = sum(len(s["objects"]) for s in described)
    texts.append(f"Altogether there are {NUMBERS[total]} shapes.")
    images.append(None)
    return {"texts": texts, "images": images, "task": "interleaved", "scenes": described}


def episode_sentence(word: str, label: str | None = None) -> str:
    """ "This is a {word}." or, given the class, "This is a {label} {word}." (few-shot and recall episodes)."""
    return f"{FEWSHOT_PREFIX} {label + ' ' if label else ''}{word}."


def _episode_pairing(rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
    """n distinct colours and n distinct made-up words, colour i paired with word i."""
    colours = [list(scenes.COLOURS)[i] for i in rng.choice(len(scenes.COLOURS), size=n, replace=False)]
    return colours, [NONSENSE[i] for i in rng.choice(len(NONSENSE), size=n, replace=False)]


def fewshot_record(
    shots: list[tuple[bytes, str]], words: list[str], mapping: dict[str, str], named: bool = False, **metadata
) -> dict:
    """An episode from its images in order as (PNG, class) — the last is the query — each followed by
    "This is a {word of its class}." ("This is a {class} {word}." when `named`); `metadata` (the images'
    descriptions) goes last. Shared with the real-image episodes of `data_pipelines/real_images.py`."""
    texts: list[str | None] = []
    images: list[bytes | None] = []
    for png, label in shots:
        texts += [None, episode_sentence(mapping[label], label if named else None)]
        images += [png, None]
    return {
        "texts": texts,
        "images": images,
        "task": "fewshot",
        "k": len(shots) - 1,
        "candidates": words,
        "answer": mapping[shots[-1][1]],
        "query_prefix": FEWSHOT_PREFIX,
        "mapping": mapping,
        **metadata,
    }


def fewshot(rng: np.random.Generator, split: str, index: int, image_size: int) -> dict[str, Any]:
    k = int(rng.integers(1, 5)) if split == "train" else EVAL_SHOTS[index % len(EVAL_SHOTS)]
    colours, words = _episode_pairing(rng, 2)
    allowed = TRAIN_COMBOS if split == "train" else ALL_COMBOS
    shots, described = [], []
    for shot in range(k + 1):
        colour = colours[int(rng.integers(2))]
        combos = [c for c in allowed if c[0] == colour]
        first = [c for c in HELD_OUT if c[0] == colour] if shot == k and split != "train" else combos
        png, scene = scenes.generate(rng, image_size, num_objects=1, combos=combos, first_combos=first, text=False)
        shots.append((png, colour))
        described.append(scene)
    return fewshot_record(shots, words, dict(zip(colours, words)), named=True, scenes=described)


def recall(rng: np.random.Generator, split: str, index: int, image_size: int) -> dict[str, Any]:
    """A text-only episode in the few-shot sentences' form: 2-3 colours paired with made-up words, then 3-9
    sentences "This is a {colour} {word}." of colours drawn uniformly from them. The main job pretrains its
    LM on these, so it comes to the images knowing in-context recall, as a pretrained LM would."""
    colours, words = _episode_pairing(rng, int(rng.integers(2, 4)))
    mapping = dict(zip(colours, words))
    texts = [episode_sentence(mapping[c], c) for c in rng.choice(colours, int(rng.integers(3, 10)))]
    return {"texts": texts, "images": [None] * len(texts), "task": "recall", "mapping": mapping}


TASKS: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "captions": ("pairs", captions),
    "vqa": ("llava", vqa),
    "grounding": ("llava", grounding),
    "chat": ("llava", chat),
    "interleaved": ("interleaved", interleaved),
    "fewshot": ("interleaved", fewshot),
    "recall": ("interleaved", recall),
    "objects": ("pairs", objects),  # last: a task's position seeds its records (`make_record`)
}
"""task -> (record format, fn(rng, split, index, image_size) -> record)."""


def make_record(task: str, split: str, index: int, seed: int = 0, image_size: int = 64) -> dict[str, Any]:
    """Record `index` of (task, split): a pure function of its arguments."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}.")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}.")
    rng = np.random.default_rng([seed, list(TASKS).index(task), SPLITS.index(split), index])
    return TASKS[task][1](rng, split, index, image_size)
