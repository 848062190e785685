"""Fuyu (`model.name = "fuyu"`): raw image patches, one linear map, straight into a Persimmon decoder.

Fuyu-8B (Adept, blog "Fuyu-8B: A Multimodal Architecture for AI Agents",
2023-10-17; transformers' `FuyuForCausalLM`) has no vision encoder: an image
is cut into 30 x 30 patches in raster order, each patch's pixels (flattened
as (row, column, channel), `encoders/patch.py`) go through one linear layer
with a bias (`vision_embed_tokens`) to the LM width, and those embeddings take
the places of the image placeholder tokens (`|SPEAKER|`) in the token stream,
with an image-newline token (`|NEWLINE|`) after each row of patches. The LM
is Persimmon-8B (LayerNorm, partial rotary, per-head query/key LayerNorm,
squared-ReLU MLP; `lm/decoder.py` options).

Token layout. `FuyuProcessor` scales an image down to fit its canvas
(keeping the aspect ratio), pads it, and writes, for the image's own
`rows` x `cols` patches (ceil(h / 30) x ceil(w / 30)), `(|SPEAKER| x cols,
|NEWLINE|) x rows` then `<s>`. Here every image slot is the whole square
canvas of `model.image_size` pixels (`data.image.mode="fuyu"`,
`data_pipelines/pipeline.py::fuyu_canvas`), whose patches are the slot's
features (`model.image_tokens` = (image_size / patch_size)^2), and the data
names each placeholder's feature (`feature_index`, as for LLaVA-NeXT): a patch
of the canvas, or -1 for the newline that ends each row
(`pipeline.fuyu_feature_order`). The data pipeline keeps each image's
placeholders one contiguous run (`data_pipelines/fitting.py` never splits an
image), so the newlines are placeholders too, and the model gives them the
`|NEWLINE|` token (`FuyuModel`): the LM sees exactly Fuyu's sequence, with a
variable grid per image. `vlm-jax forward` maps transformers' `input_ids`
(with real `|NEWLINE|` ids) and patches to this layout.

What differs from Fuyu: the canvas is square (Fuyu-8B's processor fits
images into 1080 x 1920), so a wide image is scaled to the square's width.

Everything else — placement of each packed example's patches at its own
placeholders (`nn/placement.py`), the loss, evaluation, starting parts from
checkpoints — is `InSequenceSystem`'s.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.encoders.patch import PatchEmbed, unpatchify
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.lm.decoder import DecoderLM
from vlm_jax.models import parts, register
from vlm_jax.models.base import Decoding, System
from vlm_jax.models.in_sequence import InSequenceSystem
from vlm_jax.nn.placement import place_by_index


class FuyuModel(nn.Module):
    """(tokens, segment_ids, positions, images, image_segment_ids, feature_index) -> logits [B, L, vocab].

    Each image slot [H, W, 3] (a canvas) gives its patch embeddings (`patch_embed`); a placeholder whose
    `feature_index` is i >= 0 takes patch i of its own example's slots (`nn/placement.place_by_index`), one
    whose index is -1 becomes the `newline_token_id` token. Sows the placeholders that found no patch
    ("intermediates", "unplaced"), as `InSequenceModel` does."""

    patch_embed: PatchEmbed
    decoder: DecoderLM
    image_token_id: int
    newline_token_id: int

    def encode_images(self, images: jax.Array) -> jax.Array:
        """images [B, M, H, W, 3] -> patch embeddings [B, M, (H / p) * (W / p), D_lm]."""
        return self.patch_embed(images)

    def place(self, tokens, segment_ids, image_segment_ids, features, feature_index):
        """(values [B, L, D], placed [B, L], newline [B, L]): each example's patch embeddings at its own patch
        placeholders, as `feature_index` names them, and the placeholders that stand for the newline token."""
        placeholders = (tokens == self.image_token_id) & (segment_ids > 0)
        newline = placeholders & (feature_index == -1)
        values, placed = place_by_index(
            features, placeholders & ~newline, segment_ids, image_segment_ids, feature_index
        )
        return values, placed, newline

    def __call__(self, tokens, segment_ids, positions, images, image_segment_ids, feature_index):
        features = self.encode_images(images)
        values, placed, newline = self.place(tokens, segment_ids, image_segment_ids, features, feature_index)
        patch = (tokens == self.image_token_id) & (segment_ids > 0) & ~newline
        self.sow("intermediates", "unplaced", jnp.sum(patch & ~placed))
        tokens = jnp.where(newline, self.newline_token_id, tokens)
        return self.decoder(tokens, segment_ids, positions, features=values, feature_mask=placed)


@register("fuyu")
class Fuyu(InSequenceSystem):
    """Linear patch embeddings (no vision encoder) at the `|SPEAKER|` placeholders of a Persimmon LM, a
    `|NEWLINE|` after each row of an image's patches.

    Config (`config.model`): `patch_size`, `image_size` (the square canvas every image slot is), `lm`
    (DecoderLM fields), `image_token_id`, `newline_token_id`, `image_tokens` (= (image_size / patch_size)^2,
    the canvas' patches: the features of a slot), optionally `lm_checkpoint` (an `lm`, e.g. `vlm-jax
    convert-hf` of a Persimmon) and `stage_checkpoint` (an earlier fuyu run or a converted Fuyu). The data
    needs `data.template="fuyu"` and `data.image.mode="fuyu"`."""

    def __init__(self, config):
        System.__init__(self, config)  # not InSequenceSystem's, which builds a vision encoder and a connector
        m = config.model
        parts.check_lm_settings(m.lm)
        if m.lm.get("cross_attn_every"):
            raise ConfigError("model.lm.cross_attn_every must be 0 for the fuyu system (no cross-attention).")
        for key in ("encoder", "connector", "vision_checkpoint"):
            if m.get(key):
                raise ConfigError(f"model.{key} has no meaning for the fuyu system (its patches go straight in).")
        template, mode = config.data.get("template"), config.data.get("image", {}).get("mode")
        if template != "fuyu" or mode != "fuyu":
            raise ConfigError(
                "the fuyu system needs data.template 'fuyu' and data.image.mode 'fuyu' (its image-row layout); "
                f"got {template!r} and {mode!r}."
            )
        patch, size = int(m.patch_size), int(m.image_size)
        if patch < 1 or size % patch:
            raise ConfigError(f"model.image_size {size} is not a whole number of {patch}-pixel patches.")
        if int(config.data.image.get("size", size)) != size:
            raise ConfigError(f"data.image.size {config.data.image.size} is not the model's canvas, {size} px.")
        if int(m.image_tokens) != (size // patch) ** 2:
            raise ConfigError(
                f"model.image_tokens is {m.image_tokens}, but a {size} px canvas holds {(size // patch) ** 2} "
                f"patches of {patch} px."
            )
        lm = m.lm.to_dict()
        self.module = FuyuModel(
            patch_embed=PatchEmbed(int(lm["embed_dim"]), patch, lm.get("dtype", "float32"), name="patch_embed"),
            decoder=DecoderLM(**lm),
            image_token_id=int(m.image_token_id),
            newline_token_id=int(m.newline_token_id),
        )
        self.patch_size, self.image_size = patch, size
        self.seq_len = int(config.data.seq_len)
        self.max_images = int(config.data.get("max_images", 1))
        self.prefix_lm = False
        self.indexed = True  # the data names each placeholder's patch (or -1: the newline)

    def flops_per_example(self) -> float:
        """Training FLOPs per row (`parts.training_flops`): the patch embedding (every image slot's whole canvas),
        then the LM (`parts.decoder_chain`), each following `optim.freeze`."""
        trains = parts.trained(self)
        images = jax.ShapeDtypeStruct((self.max_images, self.image_size, self.image_size, 3), jnp.float32)
        chain = [(parts.forward_flops(self.module.patch_embed, images), trains("patch_embed"))]
        return parts.training_flops(chain + parts.decoder_chain(self.module.decoder, "decoder", trains, self.seq_len))

    # ---------------------------------------------------------------- generation

    @functools.cached_property
    def _prompt_features(self):
        def run(params, tokens, segment_ids, image_segment_ids, images, feature_index):
            variables = {"params": params}
            features = self.module.apply(variables, images, method=FuyuModel.encode_images)
            values, placed, newline = self.module.apply(
                variables, tokens, segment_ids, image_segment_ids, features, feature_index, method=FuyuModel.place
            )
            # The newline token's embedding as the decoder gives it (after its embedding scale, where features go).
            decoder = self.module.decoder
            row = params["decoder"]["embed"]["embedding"][self.module.newline_token_id]
            row = row * (decoder.embed_dim**0.5 if decoder.embed_scale else 1.0)
            values = jnp.where(newline[..., None], row.astype(values.dtype), values)
            return values, placed | newline

        return jax.jit(run)

    def decoding(self, params, batch, length):
        """For `vlm_jax.generate`: the LM with the prompt's patch embeddings at its patch placeholders and the
        newline token's embedding at its newline placeholders (the images embedded once)."""
        if "feature_index" not in batch:
            raise UserError("prompts for a fuyu model need a feature_index (vlm_jax/generate.py makes it).")
        values, placed = self._prompt_features(
            params,
            batch["tokens"],
            batch["segment_ids"],
            batch["image_segment_ids"],
            batch["images"],
            batch["feature_index"],
        )
        return Decoding(self.module.decoder, params["decoder"], {"features": values, "feature_mask": placed}, {}, {})

    # ---------------------------------------------------------------- vlm-jax forward

    def forward(self, params, inputs):
        """transformers' `FuyuForCausalLM` inputs -> logits: `input_ids` [B, L] as `FuyuProcessor` writes them
        (per image of rows x cols patches `(|SPEAKER| x cols, |NEWLINE|) x rows`, each image its own grid),
        `pixel_values` (or the older name `image_patches`): the patches of every image of the batch in order,
        [patches, p * p * 3] or [images, n, p * p * 3]; optional `attention_mask` (left padding) and
        `position_ids`. An image may have up to image_size / patch_size rows and columns of patches."""
        tokens, present = parts.text_inputs(inputs, self.module.decoder.vocab_size, ("input_ids",))
        known = {"input_ids", "pixel_values", "image_patches", "attention_mask", "position_ids"}
        extra = sorted(set(inputs) - known)
        if extra:
            raise UserError(f"the fuyu system does not read the inputs {', '.join(extra)}.")
        if ("pixel_values" in inputs) == ("image_patches" in inputs):
            raise UserError("give the image patches as exactly one of pixel_values or image_patches.")
        patches = np.asarray(inputs.get("pixel_values", inputs.get("image_patches")), np.float32)
        positions = inputs.get("position_ids")
        if positions is None:
            positions = np.maximum(np.cumsum(present, axis=1) - 1, 0)
        batch = {
            "segment_ids": present.astype(np.int32),
            "positions": np.asarray(positions, np.int32),
            **self._images_by_row(tokens, present, patches),
        }
        return {"logits": np.asarray(jax.jit(self.logits)(params, batch))}

    def _images_by_row(self, tokens: np.ndarray, present: np.ndarray, patches: np.ndarray) -> dict[str, np.ndarray]:
        """tokens (each image's `|NEWLINE|` ids turned into placeholders), feature_index, images [B, M, S, S, 3]
        (each image's patches at the top left of its canvas) and image_segment_ids from transformers' inputs."""
        m, p, side = self.module, self.patch_size, self.image_size // self.patch_size
        if patches.shape[-1] != p * p * 3:
            raise UserError(f"each image patch must hold {p} x {p} x 3 = {p * p * 3} values; got {patches.shape}.")
        flat = patches.reshape(-1, p * p * 3)
        grids = [
            _image_grids(tokens[r], present[r], m.image_token_id, m.newline_token_id, r) for r in range(len(tokens))
        ]
        for rows, cols in (g for row in grids for g in row):
            if rows > side or cols > side:
                raise UserError(
                    f"an image of {rows} x {cols} patches does not fit this model's canvas of {side} x {side} "
                    f"patches ({self.image_size} px)."
                )
        needed = sum(rows * cols for row in grids for rows, cols in row)
        if len(flat) != needed:
            raise UserError(f"the inputs hold {len(flat)} image patches; the image tokens ask for {needed}.")
        slots = max(1, max(len(row) for row in grids))
        images = np.zeros((len(tokens), slots, self.image_size, self.image_size, 3), np.float32)
        ids = np.zeros((len(tokens), slots), np.int32)
        index = np.zeros(tokens.shape, np.int32)
        ours = tokens.copy()
        start = 0
        for r, row in enumerate(grids):
            spots = np.flatnonzero(present[r] & np.isin(tokens[r], (m.image_token_id, m.newline_token_id)))
            orders = []
            for i, (rows, cols) in enumerate(row):  # the image's patches at the top left of its canvas
                images[r, i, : rows * p, : cols * p] = unpatchify(flat[start : start + rows * cols], rows, cols, p)
                ids[r, i] = 1
                start += rows * cols
                grid = i * side * side + np.arange(rows)[:, None] * side + np.arange(cols)[None, :]
                orders.append(np.concatenate([grid, np.full((rows, 1), -1)], axis=1).reshape(-1))
            if orders:
                index[r, spots] = np.concatenate(orders)
                ours[r, spots] = m.image_token_id
        return {"tokens": ours, "feature_index": index, "images": images, "image_segment_ids": ids}


def _image_grids(tokens: np.ndarray, present: np.ndarray, image_id: int, newline_id: int, row: int) -> list:
    """[(rows, cols), ...] of the images in one row of transformers' Fuyu ids: each image a maximal run of
    `(image_id x cols, newline_id) x rows`. Any other use of the two ids is a UserError."""
    marks = np.where(present & (tokens == image_id), 1, np.where(present & (tokens == newline_id), 2, 0))
    grids, i = [], 0
    while i < len(marks):
        if not marks[i]:
            i += 1
            continue
        j = i
        while j < len(marks) and marks[j]:
            j += 1
        run = marks[i:j]
        ends = np.flatnonzero(run == 2)
        cols = int(ends[0]) if len(ends) else 0
        rows = len(ends)
        if cols < 1 or not np.array_equal(run, np.tile(np.r_[np.ones(cols, int), 2], rows)):
            raise UserError(
                f"row {row}: image tokens ({image_id}) and newlines ({newline_id}) must come as FuyuProcessor writes "
                "them: rows of the same number of image tokens, each row ended by a newline."
            )
        grids.append((rows, cols))
        i = j
    return grids
