"""Qwen2-VL and Qwen2.5-VL (`model.name = "qwen2_vl"`): native-resolution patches, 2 x 2 merged, in place of
`<|image_pad|>` tokens, with multimodal RoPE in the LM.

Qwen2-VL (Wang et al. 2024, arXiv:2409.12191): a 675M ViT (32 layers of width 1280, patch 14, 2D RoPE, no
position table) reads each image at (nearly) its own resolution — sides rounded to multiples of 28 px, area
within [min_pixels, max_pixels] — as a variable number of patches; several images (of one example, or of
several packed examples) share one patch sequence per row and attend only within themselves. An MLP merges
each 2 x 2 block of patch tokens into one LM token. The LM (Qwen2) rotates queries and keys by M-RoPE: text
positions count up on all three axes, an image's tokens take (p, p + row, p + column) from the next position p,
and the text after it resumes at p + max(rows, columns) (`data_pipelines/native_resolution.mrope_positions`).
Qwen2.5-VL: the ViT has RMSNorm, a gated SiLU MLP and window attention (112 px windows) in all but four layers.

Batch (beyond the LM's tokens, targets, loss_mask, segment_ids): `positions` [B, 3, L] (per packed example),
`patches` [B, P, 1176], `patch_positions` [B, P, 2], `patch_groups` [B, P] (attention groups: one per image;
0 = padding) and `patch_segment_ids` [B, P] (the example each patch belongs to). The k-th placeholder of an
example takes the k-th merged token of that example's patches (`nn/placement.place_features`, one feature per
slot), so no token ever sees another example's image.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.connectors.token_merge import PatchMerger
from vlm_jax.encoders.native_vit import NativeViT
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.lm.decoder import DecoderLM
from vlm_jax.models import parts, register
from vlm_jax.models.base import Decoding, System
from vlm_jax.models.lm import next_token_loss
from vlm_jax.nn.placement import place_features

PATCH_KEYS = ("patches", "patch_positions", "patch_groups", "patch_segment_ids")


class Qwen2VLModel(nn.Module):
    """(tokens, segment_ids, positions [B, 3, L], patches, patch_positions, patch_groups, patch_segment_ids)
    -> logits [B, L, vocab]. Sows the placeholders left without a merged token ("intermediates", "unplaced")."""

    vision: NativeViT
    merger: PatchMerger
    decoder: DecoderLM
    image_token_id: int

    def encode(self, patches, patch_positions, patch_groups) -> jax.Array:
        """Merged tokens [B, P / merge^2, D_lm], in patch order."""
        return self.merger(self.vision(patches, patch_positions, patch_groups))

    def place(self, tokens, segment_ids, merged, patch_segment_ids):
        """(values [B, L, D], placed [B, L]): each example's merged tokens at its own placeholders, in order."""
        merged_segments = patch_segment_ids[:, :: self.vision.merge**2]
        placeholders = tokens == self.image_token_id
        return place_features(merged[:, :, None], placeholders, segment_ids, merged_segments)

    def __call__(self, tokens, segment_ids, positions, patches, patch_positions, patch_groups, patch_segment_ids):
        merged = self.encode(patches, patch_positions, patch_groups)
        values, placed = self.place(tokens, segment_ids, merged, patch_segment_ids)
        self.sow("intermediates", "unplaced", jnp.sum((tokens == self.image_token_id) & (segment_ids > 0) & ~placed))
        return self.decoder(tokens, segment_ids, positions, features=values, feature_mask=placed)


@register("qwen2_vl")
class Qwen2VL(System):
    """Native-resolution ViT -> 2 x 2 patch merger -> merged tokens at `<|image_pad|>` placeholders of an M-RoPE
    Qwen2 LM."""

    fusion = "in_sequence"

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        parts.check_lm_settings(m.lm)
        if not m.lm.get("mrope_sections"):
            raise ConfigError("model.lm.mrope_sections must be set for qwen2_vl (M-RoPE over 3 position axes).")
        vision = NativeViT(**m.vision.to_dict())
        self.module = Qwen2VLModel(
            vision=vision,
            merger=PatchMerger(int(m.lm.embed_dim), vision.merge, **m.merger.to_dict()),
            decoder=DecoderLM(**m.lm.to_dict()),
            image_token_id=int(m.image_token_id),
        )
        self.seq_len = int(config.data.seq_len)
        self.max_patches = int(config.data.max_patches)
        block = vision.merge**2
        if self.max_patches % block:
            raise ConfigError(
                f"data.max_patches {self.max_patches} must be a multiple of {block} (whole merge blocks)."
            )

    @property
    def image_tokens(self) -> int:
        """Native resolution has no fixed count per image: each image's is its merged grid's size."""
        return 0

    # ---------------------------------------------------------------- training

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape, vision = (batch_size, self.seq_len), self.module.vision
        merged = self.max_patches // vision.merge**2
        tokens = np.zeros(shape, np.int32)
        tokens[:, : min(self.seq_len, merged)] = self.module.image_token_id
        return {
            "tokens": tokens,
            "targets": np.zeros(shape, np.int32),
            "loss_mask": np.zeros(shape, np.float32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), (batch_size, 3, self.seq_len)).copy(),
            "patches": np.zeros((batch_size, self.max_patches, vision.patch_dim), np.float32),
            "patch_positions": np.zeros((batch_size, self.max_patches, 2), np.int32),
            "patch_groups": np.ones((batch_size, self.max_patches), np.int32),
            "patch_segment_ids": np.ones((batch_size, self.max_patches), np.int32),
        }

    @staticmethod
    def _args(batch):
        return [batch[k] for k in ("tokens", "segment_ids", "positions", *PATCH_KEYS)]

    def init(self, rng, batch):
        return self.module.init(rng, *self._args(batch))["params"]

    def logits(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """[B, L, vocab] float32 logits."""
        return self.module.apply({"params": params}, *self._args(batch))

    def loss(self, params, batch):
        logits, state = self.module.apply({"params": params}, *self._args(batch), mutable=["intermediates"])
        loss, weight, metrics = next_token_loss(logits, batch)
        unplaced = state["intermediates"]["unplaced"][0]
        metrics["unplaced_image_tokens"] = unplaced.astype(jnp.float32) * weight / batch["tokens"].shape[0]
        return loss, weight, metrics

    def flops_per_example(self) -> float:
        """Training FLOPs of one row with `data.max_patches` patches (as `InSequenceSystem`, `parts.training_flops`:
        vision encoder, merger, LM, following `optim.freeze`)."""
        m, trains = self.module, parts.trained(self)
        p = self.max_patches
        args = (
            jax.ShapeDtypeStruct((1, p, m.vision.patch_dim), jnp.float32),
            jax.ShapeDtypeStruct((1, p, 2), jnp.int32),
            jax.ShapeDtypeStruct((1, p), jnp.int32),
        )
        vision = parts.forward_flops(m.vision, *args)
        tokens = jax.ShapeDtypeStruct((1, p, m.vision.width), jnp.float32)
        merger = parts.forward_flops(m.merger, tokens)
        chain = [(vision, trains("vision")), (merger, trains("merger"))]
        return parts.training_flops(chain + parts.decoder_chain(m.decoder, "decoder", trains, self.seq_len))

    def tokens_in(self, batch):
        return int(np.count_nonzero(batch["segment_ids"]))

    def evaluate(self, trainer, params) -> dict[str, float]:
        """The generative evaluations of `config.eval_tasks` (`evaluators.generative.evaluate_system`)."""
        from vlm_jax.evaluators import generative

        return generative.evaluate_system(self, params, trainer.config)

    # ---------------------------------------------------------------- generation

    @functools.cached_property
    def _placed_features(self):
        def run(params, tokens, segment_ids, patches, patch_positions, patch_groups, patch_segment_ids):
            variables = {"params": params}
            merged = self.module.apply(variables, patches, patch_positions, patch_groups, method=Qwen2VLModel.encode)
            return self.module.apply(
                variables, tokens, segment_ids, merged, patch_segment_ids, method=Qwen2VLModel.place
            )

        return jax.jit(run)

    def decoding(self, params, batch, length):
        """For `vlm_jax.generate`: the M-RoPE LM with the prompt's merged image tokens at its placeholders (the
        ViT runs once); `batch["positions"]` are the prompt's [B, 3, L] M-RoPE positions (`generate.batch_of`)."""
        values, placed = self._placed_features(
            params, batch["tokens"], batch["segment_ids"], *(batch[k] for k in PATCH_KEYS)
        )
        return Decoding(self.module.decoder, params["decoder"], {"features": values, "feature_mask": placed}, {}, {})

    # ---------------------------------------------------------------- vlm-jax forward

    def forward(self, params, inputs):
        """transformers-style inputs -> logits: input_ids [B, L], optional attention_mask [B, L] (left padding),
        pixel_values [patches, 1176] with image_grid_thw [images, 3] and pixel_values_videos with
        video_grid_thw [videos, 3] (every image's / video's patches in batch order, as Qwen2-VL's processors give
        them), Qwen2.5-VL's second_per_grid_ts [videos]; an optional mm_token_type_ids (1 image, 2 video) is
        checked against the placeholders. Positions are M-RoPE's, computed per row on its real tokens
        (`native_resolution.mrope_positions`), as transformers' `get_rope_index` does; video placeholders become
        image placeholders for the model (their embeddings are replaced by the features either way)."""
        from data_pipelines import native_resolution as nr

        tokens, present = parts.text_inputs(inputs, self.module.decoder.vocab_size)
        known = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
        known |= {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
        extra = sorted(set(inputs) - known)
        if extra:
            raise UserError(f"the {self.config.model.name} system does not read the inputs {', '.join(extra)}.")
        m = self.config.model
        image_id, video_id, merge = (
            self.module.image_token_id,
            int(m.get("video_token_id", -1)),
            self.module.vision.merge,
        )
        kinds = {"image": image_id, "video": video_id}
        if "mm_token_type_ids" in inputs:
            types = np.asarray(inputs["mm_token_type_ids"])
            for kind, code in (("image", 1), ("video", 2)):
                if not np.array_equal((types == code) & present, (tokens == kinds[kind]) & present):
                    raise UserError(
                        f"mm_token_type_ids marks other tokens as {kind} tokens than the {kind} placeholders."
                    )
        queues = {}
        for kind, pixels_key, grid_key in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            grids = [tuple(int(v) for v in g) for g in np.asarray(inputs.get(grid_key, np.zeros((0, 3))))]
            pixels = np.asarray(inputs.get(pixels_key, np.zeros((0, self.module.vision.patch_dim))), np.float32)
            if sum(t * h * w for t, h, w in grids) != len(pixels):
                raise UserError(f"{pixels_key} has {len(pixels)} patches; {grid_key} asks for another number.")
            starts = np.cumsum([0] + [t * h * w for t, h, w in grids])
            queues[kind] = [(pixels[starts[i] : starts[i + 1]], g) for i, g in enumerate(grids)]
        if queues["video"] and video_id < 0:
            raise UserError("this checkpoint's config has no model.video_token_id, so it cannot place videos.")
        per_second = float(m.get("video_tokens_per_second", 0))  # Qwen2.5-VL: absolute time ids
        seconds = list(np.asarray(inputs.get("second_per_grid_ts", np.ones(len(queues["video"])))).reshape(-1))
        intervals = {
            "image": [1.0] * len(queues["image"]),
            "video": [s * per_second if per_second else 1.0 for s in seconds],
        }
        taken = {"image": 0, "video": 0}
        rows, width = tokens.shape
        model_tokens = np.where((tokens == video_id) & present, image_id, tokens) if video_id >= 0 else tokens
        positions = np.zeros((rows, 3, width), np.int32)
        per_row = []
        for r in range(rows):
            real = np.flatnonzero(present[r])
            row, items, steps, i = tokens[r, real], [], [], 0
            while i < len(row):
                kind = next((k for k, v in kinds.items() if row[i] == v), None)
                j = i + 1
                while j < len(row) and row[j] == row[i]:
                    j += 1
                need = j - i if kind else 0
                while need > 0 and taken[kind] < len(queues[kind]):
                    items.append(queues[kind][taken[kind]])
                    steps.append(intervals[kind][taken[kind]])
                    need -= nr.merged_tokens(items[-1][1], merge)
                    taken[kind] += 1
                if need != 0:
                    raise UserError(f"row {r}'s {kind} placeholders do not add up to whole {kind}s of their grids.")
                i = j
            grids = [g for _, g in items]
            positions[r][:, real] = nr.mrope_positions(model_tokens[r, real], grids, image_id, merge, steps)
            per_row.append((model_tokens[r], items))
        for kind, queue in queues.items():
            if taken[kind] != len(queue):
                raise UserError(f"the inputs hold {len(queue)} {kind}s; the placeholders take {taken[kind]}.")
        batch = nr.row_inputs(per_row)
        batch.update(tokens=model_tokens, segment_ids=present.astype(np.int32), positions=positions)
        return {"logits": np.asarray(jax.jit(self.logits)(params, batch))}
