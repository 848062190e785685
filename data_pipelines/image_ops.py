"""Image operations for the input pipelines: decode, resize, crop, normalise, tile, sample video frames.

Every image here is a numpy array, uint8 [H, W, 3] RGB, unless a function says otherwise. PIL is the
decoder and the resampler, so results match the reference pipelines (the InternVL model card and
transformers' image processors) that also resize with PIL.

Bad inputs raise `BadImage`, whose `reason` the pipeline counts (the `skipped` map of `vlm-jax data stats`).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image, ImageOps

from vlm_jax.errors import UserError

DEFAULT_MAX_PIXELS = 8192 * 8192
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Leading bytes of the supported formats: a file that starts like one of them but cannot be read is corrupt,
# anything else PIL cannot read is an unsupported format.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class BadImage(Exception):
    """An image (or video) the pipeline must skip; `reason` is a short snake_case counter key.

    Reasons: corrupt_image, empty_image, unsupported_format, absurd_aspect_ratio, image_too_large, empty_video.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------- decoding


def decode(
    data: bytes,
    max_aspect_ratio: float | None = 20.0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_orientation: bool = True,
) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, WebP, GIF, BMP, TIFF) to uint8 [H, W, 3] RGB.

    Grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB (16-bit values are scaled by
    255/65535, not clipped); transparency is composited on white; a GIF gives its first frame; the EXIF
    orientation is applied when `exif_orientation`. Size and aspect ratio are checked from the header, before
    any pixel is decoded. Raises `BadImage` (reasons: empty_image, unsupported_format, corrupt_image,
    image_too_large, absurd_aspect_ratio). `None` disables a limit; PIL's own decompression-bomb limit
    (2 * Image.MAX_IMAGE_PIXELS) always applies. Truncated files raise corrupt_image unless some other code has
    set PIL's global `ImageFile.LOAD_TRUNCATED_IMAGES`.
    """
    if len(data) == 0:
        raise BadImage("empty_image", "The image has zero bytes.")
    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as e:
        raise BadImage("image_too_large", f"The image header claims too many pixels ({e}).") from None
    except Image.UnidentifiedImageError:
        head = bytes(data[:12])
        if head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
            raise BadImage("corrupt_image", "The image header could not be parsed.") from None
        raise BadImage("unsupported_format", f"The bytes are not one of {', '.join(SUPPORTED_FORMATS)}.") from None
    except Exception as e:  # PIL's plugins raise many types (OSError, SyntaxError, struct.error, ...) on bad data
        raise BadImage("corrupt_image", f"The image header could not be read ({e}).") from None

    width, height = img.size
    if width == 0 or height == 0:
        raise BadImage("empty_image", f"The image has zero size ({width}x{height}).")
    if max_pixels is not None and width * height > max_pixels:
        raise BadImage("image_too_large", f"The image has {width}x{height} pixels, above the limit of {max_pixels}.")
    if max_aspect_ratio is not None and max(width, height) / min(width, height) > max_aspect_ratio:
        raise BadImage("absurd_aspect_ratio", f"The image is {width}x{height}, beyond aspect ratio {max_aspect_ratio}.")

    try:
        img.load()  # PIL decodes lazily: errors in the pixel data only surface here
    except Exception as e:
        raise BadImage("corrupt_image", f"The image data could not be decoded ({e}).") from None
    if exif_orientation:
        img = _apply_exif_orientation(img)
    try:
        return _to_rgb(img)
    except ValueError as e:  # a mode PIL cannot convert to RGB
        raise BadImage("unsupported_format", f"Image mode {img.mode} cannot be converted to RGB ({e}).") from None


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """The image turned upright per its EXIF orientation tag; unchanged if there is no tag or it is unreadable."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block should not cost an otherwise good image
        return img
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def _to_rgb(img: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a loaded PIL image of any mode."""
    mode = img.mode
    if mode == "I" or mode.startswith("I;16") or mode == "F":
        values = np.asarray(img).astype(np.float32)
        # 16-bit data (modes I;16*, and I as some decoders deliver it) spans [0, 65535]; float images span [0, 1].
        scale = 255.0 if mode == "F" else 255.0 / 65535.0
        gray = np.round(np.clip(values * scale, 0, 255)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA")).astype(np.uint32)
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)  # over white, rounded
    return np.array(img.convert("RGB"), dtype=np.uint8)


# --------------------------------------------------------------------------------------------- resize and crop


def _check_image(image: np.ndarray) -> None:
    """Raise ValueError unless `image` is uint8 [H, W, 3] with H, W > 0."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}.")


def resize(image: np.ndarray, height: int, width: int, method: str = "bicubic", antialias: bool = True) -> np.ndarray:
    """`image` resized to [height, width] with bicubic or bilinear resampling; returns uint8.

    With `antialias` (the default) this is PIL's resize, whose filter widens when downscaling. Without it the
    filter keeps its upscaling width (as `antialias=False` in torch/TF), so downscaling aliases; upscaling gives
    the same result either way.
    """
    _check_image(image)
    if method not in _RESAMPLING:
        raise ValueError(f"method must be one of {sorted(_RESAMPLING)}, got {method!r}.")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}.")
    if antialias:
        return np.array(Image.fromarray(image).resize((width, height), _RESAMPLING[method]))
    # Two separable passes, horizontal first, each rounded and clipped to uint8 as PIL does.
    cols = _interpolation_matrix(image.shape[1], width, method)
    rows = _interpolation_matrix(image.shape[0], height, method)
    out = np.clip(np.round(np.einsum("hwc,pw->hpc", image.astype(np.float32), cols)), 0, 255)
    out = np.einsum("oh,hpc->opc", rows, out)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _interpolation_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """[out_size, in_size] weights of plain (not antialiased) interpolation along one axis.

    Pixel i covers [i, i + 1); output pixel o samples the input at its centre (o + 0.5) * in / out. Taps
    outside the image are dropped and the rest renormalised, as PIL does at the borders. The cubic is PIL's
    (a = -0.5).
    """
    centres = (np.arange(out_size) + 0.5) * (in_size / out_size)
    d = np.abs(np.arange(in_size) + 0.5 - centres[:, None])
    if method == "bilinear":
        w = np.maximum(0.0, 1.0 - d)
    else:
        a = -0.5
        w = np.where(d < 1, ((a + 2) * d - (a + 3)) * d * d + 1, np.where(d < 2, (((d - 5) * d + 8) * d - 4) * a, 0.0))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_shorter_side(image: np.ndarray, size: int, method: str = "bicubic") -> np.ndarray:
    """`image` resized so its shorter side is `size`, keeping the aspect ratio (longer side truncated to int,
    as torchvision and transformers do)."""
    h, w = image.shape[:2]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new_h, new_w = (size, new_long) if h <= w else (new_long, size)
    return resize(image, new_h, new_w, method)


def fixed_resolution(image: np.ndarray, size: int, method: str = "bicubic") -> np.ndarray:
    """`image` resized to size x size, ignoring its aspect ratio (CLIP/SigLIP/LLaVA-1.5-style single view)."""
    return resize(image, size, size, method)


def pad_to_square(image: np.ndarray, size: int, background: str, method: str = "bicubic", min_side: int = 14):
    """`image` as DeepSeek-VL's processors prepare it (`DeepseekVLHybridImageProcessor`): its longer side resized
    to `size` keeping the aspect ratio (the other side round(side * size / longer), at least `min_side`), then
    centred on a size x size canvas filled with the colour int(255 * mean) of the normalisation `background`
    (the padding normalises to about zero)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_h, new_w = max(round(h * scale), min_side), max(round(w * scale), min_side)
    image = resize(image, new_h, new_w, method)
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = [int(255 * m) for m in NORMALIZATION[background][0]]
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = image
    return canvas


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central [height, width] window of `image` (offsets rounded down, as transformers does)."""
    top, left = _crop_room(image, height, width)
    top, left = top // 2, left // 2
    return image[top : top + height, left : left + width]


def random_crop(image: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A [height, width] window of `image` at a uniformly random position drawn from `rng`."""
    room_h, room_w = _crop_room(image, height, width)
    top, left = int(rng.integers(0, room_h + 1)), int(rng.integers(0, room_w + 1))
    return image[top : top + height, left : left + width]


def _crop_room(image: np.ndarray, height: int, width: int) -> tuple[int, int]:
    """How many pixels `image` exceeds a [height, width] crop by, per axis; ValueError if the crop does not fit."""
    h, w = image.shape[:2]
    if not (0 < height <= h and 0 < width <= w):
        raise ValueError(f"cannot crop {height}x{width} from a {h}x{w} image.")
    return h - height, w - width


def normalize(image: np.ndarray, name: str) -> np.ndarray:
    """float32 [H, W, 3] = (image / 255 - mean) / std with the constants `NORMALIZATION[name]`."""
    if name not in NORMALIZATION:
        raise ValueError(f"normalization must be one of {sorted(NORMALIZATION)}, got {name!r}.")
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZATION[name])
    return (image.astype(np.float32) / 255.0 - mean) / std


# ------------------------------------------------------------------------------- InternVL 1.5 dynamic tiling


def internvl_target_ratios(min_num: int = 1, max_num: int = 12) -> list[tuple[int, int]]:
    """The (columns, rows) grids with min_num <= columns * rows <= max_num, by tile count, in the card's order.

    Within one tile count the model card's order is that of a Python set of tuples (deterministic in
    CPython); it is rebuilt the same way here because a tie between two grids of equal tile count is broken
    by this order. For 1..12 this gives the paper's 35 ratios, listed as 1:1, 1:2, 2:1, 3:1, ..., 2:6.
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def internvl_closest_ratio(width: int, height: int, ratios: list[tuple[int, int]], tile_size: int) -> tuple[int, int]:
    """The (columns, rows) grid in `ratios` whose aspect ratio is closest to width / height (InternVL 1.5).

    On an exact tie a later grid (more tiles) wins only if the image area exceeds half the grid's pixel area,
    so that small images are not blown up more than 2x.
    """
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in ratios:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def internvl_tiles(
    image: np.ndarray, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 12, use_thumbnail: bool = True
) -> list[np.ndarray]:
    """InternVL 1.5 dynamic high resolution: tile_size x tile_size tiles, row-major, then a thumbnail.

    The whole image is resized (bicubic, PIL's default in the card) to (cols * tile, rows * tile) for the
    closest grid and cut row-major; the thumbnail (the whole image at tile x tile) comes last and only when
    there is more than one tile.
    """
    _check_image(image)
    height, width = image.shape[:2]
    cols, rows = internvl_closest_ratio(width, height, internvl_target_ratios(min_tiles, max_tiles), tile_size)
    resized = resize(image, rows * tile_size, cols * tile_size, "bicubic")
    tiles = [
        resized[r * tile_size : (r + 1) * tile_size, c * tile_size : (c + 1) * tile_size]
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(resize(image, tile_size, tile_size, "bicubic"))
    return tiles


# ---------------------------------------------------------------------------------------- LLaVA-NeXT AnyRes


def select_best_resolution(original_hw: tuple[int, int], grid_pinpoints) -> tuple[int, int]:
    """The (height, width) in `grid_pinpoints` that keeps most of the image's resolution (LLaVA-NeXT AnyRes).

    Each candidate's effective resolution is the pixel count of the image scaled to fit inside it (capped at
    the original pixel count); the largest wins, ties going to the least wasted (unused) area. Pinpoints are
    (height, width) pairs as in transformers; the original LLaVA code reads them as (width, height), which is
    the same for the symmetric pinpoint sets released checkpoints use.
    """
    orig_h, orig_w = original_hw
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in grid_pinpoints:
        scale = min(w / orig_w, h / orig_h)
        effective = min(int(orig_w * scale) * int(orig_h * scale), orig_w * orig_h)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    if best is None:
        raise ValueError(f"no usable resolution in grid_pinpoints={grid_pinpoints!r}.")
    return best


def anyres_tiles(image: np.ndarray, grid_pinpoints, patch_size: int, method: str = "bicubic") -> list[np.ndarray]:
    """LLaVA-NeXT AnyRes views: the whole image at patch_size x patch_size FIRST, then the patches.

    The patches tile, row-major, the image resized to fit the best pinpoint resolution (aspect ratio kept,
    new size rounded up) and padded, centred, with black (0) to exactly that resolution, as LLaVA-NeXT and
    transformers' LlavaNextImageProcessor do.
    """
    _check_image(image)
    target_h, target_w = select_best_resolution(image.shape[:2], grid_pinpoints)
    if target_h % patch_size or target_w % patch_size:
        raise ValueError(f"pinpoint {target_h}x{target_w} is not a multiple of patch_size={patch_size}.")
    h, w = image.shape[:2]
    if target_w / w < target_h / h:
        new_h, new_w = min(int(np.ceil(h * target_w / w)), target_h), target_w
    else:
        new_h, new_w = target_h, min(int(np.ceil(w * target_h / h)), target_w)
    canvas = np.zeros((target_h, target_w, 3), np.uint8)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resize(image, new_h, new_w, method)
    patches = [
        canvas[r : r + patch_size, c : c + patch_size]
        for r in range(0, target_h, patch_size)
        for c in range(0, target_w, patch_size)
    ]
    return [resize(image, patch_size, patch_size, method)] + patches


def _anyres_layout(height: int, width: int, grid_pinpoints, tile_size: int, tokens_per_side: int):
    """(tile columns of the padded canvas, first kept feature row, first kept column, kept rows, kept columns)."""
    if height < 1 or width < 1 or tile_size < 1 or tokens_per_side < 1:
        raise UserError(
            f"AnyRes needs a positive image size, tile size and tokens per side, "
            f"not {height}x{width}, {tile_size}, {tokens_per_side}."
        )
    best_h, best_w = select_best_resolution((height, width), grid_pinpoints)
    if best_h % tile_size or best_w % tile_size:
        raise UserError(f"pinpoint {best_h}x{best_w} is not a multiple of tile_size={tile_size}.")
    rows, cols = best_h // tile_size * tokens_per_side, best_w // tile_size * tokens_per_side
    top = left = 0
    if width / height > cols / rows:  # wider than the grid: padded above and below
        covered = int(round(height * cols / width, 7))
        top = (rows - covered) // 2
        rows -= 2 * top
    else:  # padded left and right (or not at all)
        covered = int(round(width * rows / height, 7))
        left = (cols - covered) // 2
        cols -= 2 * left
    return best_w // tile_size, top, left, rows, cols


def anyres_unpadded_grid(
    height: int, width: int, grid_pinpoints, tile_size: int, tokens_per_side: int
) -> tuple[int, int]:
    """(rows, cols) of LLaVA-NeXT's feature grid for a `height` x `width` image, once the padding is cut off.

    The `anyres_tiles` patches give a grid of (pinpoint_h / tile_size) x (pinpoint_w / tile_size) tiles of
    `tokens_per_side`^2 features (tile_size // the encoder's patch size); laid side by side that is a
    feature grid of the padded canvas. LLaVA-NeXT (`unpad_image` in transformers) then drops the rows (or
    columns) that only cover the black padding: the image spans `size * grid / original` features along its
    shorter relative side (rounded to 7 decimals, then truncated, as transformers does), and the padding,
    split evenly, is cut from both ends.
    """
    return _anyres_layout(height, width, grid_pinpoints, tile_size, tokens_per_side)[3:]


def anyres_feature_order(height: int, width: int, grid_pinpoints, tile_size: int, tokens_per_side: int) -> np.ndarray:
    """Which feature goes to each of LLaVA-NeXT's placeholders for one image: int32 [anyres_feature_count].

    Features are numbered over the image's `anyres_tiles` views, view v's token t being v * tokens_per_side^2
    + t (view 0 is the base image; tokens row-major in their tile). The order is the base view's features,
    then the unpadded grid row by row (a row crosses the tiles of one tile row), each grid row followed by
    -1, the `image_newline` feature: transformers' `LlavaNextModel.pack_image_features`.
    """
    tile_cols, top, left, rows, cols = _anyres_layout(height, width, grid_pinpoints, tile_size, tokens_per_side)
    side = tokens_per_side
    y, x = np.mgrid[top : top + rows, left : left + cols]
    tile = (y // side) * tile_cols + x // side
    grid = (1 + tile) * side * side + (y % side) * side + x % side
    grid = np.concatenate([grid, np.full((rows, 1), -1)], axis=1)
    return np.concatenate([np.arange(side * side), grid.reshape(-1)]).astype(np.int32)


def anyres_feature_count(height: int, width: int, grid_pinpoints, tile_size: int, tokens_per_side: int) -> int:
    """How many image features (and `<image>` placeholders) LLaVA-NeXT places for one `height` x `width` image.

    The base view's `tokens_per_side`^2 features, then the unpadded grid (`anyres_unpadded_grid`) with one
    `image_newline` feature after each of its rows: base + rows * cols + rows. This is the count of
    transformers' LlavaNextProcessor for features without a class token (vision_feature_select_strategy
    "default" drops CLIP's; "full" on an encoder that has none, such as SigLIP).
    """
    rows, cols = anyres_unpadded_grid(height, width, grid_pinpoints, tile_size, tokens_per_side)
    return tokens_per_side * tokens_per_side + rows * cols + rows


# ----------------------------------------------------------------------------------------------------- video


def sample_frame_indices(num_frames: int, num_segments: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One frame index per segment of a video (TSN-style segment sampling); int64 [num_segments].

    Frames [0, num_frames) are split into num_segments contiguous segments of (nearly) equal length, segment k
    being [floor(k * N / S), floor((k + 1) * N / S)). Without `rng` (evaluation) each segment gives its middle
    frame; with `rng` (training) a uniformly random frame of the segment. With fewer frames than segments a
    segment may be empty: it then takes the frame where it starts, so frames repeat in order.
    Raises BadImage("empty_video") if num_frames == 0.
    """
    if num_frames <= 0:
        raise BadImage("empty_video", f"The video has {num_frames} frames.")
    if num_segments <= 0:
        raise ValueError(f"num_segments must be positive, got {num_segments}.")
    edges = np.arange(num_segments + 1, dtype=np.int64) * num_frames // num_segments
    starts = edges[:-1]
    ends = np.maximum(edges[1:], starts + 1)
    if rng is None:
        return (starts + ends) // 2
    return rng.integers(starts, ends).astype(np.int64)


# ---------------------------------------------------------------------------------------- Idefics3 tiles

IDEFICS3_MAX_SIDE = 4096  # transformers' Idefics3 MAX_IMAGE_SIZE: no side beyond it


def _lanczos(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`image` resized to [height, width] with PIL's LANCZOS (Idefics3's resampling), uint8 in and out."""
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))


def idefics3_sizes(height: int, width: int, tile_size: int = 364, longest_edge: int = 4 * 364):
    """((h1, w1), (h2, w2)): the two resizes of transformers' Idefics3 image processor (`do_resize`, then
    `resize_for_vision_encoder`). First the longest side becomes `longest_edge` (the other kept in proportion,
    truncated, then rounded up to even; no side over 4096); then each side is rounded up to a multiple of
    `tile_size` (the shorter side from its proportional length, truncated)."""
    aspect = width / height
    if width >= height:
        w1, h1 = longest_edge, int(longest_edge / aspect)
        h1 += h1 % 2
    else:
        h1, w1 = longest_edge, int(longest_edge * aspect)
        w1 += w1 % 2
    h1, w1 = max(h1, 1), max(w1, 1)
    aspect = w1 / h1
    if w1 >= h1 and w1 > IDEFICS3_MAX_SIDE:
        w1, h1 = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE / aspect)
    elif h1 > w1 and h1 > IDEFICS3_MAX_SIDE:
        h1, w1 = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE * aspect)
    h1, w1 = max(h1, 1), max(w1, 1)
    aspect = w1 / h1
    up = lambda side: -(-side // tile_size) * tile_size  # noqa: E731
    if w1 >= h1:
        w2 = up(w1)
        h2 = up(int(w2 / aspect))
    else:
        h2 = up(h1)
        w2 = up(int(h2 * aspect))
    return (h1, w1), (h2, w2)


def idefics3_grid(height: int, width: int, tile_size: int = 364, longest_edge: int = 4 * 364) -> tuple[int, int]:
    """(rows, cols) of tiles an image of `height` x `width` is split into by Idefics3; (0, 0) when it is not split
    (it fits one tile: the image alone, no global image), as transformers' processor reports them."""
    _, (h2, w2) = idefics3_sizes(height, width, tile_size, longest_edge)
    if h2 <= tile_size and w2 <= tile_size:
        return 0, 0
    return h2 // tile_size, w2 // tile_size


def idefics3_tiles(image: np.ndarray, tile_size: int = 364, longest_edge: int = 4 * 364) -> list[np.ndarray]:
    """Idefics3's views of one image (transformers' `Idefics3ImageProcessorPil` with `do_image_splitting`): the
    image resized twice with LANCZOS (`idefics3_sizes`), cut row-major into tile_size x tile_size tiles, then the
    global image (that resized image at tile_size x tile_size); an image that fits one tile is that tile alone."""
    _check_image(image)
    (h1, w1), (h2, w2) = idefics3_sizes(*image.shape[:2], tile_size, longest_edge)
    resized = _lanczos(_lanczos(image, h1, w1), h2, w2)
    if h2 <= tile_size and w2 <= tile_size:
        return [resized]
    tiles = [
        resized[r : r + tile_size, c : c + tile_size] for r in range(0, h2, tile_size) for c in range(0, w2, tile_size)
    ]
    return tiles + [_lanczos(resized, tile_size, tile_size)]
