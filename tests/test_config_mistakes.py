"""Config mistakes, each caught with one sentence before anything compiles (issue 19, point 5).

Each mistake goes through `vlm-jax train` in-process with `jax.jit` and `Lowered.compile` made to fail: the
trainer calls `jax.jit` only after validating the config (`config_lib.validate`) and checking the optimizer's
patterns on the abstract shapes of the init (`jax.eval_shape`), so a mistake caught any later (after an init was
jitted, or in the train step's compile) fails here with the guard's AssertionError instead of exit status 2.
"""

import os

import jax
import numpy as np
import pytest

from conftest import REPO
from data_pipelines.tokenizer import SPECIAL_TOKENS

# Everything `vlm-jax train` imports, imported now: some libraries wrap functions with `jax.jit` when imported
# (nothing compiles then), and the test below forbids `jax.jit` from the moment the command starts.
from vlm_jax import (
    cli,
    config_lib,
    models,  # noqa: E402
)
from vlm_jax.config_lib import ConfigError, load_config
from vlm_jax.train import trainer  # noqa: E402, F401

models.names()  # every system module

LM = os.path.join(REPO, "configs/lm.py:variant=tiny")
LLAVA = os.path.join(REPO, "configs/llava.py:variant=tiny")
SPECIALS = len(SPECIAL_TOKENS)
PIECES = 200  # pieces of the plain SentencePiece model; `Tokenizer` appends its special tokens after them


@pytest.fixture(scope="module")
def plain_spm(tmp_path_factory):
    """A PIECES-piece SentencePiece model trained without vlm_jax's special tokens, so `Tokenizer` appends them."""
    import sentencepiece as spm

    from conftest import write_corpus

    folder = tmp_path_factory.mktemp("plain_spm")
    corpus = write_corpus(folder / "text.txt", lines=600)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "plain"), vocab_size=PIECES, model_type="unigram",
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return str(folder / "plain.model")


@pytest.fixture(scope="module")
def lm_checkpoint_256(tmp_path_factory):
    """An `lm` checkpoint whose config has a 256-row vocabulary (its params are a stand-in: only the config,
    which checkpoints store as JSON, is read before training starts)."""
    from vlm_jax.interop.convert import write_checkpoint

    out = str(tmp_path_factory.mktemp("lm256"))
    write_checkpoint(load_config(LM), {"embed": {"embedding": np.zeros((1, 1), np.float32)}}, out)
    return out


def mistakes(plain_spm, lm_checkpoint_256):
    """kind -> (config spec, overrides, words the one sentence must hold)."""
    data = "/no/data"
    with_spm = f"{LM.replace('variant=tiny', '')}data={data},tokenizer={plain_spm}"
    llava_spm = f"{LLAVA},data={data},tokenizer={plain_spm}"
    return {
        "mesh that does not divide the devices": (
            LM, ["--config.mesh=data=3,fsdp=1"], ["mesh", "3 devices in all", "8 devices are available"]
        ),
        "batch not divisible by the data-parallel axes": (
            LM, ["--config.batch_size=12"], ["batch_size=12", "not divisible", "data-parallel size 8"]
        ),
        "unknown model.name": (LM, ["--config.model.name=lm9"], ["model.name 'lm9'", "not a known system"]),
        "freeze pattern matching nothing": (
            LM, ["--config.optim.freeze=('vision/.*',)"], ["optim.freeze pattern 'vision/.*'", "matches no parameter"]
        ),
        "image size not a multiple of the patch": (
            LLAVA, ["--config.model.image_size=36"], ["image_size=36", "not a multiple of the patch size 8"]
        ),
        "sequence too short for the image tokens": (
            LLAVA, ["--config.data.seq_len=16"], ["data.seq_len=16", "too short", "16 placeholder tokens"]
        ),
        "vocabulary smaller than a special-token id": (
            LLAVA, ["--config.model.lm.vocab_size=3"], ["model.image_token_id is 3", "outside the vocabulary"]
        ),
        "vocabulary smaller than the tokenizer's special tokens": (
            with_spm,
            ["--config.from_tokenizer=()", f"--config.model.vocab_size={PIECES}"],
            [f"{PIECES} pieces and {SPECIALS} special tokens it appends", f"model.vocab_size has {PIECES} embedding rows"],
        ),
        "tokenizer not matching the checkpoint's vocabulary": (
            llava_spm,
            [f"--config.model.lm_checkpoint={lm_checkpoint_256}"],
            ["model.lm_checkpoint", "vocabulary of 256 embedding rows", f"model.lm.vocab_size is {PIECES + SPECIALS}", "tokenizer"],
        ),
        "unknown --config. key": (
            LM, ["--config.optim.lrr=1"], ["names a key the config does not have", "lrr"]
        ),
    }  # fmt: skip


KINDS = list(mistakes("", ""))


@pytest.mark.parametrize("kind", KINDS)
def test_a_config_mistake_is_one_sentence_before_anything_compiles(
    kind, plain_spm, lm_checkpoint_256, tmp_path, monkeypatch, capsys
):
    spec, overrides, words = mistakes(plain_spm, lm_checkpoint_256)[kind]
    compiled = []

    def no_compile(*args, **kwargs):
        compiled.append(args)
        raise AssertionError(f"{kind}: something was jitted or compiled before the mistake was caught")

    monkeypatch.setattr(jax, "jit", no_compile)
    monkeypatch.setattr(jax.stages.Lowered, "compile", no_compile)
    monkeypatch.setenv("VLM_JAX_CACHE", str(tmp_path / "cache"))
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", spec, *overrides, "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm-jax train: ") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not compiled
    assert not list(workdir.glob("checkpoints/*/")), "a checkpoint was written"


def test_the_errors_are_config_errors_raised_by_validate(plain_spm, lm_checkpoint_256):
    """The checks the trainer runs first (`config_lib.validate`) raise ConfigError for the mistakes that need no
    parameter shapes; a mistake in a prerequisite run's config is caught before anything is resolved or trained."""
    config = cli._parse_config_flags(["--config", LLAVA, "--config.model.image_size=36"], {}).config
    with pytest.raises(ConfigError, match="not a multiple of the patch size 8"):
        config_lib.validate(config, 8)
    config = load_config(os.path.join(REPO, "configs/flamingo.py:data=builtin,scale=0.02"))
    config_lib.validate(config, 8, resolved=False)  # the main job as shipped passes, unresolved
    run = next(name for name, spec in config.prerequisites.items() if spec.kind == "run")
    config.prerequisites[run].config.batch_size = 7
    with pytest.raises(ConfigError, match=f"the prerequisite run '{run}': batch_size=7 is not divisible"):
        config_lib.validate(config, 8, resolved=False)
    config.prerequisites[run].config.batch_size = 8
    config.prerequisites[run].config.optim.freeze = ("nope/.*",)  # checked on the abstract init of that run
    with pytest.raises(ConfigError, match=f"the prerequisite run '{run}': optim.freeze pattern 'nope/.*' matches no"):
        config_lib.validate(config, 8, resolved=False)


@pytest.mark.parametrize(
    "spec", ["lm.py", "llava.py", "deepseek_vl.py:variant=tiny-1.3b", "flamingo.py:data=builtin,scale=0.02"]
)
def test_shipped_configs_pass_the_checks_before_resolving(spec):
    """No false alarm from the checks the trainer can run before resolving prerequisites, including the optimizer
    patterns on the abstract init of the config and of its prerequisite runs (image sizes, sequence room and
    special-token ids of every config and variant: test_shipped_variants_pass_the_size_and_id_checks)."""
    config = load_config(os.path.join(REPO, "configs", spec))
    config_lib.validate(config, 8, resolved=False)


def test_shipped_variants_pass_the_size_and_id_checks():
    from test_configs import SPECS

    for spec in SPECS:
        config = load_config(os.path.join(REPO, "configs", spec))
        config_lib._check_patch_sizes(config.model, "model")
        if "data" in config and "model" in config:
            config_lib._check_sequence_room(config)
        if not config.get("from_tokenizer"):
            vocab = config_lib.vocabulary(config)
            for key, token, (vocab_key, size) in (
                t for t in config_lib._token_ids(config.model, "model", vocab) if t[2] is not None
            ):
                assert token < size, (spec, key, token, vocab_key, size)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--workdirr=/x"], "--workdirr is not a flag of this command (did you mean --workdir?)."),
        (["stray"], "unexpected argument 'stray'"),
        (["--config.model.vocab_size=abc"], "--config.model.vocab_size=abc: invalid literal for int()"),
    ],
)
def test_flags_that_are_not_config_keys_are_one_sentence(args, words, capsys):
    assert cli.main(["train", "--config", LM, *args, "--workdir", "/tmp/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err, err
