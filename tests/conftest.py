"""Test setup: 8 CPU devices (set before jax is imported) and shared tiny configs."""

import os
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache per test session, shared with the commands the tests start: many tests
# build the same tiny models, and an identical computation is then compiled once (a fresh directory each session).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="vlm_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import random  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_briefly(tmp_path_factory, spec: str) -> tuple[str, int, str, str]:
    """(workdir, exit status, data cache, config argument) of `vlm-jax train --config REPO/configs/SPEC` for 4
    steps of 8 rows, evaluating 8 examples and checkpointing at step 4, on a data cache of its own: the shared
    start of the tiny systems' train -> eval -> generate tests."""
    from vlm_jax import cli

    cache = str(tmp_path_factory.mktemp("cache"))
    workdir = str(tmp_path_factory.mktemp(spec.partition(".py")[0] + "_run"))
    config = f"{REPO}/configs/{spec}"
    argv = [
        "train", "--config", config, "--workdir", workdir,
        "--config.total_steps=4", "--config.batch_size=8", "--config.eval_every=4", "--config.eval_examples=8",
        "--config.checkpoint_every=4", "--config.log_every=2",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLM_JAX_CACHE", cache)
        status = cli.main(argv)
    return workdir, status, cache, config


def tiny_lm():
    """The tiny LM config, shortened for tests, with a fixed peak so no matmul peak is measured."""
    from vlm_jax.config_lib import load_config

    c = load_config(os.path.join(REPO, "configs/lm.py:variant=tiny"))
    c.total_steps = 8
    c.log_every = 4
    c.checkpoint_every = 4
    c.eval_every = 0
    c.eval_steps = 1
    c.peak_tflops = 1.0
    c.optim.warmup_steps = 2
    return c


@pytest.fixture
def tiny_lm_config():
    return tiny_lm()


def pytest_configure(config):
    assert jax.device_count() == 8, "tests expect 8 CPU devices (XLA_FLAGS set in tests/conftest.py)"


@pytest.fixture(scope="session")
def trained_lm(tmp_path_factory):
    """(workdir, TrainResult) of one uninterrupted 8-step run of the tiny LM, shared by tests that only read it."""
    from vlm_jax.train import trainer

    workdir = str(tmp_path_factory.mktemp("trained_lm"))
    return workdir, trainer.train(tiny_lm(), workdir)


WORDS = (
    "the a an of to in on at with and or but is are was were be has have had this that these those it its "
    "cat dog ball mat red blue green yellow white black small large man woman child people street car bus "
    "tree house table chair window photo picture image describe question answer what where who how many "
    "color sitting standing running looking holding playing next near under over left right top bottom "
    "user assistant system human chat short detail briefly please shows there one two three four five"
).split()


def write_corpus(path, lines=3000, seed=0):
    """Deterministic English-like text: sentences and a few chat-shaped lines."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        n = rng.randint(4, 14)
        sentence = " ".join(rng.choice(WORDS) for _ in range(n))
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "?", "!", ","])
        if i % 7 == 0:
            sentence = f"USER: {sentence} ASSISTANT: {rng.choice(WORDS).capitalize()} {rng.randint(0, 999)}."
        out.append(sentence)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A text file of English-like sentences (the tokenizer tests' training data)."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


@pytest.fixture(scope="session")
def spm_model_path(corpus, tmp_path_factory):
    """A 400-piece SentencePiece model with the special tokens, trained once per session."""
    from data_pipelines.tokenizer import train_tokenizer

    return train_tokenizer([corpus], str(tmp_path_factory.mktemp("spm") / "tiny"), 400)


@pytest.fixture(scope="session")
def spm_tokenizer(spm_model_path):
    from data_pipelines.tokenizer import Tokenizer

    return Tokenizer(spm_model_path)


def read_tensorboard_scalars(logdir):
    """{tag: {step: value}} from the TensorBoard event files (the run report's reader)."""
    from vlm_jax.report import read_scalars

    return read_scalars(logdir)


def require_open_flamingo(what: str):
    """torch, after skipping the calling test module (with the install line) unless torch, open_flamingo and the
    packages its helpers.py imports are installed; `what` names the PyTorch reference the module compares with."""
    import importlib.util

    torch = pytest.importorskip("torch", reason=f"{what} is PyTorch: pip install -e '.[interop]'")
    for module in ("einops", "einops_exts", "open_flamingo"):  # open_flamingo's helpers.py and what it imports
        if importlib.util.find_spec(module) is None:
            pytest.skip(
                f"{module} is missing: pip install --no-deps open-flamingo==2.0.1 einops-exts==0.0.4 einops (setup.py)",
                allow_module_level=True,
            )
    return torch


def open_flamingo_helpers():
    """open_flamingo's package __init__ imports open_clip; load src/helpers.py by path instead."""
    import importlib.util

    package_dir = importlib.util.find_spec("open_flamingo").submodule_search_locations[0]  # does not run __init__
    path = os.path.join(package_dir, "src", "helpers.py")
    spec = importlib.util.spec_from_file_location("open_flamingo_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perturb(model, seed: int, scale: float = 0.1):
    """Adds noise to every weight of a PyTorch reference (norm scales and biases too), so no parameter is a no-op."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def convert_and_forward(hf_dir, work, **inputs) -> dict:
    """`vlm-jax convert-hf` on `hf_dir`, then `vlm-jax forward` on `inputs`; returns the outputs (a user's parity check)."""
    import numpy as np

    from vlm_jax import cli

    work = str(work)
    assert cli.main(["convert-hf", "--hf_dir", str(hf_dir), "--out", os.path.join(work, "converted")]) == 0
    np.savez(os.path.join(work, "inputs.npz"), **inputs)
    args = ["--checkpoint", os.path.join(work, "converted"), "--inputs", os.path.join(work, "inputs.npz")]
    assert cli.main(["forward", *args, "--out", os.path.join(work, "outputs.npz")]) == 0
    with np.load(os.path.join(work, "outputs.npz")) as f:
        return {k: f[k] for k in f.files}


def packed_slots(examples, length, slots, image_size):
    """A one-row packed batch of `examples` (tokens, images [k, H, W, 3]) in order: segments 1, 2, ..., each
    example's k images (or tiles) in the next media slots, padding after (the packer's layout, built by hand for
    packing tests)."""
    import numpy as np

    batch = {
        "tokens": np.zeros((1, length), np.int32),
        "segment_ids": np.zeros((1, length), np.int32),
        "positions": np.zeros((1, length), np.int32),
        "images": np.zeros((1, slots, image_size, image_size, 3), np.float32),
        "image_segment_ids": np.zeros((1, slots), np.int32),
    }
    start = slot = 0
    for s, (tokens, images) in enumerate(examples, 1):
        span, taken = slice(start, start + len(tokens)), slice(slot, slot + len(images))
        batch["tokens"][0, span], batch["segment_ids"][0, span] = tokens, s
        batch["positions"][0, span] = np.arange(len(tokens))
        batch["images"][0, taken], batch["image_segment_ids"][0, taken] = images, s
        start, slot = start + len(tokens), slot + len(images)
    return batch


def packed_row(examples, length, slots=2, image_size=32):
    """`packed_slots` of `examples` (tokens, prefix flags, image): one image per example, and the examples'
    prefix flags as `prefix_mask`."""
    import numpy as np

    batch = packed_slots([(tokens, image[None]) for tokens, _, image in examples], length, slots, image_size)
    batch["prefix_mask"] = np.zeros((1, length), bool)
    batch["prefix_mask"][0, : sum(len(t) for t, _, _ in examples)] = np.concatenate([p for _, p, _ in examples])
    return batch


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="session")
def interleaved_folder(tmp_path_factory):
    """`vlm-jax data build` of 200 interleaved documents whose text names the colour of the image before it
    (the images, red.png, green.png and blue.png, lie in the folder above the records)."""
    import io
    import json

    import numpy as np
    from PIL import Image

    from vlm_jax import cli

    root = tmp_path_factory.mktemp("flamingo_data")
    for name, colour in COLOURS.items():
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
        (root / f"{name}.png").write_bytes(buffer.getvalue())
    rng = np.random.default_rng(0)
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(200):
            picks = rng.choice(list(COLOURS), size=int(rng.integers(1, 4)))
            texts, images = ["A photo album."], [None]
            for name in picks:
                texts += [None, f"This one is {name}."]
                images += [f"{name}.png", None]
            f.write(json.dumps({"texts": texts, "images": images}) + "\n")
    out = root / "records"
    build = ["data", "build", "--format", "interleaved", "--input", str(root / "docs.jsonl"), "--out", str(out)]
    assert cli.main(build) == 0
    return str(out)
