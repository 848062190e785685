"""Generative evaluators: prompts equal the training template's prefixes; oracle answers score perfectly."""

import os
import re

import pytest

from conftest import REPO
from data_pipelines import templates
from data_pipelines.builtin import build
from vlm_jax import models
from vlm_jax.config_lib import load_config
from vlm_jax.evaluators import generative

SIZES = {"captions": 6, "vqa": 12, "grounding": 6, "fewshot": 8}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("builtin"))
    build.build(root, sizes={task: {"train": 20, "validation": n} for task, n in SIZES.items()}, workers=1)
    from vlm_jax.prerequisites import resolve

    # resolved: the vocabulary size and the <image> id come from the tokenizer
    config = resolve(load_config(os.path.join(REPO, f"configs/flamingo.py:variant=tiny,tokenizer={root}/spm.model")))
    config.model.image_size = config.data.image.size = 64
    config.data.seq_len, config.data.max_images = 128, 6
    return root, generative.Generator(models.build(config), None, config)


def records(root, task):
    fmt = generative.TASKS[task][0]
    return generative.read_records(f"{root}/{task}/validation", 100, fmt)


def continuation(gen, record, prompt_tokens):
    """The template-rendered training ids of `record`: the prompt must be their prefix; returns what follows."""
    rendered = templates.render("flamingo", gen.tokenizer, record, 1)
    ids = list(rendered.ids)
    assert ids[: len(prompt_tokens)] == list(prompt_tokens)
    return gen.tokenizer.decode(ids[len(prompt_tokens) :], skip_control=True)


def test_prompts_are_the_training_prefixes(built):
    root, gen = built
    for record in records(root, "vqa") + records(root, "grounding"):
        prompt, _, answer = generative.question_prompt(gen, record)
        assert continuation(gen, record, prompt["tokens"]).startswith(answer)
    for record in records(root, "captions"):
        assert continuation(gen, record, generative.caption_prompt(gen, record)["tokens"]).startswith(record["caption"])
    for record in records(root, "fewshot"):
        prompt = generative.fewshot_prompt(gen, record)
        # The query's sentence follows: its colour, then its word (the answer).
        assert re.findall(r"[a-z]+", continuation(gen, record, prompt["tokens"]))[:2] == [
            record["scenes"][-1]["objects"][0]["colour"],
            record["answer"],
        ]
        assert len(prompt["images"]) == sum(image is not None for image in record["images"])


def reference_outputs(root, gen, task):
    """What a perfect model would generate for each record of a task."""
    if task in ("vqa", "grounding"):
        return [generative.question_prompt(gen, r)[2] for r in records(root, task)]
    if task == "captions":
        return [r["caption"] for r in records(root, task)]
    return [r["texts"][-1][len(r["query_prefix"]) :] for r in records(root, task)]  # " red dax."


def test_oracle_predictions_score_perfectly_and_wrong_ones_do_not(built, monkeypatch):
    root, gen = built
    tasks = {task: f"{root}/{task}/validation" for task in sorted(SIZES)}  # evaluated in this order
    perfect = [reference_outputs(root, gen, task) for task in tasks]
    for outputs in (perfect, [["nothing"] * len(o) for o in perfect]):
        calls = iter(outputs)

        def generated(self, prompts, max_new_tokens):  # what fits in the evaluator's budget of new tokens
            return [self.tokenizer.decode(self.tokenizer.encode(text)[:max_new_tokens]) for text in next(calls)]

        monkeypatch.setattr(generative.Generator, "__call__", generated)
        metrics, samples = generative.evaluate(gen, tasks, 100)
        fewshot = {k: v for k, v in metrics.items() if k.startswith("fewshot_")}
        assert set(fewshot) == {f"fewshot_{k}shot_accuracy" for k in (0, 1, 2, 4)}
        if outputs is perfect:
            assert metrics["vqa_accuracy"] == 1.0 and metrics["grounding_acc@0.5"] == 1.0
            assert set(fewshot.values()) == {1.0}
            # every caption equals its one reference: BLEU 1, and CIDEr-D 10 (cosine 1 for n = 1..4, equal lengths)
            assert metrics["bleu4"] == pytest.approx(1.0) and metrics["cider"] == pytest.approx(10.0)
            assert {s["task"] for s in samples} == set(SIZES) and all(s["correct"] is not False for s in samples)
        else:
            assert metrics["vqa_accuracy"] == 0.0 and metrics["grounding_iou"] == 0.0
            assert metrics["cider"] == 0.0 and metrics["bleu1"] == pytest.approx(0.0)  # "nothing" is in no caption
            assert set(fewshot.values()) == {0.0}


def test_fewshot_scores_the_first_episode_word_generated(built, monkeypatch):
    # "red dax." scores the word, not the colour before it; the other episode word, or no episode word, is wrong.
    root, gen = built
    episodes = records(root, "fewshot")

    def other(r):
        return next(c for c in r["candidates"] if c != r["answer"])

    def colour(r):
        return r["scenes"][-1]["objects"][0]["colour"]

    for make, expected in (
        (lambda r: f" {colour(r)} {r['answer']}.", 1.0),
        (lambda r: f" {r['answer']} {other(r)}.", 1.0),  # the first episode word counts
        (lambda r: f" {colour(r)} {other(r)} {r['answer']}.", 0.0),
        (lambda r: f" {colour(r)} shape.", 0.0),
    ):
        outputs = [make(r) for r in episodes]
        monkeypatch.setattr(generative.Generator, "__call__", lambda self, prompts, max_new_tokens: outputs)
        metrics, _ = generative.fewshot(gen, episodes)
        assert set(metrics.values()) == {expected}


def test_per_task_record_counts(built, monkeypatch):
    from vlm_jax.errors import UserError

    root, gen = built
    tasks = {task: f"{root}/{task}/validation" for task in ("vqa", "fewshot")}
    seen = []

    def generated(self, prompts, max_new_tokens):
        seen.append(len(prompts))
        return ["nothing"] * len(prompts)

    monkeypatch.setattr(generative.Generator, "__call__", generated)
    generative.evaluate(gen, tasks, 3, {"fewshot": 5})
    assert seen == [3, 5]  # vqa reads `limit` records, fewshot its own count
    with pytest.raises(UserError, match="'captions', which is not one of eval_tasks"):
        generative.evaluate(gen, tasks, 3, {"captions": 5})
