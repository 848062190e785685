"""configs/*.py: loading is pure, derived values have one source, every module option is a --config key, and
declared prerequisites resolve once, cached (vlm_jax/prerequisites.py)."""

import ast
import json
import os

import pytest

from conftest import REPO
from vlm_jax import cli, config_lib, prerequisites
from vlm_jax.config_lib import ConfigError, load_config

# Every config with the arguments its docstring documents (paths need not exist: loading reads no file).
SPECS = [
    "lm.py",
    "lm.py:variant=50m",
    "lm.py:variant=1b",
    "lm.py:data=/no/data,tokenizer=/no/spm.model,template=llava",
    "clip.py",
    "clip.py:variant=B/16",
    "clip.py:variant=L/14",
    "clip.py:data=builtin",
    "siglip.py",
    "siglip.py:variant=B/16",
    "siglip.py:variant=So400m/14",
    "siglip.py:data=builtin",
    "nfnet.py",
    "nfnet.py:variant=tiny",
    "nfnet.py:variant=F0,head=0",
    "flamingo.py",
    "flamingo.py:variant=3B",
    "flamingo.py:variant=9B",
    "flamingo.py:variant=80B",
    "flamingo.py:variant=tiny,data=/no/data,tokenizer=/no/spm.model,train_new_tokens=True",
    "flamingo.py:lm_checkpoint=/no/lm,vision_checkpoint=/no/vision",
    "flamingo.py:data=builtin",
    "flamingo.py:data=builtin,scale=0.02",
    "llava.py",
    "llava.py:variant=7b",
    "llava.py:variant=1.5-13b,stage=1",
    "llava.py:variant=1.5-7b,data=/no/data,tokenizer=/no/spm.model,stage1=/no/run",
    "llava.py:data=builtin,stage=1,scale=0.1",
    "llava.py:data=builtin",
    "llava.py:variant=next-7b",
    "llava.py:variant=tiny-next,stage=1",
    "minigpt_v2.py",
    "minigpt_v2.py:variant=7b",
    "minigpt_v2.py:data=/no/data,tokenizer=/no/spm.model",
    "minigpt_v2.py:data=builtin,scale=0.02",
    "paligemma.py",
    "paligemma.py:variant=3b-224",
    "paligemma.py:variant=3b-448,data=/no/data,tokenizer=/no/spm.model,init=/no/run",
    "paligemma.py:variant=3b-896,stage=transfer,init=/no/run",
    "paligemma.py:data=builtin",
    "internvl.py",
    "internvl.py:variant=1.5",
    "internvl.py:variant=mini-4b,stage=1,data=/no/data,tokenizer=/no/spm.model",
    "internvl.py:variant=2-8b",
    "internvl.py:data=builtin,scale=0.02",
    "qwen2_vl.py",
    "qwen2_vl.py:variant=tiny-2.5",
    "qwen2_vl.py:variant=7b",
    "qwen2_vl.py:variant=2.5-7b",
    "qwen2_vl.py:data=builtin,scale=0.02",
    "qwen_vl.py",
    "qwen_vl.py:variant=7b,stage=1",
    "qwen_vl.py:variant=7b,data=/no/data,tokenizer=/no/spm.model",
    "qwen_vl.py:data=builtin,scale=0.02",
    "fuyu.py",
    "fuyu.py:variant=8b",
    "fuyu.py:variant=8b,data=/no/data,tokenizer=/no/spm.model",
    "fuyu.py:data=builtin",
    "fuyu.py:data=builtin,scale=0.02",
    "idefics3.py",
    "idefics3.py:variant=8b",
    "idefics3.py:variant=8b,data=/no/data,tokenizer=/no/spm.model",
    "idefics3.py:data=builtin,scale=0.02",
    "deepseek_vl.py",
    "deepseek_vl.py:variant=tiny-1.3b",
    "deepseek_vl.py:variant=7b",
    "deepseek_vl.py:variant=1.3b,stage=1,data=/no/data,tokenizer=/no/spm.model",
    "deepseek_vl.py:data=builtin,scale=0.02",
    "deepseek_vl.py:variant=tiny-1.3b,data=builtin",
    "paligemma.py:data=builtin,scale=0.02",
]


def config_path(spec):
    return os.path.join(REPO, "configs", spec)


def parse(spec, *overrides):
    """The config as `vlm-jax train --config SPEC OVERRIDES...` sees it (the CLI's own parsing)."""
    return cli._parse_config_flags(["--config", config_path(spec), *overrides], {}).config


def lookup(config, dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def forbid(*_, **__):
    raise AssertionError("loading a config built data, trained or read a tokenizer")


def test_every_config_file_is_checked():
    checked = {spec.split(":")[0] for spec in SPECS}
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if name.endswith(".py"):
            assert name in checked, f"configs/{name} is not in SPECS: add it with its documented arguments"


@pytest.mark.parametrize("spec", SPECS)
def test_loading_a_config_builds_nothing_trains_nothing_reads_no_file(spec, tmp_path, monkeypatch):
    from data_pipelines import real_images
    from data_pipelines.builtin import build
    from data_pipelines.tokenizer import Tokenizer
    from vlm_jax.train import trainer

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("VLM_JAX_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    for target, name in [(build, "build"), (build, "cached"), (real_images, "write"), (trainer, "train")]:
        monkeypatch.setattr(target, name, forbid)
    monkeypatch.setattr(Tokenizer, "__init__", forbid)
    load_config(config_path(spec))
    assert os.listdir(cache) == [] and sorted(os.listdir(tmp_path)) == ["cache"]


def test_the_main_job_declares_its_prerequisites_and_refers_to_them():
    c = load_config(config_path("flamingo.py:data=builtin,scale=0.02"))
    assert {name: p.kind for name, p in c.prerequisites.items()} == {
        "builtin": "builtin_data",
        "digits": "real_images",
        "photos": "real_images",
        "vision": "run",
        "lm": "run",
    }
    assert c.prerequisites.builtin.scale == 0.02 and c.prerequisites.lm.config.total_steps == 12
    assert c.prerequisites.vision.config.total_steps == 10  # 500 x 0.02
    assert c.model.lm_checkpoint == "prerequisite:lm" and c.model.vision_checkpoint == "prerequisite:vision"
    vision = c.prerequisites.vision.config
    assert vision.model.name == "dual_encoder" and vision.data.train_path == "prerequisite:builtin/objects/train"
    # The paper's recipe: the vision encoder and every LM weight frozen; the new tokens' embedding rows train.
    assert c.optim.freeze == (
        "vision/.*",
        "decoder/layer_groups(_tail)?/layers/.*",
        "decoder/final_norm/.*",
        "decoder/lm_head/.*",
    )
    assert c.optim.trainable_rows[0][0] == "decoder/embed/embedding"
    assert ("optim.trainable_rows.0.1", ("<image>", "<|endofchunk|>")) in c.from_tokenizer
    assert c.data.tokenizer == "prerequisite:builtin/spm.model"
    assert c.eval_tasks["fewshot/digits"] == "prerequisite:digits"
    with pytest.raises(ConfigError, match="resolve the config first"):
        config_lib.validate(c, 8)  # the trainer resolves; an unresolved config is refused, not misread


# (config, override, every key that must follow it)
FOLLOWERS = [
    ("flamingo.py", "--config.data.seq_len=96", ["data.seq_len", "data.interleaved.max_tokens"]),
    ("flamingo.py", "--config.data.image.size=48", ["model.image_size", "model.encoder_kwargs.image_size"]),
    ("flamingo.py", "--config.data.max_images=3", ["data.interleaved.max_images"]),
    ("flamingo.py:variant=3B", "--config.model.image_size=288", ["data.image.size"]),
    (
        "flamingo.py:data=builtin",
        "--config.data.seq_len=256",
        ["data.interleaved.max_tokens", "prerequisites.lm.config.data.seq_len"]
        + ["prerequisites.lm.config.data.interleaved.max_tokens"],
    ),
    (
        "flamingo.py:data=builtin",
        "--config.model.image_size=96",
        ["model.encoder_kwargs.image_size", "data.image.size"]
        + ["prerequisites.vision.config.model.vision.image_size", "prerequisites.vision.config.data.image_size"],
    ),
    ("flamingo.py:data=builtin", "--config.model.lm.embed_dim=96", ["prerequisites.lm.config.model.embed_dim"]),
    ("flamingo.py:data=builtin", "--config.model.lm.remat=dots", ["prerequisites.lm.config.model.remat"]),
    # the contrastive pretraining's image tower is the Flamingo's ViT (but its pooling)
    (
        "flamingo.py:data=builtin",
        "--config.model.encoder_kwargs.width=48",
        ["prerequisites.vision.config.model.vision.width"],
    ),
    ("lm.py:data=/d,tokenizer=/t.model", "--config.data.seq_len=256", ["data.interleaved.max_tokens"]),
    ("clip.py", "--config.data.image_size=48", ["model.vision.image_size"]),
    ("clip.py", "--config.model.text.max_len=24", ["data.text_len"]),
    ("siglip.py:data=builtin", "--config.model.vision.image_size=96", ["data.image_size"]),
    ("siglip.py:data=builtin", "--config.data.text_len=60", ["model.text.max_len"]),
    # paper sizes compute in bfloat16; one key sets every part's dtype
    (
        "flamingo.py:variant=3B",
        "--config.model.lm.dtype=float32",
        ["model.encoder_kwargs.dtype", "model.resampler.dtype"],
    ),
    ("flamingo.py", "--config.model.resampler.dtype=bfloat16", ["model.lm.dtype", "model.encoder_kwargs.dtype"]),
    ("llava.py:variant=7b", "--config.model.lm.dtype=float32", ["model.encoder_kwargs.dtype"]),
    ("paligemma.py:variant=3b-224", "--config.model.encoder_kwargs.dtype=float32", ["model.lm.dtype"]),
    ("minigpt_v2.py:variant=7b", "--config.model.lm.dtype=float32", ["model.encoder_kwargs.dtype"]),
    ("internvl.py:variant=1.5", "--config.model.lm.dtype=float32", ["model.encoder_kwargs.dtype"]),
    ("qwen2_vl.py:variant=7b", "--config.model.lm.dtype=float32", ["model.vision.dtype"]),
    ("qwen_vl.py:variant=7b", "--config.model.lm.dtype=float32", ["model.encoder_kwargs.dtype"]),
    ("qwen_vl.py", "--config.model.connector.queries=16", ["model.image_tokens"]),
    ("qwen_vl.py:data=builtin", "--config.model.image_size=96", ["model.encoder_kwargs.image_size", "data.image.size"]),
    ("fuyu.py", "--config.model.image_size=64", ["data.image.size"]),
    ("idefics3.py:variant=8b", "--config.model.lm.dtype=float32", ["model.encoder_kwargs.dtype"]),
    (
        "idefics3.py",
        "--config.model.image_size=64",
        [
            "model.encoder_kwargs.image_size",
            "data.image.size",
            "model.image_tokens",
            "data.template_options.tile_tokens",
        ],
    ),
    ("idefics3.py:variant=8b", "--config.data.seq_len=4096", ["data.interleaved.max_tokens"]),
    ("deepseek_vl.py:variant=7b", "--config.model.lm.dtype=float32", ["model.encoder_kwargs.dtype", "model.sam.dtype"]),
    (
        "deepseek_vl.py:variant=tiny-1.3b",
        "--config.model.low_res_size=64",
        ["model.encoder_kwargs.image_size", "model.image_size", "data.image.size"],
    ),
    ("deepseek_vl.py:variant=7b", "--config.data.seq_len=2048", ["data.interleaved.max_tokens"]),
    ("fuyu.py:variant=8b", "--config.data.seq_len=4096", ["data.interleaved.max_tokens"]),
    (
        "internvl.py:variant=mini-4b",
        "--config.model.image_size=896",
        ["model.encoder_kwargs.image_size", "data.image.size"],
    ),
    ("siglip.py:variant=B/16", "--config.model.text.dtype=float32", ["model.vision.dtype"]),
    (
        "paligemma.py:variant=3b-224",
        "--config.model.image_size=448",
        ["model.encoder_kwargs.image_size", "data.image.size"],
    ),
    (
        "paligemma.py:data=builtin",
        "--config.model.image_size=96",
        ["model.encoder_kwargs.image_size", "data.image.size"],
    ),
]


@pytest.mark.parametrize("spec, override, followers", FOLLOWERS)
def test_derived_values_follow_a_command_line_override(spec, override, followers):
    key, value = override[len("--config.") :].split("=")
    before = parse(spec)
    config = parse(spec, override)
    saved = json.loads(config_lib.to_json(config))  # what checkpoints store
    for name in [key, *followers]:
        assert lookup(before, name) != lookup(config, name), name  # the override changed it...
        assert str(lookup(config, name)) == value, name  # ...to the given value
        assert str(lookup(saved, name)) == value, name  # and JSON saves the values, not references


# Documented module options (docs/systems.md, docs/training.md, the configs' docstrings), per family.
FLAMINGO_KNOBS = [
    "--config.model.lm.cross_attn.gate_init=1.0",
    "--config.model.lm.cross_attn.gate_shape=vector",
    "--config.model.lm.cross_attn.norm=rmsnorm",
    "--config.model.lm.cross_attn.ff=gated",
    "--config.model.lm.cross_attn.ff_dim=32",
    "--config.model.lm.cross_attn.qk_norm=True",
    "--config.model.lm.cross_attn.ff_act=relu",
    "--config.model.only_attend_immediate_media=False",
    "--config.model.lm.remat=dots",
    "--config.model.lm.position_embedding=alibi",
    "--config.model.lm.attn_logit_softcap=30.0",
    "--config.model.lm.qkv_bias=True",
]
RESAMPLER_KNOBS = ["--config.model.resampler.ff_act=relu", "--config.model.resampler.qk_norm=True"]
VIT_KNOBS = ["--config.model.encoder_kwargs.stem=conv", "--config.model.encoder_kwargs.remat=full"]
KNOBS = {
    "lm.py": ["--config.model.remat=full", "--config.model.position_embedding=alibi", "--config.model.mlp=plain"],
    "lm.py:data=/d,tokenizer=/t.model": ["--config.model.norm=layernorm", "--config.model.final_logit_softcap=30.0"],
    "clip.py": [
        "--config.model.vision.remat=full",
        "--config.model.text.remat=full",
        "--config.model.vision.qk_norm=True",
    ],
    "clip.py:data=builtin": ["--config.model.vision.posemb=sincos2d", "--config.model.text.norm_eps=1e-6"],
    "siglip.py": ["--config.model.chunked_loss=False", "--config.model.vision.remat=dots"],
    "siglip.py:data=builtin": ["--config.model.text.remat=full", "--config.prerequisites.builtin.scale=0.5"],
    "nfnet.py": ["--config.model.kwargs.stochastic_depth_rate=0.2", "--config.model.kwargs.activation=relu"],
    "flamingo.py": FLAMINGO_KNOBS + RESAMPLER_KNOBS + VIT_KNOBS + ["--config.model.project_media=True"],
    "flamingo.py:variant=9B": FLAMINGO_KNOBS
    + RESAMPLER_KNOBS
    + ["--config.model.encoder_kwargs.stochastic_depth_rate=0.0", "--config.model.project_media=False"],
    "paligemma.py": VIT_KNOBS + ["--config.model.lm.remat=full", "--config.model.stage_checkpoint=/no/run"],
    "fuyu.py": [
        "--config.model.lm.rope_fraction=1.0",
        "--config.model.lm.qk_norm=False",
        "--config.model.lm.remat=full",
    ],
    "internvl.py": ["--config.model.connector.version=v1", "--config.data.image.max_tiles=40"],
    "idefics3.py": ["--config.data.template_options.tiles_per_side=3", "--config.data.image.longest_edge=96"],
    "idefics3.py:variant=8b": ["--config.model.encoder_kwargs.remat=full", "--config.model.lm.remat=full"],
    "deepseek_vl.py": [
        "--config.model.sam.remat=full",
        "--config.model.encoder_kwargs.remat=full",
        "--config.model.high_res_normalization=imagenet",
    ],
    "qwen2_vl.py": ["--config.model.vision.window_merge=4", "--config.data.image.max_pixels=1000000"],
    "qwen_vl.py:variant=7b": ["--config.model.connector.head_dim=64", "--config.model.encoder_kwargs.remat=full"],
    "flamingo.py:data=builtin": FLAMINGO_KNOBS
    + ["--config.model.encoder_kwargs.stem=patch", "--config.model.encoder_kwargs.stem_width=8"]
    + ["--config.prerequisites.builtin.scale=0.5", "--config.prerequisites.lm.config.total_steps=10"]
    + ["--config.prerequisites.vision.config.total_steps=10", "--config.prerequisites.vision.config.optim.lr=0.001"],
}


@pytest.mark.parametrize("spec, override", [(spec, o) for spec, knobs in KNOBS.items() for o in knobs])
def test_documented_knobs_are_settable_from_the_command_line(spec, override):
    key, value = override[len("--config.") :].split("=")
    try:
        expected = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        expected = value  # a string
    config = parse(spec, override)
    assert lookup(config, key) == expected
    assert lookup(parse(spec), key) != expected  # the config's default differs: the override did something


def test_a_knob_reaches_the_module():
    import flax.linen as nn
    import jax
    import numpy as np

    from vlm_jax import models

    config = parse("flamingo.py", "--config.model.lm.cross_attn.gate_init=1.0")
    system = models.build(config)
    params = nn.unbox(system.init(jax.random.key(0), system.dummy_batch(1)))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    gates = [v for p, v in flat if p[-1].key in ("attn_gate", "ff_gate")]
    assert len(gates) == 2 and all(np.all(np.asarray(g) == 1.0) for g in gates)  # each stacked over the groups


# ---------------------------------------------------------------------------------------------- resolution


@pytest.fixture
def with_run(tmp_path, monkeypatch):
    """(config declaring a `base` run prerequisite, the calls of a stand-in trainer.train)."""
    from vlm_jax.train import trainer

    calls = []

    def fake_train(config, workdir):
        calls.append(config)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))

    monkeypatch.setattr(trainer, "train", fake_train)
    c = load_config(config_path("lm.py"))
    c.prerequisites = config_lib.ConfigDict(
        dict(base=dict(kind="run", workdir=str(tmp_path / "runs" / "base"), config=load_config(config_path("lm.py"))))
    )
    c.init_from = "prerequisite:base/checkpoints"  # any key may refer to a prerequisite
    return c, calls


def test_a_run_prerequisite_is_trained_once_cached_and_reused(with_run, tmp_path):
    c, calls = with_run
    resolved = prerequisites.resolve(c)
    folder = resolved.prerequisites.base.path
    assert resolved.init_from == folder + "/checkpoints" and len(calls) == 1
    assert os.path.dirname(folder) == str(tmp_path / "runs") and os.path.basename(folder).startswith("base-")
    assert (
        json.load(open(os.path.join(folder, "config.json")))["total_steps"] == c.prerequisites.base.config.total_steps
    )
    assert c.init_from == "prerequisite:base/checkpoints"  # the given config is left as it was
    assert prerequisites.resolve(c).prerequisites.base.path == folder and len(calls) == 1  # cached
    assert prerequisites.resolve(resolved).init_from == resolved.init_from and len(calls) == 1  # idempotent
    c.prerequisites.base.config.total_steps = 7  # other settings, another run
    assert prerequisites.resolve(c).prerequisites.base.path != folder and len(calls) == 2


def test_without_train_a_missing_run_is_named_but_never_trained(with_run):
    c, calls = with_run
    folder = prerequisites.resolve(c, train=False).prerequisites.base.path
    assert not os.path.exists(folder) and calls == []
    assert prerequisites.resolve(c).prerequisites.base.path == folder and len(calls) == 1  # where training puts it


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c, "init_from", "prerequisite:nope"), "config.init_from refers to the prerequisite 'nope'"),
        (lambda c: setattr(c.prerequisites.base, "kind", "magic"), "prerequisites.base.kind is 'magic'"),
        (lambda c: c.prerequisites.base.update(epochs=3), "prerequisites.base.epochs is not a setting of a run"),
        (
            lambda c: setattr(c.prerequisites.base.config.model, "name", "prerequisite:base"),
            "the prerequisites base -> base form a cycle",
        ),
    ],
)
def test_bad_prerequisites_are_one_sentence(with_run, change, message):
    c, calls = with_run
    change(c)
    with pytest.raises(ConfigError, match=message):
        prerequisites.resolve(c)
    assert calls == []


def test_values_from_the_tokenizer_are_read_when_resolved(spm_model_path, spm_tokenizer):
    spec = f"flamingo.py:variant=tiny,data=/d,tokenizer={spm_model_path},train_new_tokens=True"
    c = load_config(config_path(spec))
    assert c.model.lm.vocab_size == 0 and c.optim.trainable_rows == (("decoder/embed/embedding", ()),)
    resolved = prerequisites.resolve(c)
    image, chunk = spm_tokenizer.token_id("<image>"), spm_tokenizer.token_id("<|endofchunk|>")
    assert resolved.model.lm.vocab_size == spm_tokenizer.vocab_size and resolved.model.media_token_id == image
    assert resolved.optim.trainable_rows == (("decoder/embed/embedding", (image, chunk)),)
    assert "from_tokenizer" not in resolved
    c.from_tokenizer = (("model.lm.vocab_size", "<nope>"),)
    with pytest.raises(ConfigError, match="the id of '<nope>', a piece the tokenizer"):
        prerequisites.resolve(c)
    c.from_tokenizer = (("model.lm.vocab", "vocab_size"),)
    with pytest.raises(ConfigError, match="from_tokenizer names model.lm.vocab, which the config does not have"):
        prerequisites.resolve(c)
