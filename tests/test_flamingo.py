"""The Flamingo system: zero gates leave the frozen LM untouched, and the tiny config trains through `vlm-jax train`."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from test_generate import full_forward_greedy

from conftest import REPO, read_tensorboard_scalars
from data_pipelines.tokenizer import Tokenizer
from vlm_jax import cli, generate, models
from vlm_jax.config_lib import load_config
from vlm_jax.lm.decoder import DecoderLM, flamingo_layout
from vlm_jax.prerequisites import resolve
from vlm_jax.train.checkpoint import load_params


def tiny_config(**overrides):
    c = load_config(os.path.join(REPO, "configs/flamingo.py:variant=tiny"))
    c.data.seq_len = 32
    for key, value in overrides.items():
        c.model.lm[key] = value
    return c


def test_zero_gates_give_the_plain_lm_logits_bit_for_bit():
    system = models.build(tiny_config())
    rng = np.random.default_rng(0)
    batch = system.dummy_batch(2)
    batch["tokens"] = rng.integers(0, 256, batch["tokens"].shape).astype(np.int32)
    batch["tokens"][:, [2, 9]] = system.config.model.media_token_id  # two images, text before the first
    batch["segment_ids"][1, 20:] = 2  # a second packed example in row 2
    batch["images"] = rng.normal(size=batch["images"].shape).astype(np.float32)
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), batch))
    gates = params["decoder"]["layer_groups"]["xattn"]
    assert np.all(np.asarray(gates["attn_gate"]) == 0) and np.all(np.asarray(gates["ff_gate"]) == 0)

    plain = DecoderLM(**dict(system.config.model.lm.to_dict(), cross_attn_every=0))
    decoder = params["decoder"]
    lm_params = {k: v for k, v in decoder.items() if k != "layer_groups"}
    lm_params["layers"] = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), decoder["layer_groups"]["layers"])
    want = jax.jit(plain.apply)({"params": lm_params}, batch["tokens"], batch["segment_ids"], batch["positions"])
    got = jax.jit(system.logits)(params, batch)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # and the layout helper inverts that reshape
    relaid = flamingo_layout(lm_params["layers"], system.config.model.lm.cross_attn_every)
    assert jax.tree.all(jax.tree.map(np.array_equal, relaid, decoder["layer_groups"]["layers"]))

    # With non-zero gates the images change the logits of text after them, never of text before the first image.
    params["decoder"]["layer_groups"]["xattn"] = dict(gates, attn_gate=gates["attn_gate"] + 0.5)
    moved = np.asarray(jax.jit(system.logits)(params, batch))
    np.testing.assert_array_equal(moved[:, :2], np.asarray(want)[:, :2])
    assert np.abs(moved[:, 2:] - np.asarray(want)[:, 2:]).max() > 1e-4


@pytest.fixture(scope="module")
def trained_flamingo(interleaved_folder, spm_model_path, tmp_path_factory):
    """A 40-step `vlm-jax train` run of the tiny Flamingo: (workdir, exit status)."""
    workdir = tmp_path_factory.mktemp("flamingo_run")
    config = f"{REPO}/configs/flamingo.py:variant=tiny,data={interleaved_folder},tokenizer={spm_model_path}"
    argv = ["train", "--config", config, "--workdir", str(workdir), "--config.total_steps=40", "--config.log_every=5"]
    return str(workdir), cli.main(argv)


def test_tiny_flamingo_trains_from_packed_interleaved_batches(trained_flamingo):
    workdir, status = trained_flamingo
    assert status == 0
    scalars = read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    loss = scalars["train/loss"]
    first, last = loss[min(loss)], loss[max(loss)]
    assert last < 0.7 * first, loss
    gates = scalars["train/gates/attn_gate"]
    assert gates[max(gates)] > 1e-3, gates  # the cross-attention opened


def test_generate_command_continues_text_and_image_prompts(trained_flamingo, interleaved_folder, tmp_path, capsys):
    workdir, _ = trained_flamingo
    images = os.path.dirname(interleaved_folder)
    prompts = os.path.join(images, "prompts.jsonl")
    with open(prompts, "w") as f:
        f.write(json.dumps({"text": "A photo album.<|endofchunk|><image>This one is", "images": ["red.png"]}) + "\n")
        f.write(
            json.dumps(
                {"text": "<image>This one is blue.<|endofchunk|><image>This one", "images": ["blue.png", "green.png"]}
            )
            + "\n"
        )
        f.write(json.dumps({"text": "A photo album."}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", workdir, "--prompts", prompts, "--out", str(out), "--max_new_tokens", "5"]
    assert cli.main([*argv, "--stop", "<|endofchunk|>,</s>"]) == 0, capsys.readouterr().err
    stopped = [json.loads(line) for line in out.read_text().splitlines()]
    # Without --stop, the system's stop tokens: the tokenizer's eos and the flamingo template's <|endofchunk|>.
    config, system, params = load_params(workdir)
    tokenizer = Tokenizer(config.data.tokenizer)
    stop = {tokenizer.eos_id, tokenizer.token_id("<|endofchunk|>")}
    assert set(system.stop_tokens(tokenizer)) == stop and tokenizer.token_id("</s>") == tokenizer.eos_id
    default = tmp_path / "default.jsonl"
    argv_default = [*argv[:-4], "--out", str(default), "--max_new_tokens", "12"]
    assert cli.main(argv_default) == 0
    free = [json.loads(line) for line in default.read_text().splitlines()]
    # Both runs are the checkpoint's greedy continuations up to and including the first stop token, token for
    # token as the no-cache reference loop, and their texts are those tokens without the stop token.
    fmt = generate.PromptFormat.of(system, tokenizer)
    rendered = generate.read_prompts(prompts, fmt)
    length = max(len(p["tokens"]) for p in rendered) + 12  # one compilation for every reference below

    def reference(prompt, steps):
        """The no-cache greedy continuation of a rendered prompt, up to and including its first stop token."""
        pixels = np.array(prompt["images"], np.float32).reshape(-1, 32, 32, 3)
        want = full_forward_greedy(system, params, prompt["tokens"], steps, pixels, length=length, slots=2)
        return want[: next((i + 1 for i, t in enumerate(want) if t in stop), steps)]

    for prompt, short, long in zip(rendered, stopped, free, strict=True):
        want = reference(prompt, 12)
        assert long["tokens"] == want and short["tokens"] == want[:5]
        for line in (short, long):
            assert line["text"] == tokenizer.decode([t for t in line["tokens"] if t not in stop])
    capsys.readouterr()  # drops the "Wrote ..." lines of the runs above
    argv_one = ["generate", "--checkpoint", workdir, "--max_new_tokens", "3", "--prompt", "<image>This one is"]
    assert cli.main([*argv_one, "--image", os.path.join(images, "red.png")]) == 0
    one = generate.parse_prompt({"text": "<image>This one is", "images": ["red.png"]}, fmt, "--prompt", images)
    printed = tokenizer.decode([t for t in reference(one, 3) if t not in stop])
    assert capsys.readouterr().out == printed + "\n"  # the continuation, printed
    with open(prompts, "a") as f:
        f.write(json.dumps({"text": "<image>x", "images": ["missing.png"]}) + "\n")
    assert cli.main(argv) == 2
    assert "the image missing.png does not exist" in capsys.readouterr().err


def test_train_new_tokens_trains_only_the_new_token_rows_of_the_embedding(spm_model_path, spm_tokenizer):
    from vlm_jax.config_lib import validate_patterns
    from vlm_jax.train.optimizer import path_str, split_trainable

    spec = f"configs/flamingo.py:variant=tiny,tokenizer={spm_model_path},train_new_tokens=True"
    c = resolve(load_config(os.path.join(REPO, spec)))  # the rows' ids come from the tokenizer
    rows = (spm_tokenizer.token_id("<image>"), spm_tokenizer.token_id("<|endofchunk|>"))
    assert c.optim.trainable_rows == (("decoder/embed/embedding", rows),)
    system = models.build(c)
    params = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    validate_patterns(c, [path_str(tuple(k.key for k in p)) for p, _ in flat])
    trainable = set(traverse_util.flatten_dict(split_trainable(params, list(c.optim.freeze))[0]))
    assert ("decoder", "embed", "embedding") in trainable
    paths = {"/".join(k) for k in trainable}
    assert not any(p.startswith(("vision/", "decoder/final_norm/", "decoder/layer_groups/layers/")) for p in paths)
    assert any(p.startswith("perceiver/") for p in paths) and any("/xattn/" in p for p in paths)


def test_frozen_parts_start_from_lm_and_vision_checkpoints(interleaved_folder, spm_model_path, tmp_path):
    from ml_collections import ConfigDict

    from vlm_jax.config_lib import ConfigError
    from vlm_jax.interop.convert import write_checkpoint
    from vlm_jax.train import trainer

    spec = f"configs/flamingo.py:variant=tiny,data={interleaved_folder},tokenizer={spm_model_path}"
    c = resolve(load_config(os.path.join(REPO, spec)))  # the LM's vocabulary size comes from the tokenizer
    c.total_steps, c.log_every, c.checkpoint_every = 2, 1, 0
    sources = {
        "lm": dict(name="lm", **{k: v for k, v in c.model.lm.items() if not k.startswith("cross_attn")}),
        "vision": dict(name="vision_encoder", encoder="vit", kwargs=c.model.encoder_kwargs.to_dict(), image_size=32),
    }
    saved = {}
    for name, model in sources.items():
        source = ConfigDict({"model": model, "data": {"seq_len": 8}})
        system = models.build(source)
        saved[name] = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(7), system.dummy_batch(1)))
        write_checkpoint(source, saved[name], str(tmp_path / name))
    c.model.lm_checkpoint, c.model.vision_checkpoint = str(tmp_path / "lm"), str(tmp_path / "vision")

    trainer.train(c, str(tmp_path / "run"))
    _, _, params = load_params(str(tmp_path / "run"))
    lm, decoder = saved["lm"], params["decoder"]
    same = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))  # noqa: E731
    assert same(decoder["embed"], lm["embed"]) and same(decoder["lm_head"], lm["lm_head"])
    assert same(decoder["layer_groups"]["layers"], flamingo_layout(lm["layers"], c.model.lm.cross_attn_every))
    assert same(params["vision"], saved["vision"])
    assert np.any(np.asarray(decoder["layer_groups"]["xattn"]["ff_gate"]) != 0)  # and the new parts trained

    c.model.lm.mlp_dim = 96  # a checkpoint of another shape is one clear sentence
    system = models.build(c)
    with pytest.raises(
        ConfigError, match=r"lm_checkpoint layers.*down.* has shape \(2, 2, 128, 64\); the model needs \(2, 2, 96, 64\)"
    ):
        system.pretrained(nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1))))
