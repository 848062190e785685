"""A small procedural image-caption dataset (coloured shapes) for contrastive training and tests.

Record i of a split is drawn from a generator seeded by (seed, split, i): a
shape (circle, square, triangle, cross) of a colour (8 colours) and size on a
background of another colour, at a random position, saved as PNG bytes, with
the caption "a {size} {colour} {shape} on {background}" and the colour's
index in `COLOURS` as `label` (for zero-shot classification). It is a
random-access record source in the `pairs` shape of `sources.py`, so every
pipeline can read it; nothing is downloaded. The built-in dataset of the main
job (a later issue) is richer; this one is just enough for a dual encoder to
learn something measurable in seconds.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
SPLITS = {"train": 0, "validation": 1, "test": 2}
VOCAB_SIZE = 384  # 256 byte pieces + special tokens + merges up to whole words (a caption is 6 ids)


class ShapesSource:
    """`length` procedural records of one split (grain random-access source)."""

    format = "pairs"

    def __init__(self, split: str, length: int, seed: int = 0, image_size: int = 32):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {sorted(SPLITS)}.")
        self.split, self.length, self.seed, self.image_size = SPLITS[split], length, seed, image_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.split, int(index)])
        names = list(COLOURS)
        colour, background = rng.choice(len(names), size=2, replace=False)
        shape, size = SHAPES[rng.integers(len(SHAPES))], SIZES[rng.integers(len(SIZES))]
        image = Image.new("RGB", (self.image_size,) * 2, COLOURS[names[background]])
        draw = ImageDraw.Draw(image)
        extent = int(self.image_size * (0.7 if size == "large" else 0.35))
        x0, y0 = rng.integers(0, self.image_size - extent + 1, size=2)
        box = (int(x0), int(y0), int(x0) + extent - 1, int(y0) + extent - 1)
        fill = COLOURS[names[colour]]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
        else:
            w = max(extent // 4, 1)
            cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
            draw.rectangle((box[0], cy - w, box[2], cy + w), fill=fill)
            draw.rectangle((cx - w, box[1], cx + w, box[3]), fill=fill)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        caption = f"a {size} {names[colour]} {shape} on {names[background]}"
        return {"images": [buffer.getvalue()], "caption": caption, "label": int(colour)}


def tokenizer_path(cache_dir: str | None = None) -> str:
    """A SentencePiece model for the shapes captions, trained once and cached (deterministic)."""
    from data_pipelines.tokenizer import train_tokenizer

    cache_dir = cache_dir or os.environ.get("VLM_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vlm_jax"))
    os.makedirs(cache_dir, exist_ok=True)
    prefix = os.path.join(cache_dir, "shapes_spm")
    if not os.path.isfile(prefix + ".model"):
        tmp = f"{prefix}.tmp{os.getpid()}"  # concurrent processes each train, then one rename wins
        words = ["a", "on", *SIZES, *COLOURS, *SHAPES]
        with open(tmp + ".txt", "w") as f:
            for i in range(2000):
                f.write(" ".join(np.random.default_rng(i).choice(words, size=8)) + "\n")
        # BPE with room for every word of the closed vocabulary as one piece.
        train_tokenizer([tmp + ".txt"], tmp, vocab_size=VOCAB_SIZE, model_type="bpe")
        os.replace(tmp + ".model", prefix + ".model")
        for leftover in (tmp + ".txt", tmp + ".vocab"):
            os.remove(leftover)
    return prefix + ".model"


def pairs_data_config(image_size: int, text_len: int, normalization: str) -> dict:
    """The `data` section of a dual-encoder config that trains on this dataset (data_pipelines/pairs.py)."""
    return dict(
        name="pairs",
        source="shapes",
        train_size=8192,
        validation_size=512,
        dataset_seed=0,
        raw_size=32,
        image_size=image_size,
        text_len=text_len,
        normalization=normalization,
        tokenizer="",  # "" = this dataset's own SentencePiece model (`tokenizer_path`)
        worker_count=0,  # Grain worker processes preparing batches; 0 = in the training process
    )


def zero_shot_config() -> dict:
    """Zero-shot classification by the shape's colour (the records' `label`), with a prompt ensemble in the
    captions' own style, as CLIP's ImageNet templates follow web captions."""
    return dict(
        classes=list(COLOURS),
        prompts=[f"a {size} {{}} {shape} on {bg}" for size in SIZES for shape in SHAPES for bg in ("black", "white")],
    )
