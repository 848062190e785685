"""PaliGemma: transformers parity, prefix-LM packing, configs and parameter counts, training, eval, generation."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, convert_and_forward, packed_row, perturb, read_tensorboard_scalars
from vlm_jax import cli, models
from vlm_jax.config_lib import ConfigError, load_config

CONFIG = os.path.join(REPO, "configs/paligemma.py")
IMAGE_TOKENS = 16  # the tiny config: 32 px images, patch 8, no class token
BOS, SEP = 2, 7  # SEP stands in for "\n", which ends the prefix


# ------------------------------------------------------------------------------------------ transformers parity

HF_IMAGE, HF_TOKENS, HF_IMAGE_ID = 16, 16, 98  # 16 px, patch 4: 16 image tokens per image


def build_hf(path, tie=True):
    """A small random PaliGemmaForConditionalGeneration (odd-ish widths, one KV head) saved to `path`."""
    torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
    pytest.importorskip("transformers", reason="the reference is transformers' PaliGemma: pip install -e '.[interop]'")
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=24, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=2, patch_size=4, image_size=HF_IMAGE, vision_use_head=False,
        ),
        text_config=dict(
            model_type="gemma", hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=12, vocab_size=99,
        ),
        projection_dim=40,
        image_token_index=HF_IMAGE_ID,
        tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    model = perturb(PaliGemmaForConditionalGeneration(config), seed=1)  # norms and biases off their inits too
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(directory, model) of the tied PaliGemma every parity test shares."""
    return build_hf(tmp_path_factory.mktemp("hf_paligemma"))


def hf_logits(model, inputs):
    """transformers' logits for numpy `inputs`."""
    import torch

    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()


def hf_inputs(rng):
    """Two rows: one image with left padding, and two images; token_type_ids 0 on image + bos + prefix + sep."""
    rows = [(1, 6, 4), (2, 4, 5)]  # (images, prefix length, suffix length)
    length = max(n * HF_TOKENS + 1 + p + 1 + s for n, p, s in rows)
    ids, types, mask = (np.zeros((len(rows), length), np.int64) for _ in range(3))
    for r, (n, p, s) in enumerate(rows):
        prefix = [HF_IMAGE_ID] * (n * HF_TOKENS) + [BOS] + list(rng.integers(10, 90, p)) + [SEP]
        tokens = prefix + list(rng.integers(10, 90, s))
        start = length - len(tokens)
        ids[r, start:], mask[r, start:] = tokens, 1
        types[r, start + len(prefix) :] = 1
    pixels = rng.normal(size=(3, 3, HF_IMAGE, HF_IMAGE)).astype(np.float32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, token_type_ids=types), positions


@pytest.mark.parametrize("explicit_positions", [True, False])
def test_logits_match_transformers(hf_model, tmp_path, explicit_positions):
    """Converted (vlm-jax convert-hf) and run (vlm-jax forward) on transformers' input names: the logits of every
    real token within 1e-4. Without position_ids transformers counts from 1 at the first (padding) column and we
    from 0 at each row's first real token: RoPE only sees differences, so the logits agree all the same."""
    path, model = hf_model
    inputs, positions = hf_inputs(np.random.default_rng(0))
    if explicit_positions:
        inputs["position_ids"] = positions
    want = hf_logits(model, inputs)
    got = convert_and_forward(path, tmp_path, **inputs)["logits"]
    real = inputs["attention_mask"] > 0
    diff = np.abs(got[real] - want[real]).max()
    assert diff <= 1e-4, diff
    assert np.abs(want[real]).max() > 1.0  # logits of a size the tolerance means something for


def test_an_untied_head_converts(tmp_path):
    pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
    pytest.importorskip("transformers", reason="the reference is transformers' PaliGemma: pip install -e '.[interop]'")
    path, model = build_hf(tmp_path / "hf", tie=False)
    assert not np.allclose(model.lm_head.weight.detach().numpy(), model.get_input_embeddings().weight.detach().numpy())
    inputs, positions = hf_inputs(np.random.default_rng(0))
    inputs["position_ids"] = positions
    got = convert_and_forward(path, tmp_path / "work", **inputs)["logits"]
    real = inputs["attention_mask"] > 0
    assert np.abs(got[real] - hf_logits(model, inputs)[real]).max() <= 1e-4


def test_prefix_mask_matters_in_the_parity_setting(hf_model, tmp_path):
    """The same model with every token_type_id 1 (all causal) gives other logits on the prefix: the parity test
    above does check the bidirectional prefix."""
    path, model = hf_model
    inputs, positions = hf_inputs(np.random.default_rng(0))
    inputs["position_ids"] = positions
    causal = dict(inputs, token_type_ids=np.ones_like(inputs["token_type_ids"]))
    prefix_lm, plain = hf_logits(model, inputs), hf_logits(model, causal)
    got = convert_and_forward(path, tmp_path, **causal)["logits"]
    real = inputs["attention_mask"] > 0
    assert np.abs(got[real] - plain[real]).max() <= 1e-4
    assert np.abs(prefix_lm[real] - plain[real]).max() > 1e-2


def _write_layout(model, out, rename, config_text):
    """A PaliGemma directory holding `model`'s tensors under keys `rename(key)` and the given config.json."""
    from safetensors.torch import save_file

    os.makedirs(out)
    tensors = {rename(k): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(config_text)
    return out


def test_every_key_layout_and_a_sparse_config_convert_alike(hf_model, tmp_path):
    """transformers 5's in-memory keys (`model.language_model.*`), the hub's (`vision_tower.vision_model.*`,
    `language_model.model.*`) and save_pretrained's give the same params; a hub-style config.json that omits
    SigLIP's and Gemma's default values gives the same system config."""
    from vlm_jax.interop.hf_paligemma import load_paligemma_dir

    path, model = hf_model
    want_model, want = load_paligemma_dir(path)
    full = json.load(open(os.path.join(path, "config.json")))
    sparse = dict(full)
    sparse["vision_config"] = {
        k: v for k, v in full["vision_config"].items() if k not in ("hidden_act", "layer_norm_eps", "num_channels")
    }
    sparse["text_config"] = {
        k: v for k, v in full["text_config"].items() if k not in ("hidden_act", "rms_norm_eps", "rope_parameters")
    }
    hub = {
        "model.vision_tower.": "vision_tower.vision_model.",
        "model.language_model.": "language_model.model.",
        "model.multi_modal_projector.": "multi_modal_projector.",
    }

    def to_hub(key):
        old = next(p for p in hub if key.startswith(p))
        return hub[old] + key[len(old) :]

    layouts = {
        "memory": _write_layout(model, str(tmp_path / "memory"), lambda k: k, json.dumps(full)),
        "hub": _write_layout(model, str(tmp_path / "hub"), to_hub, json.dumps(sparse)),
    }
    for name, directory in layouts.items():
        got_model, got = load_paligemma_dir(directory)
        assert got_model == want_model, name
        assert jax.tree.structure(got) == jax.tree.structure(want), name
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    assert want_model["image_tokens"] == HF_TOKENS and want_model["lm"]["head_dim"] == 12


def test_paligemma_2_is_refused(hf_model, tmp_path):
    from vlm_jax.errors import UserError
    from vlm_jax.interop.hf_paligemma import load_paligemma_dir

    path, model = hf_model
    config = json.load(open(os.path.join(path, "config.json")))
    config["text_config"]["model_type"] = "gemma2"
    directory = _write_layout(model, str(tmp_path / "pg2"), lambda k: k, json.dumps(config))
    with pytest.raises(UserError, match="Gemma 2"):
        load_paligemma_dir(directory)


# ------------------------------------------------------------------------------------------ the tiny system


def tiny(**model):
    """(system, params) of the tiny config with two image slots per row; `model` overrides config.model keys."""
    config = load_config(f"{CONFIG}:variant=tiny")
    config.data.max_images = 2
    config.model.update(model)
    system = models.build(config)
    params = nn.unbox(jax.jit(system.init)(jax.random.PRNGKey(0), system.dummy_batch(1)))
    return system, params


def test_the_projection_starts_at_zero_and_the_template_must_be_prefix_lm():
    system, params = tiny()
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(params["connector"]))
    assert np.any(params["vision"]["patch_embed"]["kernel"])
    config = load_config(f"{CONFIG}:variant=tiny")
    config.data.template = "llava"
    with pytest.raises(ConfigError, match="prefix-LM"):
        models.build(config)


def example(rng, prefix_len, suffix_len):
    """One example: image placeholders, bos, prefix, SEP ("\\n"), suffix; its prefix flags and its image."""
    prefix = [3] * IMAGE_TOKENS + [BOS] + list(rng.integers(10, 250, prefix_len)) + [SEP]
    tokens = np.asarray(prefix + list(rng.integers(10, 250, suffix_len)), np.int32)
    return tokens, np.arange(len(tokens)) < len(prefix), rng.normal(size=(32, 32, 3)).astype(np.float32)


def test_a_packed_row_equals_its_examples_run_alone():
    system, params = tiny()
    rng = np.random.default_rng(0)
    params["connector"] = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params["connector"])
    a, b = example(rng, 5, 4), example(rng, 8, 6)
    na, nb = len(a[0]), len(b[0])
    length = na + nb + 3
    logits = jax.jit(system.logits)

    def run(*examples):
        return np.asarray(logits(params, packed_row(examples, length)))[0]

    packed, alone_a, alone_b = run(a, b), run(a), run(b)
    np.testing.assert_allclose(packed[:na], alone_a[:na], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[na : na + nb], alone_b[:nb], atol=1e-5, rtol=0)
    assert np.abs(alone_a[:na] - alone_b[:na]).max() > 1e-2  # the two examples do differ

    # Another image for example b: nothing of example a moves, b's tokens do.
    changed = run(a, (b[0], b[1], rng.normal(size=(32, 32, 3)).astype(np.float32)))
    np.testing.assert_array_equal(changed[:na], packed[:na])
    assert np.abs(changed[na : na + nb] - packed[na : na + nb]).max() > 1e-3

    # Prefix-LM: the last prefix token reaches back to the image tokens; the last suffix token reaches nothing.
    last_prefix = int(np.flatnonzero(a[1])[-1]) - 1  # the last prefix word (SEP follows it)
    tokens = a[0].copy()
    tokens[last_prefix] = 11 if tokens[last_prefix] != 11 else 12
    edited = run(b, (tokens, a[1], a[2]))[nb:]
    assert np.abs(edited[:IMAGE_TOKENS] - alone_a[:IMAGE_TOKENS]).max() > 1e-4
    tokens = a[0].copy()
    tokens[-1] = 11 if tokens[-1] != 11 else 12
    edited = run(b, (tokens, a[1], a[2]))[nb:]
    np.testing.assert_allclose(edited[: na - 1], alone_a[: na - 1], atol=1e-5, rtol=0)


def test_a_stage_checkpoint_starts_every_part_at_a_new_resolution(tmp_path):
    """Stage 2: a 32 px checkpoint starts a 48 px model; the ViT position embedding is resampled to the 6x6 grid,
    every other weight is the checkpoint's."""
    from vlm_jax.encoders.vit import resample_posemb
    from vlm_jax.interop.convert import write_checkpoint

    system, params = tiny()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    write_checkpoint(system.config, params, str(tmp_path / "stage1"))
    config = load_config(f"{CONFIG}:variant=tiny,stage=2,init={tmp_path / 'stage1'}")
    config.model.image_size = 48
    bigger = models.build(config)
    fresh = nn.unbox(jax.jit(bigger.init)(jax.random.PRNGKey(1), bigger.dummy_batch(1)))
    started = bigger.pretrained(jax.device_get(fresh))
    pos = started["vision"].pop("pos_embedding")
    want = resample_posemb(params["vision"].pop("pos_embedding"), (4, 4), (6, 6), "bilinear")
    assert pos.shape == (1, 36, 32)
    np.testing.assert_allclose(pos, want, atol=1e-6)
    for a, b in zip(jax.tree.leaves(started), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_a_siglip_tower_with_its_pooling_head_starts_the_vit(tmp_path):
    """Stage 1 starts the ViT from a SigLIP checkpoint, whose attention-pooling head PaliGemma does not have."""
    from ml_collections import ConfigDict

    from vlm_jax.interop.convert import write_checkpoint

    system, _ = tiny()
    vit = dict(system.config.model.encoder_kwargs.to_dict(), pool="map")
    config = ConfigDict(dict(model=dict(name="vision_encoder", encoder="vit", kwargs=vit), data={}))
    siglip = models.build(config)
    tower = nn.unbox(jax.jit(siglip.init)(jax.random.PRNGKey(2), siglip.dummy_batch(1)))
    write_checkpoint(config, tower, str(tmp_path / "siglip"))
    system, params = tiny(vision_checkpoint=str(tmp_path / "siglip"))
    started = system.pretrained(jax.device_get(params))
    assert "map_head" in tower and "map_head" not in started["vision"]
    want = {k: v for k, v in tower.items() if k != "map_head"}
    assert jax.tree.structure(started["vision"]) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(started["vision"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(started["decoder"]), jax.tree.leaves(params["decoder"])):
        np.testing.assert_array_equal(a, b)  # no lm_checkpoint: the LM keeps its init


# ------------------------------------------------------------------------------------------ configs and sizes


def param_count(variant):
    system = models.build(load_config(f"{CONFIG}:variant={variant}"))
    shapes = nn.unbox(jax.eval_shape(system.init, jax.random.PRNGKey(0), system.dummy_batch(1)))
    return system, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


# Published: the Hugging Face Hub's safetensors parameter count of google/paligemma-3b-pt-224, "2.92B" (SigLIP
# So400m/14 ~0.41B + projection + Gemma-2B with 257216 embedding rows ~2.51B); the paper's "3B".
@pytest.mark.parametrize("variant, tokens", [("3b-224", 256), ("3b-448", 1024), ("3b-896", 4096)])
def test_paper_sizes(variant, tokens):
    system, count = param_count(variant)
    assert system.image_tokens == tokens == system.features_per_image()
    assert system.seq_len == tokens + (128 if variant == "3b-224" else 512)
    assert abs(count / 2.92e9 - 1) < 0.02, count
    assert system.config.optim.freeze == ()  # nothing frozen in stage 1 or 2


def test_the_3b_count_equals_transformers():
    """The same architecture built by transformers (on the meta device: no memory) from the hub config's values."""
    torch = pytest.importorskip("torch", reason="transformers' model is PyTorch: pip install -e '.[interop]'")
    pytest.importorskip("transformers", reason="the reference is transformers' PaliGemma: pip install -e '.[interop]'")
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
            num_attention_heads=16, patch_size=14, image_size=224, vision_use_head=False,
        ),
        text_config=dict(
            model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
            num_attention_heads=8, num_key_value_heads=1, vocab_size=257216,
        ),
        projection_dim=2048,
        image_token_index=257152,
    )  # fmt: skip
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    assert param_count("3b-224")[1] == sum(p.numel() for p in model.parameters())  # 2,923,466,480


@pytest.mark.parametrize(
    "arg, error",
    [("variant=3b-448,stage=1", "224"), ("variant=3b-224,stage=2", "448"), ("variant=3b-224,stage=3", "stage=3")],
)
def test_stage_and_resolution_must_agree(arg, error):
    with pytest.raises(ConfigError, match=error):
        load_config(f"{CONFIG}:{arg}")


# ------------------------------------------------------------------------------------------ end to end

SHORT = ["--config.total_steps=4", "--config.batch_size=8", "--config.eval_every=4", "--config.eval_examples=8"]
BUILTIN = f"{CONFIG}:data=builtin,scale=0.02"
PROMPT = "answer en what colour is the shape?"
METRICS = ("vqa_accuracy", "cider", "baseline/vqa_accuracy", "baseline/cider")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, cache) of the tiny PaliGemma trained for 4 steps on a 2% build of the built-in dataset."""
    cache = str(tmp_path_factory.mktemp("cache"))
    workdir = str(tmp_path_factory.mktemp("paligemma_run"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLM_JAX_CACHE", cache)
        argv = ["train", "--config", BUILTIN, "--workdir", workdir, *SHORT, "--config.checkpoint_every=4"]
        assert cli.main(argv + ["--config.log_every=2"]) == 0
    return workdir, cache


def test_tiny_paligemma_trains_evaluates_and_answers(trained, tmp_path, capsys):
    workdir, cache = trained
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["model"]["name"] == "paligemma" and config["data"]["template"] == "paligemma"
    scalars = read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    assert set(scalars["train/loss"]) == {2, 4}
    for name in METRICS:
        assert set(scalars[f"eval/{name}"]) == {4}, name

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLM_JAX_CACHE", cache)
        assert cli.main(["eval", "--config", BUILTIN, "--workdir", workdir, *SHORT]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4
    for name in METRICS:  # the same checkpoint and records: the same scores
        assert result[name] == pytest.approx(scalars[f"eval/{name}"][4], abs=1e-6), name

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(image)
    argv = ["generate", "--checkpoint", workdir, "--image", str(image), "--prompt", PROMPT]
    assert cli.main(argv + ["--max_new_tokens", "6"]) == 0
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    assert "</s>" not in answer and "<image>" not in answer
    out = tmp_path / "out.jsonl"
    assert cli.main(argv + ["--max_new_tokens", "6", "--out", str(out)]) == 0
    assert 1 <= len(json.loads(out.read_text())["tokens"]) <= 6
