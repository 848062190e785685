"""KV-cache generation: cached decoding equals recomputing the full forward, sampling filters, stop tokens, the CLI."""

import functools
import json
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from vlm_jax import cli, generate, models
from vlm_jax.config_lib import load_config
from vlm_jax.errors import UserError
from vlm_jax.models.base import Decoding


@functools.cache
def jitted_logits(system):
    """`system.logits`, jitted once per system (a fresh `jax.jit` of the bound method compiles again each time)."""
    return jax.jit(system.logits)


def full_forward_greedy(system, params, prompt, steps, images=None, length=None, slots=None):
    """The reference: re-run the whole sequence through `system.logits` (no cache) for every new token.

    Rows are right-padded to one length (padding is segment 0, which causal attention never reaches back
    to), so one compilation serves every step; `length` (default: the prompt and its new tokens) and `slots`
    (default: the prompt's images, at least 1) fix those shapes for several prompts."""
    length = length or len(prompt) + steps
    logits = jitted_logits(system)
    seq = list(prompt)
    for _ in range(steps):
        n = len(seq)
        batch = {
            "tokens": np.array([seq + [0] * (length - n)], np.int32),
            "segment_ids": (np.arange(length) < n).astype(np.int32)[None],
            "positions": np.arange(length, dtype=np.int32)[None],
        }
        if images is not None:
            count = slots or max(len(images), 1)
            batch["images"] = np.zeros((1, count) + system.dummy_batch(1)["images"].shape[2:], np.float32)
            batch["images"][0, : len(images)] = images
            batch["image_segment_ids"] = (np.arange(count) < len(images)).astype(np.int32)[None]
        seq.append(int(np.argmax(np.asarray(logits(params, batch))[0, n - 1])))
    return seq[len(prompt) :]


@pytest.fixture(scope="module")
def flamingo():
    """The tiny Flamingo with random weights and open gates (so the images change the text)."""
    config = load_config(os.path.join(REPO, "configs/flamingo.py:variant=tiny"))
    config.data.seq_len = 16
    system = models.build(config)
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), system.dummy_batch(1)))
    xattn = params["decoder"]["layer_groups"]["xattn"]
    params["decoder"]["layer_groups"]["xattn"] = dict(xattn, attn_gate=xattn["attn_gate"] + 1.0)
    return system, params


def flamingo_batch(prompts, images, length=7):
    """Three prompts and their images as one batch of the Flamingo tests' shapes (7 tokens, 2 media slots), so that
    generating with `Sampling(max_new_tokens=5)` compiles once for all of them."""
    batch = generate.left_pad(prompts, length)
    batch.update(generate.pad_images(images, 32, slots=2))
    return batch


def test_lm_cached_greedy_equals_full_forward_for_prompts_of_different_lengths():
    system = models.build(load_config(os.path.join(REPO, "configs/lm.py:variant=tiny")))
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(1), system.dummy_batch(1)))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [200]]
    out = generate.generate(system, params, generate.left_pad(prompts), generate.Sampling(max_new_tokens=6))
    assert out.shape == (3, 6)
    for row, prompt in enumerate(prompts):
        assert out[row].tolist() == full_forward_greedy(system, params, prompt, 6, length=13)  # one compilation


def test_flamingo_cached_greedy_equals_full_forward_with_different_image_counts(flamingo):
    system, params = flamingo
    image = system.config.model.media_token_id
    rng = np.random.default_rng(0)
    prompts = [[1, image, 40, 41], [1, 50, image, 51, 52, image, 53], [1, 60, 61]]  # 1, 2 and 0 images
    images = [rng.normal(size=(n, 32, 32, 3)).astype(np.float32) for n in (1, 2, 0)]
    batch = flamingo_batch(prompts, images)
    out = generate.generate(system, params, batch, generate.Sampling(max_new_tokens=5))
    for row, prompt in enumerate(prompts):
        assert out[row].tolist() == full_forward_greedy(system, params, prompt, 5, images[row], length=12, slots=2)
    # the images matter: other pixels give another continuation for the image rows
    batch["images"] = batch["images"] + 3.0
    moved = generate.generate(system, params, batch, generate.Sampling(max_new_tokens=5))
    assert moved[2].tolist() == out[2].tolist() and moved[:2].tolist() != out[:2].tolist()


# An image's colour -> the token that names it (as "This one is red." in tests/conftest.py's documents).
COLOUR_WORDS = {(220, 30, 30): 50, (30, 200, 40): 60, (30, 40, 220): 70}


def test_a_briefly_trained_flamingo_names_each_images_colour(flamingo):
    """30 Adam steps on the LM head (the cheapest training whose result depends on the images, which reach the
    last hidden state only through the open cross-attention) teach "<image> This one is" -> the image colour's
    word, then a stop token; greedy generation must then say exactly that word for each colour, then stop. Only
    the images tell the rows apart, so generation that loses, mixes up or ignores them fails, as does one whose
    logits differ from the training forward's. The shapes are the test above's, so generation is compiled once."""
    system, params = flamingo
    stop, prompt = 2, [1, 30, 31, system.config.model.media_token_id, 40, 41, 42]
    words = list(COLOUR_WORDS.values())
    images = [np.full((1, 32, 32, 3), np.array(colour) / 127.5 - 1, np.float32) for colour in COLOUR_WORDS]
    batch = flamingo_batch([prompt + [word] for word in words], images, length=8)
    targets = np.array([[word, stop] for word in words], np.int32)
    optimizer = optax.adam(3e-2)

    def with_head(head):
        return {**params, "decoder": {**params["decoder"], "lm_head": head}}

    def loss(head):  # cross-entropy of the word after the prompt and of the stop token after the word
        logp = jax.nn.log_softmax(system.logits(with_head(head), batch)[:, -2:].astype(jnp.float32))
        return -jnp.take_along_axis(logp, targets[..., None], -1).mean()

    @jax.jit
    def step(head, state):
        updates, state = optimizer.update(jax.grad(loss)(head), state, head)
        return optax.apply_updates(head, updates), state

    head = params["decoder"]["lm_head"]
    state = optimizer.init(head)
    for _ in range(30):
        head, state = step(head, state)
    out = generate.generate(
        system, with_head(head), flamingo_batch([prompt] * 3, images), generate.Sampling(max_new_tokens=5)
    )
    assert out[:, :2].tolist() == [[word, stop] for word in words]


def test_media_are_encoded_once_per_generation(flamingo, monkeypatch):
    system, params = flamingo
    calls = []
    encode = system._encode_media
    monkeypatch.setattr(system, "_encode_media", lambda *args: calls.append(1) or encode(*args))
    batch = flamingo_batch([[1, system.config.model.media_token_id, 9]] * 3, [np.zeros((1, 32, 32, 3), np.float32)] * 3)
    generate.generate(system, params, batch, generate.Sampling(max_new_tokens=5))
    assert len(calls) == 1  # and the decoding loop receives the latents, never the images


def test_stop_tokens_end_a_row_and_the_others_go_on(flamingo):
    system, params = flamingo
    batch = flamingo_batch([[1, 7, 8], [1, 20, 21, 22], [1, 30]], [[], [], []])
    free = generate.generate(system, params, batch, generate.Sampling(max_new_tokens=5))
    stop = int(free[0, 1])
    stopped = generate.generate(system, params, batch, generate.Sampling(max_new_tokens=5, stop_tokens=(stop,)))
    first = free[0].tolist().index(stop)
    assert stopped[0, : first + 1].tolist() == free[0, : first + 1].tolist()
    assert (stopped[0, first + 1 :] == generate.PAD).all()
    if stop not in free[1].tolist():
        assert stopped[1].tolist() == free[1].tolist()


class CountingDecoder(nn.Module):
    """A decoder that counts its forward passes as they run (a host callback, so every loop iteration counts)."""

    lm: nn.Module
    count: Callable[[], None]

    @nn.compact
    def __call__(self, *args, **kwargs):
        jax.debug.callback(self.count)
        return self.lm(*args, **kwargs)


class CountedSystem:
    """`system` generating through a `CountingDecoder`."""

    def __init__(self, system):
        self.system, self.calls = system, []

    def decoding(self, params, batch, length):
        d = self.system.decoding(params, batch, length)
        decoder = CountingDecoder(d.decoder, lambda: self.calls.append(1))
        return Decoding(decoder, {"lm": d.params}, d.prompt_inputs, d.step_inputs, d.cache_inputs)


def test_the_decoder_runs_on_a_new_token_only_when_another_token_follows():
    system = models.build(load_config(os.path.join(REPO, "configs/lm.py:variant=tiny")))
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(1), system.dummy_batch(1)))
    batch = generate.left_pad([[5, 6, 7]])
    free = generate.generate(system, params, batch, generate.Sampling(max_new_tokens=6))[0].tolist()
    counted = CountedSystem(system)
    assert generate.generate(counted, params, batch, generate.Sampling(max_new_tokens=6))[0].tolist() == free
    jax.effects_barrier()
    assert len(counted.calls) == 6  # the prompt pass, then the first five new tokens
    stop = free[2]
    first = free.index(stop)
    counted.calls.clear()
    out = generate.generate(counted, params, batch, generate.Sampling(max_new_tokens=6, stop_tokens=(stop,)))
    jax.effects_barrier()
    assert out[0].tolist() == free[: first + 1] + [generate.PAD] * (5 - first)
    assert len(counted.calls) == first + 1  # nothing runs on the stop token


def test_flamingo_steps_reuse_the_prompts_media_keys_and_values(flamingo):
    """Each step's computation projects no media: no matmul takes the media latents [B, M * n, Dv]."""
    system, params = flamingo
    batch = generate.left_pad([[1, system.config.model.media_token_id, 9]])
    batch.update(generate.pad_images([np.zeros((2, 32, 32, 3), np.float32)], 32))
    d = system.decoding(params, batch, 5)
    latents = d.prompt_inputs["media"]
    b, m, n, width = latents.shape
    dummy = jnp.zeros((b, 5), jnp.int32)
    cache = d.decoder.init(jax.random.PRNGKey(0), dummy, dummy, dummy, **d.cache_inputs, decode=True)["cache"]

    def run(cache, tokens, inputs):
        ones = jnp.ones_like(tokens)
        variables = {"params": d.params, "cache": cache}
        return d.decoder.apply(variables, tokens, ones, ones, **inputs, decode=True, mutable=["cache"])

    def media_matmuls(inputs):
        jaxpr = jax.make_jaxpr(run)(cache, jnp.ones((b, 1), jnp.int32), inputs).jaxpr
        return [e for e in equations(jaxpr) if e.primitive.name == "dot_general" and media_operand(e)]

    def media_operand(eqn):  # nn.layers.matmul may flatten the leading dims into one
        media_shapes = {(b, m * n, width), (b * m * n, width)}
        return any(getattr(v.aval, "shape", None) in media_shapes for v in eqn.invars)

    assert media_matmuls({**d.step_inputs, "media": latents})  # what a step that got the media would do
    assert not media_matmuls(d.step_inputs)
    with pytest.raises(UserError, match="cross-attention without media needs decode=True"):
        run({}, jnp.ones((b, 1), jnp.int32), d.step_inputs)


def equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs inside it (scan bodies, nested calls)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def empirical(logits, settings, draws=4000):
    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    tokens = jax.vmap(lambda k: generate.sample(jnp.asarray(logits)[None], k, settings)[0])(keys)
    return np.bincount(np.asarray(tokens), minlength=len(logits)) / draws


@pytest.mark.parametrize(
    "settings, allowed",
    [
        (generate.Sampling(temperature=1.0), [0, 1, 2, 3, 4]),
        (generate.Sampling(temperature=0.5), [0, 1, 2, 3, 4]),
        (generate.Sampling(temperature=1.0, top_k=2), [0, 1]),
        (generate.Sampling(temperature=1.0, top_p=0.75), [0, 1]),  # p = .48, .29, ...: .48 < .75 <= .77
        (generate.Sampling(temperature=1.0, top_p=0.3), [0]),
    ],
)
def test_sampling_follows_the_filtered_softmax(settings, allowed):
    logits = np.log(np.array([0.48, 0.29, 0.13, 0.07, 0.03]))
    scaled = logits / settings.temperature
    want = np.zeros(5)
    want[allowed] = np.exp(scaled[allowed]) / np.exp(scaled[allowed]).sum()
    np.testing.assert_allclose(empirical(logits, settings), want, atol=0.03)


def test_bad_sampling_settings_are_one_clear_sentence():
    with pytest.raises(Exception, match="top_p must lie in"):
        generate.Sampling(top_p=0.0)
    with pytest.raises(Exception, match="every prompt needs at least one token"):
        generate.left_pad([[1], []])


def test_generate_command_on_a_trained_lm(trained_lm, tmp_path, capsys):
    workdir, _ = trained_lm
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n" + json.dumps({"input_ids": [9]}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--checkpoint", workdir, "--prompts", str(prompts), "--out", str(out), "--max_new_tokens", "4"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    # The command's tokens are the checkpoint's greedy continuations, token for token as the no-cache reference.
    from vlm_jax.train.checkpoint import load_params

    _, system, params = load_params(workdir)
    want = [full_forward_greedy(system, params, p, 4, length=7) for p in ([1, 2, 3], [9])]  # one compilation
    assert [line["tokens"] for line in lines] == want
    assert cli.main([*argv[:-2], "--max_new_tokens", "0"]) == 2
    assert "max_new_tokens must be at least 1" in capsys.readouterr().err
