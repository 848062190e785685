"""Fuyu through the in-sequence system contract: the pipeline writes Fuyu's rows, patches and newlines land where
FuyuProcessor puts them, packed rows equal their examples alone, cached generation equals the full forward, the
paper size has the published count, and the tiny config trains, evaluates and answers through `vlm-jax`."""

import io
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, read_tensorboard_scalars, train_briefly
from data_pipelines import templates
from data_pipelines.pipeline import GrainPipeline, fuyu_canvas, fuyu_feature_order
from vlm_jax import cli, models
from vlm_jax.config_lib import load_config

SIZES = [(40, 70), (70, 30), (20, 20), (33, 61), (64, 50), (25, 25)]  # (height, width): larger and smaller than 32


def png(rng, h, w):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def setup(spm_model_path):
    """The tiny Fuyu (32 px canvas, 8 px patches: up to 4 rows of 4 patches and a newline) on pairs records of
    images of several sizes through the Grain pipeline with the "fuyu" template and image mode, and one
    training batch of it."""
    rng = np.random.default_rng(0)
    records = [{"images": [png(rng, h, w)], "caption": f"a picture number {i}"} for i, (h, w) in enumerate(SIZES)]
    config = load_config(os.path.join(REPO, "configs/fuyu.py:variant=tiny"))
    config.data.update(
        source="memory", format="pairs", records={"train": records, "validation": records}, tokenizer=spm_model_path
    )
    config.data.seq_len = 160
    config.data.max_images = 3  # image slots per row: several examples share a row
    config.model.lm.vocab_size = 1024  # above the test tokenizer's ids
    tokenizer = GrainPipeline(config, "validation").tokenizer
    config.model.image_token_id = tokenizer.token_id("|SPEAKER|")
    config.model.newline_token_id = tokenizer.token_id("|NEWLINE|")
    config.batch_size = 8
    system = models.build(config)
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), system.dummy_batch(1)))
    batch = next(GrainPipeline(config, "train"))
    return config, system, params, batch, tokenizer


def test_the_template_writes_fuyu_processors_prompt(spm_tokenizer):
    """`|SPEAKER|` x image_tokens, `<s>`, the question and its "\\n", `<0x04>`, then the answer and `</s>` as
    targets (FuyuProcessor: image tokens, `<s>`, prompt, `<0x04>`)."""
    tok = spm_tokenizer
    record = {"images": [b""], "question": "What colour is it?", "answer": "red"}
    out = templates.render("fuyu", tok, record, 20)
    speaker = tok.token_id("|SPEAKER|")
    prompt = tok.encode("What colour is it?\n\x04", add_bos=False)
    assert tok.token_id("<0x04>") in prompt  # the beginning-of-answer byte piece
    head = [speaker] * 20 + [tok.bos_id] + prompt
    assert out.ids.tolist()[: len(head)] == head
    assert out.ids[-1] == tok.eos_id and tok.decode(out.ids[len(head) : -1].tolist()).strip() == "red"
    assert not out.predict[: len(head)].any() and out.predict[len(head) :].all()
    generation = templates.user_prompt("fuyu", tok, "What colour is it?", 1, [20])
    assert generation == head


def test_pipeline_rows_place_patches_and_newlines_as_fuyu_processor_does(setup):
    """Each example's image run becomes Fuyu's `(|SPEAKER| x cols, |NEWLINE|) x rows` for its own image's grid (the
    scaled image's ceil(h / 8) x ceil(w / 8) patches), and its patch placeholders take the linear map of those
    8 x 8 x 3 patches of the canvas in raster order ((row, column, channel) flattening), computed here with
    NumPy from the batch's pixels."""
    config, system, params, batch, tok = setup
    m = system.module
    speaker, newline = m.image_token_id, m.newline_token_id
    features = np.asarray(m.apply({"params": params}, batch["images"], method=type(m).encode_images))
    values, placed, is_newline = (
        np.asarray(a)
        for a in m.apply(
            {"params": params},
            batch["tokens"],
            batch["segment_ids"],
            batch["image_segment_ids"],
            features,
            batch["feature_index"],
            method=type(m).place,
        )
    )
    kernel = np.asarray(params["patch_embed"]["linear"]["kernel"])
    bias = np.asarray(params["patch_embed"]["linear"]["bias"])
    grids = set()
    for r in range(batch["tokens"].shape[0]):
        for s in set(batch["segment_ids"][r].tolist()) - {0}:
            spots = np.flatnonzero(batch["segment_ids"][r] == s)
            run = int(np.argmax(batch["tokens"][r, spots] != speaker))  # the image's placeholders come first
            tokens = np.where(is_newline[r, spots], newline, batch["tokens"][r, spots])[:run]
            rows = int(np.sum(tokens == newline))
            cols = run // rows - 1
            assert tokens.tolist() == ([speaker] * cols + [newline]) * rows
            assert batch["tokens"][r, spots[run]] == tok.bos_id
            (slot,) = np.flatnonzero(batch["image_segment_ids"][r] == s)
            canvas = batch["images"][r, slot]  # [32, 32, 3]
            patches = canvas.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4)[:rows, :cols].reshape(-1, 192)
            patch_spots = spots[:run][tokens == speaker]
            np.testing.assert_allclose(values[r, patch_spots], patches @ kernel + bias, atol=1e-5, rtol=0)
            assert placed[r, patch_spots].all() and not placed[r, spots[run:]].any()
            grids.add((rows, cols))
    # SIZES scaled to fit 32 px: (18, 32), (32, 13), (20, 20), (17, 32), (32, 25), (25, 25) px
    assert grids <= {(3, 4), (4, 2), (3, 3), (4, 4)} and len(grids) >= 2  # (rows, cols) of the sizes above
    _, _, metrics = system.loss(params, batch)
    assert float(metrics["unplaced_image_tokens"]) == 0


@pytest.mark.parametrize("hw", SIZES)
def test_canvas_and_grid_match_fuyus_image_processor(hw):
    """transformers' `FuyuImageProcessorPil` (fit into 32 x 32, pad with 1, to [-1, 1]; FuyuProcessor's crop to
    whole patches, `patchify_image`) against `fuyu_canvas` + "siglip" normalisation, `fuyu_feature_order`'s grid
    and `encoders.patch.patchify`."""
    pytest.importorskip(
        "transformers", reason="the reference is transformers' image processor: pip install -e '.[interop]'"
    )
    import math

    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    from data_pipelines import image_ops
    from vlm_jax.encoders.patch import patchify

    image = np.random.default_rng(hw[0]).integers(0, 255, size=(*hw, 3), dtype=np.uint8)
    proc = FuyuImageProcessorPil(size={"height": 32, "width": 32}, patch_size={"height": 8, "width": 8})
    out = proc([Image.fromarray(image)], return_tensors="np")
    h = math.ceil(out["image_unpadded_heights"][0][0] / 8) * 8
    w = math.ceil(out["image_unpadded_widths"][0][0] / 8) * 8
    want = np.asarray(out["images"])[0, 0][:, :h, :w]  # [3, h, w]
    ours = image_ops.normalize(fuyu_canvas(image, 32), "siglip")[:h, :w]
    assert np.abs(ours.transpose(2, 0, 1) - want).max() <= 2.5 / 127.5  # PIL resampling, rounded to uint8
    if hw[0] <= 32 and hw[1] <= 32:  # not resized: exact
        np.testing.assert_allclose(ours.transpose(2, 0, 1), want, atol=1e-6)
    order = fuyu_feature_order(hw, 32, 4)
    rows = int(np.sum(order == -1))
    assert (rows, len(order) // rows - 1) == (h // 8, w // 8)
    np.testing.assert_allclose(
        np.asarray(patchify(ours, 8)), proc.patchify_image(want[None], proc.patch_size).reshape(-1, 192), atol=1e-6
    )


def test_a_packed_fuyu_row_equals_its_examples_alone(setup):
    config, system, params, batch, _ = setup
    r = int(np.argmax(batch["segment_ids"].max(axis=1)))  # the row with the most examples
    assert batch["segment_ids"][r].max() >= 2
    logits = jax.jit(system.logits)
    row = {k: v[r : r + 1] for k, v in batch.items()}
    packed = np.asarray(logits(params, row))[0]
    alone_logits = []
    for s in range(1, int(batch["segment_ids"][r].max()) + 1):
        tokens = np.flatnonzero(batch["segment_ids"][r] == s)
        slots = np.flatnonzero(batch["image_segment_ids"][r] == s)
        alone = {k: np.zeros_like(v) for k, v in row.items()}
        for key in ("tokens", "positions", "targets", "loss_mask", "feature_index"):
            alone[key][0, : len(tokens)] = batch[key][r, tokens]
        alone["segment_ids"][0, : len(tokens)] = 1
        alone["images"][0, : len(slots)] = batch["images"][r, slots]
        alone["image_segment_ids"][0, : len(slots)] = 1
        by_itself = np.asarray(logits(params, alone))[0, : len(tokens)]
        np.testing.assert_allclose(packed[tokens], by_itself, atol=1e-5, rtol=0)
        alone_logits.append(by_itself)
    # No token sees another example's image: new pixels for the last example move none of the others' logits.
    last = int(batch["segment_ids"][r].max())
    other = dict(row, images=row["images"].copy())
    other["images"][0, row["image_segment_ids"][0] == last] += 1.0
    moved = np.asarray(logits(params, other))[0]
    before = batch["segment_ids"][r] < last
    np.testing.assert_array_equal(moved[before], packed[before])
    assert np.abs(moved[batch["segment_ids"][r] == last] - packed[batch["segment_ids"][r] == last]).max() > 1e-3


def test_cached_generation_equals_the_full_forward(setup):
    """The prompt pass (newline embeddings given as features) and KV-cache steps decode exactly as re-running the
    whole sequence (newline placeholders turned into the newline token) does."""
    from vlm_jax import generate
    from vlm_jax.evaluators.generative import Generator

    config, system, params, _, tok = setup
    fmt = Generator(system, params, config).fmt
    prompt = fmt.prompt([png(np.random.default_rng(5), 45, 80)], lambda counts: templates.user_prompt(
        "fuyu", tok, "What is it?", 1, counts
    ))  # fmt: skip
    run = ([1] * 4 + [-1]) * 3  # 45 x 80 px scaled to 18 x 32: 3 rows of 4 patches, each row then a newline
    assert len(prompt["tokens"]) == len(run) + 1 + len(tok.encode("What is it?\n\x04", add_bos=False))
    assert (prompt["feature_index"][: len(run)] == -1).tolist() == [v == -1 for v in run]
    steps = 4
    out = generate.generate(system, params, generate.batch_of([prompt], fmt), generate.Sampling(max_new_tokens=steps))
    seq, logits = list(prompt["tokens"]), jax.jit(system.logits)
    length = len(seq) + steps
    for _ in range(steps):
        n = len(seq)
        index = np.pad(prompt["feature_index"], (0, n - len(prompt["tokens"])))
        batch = generate.batch_of([dict(prompt, tokens=seq, feature_index=index)], fmt)
        batch = {k: np.pad(v, [(0, 0), (0, length - n)]) if v.shape[1:] == (n,) else v for k, v in batch.items()}
        seq.append(int(np.argmax(np.asarray(logits(params, batch))[0, n - 1])))
    assert out[0].tolist() == seq[-steps:]


def test_fuyu_8b_parameter_count():
    """Published: the Hugging Face Hub's safetensors count for adept/fuyu-8b, "9.41B params" (Fuyu-8B model card,
    Adept 2023). Cross-check: transformers' `FuyuForCausalLM(FuyuConfig())` (FuyuConfig's defaults are
    adept/fuyu-8b's sizes) has 9,408,238,592 parameters on the meta device (counted when this test was written:
    `sum(p.numel() for p in model.parameters())`)."""
    system = models.build(load_config(os.path.join(REPO, "configs/fuyu.py:variant=8b")))
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert shapes["patch_embed"]["linear"]["kernel"].shape == (30 * 30 * 3, 4096)
    assert abs(count / 9.41e9 - 1) < 0.02
    assert count == 9_408_238_592


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(image_tokens=20), "image_tokens is 20, but a 32 px canvas holds 16 patches"),
        (dict(patch_size=7), "whole number of 7-pixel patches"),
        (dict(connector={"kind": "linear"}), "model.connector has no meaning"),
        (dict(template="llava"), "needs data.template 'fuyu' and data.image.mode 'fuyu'"),
        (dict(mode="fixed"), "got 'fuyu' and 'fixed'"),
        (dict(size=48), "data.image.size 48 is not the model's canvas, 32 px"),
    ],
)
def test_inconsistent_configs_are_one_sentence(change, match):
    from vlm_jax.config_lib import ConfigError

    config = load_config(os.path.join(REPO, "configs/fuyu.py:variant=tiny"))
    if "template" in change:
        config.data.template = change["template"]
    elif "mode" in change or "size" in change:  # a copy: the config's data.image.size is model.image_size
        config.data.image = dict(config.data.image.to_dict(), **change)
    else:
        config.model.update(change)
    with pytest.raises(ConfigError, match=match):
        models.build(config)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny Fuyu trained for a few steps on a small built-in dataset through `vlm-jax train`."""
    return train_briefly(tmp_path_factory, "fuyu.py:data=builtin,scale=0.02")


def test_tiny_fuyu_trains_evaluates_and_answers(trained, tmp_path, capsys, monkeypatch):
    workdir, status, cache, config = trained
    assert status == 0
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["image_tokens"] == 64 and saved["data"]["template"] == "fuyu"  # 64 px: 8 x 8 patches
    scalars = read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    unplaced = [v for tag, by_step in scalars.items() if "unplaced_image_tokens" in tag for v in by_step.values()]
    assert unplaced and max(unplaced) == 0  # the pipeline's image runs and the model's patches agree
    report = open(os.path.join(workdir, "report", "index.html")).read()
    assert "vqa_accuracy" in report and "cider" in report
    monkeypatch.setenv("VLM_JAX_CACHE", cache)
    capsys.readouterr()
    assert cli.main(["eval", "--config", config, "--workdir", workdir, "--config.eval_examples=8"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["step"] == 4 and {"vqa_accuracy", "cider", "bleu4"} <= set(scores)
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(image)
    capsys.readouterr()
    argv = ["generate", "--checkpoint", workdir, "--image", str(image), "--prompt", "What colour is the shape?"]
    out = tmp_path / "out.jsonl"
    assert cli.main(argv + ["--max_new_tokens", "6", "--out", str(out)]) == 0
    line = json.loads(out.read_text())
    assert 1 <= len(line["tokens"]) <= 6
    # the text is the generated tokens' only: the prompt's 64 placeholders do not leak into it (a 4-step model
    # may itself generate a placeholder piece, one per token at most)
    text = line.get("text", "")
    assert text.count("|SPEAKER|") + text.count("|NEWLINE|") <= len(line["tokens"])
