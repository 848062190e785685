"""Procedural scenes of the built-in dataset: 1-3 coloured shapes (and optionally a word) on a plain background.

`sample(rng, ...)` draws a scene description (a plain dict, msgpack/JSON-safe),
`render(scene)` draws it as PNG bytes, `generate` does both. A description::

    {"size": 64, "background": "gray", "background_rgb": [r, g, b],
     "objects": [{"colour": "red", "rgb": [r, g, b], "shape": "circle", "size": "small",
                  "box": [x0, y0, x1, y1]}, ...],
     "text": "cat" | None, "text_box": [x0, y0, x1, y1] | None}

Boxes are in pixels, `x1`/`y1` exclusive: the drawn pixels of an object lie in
`[x0, x1) x [y0, y1)` and touch all four sides. Within one scene the objects
have distinct colours AND distinct shapes, never overlap (nor the text), so
"the square", "the red object" and "the red square" each name one object, and
the spatial relation of two objects (`relation`) is unambiguous. Every object
and background is painted in its own shade of its named colour (`shade`:
brightness x0.85-1.15 and up to +-10 per channel; the palette colour stays the
nearest one): a model cannot tie a shape to one exact RGB value, which
measurably helps it name shapes in colour combinations it never saw. The word is
drawn with PIL's built-in font (`ImageFont.load_default`), black or white for
contrast. Everything is a function of the numpy Generator's state.
"""

from __future__ import annotations

import functools
import io
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {"gray": (128, 128, 128), "brown": (120, 90, 65), "beige": (205, 190, 160)}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = {"small": 0.2, "large": 0.34}  # side of the object's box as a fraction of the image side
WORDS = ("cat", "dog", "sun", "box", "hat", "pen", "cup", "key", "map", "egg", "fox", "bus")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
BRIGHTNESS = (0.85, 1.15)  # range of a shade's brightness factor
CHANNEL_JITTER = 10  # and of its per-channel offset
_MARGIN = 2  # pixels kept free between items and from the border
MIN_IMAGE_SIZE = 40  # below it a small object (8 px) no longer shows its shape


@functools.lru_cache(maxsize=None)
def font(image_size: int) -> ImageFont.ImageFont:
    """PIL's built-in font at a size that scales with the image (10 px minimum)."""
    return ImageFont.load_default(size=max(10, round(image_size * 0.19)))


def shade(rng: np.random.Generator, rgb: Sequence[int]) -> list[int]:
    """A random shade of a palette colour: brightness and per-channel jitter (`BRIGHTNESS`, `CHANNEL_JITTER`)."""
    factor = rng.uniform(*BRIGHTNESS)
    offset = rng.integers(-CHANNEL_JITTER, CHANNEL_JITTER + 1, size=3)
    return [int(v) for v in np.clip(np.round(np.asarray(rgb) * factor) + offset, 0, 255)]


def nearest_colour(rgb: Sequence[int]) -> str:
    """The palette colour (`COLOURS`) nearest to an RGB value."""
    rgb = [int(v) for v in rgb]  # uint8 pixels would wrap around
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], rgb)))


def _free(box: Sequence[int], taken: list[Sequence[int]]) -> bool:
    return all(
        box[2] + _MARGIN <= t[0] or t[2] + _MARGIN <= box[0] or box[3] + _MARGIN <= t[1] or t[3] + _MARGIN <= box[1]
        for t in taken
    )


def _place(rng: np.random.Generator, width: int, height: int, image_size: int, taken: list) -> list[int] | None:
    """A free box of the given extent at a random position, or None after 50 tries."""
    for _ in range(50):
        x0 = int(rng.integers(_MARGIN, image_size - _MARGIN - width + 1))
        y0 = int(rng.integers(_MARGIN, image_size - _MARGIN - height + 1))
        box = [x0, y0, x0 + width, y0 + height]
        if _free(box, taken):
            return box
    return None


def sample(
    rng: np.random.Generator,
    image_size: int = 64,
    num_objects: int | None = None,
    combos: Sequence[tuple[str, str]] | None = None,
    first_combos: Sequence[tuple[str, str]] | None = None,
    text: bool | None = None,
) -> dict[str, Any]:
    """A scene description.

    num_objects: 1-3 (None: uniform). combos: the (colour, shape) pairs objects
    may have (None: all). first_combos: the pairs the first object is drawn
    from (None: `combos`), e.g. the held-out pairs of an evaluation split.
    text: draw a word (None: with probability 0.3).
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"scenes need images of at least {MIN_IMAGE_SIZE} pixels, got {image_size}.")
    combos = list(combos or [(c, s) for c in COLOURS for s in SHAPES])
    first_combos = list(first_combos or combos)
    count = int(rng.integers(1, 4)) if num_objects is None else num_objects
    with_text = bool(rng.random() < 0.3) if text is None else text
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    background_rgb = shade(rng, BACKGROUNDS[background])
    word = WORDS[int(rng.integers(len(WORDS)))] if with_text else None
    while True:  # a layout that fits (almost always the first)
        taken: list[list[int]] = []
        text_box = None
        if word is not None:
            left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), word, font(image_size))
            text_box = _place(rng, right - left, bottom - top, image_size, taken)
            taken.append(text_box)
        objects = []
        for i in range(count):
            pool = [
                (c, s)
                for c, s in (first_combos if i == 0 else combos)
                if all(c != o["colour"] and s != o["shape"] for o in objects)
            ]
            colour, shape = pool[int(rng.integers(len(pool)))]
            size = list(SIZES)[int(rng.integers(len(SIZES)))]
            extent = round(image_size * SIZES[size])
            box = _place(rng, extent, extent, image_size, taken)
            if box is None:
                break
            taken.append(box)
            rgb = shade(rng, COLOURS[colour])
            while nearest_colour(rgb) != colour:  # rare (~1 in 25,000): keep the colour's name true
                rgb = shade(rng, COLOURS[colour])
            objects.append({"colour": colour, "rgb": rgb, "shape": shape, "size": size, "box": box})
        if len(objects) == count:
            return {
                "size": image_size,
                "background": background,
                "background_rgb": background_rgb,
                "objects": objects,
                "text": word,
                "text_box": text_box,
            }


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL boxes are inclusive
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        w = max((x1 - x0 + 1) // 6, 1)
        draw.rectangle((x0, round(cy) - w, x1, round(cy) + w), fill=fill)
        draw.rectangle((round(cx) - w, y0, round(cx) + w, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}.")


def render(scene: dict[str, Any]) -> bytes:
    """The scene as PNG bytes (deterministic)."""
    size = scene["size"]
    background = tuple(scene["background_rgb"])
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        _draw_shape(draw, obj["shape"], obj["box"], tuple(obj["rgb"]))
    if scene["text"] is not None:
        f = font(size)
        left, top, _, _ = draw.textbbox((0, 0), scene["text"], f)
        ink = (0, 0, 0) if sum(background) > 3 * 110 else (255, 255, 255)
        x0, y0 = scene["text_box"][:2]
        draw.text((x0 - left, y0 - top), scene["text"], fill=ink, font=f)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate(rng: np.random.Generator, image_size: int = 64, **options) -> tuple[bytes, dict[str, Any]]:
    """(PNG bytes, description) of a fresh scene; options as in `sample`."""
    scene = sample(rng, image_size, **options)
    return render(scene), scene


def centre(obj: dict[str, Any]) -> tuple[float, float]:
    """The centre of an object's box, in pixels."""
    x0, y0, x1, y1 = obj["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def relation(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Where `a` is relative to `b` along the axis of their larger centre offset: left of / right of / above / below."""
    (ax, ay), (bx, by) = centre(a), centre(b)
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"
