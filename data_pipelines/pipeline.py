"""The Grain input pipeline for vision-language data (`data.name = "grain"`).

    source (ArrayRecord / TFDS / list) -> MapDataset -> global shuffle (seed) -> this host's
    shard -> repeat -> process each record (decode, tile, render the template, fit the
    row budgets) -> drop and count bad records -> first-fit pack into rows -> batch

With `data.mixture`, each component (its own ArrayRecord folder, record
format and template) runs the steps up to processing on its own; training
mixes the components' endless streams by weight (`grain.MapDataset.mix`, a
fixed interleaving), a single pass (validation, `data stats`) reads each
component once, in order (`grain.MapDataset.concatenate`). Counting, packing
and batching then see one stream.

Everything before packing is a deterministic function of (seed, record index),
so the same seed gives the same batches; the iterator state (a few integers
and the skip counts) rides in the trainer's checkpoint and a resumed run sees
exactly the batches it would have seen. Each host reads only its own records
(`process_index::process_count` of the shuffled order); the union over hosts
is the global batch.

`data` config keys are documented in docs/data.md.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Any

import grain
import ml_collections
import numpy as np
from grain.multiprocessing import SharedMemoryArray

from data_pipelines import fitting, image_ops, native_resolution, templates
from data_pipelines.packing import REPAIRS, SKIP, CountSkips, CountSkipsIterator, pack
from data_pipelines.sources import ArrayRecordSource, ListSource, TfdsSource
from data_pipelines.tokenizer import Tokenizer
from vlm_jax.errors import UserError


def make_source(data: ml_collections.ConfigDict, split: str):
    """The record source of `split` named by the data config."""
    kind = data.source
    if kind == "array_record":
        path = data.get(f"{split}_path")
        if not path:
            raise UserError(f"data.{split}_path is not set (the folder written by `vlm-jax data build`).")
        return ArrayRecordSource(path)
    if kind == "tfds":
        t = data.tfds
        return TfdsSource(t.name, t.get(f"{split}_split", split), t.get("data_dir"), dict(t.get("fields", {})))
    if kind == "memory":
        return ListSource(data.records[split], data.format)
    raise UserError(f"data.source {kind!r} is not one of array_record, tfds, memory.")


def repair_text(text: Any, repairs: list[str]) -> str:
    """Valid UTF-8 text: bytes or undecodable characters become U+FFFD (counted as `invalid_utf8`)."""
    if isinstance(text, bytes):
        fixed = text.decode("utf-8", errors="replace")
    else:
        fixed = str(text).encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    if fixed != text:
        repairs.append("invalid_utf8")
    return fixed


MIXTURE_KEYS = ("train_path", "validation_path", "weight", "template", "template_options")


def mixture_components(data: ml_collections.ConfigDict, split: str) -> list[dict[str, Any]]:
    """The checked `data.mixture` components for `split`: dicts with path, weight, template, template_options.

    Raises one clear UserError for a mixture that is not a non-empty list of
    dicts, an unknown key, a weight that is not a positive number, a missing
    path or folder, or a template that does not render the folder's format.
    """
    mixture = data.mixture
    if data.source != "array_record":
        raise UserError(f"data.mixture needs data.source = 'array_record', not {data.source!r}.")
    if not isinstance(mixture, (list, tuple)) or not mixture:
        raise UserError("data.mixture must be a non-empty list of components (dicts with train_path and weight).")
    components = []
    for i, component in enumerate(mixture):
        name = f"data.mixture[{i}]"
        if not isinstance(component, (dict, ml_collections.ConfigDict)):
            raise UserError(f"{name} must be a dict with {', '.join(MIXTURE_KEYS)}, not {component!r}.")
        component = dict(component)
        unknown = sorted(set(component) - set(MIXTURE_KEYS))
        if unknown:
            raise UserError(f"{name} has unknown key(s) {', '.join(unknown)}; the keys are {', '.join(MIXTURE_KEYS)}.")
        weight = component.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise UserError(f"{name}.weight must be a positive number, got {weight!r}.")
        path = component.get(f"{split}_path")
        if not path:
            raise UserError(f"{name}.{split}_path is not set (the folder written by `vlm-jax data build`).")
        try:
            source = ArrayRecordSource(path)
        except UserError as e:
            raise UserError(f"{name}: {e}") from None
        template = component.get("template") or data.template
        formats = templates.supported_formats(template)
        if source.format not in formats:
            raise UserError(
                f"{name}: template {template!r} does not render the {source.format} records of {path} "
                f"(it renders {', '.join(formats)})."
            )
        options = component.get("template_options")
        components.append(
            {
                "source": source,
                "weight": float(weight),
                "template": template,
                "template_options": dict(data.get("template_options", {}) if options is None else options),
            }
        )
    if len({templates.uses_prefix_mask(c["template"]) for c in components}) > 1:
        raise UserError("data.mixture mixes prefix-LM and causal templates, which cannot share packed rows.")
    return components


def image_views(image: np.ndarray, settings: Any) -> list[np.ndarray]:
    """The normalised views of one decoded image that the model takes as media slots (`data.image`): the image
    at a fixed resolution, InternVL's tiles and thumbnail, LLaVA-NeXT's base view and tiles, Fuyu's
    aspect-kept image on a padded canvas (`fuyu_canvas`), or Idefics3's tiles and global image
    (`image_ops.idefics3_tiles`)."""
    mode, size = settings.mode, int(settings.size)
    if mode == "fixed":
        tiles = [image_ops.fixed_resolution(image, size, settings.get("method", "bicubic"))]
    elif mode == "internvl":
        tiles = image_ops.internvl_tiles(
            image, size, int(settings.min_tiles), int(settings.max_tiles), bool(settings.use_thumbnail)
        )
    elif mode == "anyres":
        tiles = image_ops.anyres_tiles(image, [tuple(p) for p in settings.grid_pinpoints], size)
    elif mode == "fuyu":
        tiles = [fuyu_canvas(image, size, settings.get("method", "bilinear"))]
    elif mode == "deepseek_vl":  # aspect kept, padded to a square with the normalisation's mean colour
        tiles = [image_ops.pad_to_square(image, size, settings.normalization, settings.get("method", "bicubic"))]
    elif mode == "idefics3":  # tiles of `size` px, then the global image
        tiles = image_ops.idefics3_tiles(image, size, int(settings.longest_edge))
    else:
        raise UserError(f"data.image.mode {mode!r} is not one of fixed, internvl, anyres, fuyu, deepseek_vl, idefics3.")
    return [image_ops.normalize(t, settings.normalization) for t in tiles]


def fuyu_canvas(image: np.ndarray, size: int, method: str = "bilinear") -> np.ndarray:
    """`image` as transformers' `FuyuImageProcessor` prepares it, on a square `size` canvas: scaled down (never
    up) to fit, keeping its aspect ratio (int(side * scale)), then padded at the bottom and right with pixel
    value 1 (the processor's `padding_value` 1.0, before rescaling). Fuyu then reads only the image's own
    ceil(side / patch) patches (`fuyu_feature_order`)."""
    h, w = image.shape[:2]
    if h > size or w > size:
        scale = min(size / h, size / w)
        image = image_ops.resize(image, max(1, int(h * scale)), max(1, int(w * scale)), method)
    canvas = np.ones((size, size, 3), np.uint8)
    canvas[: image.shape[0], : image.shape[1]] = image
    return canvas


def fuyu_feature_order(image_hw: tuple[int, int], size: int, side: int) -> np.ndarray:
    """Fuyu's placeholders of one image of `image_hw` (height, width) on a `size` px canvas of side x side
    patches (`fuyu_canvas`): its own ceil(h' / p) x ceil(w' / p) patches of the scaled image (h', w'), row by
    row, each row followed by -1 (the image-newline token), as FuyuProcessor lays them out; each value is the
    patch's index among the canvas' patches (row * side + column)."""
    h, w = image_hw
    if h > size or w > size:
        scale = min(size / h, size / w)
        h, w = max(1, int(h * scale)), max(1, int(w * scale))
    patch = size // side
    rows, cols = -(-h // patch), -(-w // patch)
    grid = np.arange(rows)[:, None] * side + np.arange(cols)[None, :]
    return np.concatenate([grid, np.full((rows, 1), -1)], axis=1).reshape(-1).astype(np.int32)


def uses_feature_index(settings: Any) -> bool:
    """Whether `data.image` lays AnyRes features out as LLaVA-NeXT does, or is Fuyu's canvas (the data then names
    each placeholder's feature); raises a UserError for an unknown `anyres_layout`."""
    if settings.get("mode") == "fuyu":
        return True
    if settings.get("mode") != "anyres":
        return False
    layout = settings.get("anyres_layout", "tiles")
    if layout not in ("tiles", "llava_next"):
        raise UserError(f"data.image.anyres_layout {layout!r} is not 'tiles' or 'llava_next'.")
    return layout == "llava_next"


def feature_order(image_hw: tuple[int, int], settings: Any, tokens_per_slot: int) -> np.ndarray:
    """LLaVA-NeXT's feature for each placeholder of one image (`image_ops.anyres_feature_order`), or Fuyu's
    (`fuyu_feature_order`: tokens_per_slot is then the canvas' patches)."""
    if settings.get("mode") == "fuyu":
        return fuyu_feature_order(image_hw, int(settings.size), int(round(tokens_per_slot**0.5)))
    pinpoints = [tuple(p) for p in settings.grid_pinpoints]
    side = int(round(tokens_per_slot**0.5))
    return image_ops.anyres_feature_order(*image_hw, pinpoints, int(settings.size), side)


def feature_index(
    ids: np.ndarray, placeholder_id: int, orders: list[np.ndarray], slots_per_image: list[int], tokens_per_slot: int
) -> np.ndarray:
    """int32 per token: at the images' placeholders (in order), which feature of the example's slots goes there
    (slot * tokens_per_slot + token, counting the example's slots from 0; -1 = image_newline); 0 elsewhere."""
    index = np.zeros(len(ids), np.int32)
    first_slot, placed = 0, []
    for order, slots in zip(orders, slots_per_image):
        placed.append(np.where(order >= 0, order + first_slot * tokens_per_slot, -1))
        first_slot += slots
    spots = np.flatnonzero(np.asarray(ids) == placeholder_id)
    values = np.concatenate(placed) if placed else np.zeros(0, np.int32)
    if len(spots) != len(values):
        raise UserError(f"{len(spots)} image placeholders for {len(values)} image features.")
    index[spots] = values
    return index


class Preprocessor:
    """record -> example (tokens/targets/loss_mask, images [slots, H, W, 3]) or `{SKIP: reason}`.

    `template` and `template_options` default to `data.template` and `data.template_options` (a mixture
    component passes its own).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        tokenizer: Tokenizer,
        format: str,
        training: bool,
        template: str | None = None,
        template_options: dict[str, Any] | None = None,
    ):
        data = config.data
        self.format = format
        self.training = training
        self.tokenizer = tokenizer
        self.template = template or data.template
        self.template_options = dict(data.get("template_options", {}) if template_options is None else template_options)
        self.seq_len = int(data.seq_len)
        self.max_images = int(data.max_images)
        self.tokens_per_slot = int(config.model.get("image_tokens", 1))
        self.image = data.image
        # Native resolution (Qwen2-VL): an image is a variable number of patches, the row's budget is
        # `data.max_patches` patches (in place of media slots), and positions are M-RoPE's [3, L].
        self.native = self.image.get("mode") == "native"
        self.slot_budget = int(data.max_patches) if self.native else self.max_images
        self.video_step = float(self.image.get("video_time_interval", 1.0))  # M-RoPE temporal step per frame pair
        window = data.get("interleaved", {})
        self.window_tokens = int(window.get("max_tokens", self.seq_len))
        self.window_images = int(window.get("max_images", self.max_images))
        self.with_prefix_mask = templates.uses_prefix_mask(self.template)
        # LLaVA-NeXT's layout: an AnyRes image places its base view, its unpadded grid and a newline per grid row
        # (image_ops.anyres_feature_order), and each placeholder's feature is named in `feature_index`.
        self.with_feature_index = self.image.get("mode") == "anyres" and self.image.get("anyres_layout") == "llava_next"
        self.with_feature_index |= self.image.get("mode") == "fuyu"  # each image's own patch grid and newlines
        if self.image.get("mode") == "anyres" and self.image.get("anyres_layout", "tiles") not in (
            "tiles",
            "llava_next",
        ):
            raise UserError(f"data.image.anyres_layout {self.image.anyres_layout!r} is not 'tiles' or 'llava_next'.")
        # Idefics3: an image's tiles lie apart in the text (`<row_r_col_c>` between them): fitting keeps or drops
        # tile by tile, and the template is given each image's grid (the record's `image_grids`, from `_images`).
        self.idefics3 = self.image.get("mode") == "idefics3"
        placeholder, wrappers = templates.image_placeholder(self.template)
        self.placeholder_id = tokenizer.token_id(placeholder)
        self.wrapper_ids = tuple(tokenizer.token_id(w) for w in wrappers)

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        repairs: list[str] = []
        try:
            record = self._clean(record, repairs)
            slots_per_image, pixels, orders = self._images(record, repairs, rng)
            if self.format != "interleaved" and sum(slots_per_image) > self.slot_budget:
                return {SKIP: "too_many_patches" if self.native else "too_many_images"}
            counts = self._placeholders(slots_per_image, pixels, orders)
            options = dict(self.template_options)
            if self.idefics3:  # the template writes each image's grid of tiles
                options["grids"] = record["image_grids"]
            rendered = templates.render(self.template, self.tokenizer, record, counts, **options)
        except image_ops.BadImage as e:
            return {SKIP: e.reason}
        except UserError as e:
            return {SKIP: getattr(e, "reason", "unrenderable")}
        return self._fit(rendered, slots_per_image, pixels, orders, repairs, rng)

    def _placeholders(self, slots_per_image, pixels, orders) -> list[int]:
        """Placeholder ids per image: LLaVA-NeXT's feature order, a native-resolution image's merged tokens, or
        `image_tokens` per media slot."""
        if orders:
            return [len(o) for o in orders]
        if self.native:
            return [native_resolution.merged_tokens(grid) for _, grid in pixels]
        return [self.tokens_per_slot * k for k in slots_per_image]

    def _clean(self, record: dict[str, Any], repairs: list[str]) -> dict[str, Any]:
        record = dict(record)
        if self.format == "pairs":
            record["caption"] = repair_text(record.get("caption", ""), repairs)
        elif self.format == "llava":
            record["conversations"] = [
                {**t, "value": repair_text(t.get("value", ""), repairs)} for t in record.get("conversations", [])
            ]
        else:
            record["texts"] = [None if t is None else repair_text(t, repairs) for t in record.get("texts", [])]
        return record

    def _images(self, record: dict[str, Any], repairs: list[str], rng) -> tuple[list[int], list[np.ndarray], list]:
        """Decodes and tiles every image: (slots per image, the slots' pixels, and under the LLaVA-NeXT layout each
        image's feature order, else []); interleaved documents drop a bad image, other formats skip."""
        slots_per_image, pixels, bad, orders = [], [], [], []
        if self.idefics3:  # each decoded image's (rows, cols), for the template (`__call__`)
            record["image_grids"] = []
        for position, data in enumerate(record.get("images", [])):
            if data is None:
                continue
            try:
                if isinstance(data, (list, tuple)) and self.native:  # a video at native resolution
                    patches, grid = native_resolution.video_patches(self._frame_images(data, rng), self.image)
                    slots_per_image.append(len(patches))
                    pixels.append((patches, grid))
                    continue
                if isinstance(data, (list, tuple)):  # a video: encoded frames
                    tiles = self._frames(data, rng)
                elif self.native:
                    image = image_ops.decode(data, max_aspect_ratio=float(self.image.max_aspect_ratio))
                    patches, grid = native_resolution.image_patches(image, self.image)
                    slots_per_image.append(len(patches))  # the budget counts patches
                    pixels.append((patches, grid))
                    continue
                else:
                    image = image_ops.decode(data, max_aspect_ratio=float(self.image.max_aspect_ratio))
                    tiles = image_views(image, self.image)
                    if self.idefics3:
                        size, longest = int(self.image.size), int(self.image.longest_edge)
                        record["image_grids"].append(image_ops.idefics3_grid(*image.shape[:2], size, longest))
                    if self.with_feature_index:
                        orders.append(feature_order(image.shape[:2], self.image, self.tokens_per_slot))
            except image_ops.BadImage as e:
                if self.format != "interleaved":
                    raise
                repairs.append(f"dropped_image/{e.reason}")
                bad.append(position)
                continue
            slots_per_image.append(len(tiles))
            pixels.extend(tiles)
        if bad:  # the document goes on without the bad images
            keep = [i for i in range(len(record["images"])) if i not in bad]
            record["texts"] = [record["texts"][i] for i in keep]
            record["images"] = [record["images"][i] for i in keep]
        return slots_per_image, pixels, orders

    def _frame_images(self, frames: list[bytes], rng) -> list[np.ndarray]:
        """The decoded frames `data.image.video_frames` picks by uniform segment sampling (random within
        segments when training)."""
        indices = image_ops.sample_frame_indices(
            len(frames), int(self.image.get("video_frames", 8)), rng if self.training else None
        )
        max_ratio = float(self.image.max_aspect_ratio)
        return [image_ops.decode(frames[i], max_aspect_ratio=max_ratio) for i in indices]

    def _frames(self, frames: list[bytes], rng) -> list[np.ndarray]:
        """`data.video_frames` frames by uniform segment sampling (random within segments when training)."""
        indices = image_ops.sample_frame_indices(
            len(frames), int(self.image.get("video_frames", 8)), rng if self.training else None
        )
        size, method = int(self.image.size), self.image.get("method", "bicubic")
        max_ratio = float(self.image.max_aspect_ratio)
        return [
            image_ops.normalize(
                image_ops.fixed_resolution(image_ops.decode(frames[i], max_aspect_ratio=max_ratio), size, method),
                self.image.normalization,
            )
            for i in indices
        ]

    def _fit(self, rendered, slots_per_image, pixels, orders, repairs, rng) -> dict[str, Any]:
        ids, predict = np.asarray(rendered.ids), np.asarray(rendered.predict)
        if self.idefics3:  # a tile's placeholders are one contiguous run: tiles are the units fitted
            slots_per_image = [1] * sum(slots_per_image)
        counts = self._placeholders(slots_per_image, pixels, orders)
        spans = fitting.image_spans(ids, self.placeholder_id, counts, self.wrapper_ids)
        interleaved = self.format == "interleaved"
        fitted = fitting.fit(
            ids,
            predict,
            rendered.prefix_mask,
            spans,
            slots_per_image,
            max_tokens=min(self.seq_len, self.window_tokens if interleaved else self.seq_len) + 1,
            max_slots=self.slot_budget
            if self.native
            else min(self.max_images, self.window_images if interleaved else self.max_images),
            rng=rng if interleaved else None,
        )
        if len(fitted.ids) < 2 or not fitted.predict[1:].any():
            return {SKIP: "nothing_to_predict"}
        if fitted.truncated and not interleaved:
            repairs.append("truncated")
        if self.native:
            return self._native_example(fitted, pixels, repairs)
        first_slot = np.cumsum([0] + slots_per_image)
        kept_pixels = [pixels[s] for i in fitted.kept_images for s in range(first_slot[i], first_slot[i + 1])]
        size = int(self.image.size)
        example = {
            "tokens": fitted.ids[:-1].astype(np.int32),
            "targets": fitted.ids[1:].astype(np.int32),
            "loss_mask": fitted.predict[1:].astype(np.float32),
            "images": np.stack(kept_pixels) if kept_pixels else np.zeros((0, size, size, 3), np.float32),
            REPAIRS: repairs,
        }
        if self.with_prefix_mask:
            example["prefix_mask"] = fitted.prefix_mask[:-1]
        if self.with_feature_index:
            example["feature_index"] = self._feature_index(fitted, slots_per_image, orders)[:-1]
        return example

    def _native_example(self, fitted, pixels, repairs) -> dict[str, Any]:
        """A native-resolution example: its tokens, M-RoPE positions [L, 3] (transposed into the batch's [3, L]
        after packing) and its kept images' patches, patch positions and attention groups (1.. per image)."""
        kept = [pixels[i] for i in fitted.kept_images]
        grids = [grid for _, grid in kept]
        tokens = fitted.ids[:-1].astype(np.int32)
        dim = 3 * native_resolution.FRAMES * native_resolution.PATCH**2
        example = {
            "tokens": tokens,
            "targets": fitted.ids[1:].astype(np.int32),
            "loss_mask": fitted.predict[1:].astype(np.float32),
            "mrope_positions": native_resolution.mrope_positions(
                tokens, grids, self.placeholder_id, time_intervals=[self.video_step if g[0] > 1 else 1.0 for g in grids]
            ).T.copy(),
            "patches": np.concatenate([p for p, _ in kept]) if kept else np.zeros((0, dim), np.float32),
            "patch_positions": np.concatenate([native_resolution.patch_positions(g) for g in grids])
            if kept
            else np.zeros((0, 2), np.int32),
            "patch_groups": native_resolution.attention_groups(grids),
            REPAIRS: repairs,
        }
        return example

    def _feature_index(self, fitted, slots_per_image, orders) -> np.ndarray:
        """`feature_index` of the fitted example: its kept images' orders at their placeholders."""
        kept = fitted.kept_images
        slots = [slots_per_image[i] for i in kept]
        return feature_index(fitted.ids, self.placeholder_id, [orders[i] for i in kept], slots, self.tokens_per_slot)


def local_streams(config: ml_collections.ConfigDict, process_index: int, process_count: int) -> tuple[range, int]:
    """(the data streams this process reads, how many streams there are).

    The shuffled records are dealt to `data.streams` streams (0: one per process), each packed and batched on
    its own into `batch_size / streams` rows; process i reads streams i, i + N, ... and its rows are theirs,
    in order. A global batch is therefore the same rows whatever the number of processes, as long as it
    divides `data.streams`.
    """
    count = int(config.data.get("streams", 0)) or process_count
    if count % process_count:
        raise UserError(f"data.streams={count} is not divisible by the {process_count} processes of this run.")
    if config.batch_size % count:
        raise UserError(f"batch_size={config.batch_size} is not divisible by data.streams={count}.")
    return range(process_index, count, process_count), count


def concatenate_rows(batches: list[grain.IterDataset]) -> grain.IterDataset:
    """One stream of batches from several: the i-th batch of each, concatenated row-wise in order."""
    if len(batches) == 1:
        return batches[0]

    def concatenate(parts: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return grain.experimental.ZipIterDataset(batches).map(concatenate)


def records_dataset(
    config: ml_collections.ConfigDict,
    source,
    process_index: int,
    process_count: int,
    repeat: bool,
    seed: int | None = None,
):
    """The shuffled, host-sharded (and repeated) MapDataset of records; `seed` defaults to config.seed."""
    ds = grain.MapDataset.source(source)
    if config.data.get("shuffle", True):
        ds = ds.shuffle(seed=int(config.seed) if seed is None else seed)
    ds = ds[process_index::process_count]
    if repeat:
        ds = ds.repeat(None)
    return ds


class BatchIteratorBase(grain.DatasetIterator):
    """The trainer-facing side of a Grain iterator (`self._iterator`): next, state, skip counts.

    Itself a `grain.DatasetIterator` (with `self._iterator` as its parent), so Grain's orbax checkpoint handler
    saves and restores its state, one file per process."""

    _iterator: grain.DatasetIterator
    _parents: tuple = ()  # until `grain.DatasetIterator.__init__` runs (a constructor that raised earlier)
    _closed = False

    def __init__(self, iterator: grain.DatasetIterator):
        super().__init__(iterator)
        _track(self)

    def close(self) -> None:
        """Stops the Grain worker processes, if any, and frees the batches they had prefetched in shared memory;
        idempotent. A pipeline still open when the interpreter exits is closed then (`_close_open_pipelines`)."""
        self._close(wait=True)

    def _close(self, wait: bool) -> None:
        if self._closed:
            return
        super().close()  # closes `self._iterator` and its parents: the worker stops, its queued batches are unlinked
        if wait:
            _wait_for_shared_memory_release()

    def __del__(self):
        self._close(wait=False)  # garbage collection may run anywhere (even in Grain's threads): never block

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        # From a Grain worker, each array lies in a shared-memory block, unlinked when the array is dropped. The
        # trainer gets copies, so its batch is ordinary memory and the block is freed now: JAX on CPU aliases host
        # arrays without a copy, and a block held by a device array that only the cyclic garbage collector frees
        # outlived Grain's unlinking thread and was reported at exit as "leaked shared_memory objects".
        return {k: np.array(v) if isinstance(v, SharedMemoryArray) else v for k, v in batch.items()}

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)

    def stats(self) -> dict[str, int]:
        """Records kept, skipped and repaired (per reason) so far on this host."""
        return counts_of(self._iterator)


class GrainPipeline(BatchIteratorBase):
    """Iterator of this host's batches (dicts of numpy arrays in the batch format); checkpointable."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        split: str,
        process_index: int = 0,
        process_count: int = 1,
        repeat: bool | None = None,
    ):
        """`repeat` defaults to True for "train" (endless epochs) and False otherwise (one pass)."""
        data = config.data
        self.tokenizer = Tokenizer(data.tokenizer)
        training = split == "train"
        repeat = training if repeat is None else repeat
        mixed = data.get("mixture") is not None
        if mixed:
            components = mixture_components(data, split)
        else:
            components = [
                {"source": make_source(data, split), "weight": 1.0, "template": None, "template_options": None}
            ]
        self.sources = [c["source"] for c in components]
        streams, count = local_streams(config, process_index, process_count)
        rows_per_stream = config.batch_size // count
        preprocessors = [
            Preprocessor(config, self.tokenizer, c["source"].format, training, c["template"], c["template_options"])
            for c in components
        ]
        preprocessor = preprocessors[0]  # with_prefix_mask / with_feature_index: the same for every component
        read = grain.ReadOptions(
            num_threads=int(data.get("read_threads", 2)), prefetch_buffer_size=int(data.get("read_buffer", 64))
        )
        batches = []
        for stream in streams:
            datasets = []
            for k, (c, prep) in enumerate(zip(components, preprocessors)):  # component k: seed + k
                seed = int(config.seed) + k
                ds = records_dataset(config, c["source"], stream, count, repeat=repeat, seed=seed)
                datasets.append(ds.random_map(prep, seed=seed))
            if not mixed:
                ds = datasets[0]
            elif repeat:
                ds = grain.MapDataset.mix(datasets, [c["weight"] for c in components])
            else:
                ds = grain.MapDataset.concatenate(datasets)
            examples = CountSkips(ds.to_iter_dataset(read))
            rows = pack(
                examples,
                int(data.seq_len),
                int(data.max_images),
                num_bins=int(data.get("packing_bins", 32)),
                seed=int(config.seed),
                with_prefix_mask=preprocessor.with_prefix_mask,  # the same for every component (mixture_components)
                with_feature_index=preprocessor.with_feature_index,
                max_patches=preprocessor.slot_budget if preprocessor.native else 0,
            )
            self.rows = rows  # the unbatched rows (of the last stream), for `data_stats`
            batches.append(rows.batch(rows_per_stream, drop_remainder=True))
        self._iterator = iter(in_workers(concatenate_rows(batches), data))
        super().__init__(self._iterator)


_open_pipelines: weakref.WeakSet = weakref.WeakSet()  # pipelines not yet closed, closed at interpreter exit
_exit_hook_registered = False


def _track(pipeline: BatchIteratorBase) -> None:
    """Closes `pipeline` at interpreter exit if it is still open then.

    A batch from a Grain worker (`data.worker_count` > 0) lies in shared memory, unlinked when the batch is
    dropped. A pipeline still referenced at exit (a global, a reference cycle) holds a batch in Grain's prefetch
    thread, dropped only during interpreter teardown, after `multiprocessing`'s exit handler has stopped Grain's
    unlinking thread: Python's resource tracker then reports it as "leaked shared_memory objects". This hook is
    registered after `multiprocessing` registered that handler, so it runs first (atexit runs handlers last-in
    first-out), while the worker and the unlinking thread still run.
    """
    global _exit_hook_registered
    _open_pipelines.add(pipeline)
    if not _exit_hook_registered:
        _exit_hook_registered = True
        atexit.register(_close_open_pipelines)


def _close_open_pipelines() -> None:
    for pipeline in list(_open_pipelines):
        pipeline.close()


def _wait_for_shared_memory_release() -> None:
    """Waits until Grain's background thread has unlinked the shared memory of every batch dropped so far.

    Grain frees the shared memory of a dropped batch on a one-thread pool (`SharedMemoryArray.enable_async_del`),
    first in, first out, and that pool's pending work is discarded at interpreter exit; a no-op run on the same
    pool returns once everything queued before it is done. Only from the main thread: a call from inside the pool
    (garbage collection can run there) would wait for itself."""
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None and threading.current_thread() is threading.main_thread():
        pool.apply(int)


def in_workers(batches: grain.IterDataset, data: ml_collections.ConfigDict) -> grain.IterDataset:
    """`batches` prepared by `data.worker_count` Grain worker processes (`mp_prefetch`; 0: in this process)."""
    workers = int(data.get("worker_count", 0))
    if not workers:
        return batches
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; a library caller never parsed them
        flags.FLAGS.mark_as_parsed()
    return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def counts_of(iterator: grain.DatasetIterator) -> dict[str, int]:
    """The CountSkips counters of a pipeline iterator.

    Read live from the counting stage when it runs in this process; with Grain
    worker processes, from the iterator state (summed over workers), which lags
    by the examples the packer holds.
    """
    stack, live = [iterator], []
    while stack:
        it = stack.pop()
        if isinstance(it, CountSkipsIterator):
            live.append(it.counts)
        else:
            stack.extend(getattr(it, "_parents", ()))
    totals: dict[str, int] = {}
    for counts in live or _find_counts(iterator.get_state()):
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + int(v)
    return totals


def _find_counts(state: Any) -> list[dict[str, int]]:
    """Every CountSkips counter dict inside an iterator state (one per worker process)."""
    if isinstance(state, dict):
        if "counts" in state and isinstance(state["counts"], dict):
            return [state["counts"]]
        return [c for v in state.values() for c in _find_counts(v)]
    if isinstance(state, (list, tuple)):
        return [c for v in state for c in _find_counts(v)]
    return []


def data_stats(config: ml_collections.ConfigDict, split: str = "train", max_rows: int | None = None) -> dict[str, Any]:
    """One pass of the configured pipeline over `split`: counts, fill rates and speed (`vlm-jax data stats`)."""
    import time

    config = ml_collections.ConfigDict(config.to_dict())
    config.data.streams = 1  # every record in one stream
    pipeline = GrainPipeline(config, split, repeat=False)
    iterator = iter(pipeline.rows)
    rows = tokens = slots = examples = 0
    start = time.perf_counter()
    for row in iterator:
        rows += 1
        tokens += int(np.count_nonzero(row["segment_ids"]))
        slots += int(np.count_nonzero(row["patch_segment_ids" if "patches" in row else "image_segment_ids"]))
        examples += int(row["segment_ids"].max())
        if max_rows and rows >= max_rows:
            break
    seconds = time.perf_counter() - start
    counts = counts_of(iterator)
    pipeline.close()  # its worker processes (`data.worker_count`), which this pass over `rows` does not use
    seq_len, max_images = int(config.data.seq_len), int(config.data.max_images)
    if config.data.get("image", {}).get("mode") == "native":  # the image budget is patches, not media slots
        max_images = int(config.data.max_patches)
    stats = {
        "records": counts.get("records", 0) + sum(v for k, v in counts.items() if k.startswith("skipped/")),
        "kept": counts.get("records", 0),
        "skipped": {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("skipped/")},
        "repaired": {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("repaired/")},
        "rows": rows,
        "token_fill": tokens / max(rows * seq_len, 1),
        "image_slot_fill": slots / max(rows * max_images, 1),  # native resolution: patches per data.max_patches
        "examples_per_row": examples / max(rows, 1),
        "rows_per_s": rows / max(seconds, 1e-9),
    }
    if config.data.get("image", {}).get("mode") == "native":
        stats["patch_fill"] = stats["image_slot_fill"]
    return stats
