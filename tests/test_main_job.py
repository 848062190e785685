"""The README's main job end to end, shortened: `vlm-jax train` on the built-in data, evaluation, report, `vlm-jax eval`.

Runs the real config (`configs/flamingo.py:data=builtin`) on a 2% build of the
built-in dataset for 4 steps: what is checked is that every stage of the main
job happens and leaves its outputs, not how well 4 steps learn.
"""

import json
import os
import re

import pytest

from conftest import REPO, read_tensorboard_scalars
from vlm_jax import cli

CONFIG = os.path.join(REPO, "configs/flamingo.py:data=builtin,scale=0.02")
SHORT = ["--config.total_steps=4", "--config.log_every=2", "--config.eval_every=4", "--config.eval_examples=16"]
EVAL_METRICS = (
    "vqa_accuracy",
    "vqa_accuracy/colour",
    "cider",
    "bleu4",
    "grounding_acc@0.5",
    *(f"fewshot_{k}shot_accuracy" for k in (0, 1, 2, 4)),
    *(f"{source}/fewshot_{k}shot_accuracy" for source in ("digits", "photos") for k in (0, 1, 2, 4)),
    "baseline/vqa_accuracy",
    "baseline/cider",
)


def tb_tag(name):
    return "eval/" + name.replace("@", "_")  # TensorBoard's tag rules turn "@" into "_"


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """(workdir, cache folder) of one shortened main-job run, with its own data cache."""
    cache = str(tmp_path_factory.mktemp("cache"))
    workdir = str(tmp_path_factory.mktemp("run"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLM_JAX_CACHE", cache)
        assert cli.main(["train", "--config", CONFIG, "--workdir", workdir, *SHORT]) == 0
    return workdir, cache


def test_the_main_job_builds_its_data_trains_evaluates_and_reports(main_job):
    workdir, cache = main_job
    assert sorted(os.listdir(cache)) == ["builtin", "real_images"]  # built on first use, in the cache
    config = json.load(open(os.path.join(workdir, "config.json")))
    lm_run = config["model"]["lm_checkpoint"]  # the LM pretrained on the text episodes, kept in the data cache
    assert lm_run.startswith(os.path.join(cache, "builtin")) and os.path.basename(lm_run).startswith("lm-recall-")
    assert json.load(open(os.path.join(lm_run, "config.json")))["model"]["name"] == "lm"
    assert os.path.isdir(os.path.join(lm_run, "checkpoints", "12"))  # 600 steps x scale 0.02
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
    scalars = read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    assert set(scalars["train/loss"]) == {2, 4}
    for name in EVAL_METRICS:
        tag = tb_tag(name)
        assert set(scalars[tag]) == {4}, name
        assert 0.0 <= scalars[tag][4] <= (10.0 if name == "cider" else 1.0)
    page = open(os.path.join(workdir, "report", "index.html"), encoding="utf-8").read()
    for name in EVAL_METRICS:
        assert f"<td>eval/{name}</td>" in page, name
    for task in ("vqa", "captions", "grounding", "fewshot", "fewshot/digits", "fewshot/photos"):
        assert f'<div class="task">{task}</div>' in page, task  # samples of every evaluation
    for row in ("examples_per_s", "mfu", "compile_s", "train_loop_s", "eval_s"):
        assert f"<td>{row}</td>" in page
    assert os.path.isfile(os.path.join(workdir, "report", "eval.png"))
    plotted = re.search(r'title="eval.png" data-tags="([^"]*)"', page).group(1).split()
    assert {tb_tag(name) for name in EVAL_METRICS} <= set(plotted)  # the last evaluation is in the curves too


def test_eval_command_scores_the_checkpoint_again(main_job, capsys):
    workdir, cache = main_job
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLM_JAX_CACHE", cache)
        assert cli.main(["eval", "--config", CONFIG, "--workdir", workdir, *SHORT]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4
    trained = read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    for name in EVAL_METRICS:  # the same checkpoint and records: the same scores
        assert result[name] == pytest.approx(trained[tb_tag(name)][4], abs=1e-6), name
