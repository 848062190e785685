"""Tests of data_pipelines/image_ops.py.

Reference values come from PIL/transformers (the reference preprocessors), from the InternVL 1.5 paper and
model card, or are derived by hand from the stated rules; never from image_ops itself.
"""

import io
import struct
import zlib

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from data_pipelines import image_ops
from data_pipelines.image_ops import BadImage
from vlm_jax.errors import UserError


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written chunk by chunk, so headers can claim any size."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def random_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth_rgb(h, w):
    """A smooth image (JPEG-friendly): gradients in each channel."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(h + w - 2, 1)], -1
    ).astype(np.uint8)


def reason_of(data, **kwargs):
    with pytest.raises(BadImage) as info:
        image_ops.decode(data, **kwargs)
    assert str(info.value)  # a message, not just a reason
    return info.value.reason


# ------------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "fmt,kwargs", [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}), ("GIF", {})]
)
def test_decode_lossless_formats_round_trip(fmt, kwargs):
    # Few colours, so GIF's 256-colour palette is exact too.
    image = np.zeros((12, 20, 3), np.uint8)
    image[:6, :10] = (255, 0, 0)
    image[:6, 10:] = (0, 255, 0)
    image[6:, :10] = (0, 0, 255)
    image[6:, 10:] = (17, 130, 250)
    out = image_ops.decode(encode(Image.fromarray(image), fmt, **kwargs))
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_decode_lossy_formats_close(fmt):
    image = smooth_rgb(32, 48)
    out = image_ops.decode(encode(Image.fromarray(image), fmt, quality=95))
    assert out.dtype == np.uint8 and out.shape == (32, 48, 3)
    assert np.abs(out.astype(int) - image).mean() < 3


def test_decode_grayscale_and_bilevel():
    gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    out = image_ops.decode(encode(Image.fromarray(gray), "PNG"))
    assert out.shape == (12, 20, 3)
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, -1))

    bits = Image.fromarray(gray >= 120).convert("1")
    out = image_ops.decode(encode(bits, "PNG"))
    np.testing.assert_array_equal(out[..., 0], np.where(gray >= 120, 255, 0))


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_decode_16bit_grayscale_is_scaled_not_clipped(mode, fmt):
    values = np.linspace(0, 65535, 4 * 64).round().astype(np.uint16).reshape(4, 64)
    dtype = ">u2" if mode.endswith("B") else "<u2"
    img = Image.frombytes(mode, (64, 4), values.astype(dtype).tobytes())
    assert np.array(img.convert("L")).max() == 255 and np.array(img.convert("L"))[0, 1] == 255  # PIL clips
    out = image_ops.decode(encode(img, fmt))
    expected = np.round(values / 65535 * 255).astype(np.uint8)  # the full 16-bit range onto 0..255
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, -1))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255 and 0 < np.median(out) < 255


def test_decode_32bit_int_mode_with_16bit_data():
    values = np.array([[0, 257, 32768, 65535]], np.int32)
    img = Image.fromarray(values)
    assert img.mode == "I"
    out = image_ops.decode(encode(img, "TIFF"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


def test_decode_rgba_composites_on_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent -> white
    rgba[0, 1] = (10, 20, 30, 255)  # opaque -> itself
    rgba[0, 2] = (0, 0, 0, 128)  # half transparent black -> mid gray
    rgba[1] = (200, 100, 50, 255)
    for fmt, kwargs in [("PNG", {}), ("WEBP", {"lossless": True, "exact": True}), ("TIFF", {})]:
        out = image_ops.decode(encode(Image.fromarray(rgba), fmt, **kwargs))
        assert out.shape == (2, 3, 3)
        np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
        np.testing.assert_array_equal(out[0, 1], (10, 20, 30))
        assert np.all(np.abs(out[0, 2].astype(int) - round(255 * (1 - 128 / 255))) <= 1)
        np.testing.assert_array_equal(out[1], [(200, 100, 50)] * 3)


def test_decode_gray_alpha_composites_on_white():
    la = Image.merge("LA", [Image.new("L", (4, 1), 60), Image.frombytes("L", (4, 1), bytes([0, 255, 0, 255]))])
    out = image_ops.decode(encode(la, "PNG"))
    np.testing.assert_array_equal(out[0, :, 0], [255, 60, 255, 60])


def test_decode_palette_colours_and_transparency():
    palette = [255, 0, 0, 0, 200, 0, 1, 2, 250, 90, 90, 90]
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    img = Image.frombytes("P", (4, 2), indices.tobytes())
    img.putpalette(palette)
    expected = np.array(palette, np.uint8).reshape(4, 3)[indices]
    np.testing.assert_array_equal(image_ops.decode(encode(img, "PNG")), expected)

    transparent = encode(img, "PNG", transparency=1)  # palette index 1 is transparent -> white
    expected[indices == 1] = 255
    np.testing.assert_array_equal(image_ops.decode(transparent), expected)
    np.testing.assert_array_equal(image_ops.decode(encode(img, "GIF", transparency=1)), expected)


def test_decode_gif_takes_first_frame():
    red, blue = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = image_ops.decode(data)
    assert out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out, np.broadcast_to([255, 0, 0], (6, 8, 3)))


@pytest.mark.parametrize("cmyk,rgb", [((0, 255, 255, 0), (255, 0, 0)), ((255, 0, 0, 0), (0, 255, 255))])
def test_decode_cmyk_jpeg(cmyk, rgb):
    data = encode(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = image_ops.decode(data)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - rgb).max() <= 8


def test_decode_applies_exif_orientation():
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :10] = (255, 0, 0)  # left half red
    stored[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge becomes the top
    data = encode(Image.fromarray(stored), "PNG", exif=exif)
    out = image_ops.decode(data)
    assert out.shape == (20, 10, 3)
    np.testing.assert_array_equal(out[:10], np.broadcast_to([255, 0, 0], (10, 10, 3)))
    np.testing.assert_array_equal(out[10:], np.broadcast_to([0, 0, 255], (10, 10, 3)))
    np.testing.assert_array_equal(image_ops.decode(data, exif_orientation=False), stored)


def test_decode_empty_bytes():
    assert reason_of(b"") == "empty_image"


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is plain text and not an image",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
        bytes(np.random.default_rng(3).integers(1, 255, 500, dtype=np.uint8)),
        encode(Image.new("RGB", (4, 4)), "PPM"),  # PIL reads PPM, but it is not an accepted format
        encode(Image.new("RGB", (4, 4)), "ICO"),
    ],
)
def test_decode_unsupported_format(data):
    assert reason_of(data) == "unsupported_format"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_decode_truncated_is_corrupt(fmt, keep):
    data = encode(Image.fromarray(random_rgb(40, 40)), fmt)
    assert reason_of(data[: int(len(data) * keep)]) == "corrupt_image"


def test_decode_corrupt_headers_and_data():
    assert reason_of(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10) == "corrupt_image"
    assert reason_of(b"\xff\xd8\xff\xe0" + b"garbage" * 10) == "corrupt_image"
    assert reason_of(b"RIFF\x10\x00\x00\x00WEBPVP8 garbage") == "corrupt_image"
    data = bytearray(encode(Image.fromarray(random_rgb(32, 32)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20] ^= 0xFF  # damage the compressed pixels (the chunk CRC no longer matches)
    assert reason_of(bytes(data)) == "corrupt_image"
    # PIL refuses zero-width headers outright, so they count as corrupt rather than empty.
    assert reason_of(png_bytes(0, 5, 8, 2, b"")) == "corrupt_image"


def test_decode_zero_size_image_from_decoder(monkeypatch):
    # No PIL plugin hands out a 0-pixel image, so stand in for a decoder that would.
    monkeypatch.setattr(PIL.Image, "open", lambda *args, **kwargs: Image.new("RGB", (0, 7)))
    assert reason_of(b"not empty") == "empty_image"


def test_decode_absurd_aspect_ratio():
    tall = encode(Image.new("L", (1, 10000)), "PNG")
    wide = encode(Image.new("L", (10000, 1)), "PNG")
    assert reason_of(tall) == "absurd_aspect_ratio"
    assert reason_of(wide) == "absurd_aspect_ratio"
    strip = encode(Image.new("L", (30, 1)), "PNG")
    assert reason_of(strip) == "absurd_aspect_ratio"  # 30 > default 20
    assert image_ops.decode(strip, max_aspect_ratio=30.0).shape == (1, 30, 3)
    assert image_ops.decode(encode(Image.new("L", (20, 1)), "PNG")).shape == (1, 20, 3)  # exactly 20 is fine


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decode_too_large():
    bomb = png_bytes(100_000, 100_000, 1, 0, b"")  # 1e10 pixels claimed by a ~60-byte file
    assert reason_of(bomb) == "image_too_large"
    big = png_bytes(10_000, 10_000, 1, 0, b"")  # under PIL's hard limit, over the default max_pixels
    assert reason_of(big) == "image_too_large"
    small = encode(Image.new("RGB", (100, 100)), "PNG")
    assert reason_of(small, max_pixels=5_000) == "image_too_large"
    assert image_ops.decode(small, max_pixels=10_000).shape == (100, 100, 3)


# ------------------------------------------------------------------------------------------- resize, crop


def test_resize_matches_transformers_pil_resize():
    pytest.importorskip("transformers", reason="the reference is transformers' resize: pip install -e '.[interop]'")
    from transformers.image_transforms import resize as hf_resize
    from transformers.image_utils import PILImageResampling

    image = random_rgb(37, 53)
    for method, resample in [("bicubic", PILImageResampling.BICUBIC), ("bilinear", PILImageResampling.BILINEAR)]:
        for h, w in [(20, 30), (80, 100), (37, 10)]:
            out = image_ops.resize(image, h, w, method)
            assert out.dtype == np.uint8 and out.shape == (h, w, 3)
            np.testing.assert_array_equal(out, hf_resize(image, (h, w), resample=resample))


def test_resize_without_antialias():
    image = random_rgb(16, 24, seed=1)
    # Halving with plain bilinear samples between each 2x2 block: its mean (to within the two passes' rounding).
    block_mean = image.astype(float).reshape(8, 2, 12, 2, 3).mean((1, 3))
    out = image_ops.resize(image, 8, 12, "bilinear", antialias=False)
    assert np.abs(out - block_mean).max() <= 1
    # PIL's antialiased filter widens when downscaling, so it blurs more than the block mean.
    assert np.abs(image_ops.resize(image, 8, 12, "bilinear").astype(float) - block_mean).max() > 5
    # Upscaling has nothing to antialias: both paths agree with PIL (up to PIL's fixed-point rounding).
    for method, resample in [("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)]:
        pil = np.array(Image.fromarray(image).resize((41, 35), resample)).astype(int)
        assert np.abs(image_ops.resize(image, 35, 41, method, antialias=False) - pil).max() <= 1
    flat = np.full((9, 9, 3), 77, np.uint8)
    np.testing.assert_array_equal(image_ops.resize(flat, 4, 13, "bicubic", antialias=False), 77)


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError):
        image_ops.resize(np.zeros((4, 4, 3), np.float32), 2, 2)
    with pytest.raises(ValueError):
        image_ops.resize(np.zeros((4, 4, 3), np.uint8), 2, 2, method="lanczos")


def test_resize_shorter_side_matches_transformers():
    pytest.importorskip("transformers", reason="the reference is transformers' resize: pip install -e '.[interop]'")
    from transformers.image_transforms import get_resize_output_image_size

    for h, w in [(100, 150), (150, 100), (64, 64), (333, 127)]:
        image = np.zeros((h, w, 3), np.uint8)
        out = image_ops.resize_shorter_side(image, 48)
        expected = get_resize_output_image_size(image, 48, default_to_square=False, input_data_format="channels_last")
        assert out.shape[:2] == tuple(expected)


def test_fixed_resolution():
    image = random_rgb(30, 50)
    out = image_ops.fixed_resolution(image, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.array(Image.fromarray(image).resize((24, 24), Image.Resampling.BICUBIC)))


def test_center_crop_matches_transformers():
    pytest.importorskip(
        "transformers", reason="the reference is transformers' center_crop: pip install -e '.[interop]'"
    )
    from transformers.image_transforms import center_crop as hf_center_crop

    image = random_rgb(11, 16)
    for h, w in [(4, 5), (11, 16), (10, 3), (1, 1)]:
        expected = hf_center_crop(image, (h, w), input_data_format="channels_last")
        np.testing.assert_array_equal(image_ops.center_crop(image, h, w), expected)
    with pytest.raises(ValueError):
        image_ops.center_crop(image, 12, 4)


def test_random_crop_covers_all_offsets():
    image = np.arange(6 * 7).reshape(6, 7, 1).repeat(3, -1).astype(np.uint8)
    rng = np.random.default_rng(0)
    offsets = set()
    for _ in range(300):
        crop = image_ops.random_crop(image, 4, 4, rng)
        top, left = divmod(int(crop[0, 0, 0]), 7)
        np.testing.assert_array_equal(crop, image[top : top + 4, left : left + 4])
        offsets.add((top, left))
    assert offsets == {(top, left) for top in range(3) for left in range(4)}
    with pytest.raises(ValueError):
        image_ops.random_crop(image, 7, 2, rng)


# ----------------------------------------------------------------------------------------------- normalise


def test_normalization_constants_are_the_published_ones():
    pytest.importorskip("transformers", reason="the reference is transformers' constants: pip install -e '.[interop]'")
    from transformers.utils import constants

    assert image_ops.NORMALIZATION["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert image_ops.NORMALIZATION["clip"] == (
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
    )
    assert image_ops.NORMALIZATION["siglip"] == ((0.5,) * 3, (0.5,) * 3)
    assert list(image_ops.NORMALIZATION["imagenet"][0]) == constants.IMAGENET_DEFAULT_MEAN
    assert list(image_ops.NORMALIZATION["imagenet"][1]) == constants.IMAGENET_DEFAULT_STD
    assert list(image_ops.NORMALIZATION["clip"][0]) == constants.OPENAI_CLIP_MEAN
    assert list(image_ops.NORMALIZATION["clip"][1]) == constants.OPENAI_CLIP_STD


def test_normalize():
    image = np.array([[[0, 0, 0], [255, 255, 255], [51, 102, 204]]], np.uint8)
    siglip = image_ops.normalize(image, "siglip")
    assert siglip.dtype == np.float32 and siglip.shape == (1, 3, 3)
    np.testing.assert_allclose(siglip[0, 0], -1.0)
    np.testing.assert_allclose(siglip[0, 1], 1.0)
    imagenet = image_ops.normalize(image, "imagenet")
    expected = [(0.2 - 0.485) / 0.229, (0.4 - 0.456) / 0.224, (0.8 - 0.406) / 0.225]
    np.testing.assert_allclose(imagenet[0, 2], expected, rtol=1e-6)
    with pytest.raises(ValueError):
        image_ops.normalize(image, "nope")


# ---------------------------------------------------------------------------------------- InternVL tiling


def test_internvl_target_ratios_published():
    ratios = image_ops.internvl_target_ratios(1, 12)
    assert len(ratios) == 35  # "all 35 possible aspect-ratio combinations formed by 1 to 12 tiles"
    assert set(ratios) == {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}
    # The paper lists them as {1:1, 1:2, 2:1, 3:1, ..., 2:6}: the model card's order.
    assert ratios[:4] == [(1, 1), (1, 2), (2, 1), (3, 1)] and ratios[-1] == (2, 6)
    assert [i * j for i, j in ratios] == sorted(i * j for i, j in ratios)
    # Grids with at most n tiles: the divisor summatory function, sum_k floor(n / k).
    for n in (6, 40):
        assert len(image_ops.internvl_target_ratios(1, n)) == sum(n // k for k in range(1, n + 1))
    assert min(i * j for i, j in image_ops.internvl_target_ratios(3, 8)) == 3


def test_internvl_paper_example_800x1300():
    image = np.zeros((1300, 800, 3), np.uint8)  # width 800, height 1300
    assert image_ops.internvl_closest_ratio(800, 1300, image_ops.internvl_target_ratios(1, 12), 448) == (2, 3)
    tiles = image_ops.internvl_tiles(image, 448, 1, 12)
    assert len(tiles) == 7  # 2 x 3 tiles of the 896 x 1344 resize + the thumbnail
    assert all(t.shape == (448, 448, 3) and t.dtype == np.uint8 for t in tiles)


@pytest.mark.parametrize("side,grid", [(448, (1, 1)), (500, (1, 1)), (700, (2, 2)), (2000, (3, 3))])
def test_internvl_square_tie_rule(side, grid):
    # Squares tie 1x1, 2x2, 3x3; the larger grid wins only if side^2 > 0.5 * 448^2 * tiles.
    ratios = image_ops.internvl_target_ratios(1, 12)
    assert image_ops.internvl_closest_ratio(side, side, ratios, 448) == grid


def test_internvl_grid_matches_transformers_gotocr2():
    pytest.importorskip(
        "transformers", reason="the reference is transformers' GotOcr2 tiling: pip install -e '.[interop]'"
    )
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    sizes = [(w, h) for w in range(20, 4000, 97) for h in range(20, 4000, 89)]
    sizes += [(s, s) for s in (100, 448, 633, 634, 700, 1000, 2000)] + [(800, 1300), (1300, 800), (5, 2), (2, 5)]
    for min_n, max_n in [(1, 12), (1, 6), (1, 40), (2, 9)]:
        ratios = image_ops.internvl_target_ratios(min_n, max_n)
        for w, h in sizes:
            expected = get_optimal_tiled_canvas((h, w), (448, 448), min_n, max_n)
            assert image_ops.internvl_closest_ratio(w, h, ratios, 448) == expected, (w, h, min_n, max_n)


def test_internvl_tie_order_differs_from_gotocr2_when_min_equals_max():
    """A known disagreement, kept visible on purpose.

    Ties between two grids with the SAME tile count are broken by list order. The model card sorts a Python
    set by tile count, so within one count the order is the set's; for min=max=4 that is (4,1), (1,4), (2,2).
    transformers' GotOcr2 builds its list width-major, (1,4), (2,2), (4,1). A 5x2 image (aspect 2.5) is
    equally far from 4:1 and 2:2 and too small for the "later grid" rule, so the first listed wins: the card
    (and InternVL's training code, which has the same function) gives 4x1, transformers 2x2. With min_num=1
    no such tie can be the closest (a grid in between is always closer), so the standard ranges agree, as the
    test above checks over a sweep.
    """
    pytest.importorskip(
        "transformers", reason="the reference is transformers' GotOcr2 tiling: pip install -e '.[interop]'"
    )
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    ratios = image_ops.internvl_target_ratios(4, 4)
    assert image_ops.internvl_closest_ratio(5, 2, ratios, 448) == (4, 1)
    assert get_optimal_tiled_canvas((2, 5), (448, 448), 4, 4) == (2, 2)


@pytest.mark.parametrize("hw", [(65, 40), (40, 65), (20, 100), (28, 28), (35, 35), (50, 50), (9, 300), (128, 97)])
def test_internvl_tiles_match_transformers_gotocr2_pixels(hw):
    pytest.importorskip(
        "transformers", reason="the reference is transformers' GotOcr2 image processor: pip install -e '.[interop]'"
    )
    from transformers.image_utils import PILImageResampling, SizeDict
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tile = 28
    image = random_rgb(*hw, seed=sum(hw))
    ours = image_ops.internvl_tiles(image, tile_size=tile, min_tiles=1, max_tiles=12)
    processor = GotOcr2ImageProcessorPil(crop_to_patches=True, size={"height": tile, "width": tile})
    theirs = processor.crop_image_to_patches(
        np.moveaxis(image, -1, 0),
        1,
        12,
        patch_size=SizeDict(height=tile, width=tile),
        resample=PILImageResampling.BICUBIC,
    )
    assert len(ours) == len(theirs)
    assert len(ours) == 1 or len(ours) >= 3  # a thumbnail only ever follows two or more tiles
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, np.moveaxis(b, 0, -1))


def test_internvl_tiles_layout_and_normalised_output():
    pytest.importorskip(
        "transformers", reason="the reference is transformers' GotOcr2 image processor: pip install -e '.[interop]'"
    )
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    # Quadrant colours: a 2x2 grid must come out row-major (top-left, top-right, bottom-left, bottom-right).
    image = np.zeros((64, 64, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for k, colour in enumerate(colours):
        r, c = divmod(k, 2)
        image[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] = colour
    tiles = image_ops.internvl_tiles(image, tile_size=16, max_tiles=4)
    assert len(tiles) == 5
    for k, colour in enumerate(colours):
        np.testing.assert_array_equal(tiles[k][4:12, 4:12], np.broadcast_to(colour, (8, 8, 3)))
    assert len(image_ops.internvl_tiles(image, tile_size=16, max_tiles=4, use_thumbnail=False)) == 4
    assert len(image_ops.internvl_tiles(image, tile_size=64, max_tiles=12)) == 1  # 1 tile: no thumbnail

    mean, std = image_ops.NORMALIZATION["imagenet"]
    processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True, size={"height": 16, "width": 16}, max_patches=4, image_mean=mean, image_std=std
    )
    image = random_rgb(30, 70)
    theirs = processor(image, return_tensors="np")["pixel_values"]
    ours = np.stack([image_ops.normalize(t, "imagenet") for t in image_ops.internvl_tiles(image, 16, 1, 4)])
    np.testing.assert_allclose(ours, np.moveaxis(theirs, 1, -1), atol=1e-5)


# ------------------------------------------------------------------------------------------ LLaVA-NeXT AnyRes

LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PINPOINT_SETS = [
    LLAVA_NEXT_PINPOINTS,
    [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],  # LLaVA-OneVision "anyres_max" style grid
    [[224, 448], [448, 448], [672, 224]],  # asymmetric
]


def test_select_best_resolution_matches_transformers():
    pytest.importorskip(
        "transformers", reason="the reference is transformers' select_best_resolution: pip install -e '.[interop]'"
    )
    from transformers.image_processing_utils import select_best_resolution

    sizes = [(h, w) for h in range(50, 3000, 173) for w in range(50, 3000, 191)] + [(336, 336), (672, 336), (1, 1)]
    for pinpoints in PINPOINT_SETS:
        for hw in sizes:
            assert image_ops.select_best_resolution(hw, pinpoints) == tuple(select_best_resolution(hw, pinpoints))


def test_select_best_resolution_examples():
    # Hand-derived: an image that fits a pinpoint exactly uses it; a tiny image loses nothing anywhere, so the
    # least wasted (smallest) pinpoint wins; a tall image picks the tall pinpoint.
    assert image_ops.select_best_resolution((672, 672), LLAVA_NEXT_PINPOINTS) == (672, 672)
    assert image_ops.select_best_resolution((10, 10), LLAVA_NEXT_PINPOINTS) == (336, 672)
    assert image_ops.select_best_resolution((1000, 300), LLAVA_NEXT_PINPOINTS) == (1008, 336)


@pytest.mark.parametrize("pinpoints", PINPOINT_SETS[:1] + PINPOINT_SETS[2:])
@pytest.mark.parametrize("hw", [(100, 80), (80, 100), (300, 90), (50, 200), (70, 70), (333, 500), (13, 7)])
def test_anyres_tiles_match_transformers_llava_next(pinpoints, hw):
    pytest.importorskip(
        "transformers", reason="the reference is transformers' LLaVA-NeXT image processor: pip install -e '.[interop]'"
    )
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    # Pinpoints and patch size scaled down 1/14 (336 -> 24) so the test stays fast.
    pinpoints = [[h // 14, w // 14] for h, w in pinpoints]
    patch = 24 if pinpoints[0][0] % 24 == 0 else 16
    image = random_rgb(*hw, seed=hw[0])
    ours = image_ops.anyres_tiles(image, pinpoints, patch)
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": patch}, crop_size={"height": patch, "width": patch}, image_grid_pinpoints=pinpoints
    )
    theirs = processor.get_image_patches(
        np.moveaxis(image, -1, 0), pinpoints, size=(patch, patch), patch_size=patch, resample=PILImageResampling.BICUBIC
    )
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == (patch, patch, 3)
        np.testing.assert_array_equal(a, np.moveaxis(b, 0, -1))

    # The full processor (resize + center crop of each view, rescale, normalise) gives the same tensors.
    full = processor(image, return_tensors="np")["pixel_values"][0]
    ours_normalised = np.stack([image_ops.normalize(t, "clip") for t in ours])
    np.testing.assert_allclose(ours_normalised, np.moveaxis(full, 1, -1), atol=1e-5)


def test_anyres_layout_base_first_and_black_padding():
    image = np.full((20, 80, 3), 255, np.uint8)  # wide white image into a 48 x 96 pinpoint: padded top and bottom
    tiles = image_ops.anyres_tiles(image, [[48, 96]], 48)
    assert len(tiles) == 3  # base + 1 x 2 patches
    np.testing.assert_array_equal(tiles[0], 255)  # the base view is the whole image, unpadded
    # Resized to 96 wide x ceil(20 * 96 / 80) = 24 high, centred in 48 rows: rows 12..35 image, the rest black.
    for patch in tiles[1:]:
        np.testing.assert_array_equal(patch[:12], 0)
        np.testing.assert_array_equal(patch[12:36], 255)
        np.testing.assert_array_equal(patch[36:], 0)
    with pytest.raises(ValueError):
        image_ops.anyres_tiles(image, [[50, 100]], 48)


# Real photos (scikit-image's bundled data) cropped to awkward sizes: (photo, top, left, height, width).
PHOTO_CROPS = [
    ("coffee", 20, 40, 333, 517),
    ("rocket", 150, 100, 97, 401),
    ("hubble_deep_field", 100, 500, 640, 95),
    ("astronaut", 0, 100, 511, 263),
    ("chelsea", 0, 0, 300, 451),
    ("retina", 200, 300, 1000, 333),
    ("colorwheel", 0, 0, 370, 371),
    ("astronaut", 250, 250, 21, 37),
]
PHOTO_IDS = [f"{name}-{h}x{w}" for name, _, _, h, w in PHOTO_CROPS]


def photo_crop(name, top, left, h, w):
    import skimage.data

    photo = getattr(skimage.data, name)()[top : top + h, left : left + w]
    assert photo.shape == (h, w, 3) and photo.dtype == np.uint8
    return np.ascontiguousarray(photo)


def llava_next_processor(pinpoints, tile, patch, strategy, extra_tokens):
    """transformers' LlavaNextProcessor with a one-word tokenizer built in memory (no download)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    words = Tokenizer(models.WordLevel({"<unk>": 0, "describe": 1}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    images = LlavaNextImageProcessorPil(
        image_grid_pinpoints=pinpoints, size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}
    )
    return transformers.LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
    )


@pytest.mark.parametrize("crop", PHOTO_CROPS, ids=PHOTO_IDS)
def test_anyres_tiles_match_llava_next_on_real_photos(crop):
    pytest.importorskip(
        "transformers", reason="the reference is transformers' LLaVA-NeXT processor: pip install -e '.[interop]'"
    )
    image = photo_crop(*crop)
    processor = llava_next_processor(LLAVA_NEXT_PINPOINTS, 336, 14, "default", 1)
    out = processor(images=image, text="<image> describe", return_tensors="np")
    assert tuple(out["image_sizes"][0]) == image.shape[:2]
    theirs = np.moveaxis(out["pixel_values"][0], 1, -1)
    ours = np.stack([image_ops.normalize(t, "clip") for t in image_ops.anyres_tiles(image, LLAVA_NEXT_PINPOINTS, 336)])
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


# (pinpoints, tile size, encoder patch size, vision_feature_select_strategy, extra tokens the encoder adds):
# LLaVA-NeXT's CLIP ViT-L/14-336 (class token dropped by "default"), and a SigLIP-style 384 tile encoder
# without a class token ("full") on the LLaVA-OneVision 384-pixel grid.
COUNT_SETUPS = [
    (LLAVA_NEXT_PINPOINTS, 336, 14, "default", 1),
    (PINPOINT_SETS[1], 384, 14, "full", 0),
]


@pytest.mark.parametrize("setup", COUNT_SETUPS, ids=["clip336-default", "siglip384-full"])
@pytest.mark.parametrize("crop", PHOTO_CROPS, ids=PHOTO_IDS)
def test_anyres_feature_count_is_the_llava_next_processors_placeholder_count(crop, setup):
    torch = pytest.importorskip(
        "torch", reason="transformers' LLaVA-NeXT unpadding is PyTorch: pip install -e '.[interop]'"
    )
    pytest.importorskip(
        "transformers", reason="the reference is transformers' LLaVA-NeXT processor: pip install -e '.[interop]'"
    )
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    pinpoints, tile, patch, strategy, extra = setup
    image = photo_crop(*crop)
    h, w = image.shape[:2]
    processor = llava_next_processor(pinpoints, tile, patch, strategy, extra)
    ids = processor(images=image, text="<image> describe", return_tensors="np")["input_ids"]
    side = tile // patch
    assert image_ops.anyres_feature_count(h, w, pinpoints, tile, side) == int((ids == processor.image_token_id).sum())

    # The grid is the one the model unpads: its tile grid, `side` features per tile side, padding cut.
    grid_rows, grid_cols = get_anyres_image_grid_shape((h, w), pinpoints, tile)
    unpadded = unpad_image(torch.zeros(1, grid_rows * side, grid_cols * side), (h, w))
    assert image_ops.anyres_unpadded_grid(h, w, pinpoints, tile, side) == tuple(unpadded.shape[1:])


@pytest.mark.parametrize("crop", PHOTO_CROPS, ids=PHOTO_IDS)
def test_anyres_feature_order_is_llava_next_pack_image_features(crop):
    """Features numbered by (view, token) come out of transformers' own packing in our order; -1 = newline."""
    torch = pytest.importorskip(
        "torch", reason="transformers' LLaVA-NeXT packing is PyTorch: pip install -e '.[interop]'"
    )
    pytest.importorskip(
        "transformers", reason="the reference is transformers' LLaVA-NeXT packing: pip install -e '.[interop]'"
    )
    import types

    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    h, w = photo_crop(*crop).shape[:2]
    tile, patch = 336, 14
    side = tile // patch
    views = len(image_ops.anyres_tiles(np.zeros((h, w, 3), np.uint8), LLAVA_NEXT_PINPOINTS, tile))
    numbered = torch.arange(views * side * side, dtype=torch.float64).reshape(views, side * side, 1)
    config = types.SimpleNamespace(
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_config=types.SimpleNamespace(image_size=tile, patch_size=patch),
    )
    packed, _ = LlavaNextModel.pack_image_features(
        types.SimpleNamespace(config=config), [numbered], torch.tensor([[h, w]]), "default", torch.tensor([-1.0])
    )
    packed = torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed
    order = image_ops.anyres_feature_order(h, w, LLAVA_NEXT_PINPOINTS, tile, side)
    np.testing.assert_array_equal(order, packed[:, 0].numpy().astype(np.int64))
    assert len(order) == image_ops.anyres_feature_count(h, w, LLAVA_NEXT_PINPOINTS, tile, side)


def test_anyres_feature_count_by_hand():
    # 333 x 512 into LLaVA-NeXT's pinpoints: 336 x 672 keeps every pixel with the least waste -> 1 x 2 tiles
    # of 24 x 24 features = a 24 x 48 grid. The image is narrower than 1:2, so it spans 512 * 24 / 333 =
    # 36.9 -> 36 columns; padding (48 - 36) // 2 = 6 is cut from each side: 24 x 36. Features: 24^2 base +
    # 24 * 36 grid + 24 newlines = 1464.
    assert image_ops.anyres_unpadded_grid(333, 512, LLAVA_NEXT_PINPOINTS, 336, 24) == (24, 36)
    assert image_ops.anyres_feature_count(333, 512, LLAVA_NEXT_PINPOINTS, 336, 24) == 576 + 864 + 24
    # A square image on the 672 x 672 pinpoint fills its 48 x 48 grid: nothing is cut.
    assert image_ops.anyres_unpadded_grid(700, 700, LLAVA_NEXT_PINPOINTS, 336, 24) == (48, 48)
    with pytest.raises(UserError, match="not a multiple of tile_size=300"):
        image_ops.anyres_feature_count(333, 512, LLAVA_NEXT_PINPOINTS, 300, 24)
    with pytest.raises(UserError, match="positive image size"):
        image_ops.anyres_unpadded_grid(0, 512, LLAVA_NEXT_PINPOINTS, 336, 24)


# --------------------------------------------------------------------------------------------------- video


def test_sample_frame_indices_eval_middles():
    # Segments of 2 frames [0, 2), [2, 4), ...: middles 1, 3, 5, 7, 9 (as TSN's test-time sampling).
    np.testing.assert_array_equal(image_ops.sample_frame_indices(10, 5), [1, 3, 5, 7, 9])
    np.testing.assert_array_equal(image_ops.sample_frame_indices(100, 4), [12, 37, 62, 87])
    np.testing.assert_array_equal(image_ops.sample_frame_indices(7, 3), [1, 3, 5])  # [0,2), [2,4), [4,7)
    np.testing.assert_array_equal(image_ops.sample_frame_indices(1, 3), [0, 0, 0])
    assert image_ops.sample_frame_indices(10, 5).dtype == np.int64


def test_sample_frame_indices_train_stay_in_segments():
    rng = np.random.default_rng(0)
    num_frames, num_segments = 23, 5
    bounds = [(k * num_frames // num_segments, (k + 1) * num_frames // num_segments) for k in range(num_segments)]
    seen = [set() for _ in range(num_segments)]
    for _ in range(400):
        indices = image_ops.sample_frame_indices(num_frames, num_segments, rng)
        assert indices.shape == (num_segments,) and indices.dtype == np.int64
        for k, index in enumerate(indices):
            assert bounds[k][0] <= index < bounds[k][1]
            seen[k].add(int(index))
    assert all(seen[k] == set(range(*bounds[k])) for k in range(num_segments))  # every frame is reachable


def test_sample_frame_indices_fewer_frames_than_segments():
    expected = [0, 0, 1, 1, 2, 2]  # each of the 3 frames twice, in order
    np.testing.assert_array_equal(image_ops.sample_frame_indices(3, 6), expected)
    np.testing.assert_array_equal(image_ops.sample_frame_indices(3, 6, np.random.default_rng(1)), expected)
    indices = image_ops.sample_frame_indices(4, 7, np.random.default_rng(2))
    assert np.all(np.diff(indices) >= 0) and set(indices.tolist()) == {0, 1, 2, 3}


def test_sample_frame_indices_empty_video():
    with pytest.raises(BadImage) as info:
        image_ops.sample_frame_indices(0, 8)
    assert info.value.reason == "empty_video"
    with pytest.raises(BadImage):
        image_ops.sample_frame_indices(0, 8, np.random.default_rng(0))
