"""LLaVA-NeXT (AnyRes): the pipeline names each placeholder's feature, the model places base view, unpadded grid and
newlines as the data says, packed rows equal their examples alone, and the paper size has the published count."""

import io
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from conftest import REPO
from data_pipelines import image_ops
from data_pipelines.pipeline import GrainPipeline
from vlm_jax import models
from vlm_jax.config_lib import load_config
from vlm_jax.models.in_sequence import InSequenceModel

SIZES = [(40, 70), (70, 30), (33, 33), (20, 61), (64, 50), (25, 25)]  # (height, width): awkward aspect ratios


def png(rng, h, w):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def setup(spm_model_path):
    rng = np.random.default_rng(0)
    records = [{"images": [png(rng, h, w)], "caption": f"a picture number {i}"} for i, (h, w) in enumerate(SIZES)]
    config = load_config(os.path.join(REPO, "configs/llava.py:variant=tiny-next,stage=1"))
    config.data.update(
        source="memory", format="pairs", records={"train": records, "validation": records}, tokenizer=spm_model_path
    )
    config.data.seq_len = 256
    config.data.max_images = 10
    config.model.lm.vocab_size = 1024  # above the test tokenizer's ids
    config.model.image_token_id = GrainPipeline(config, "validation").tokenizer.token_id("<image>")
    config.batch_size = 8
    system = models.build(config)
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), system.dummy_batch(1)))
    batch = next(GrainPipeline(config, "train"))
    return config, system, params, batch


def test_placeholders_take_base_grid_and_newlines_in_llava_next_order(setup):
    config, system, params, batch = setup
    side = 4  # 32 px tiles, patch 8: 4 x 4 features per tile
    pinpoints = [tuple(p) for p in config.data.image.grid_pinpoints]
    features = system.module.apply({"params": params}, batch["images"], method=InSequenceModel.encode_images)
    values, placed = system.module.apply(
        {"params": params},
        batch["tokens"],
        batch["segment_ids"],
        batch["image_segment_ids"],
        features,
        batch["feature_index"],
        method=InSequenceModel.place,
    )
    features, values, newline = np.asarray(features), np.asarray(values), np.asarray(params["image_newline"])
    checked = 0
    for r in range(batch["tokens"].shape[0]):
        for s in set(batch["segment_ids"][r].tolist()) - {0}:
            slots = np.flatnonzero(batch["image_segment_ids"][r] == s)
            spots = np.flatnonzero(
                (batch["segment_ids"][r] == s) & (batch["tokens"][r] == system.module.image_token_id)
            )
            # Which image: the one whose AnyRes view count and feature count both match this example.
            sizes = [hw for hw in SIZES if image_ops.anyres_feature_count(*hw, pinpoints, 32, side) == len(spots)]
            assert sizes, "the placeholder count is the LLaVA-NeXT count of one of the images"
            order = image_ops.anyres_feature_order(*sizes[0], pinpoints, 32, side)
            slot_features = features[r, slots].reshape(-1, features.shape[-1])
            want = np.stack([newline if i < 0 else slot_features[i] for i in order])
            np.testing.assert_array_equal(values[r, spots], want)
            assert placed[r, spots].all()
            checked += 1
    assert checked >= 2
    _, weight, metrics = system.loss(params, batch)
    assert float(metrics["unplaced_image_tokens"]) == 0


def test_a_packed_llava_next_row_equals_its_examples_alone(setup):
    config, system, params, batch = setup
    r = int(np.argmax(batch["segment_ids"].max(axis=1)))  # the row with the most examples
    assert batch["segment_ids"][r].max() >= 2
    logits = jax.jit(system.logits)
    packed = np.asarray(logits(params, {k: v[r : r + 1] for k, v in batch.items()}))[0]
    for s in range(1, int(batch["segment_ids"][r].max()) + 1):
        tokens = np.flatnonzero(batch["segment_ids"][r] == s)
        slots = np.flatnonzero(batch["image_segment_ids"][r] == s)
        alone = {k: np.zeros_like(v[r : r + 1]) for k, v in batch.items()}
        for key in ("tokens", "positions", "feature_index", "targets", "loss_mask"):
            alone[key][0, : len(tokens)] = batch[key][r, tokens]
        alone["segment_ids"][0, : len(tokens)] = 1
        alone["images"][0, : len(slots)] = batch["images"][r, slots]
        alone["image_segment_ids"][0, : len(slots)] = 1
        by_itself = np.asarray(logits(params, alone))[0, : len(tokens)]
        np.testing.assert_allclose(packed[tokens], by_itself, atol=1e-5, rtol=0)


def test_next_7b_parameter_count():
    # Published: the Hugging Face Hub's count for llava-hf/llava-v1.6-vicuna-7b-hf, "7.06B" (LLaVA-NeXT, Liu et
    # al., blog 2024-01-30): LLaVA-1.5-7B's parts plus one 4096-wide image_newline.
    system = models.build(load_config(os.path.join(REPO, "configs/llava.py:variant=next-7b")))
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert shapes["image_newline"].shape == (4096,)
    assert abs(count / 7.06e9 - 1) < 0.02


def test_unknown_anyres_layout_is_one_sentence(setup):
    config = ConfigDict(setup[0].to_dict())
    config.data.image.anyres_layout = "grid"
    with pytest.raises(Exception, match="anyres_layout 'grid' is not 'tiles' or 'llava_next'"):
        next(GrainPipeline(config, "validation"))


def test_cached_generation_with_anyres_prompts_equals_the_full_forward(setup):
    """A prompt preprocessed as in training (views, LLaVA-NeXT placeholders and feature_index) decodes with the
    KV cache exactly as re-running the whole sequence does."""
    from vlm_jax import generate
    from vlm_jax.evaluators.generative import Generator

    config, system, params, _ = setup
    fmt = Generator(system, params, config).fmt
    image = png(np.random.default_rng(5), 45, 80)
    image_id = system.module.image_token_id
    prompt = fmt.prompt([image], lambda counts: [1] + [image_id] * counts[0] + [7, 8])
    h, w = 45, 80
    pinpoints = [tuple(p) for p in config.data.image.grid_pinpoints]
    assert len(prompt["tokens"]) == 3 + image_ops.anyres_feature_count(h, w, pinpoints, 32, 4)
    steps = 4
    out = generate.generate(system, params, generate.batch_of([prompt], fmt), generate.Sampling(max_new_tokens=steps))
    seq, logits = list(prompt["tokens"]), jax.jit(system.logits)
    length = len(seq) + steps
    for _ in range(steps):
        n = len(seq)
        batch = generate.batch_of(
            [dict(prompt, tokens=seq, feature_index=np.pad(prompt["feature_index"], (0, n - len(prompt["tokens"]))))],
            fmt,
        )
        batch = {k: np.pad(v, [(0, 0), (0, length - n)]) if v.shape[1:] == (n,) else v for k, v in batch.items()}
        seq.append(int(np.argmax(np.asarray(logits(params, batch))[0, n - 1])))
    assert out[0].tolist() == seq[-steps:]
