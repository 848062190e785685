"""In-sequence vision-language models: image features take the places of placeholder tokens in the LM's input.

    images [B, M, H, W, 3] -> vision encoder (a tapped layer, class token dropped) -> connector
      -> features [B, M, n, D_lm] -> the k-th placeholder of each packed example takes its k-th feature
      (`nn/placement.py`) -> DecoderLM (causal within each example, or prefix-LM with `prefix_mask`)

`InSequenceSystem` holds everything such a system shares with the trainer,
`generate`, the evaluators and `vlm-jax forward`; a family (LLaVA,
PaliGemma, ...) is a subclass in its own file that sets its defaults and,
where it differs, overrides a method (`init`, `pretrained`, `forward` inputs).

Config (`config.model`): `encoder` ("vit") and `encoder_kwargs` (its fields),
`feature_layer` (a ViT block index, e.g. -2 for LLaVA's penultimate layer;
None: the encoder's final tokens), `drop_class_token`, `connector` (a dict:
`kind` — linear, mlp, concat, pixel_shuffle_mlp or xattn_resampler, see `connector` — plus its fields), `lm`
(DecoderLM fields), `image_token_id`, `image_tokens` (features per image slot:
the data pipeline writes that many placeholders per slot), `image_size`,
`image_newline` (LLaVA-NeXT: with `data.image.anyres_layout="llava_next"` the
batch's `feature_index` says where each feature goes), and optionally
`lm_checkpoint` / `vision_checkpoint` (an `lm` and a `vision_encoder` or
`dual_encoder` checkpoint that start those parts) and `stage_checkpoint` (an
earlier stage of the same system). What trains is the optimizer's business
(`optim.freeze`, regexes over `vision/`, `connector/`, `decoder/`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import templates
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.lm.decoder import DecoderLM
from vlm_jax.models import parts
from vlm_jax.models.base import Decoding, System
from vlm_jax.models.lm import next_token_loss
from vlm_jax.nn.placement import place_by_index, place_features


def connector(kind: str, out_dim: int, kwargs: dict) -> nn.Module:
    """The connector `kind` mapping vision features to the LM width `out_dim` (`vlm_jax/connectors/`)."""
    from vlm_jax.connectors import projector, token_merge, xattn_resampler

    kinds = {
        "linear": projector.LinearProjector,  # LLaVA v1, PaliGemma
        "mlp": projector.MLPProjector,  # LLaVA-1.5 "mlp2x_gelu" (depth 2)
        "concat": token_merge.ConcatProjector,  # MiniGPT-v2: 4 adjacent tokens concatenated, then linear
        "pixel_shuffle_mlp": token_merge.PixelShuffleMLP,  # InternVL: 2x2 blocks to channels, LayerNorm, 2-layer MLP
        "pixel_shuffle_linear": token_merge.PixelShuffleLinear,  # Idefics3: 2x2 blocks to channels, bias-free linear
        "xattn_resampler": xattn_resampler.CrossAttentionResampler,  # Qwen-VL: 256 learned queries, one attention
    }
    if kind not in kinds:
        raise ConfigError(f"model.connector.kind {kind!r} is not one of {', '.join(kinds)}.")
    return kinds[kind](out_dim=out_dim, name="connector", **kwargs)


class InSequenceModel(nn.Module):
    """(tokens, segment_ids, positions, images, image_segment_ids[, prefix_mask]) -> logits [B, L, vocab].

    Sows the number of placeholders that found no image feature ("intermediates", "unplaced"): the trainer
    reports it, so a data/model mismatch in image tokens is visible, never silent."""

    vision: nn.Module
    connector: nn.Module
    decoder: DecoderLM
    image_token_id: int
    feature_layer: int | None = -2
    drop_class_token: bool = True
    image_newline: bool = False  # LLaVA-NeXT: a learned feature after each row of an image's grid

    def encode_images(self, images: jax.Array) -> jax.Array:
        """images [B, M, H, W, 3] -> features [B, M, n, D_lm] (the connector's outputs per slot)."""
        b, m = images.shape[:2]
        out = self.vision(images.reshape((b * m,) + images.shape[2:]))
        features = out["tokens"] if self.feature_layer is None else out["taps"][self.feature_layer]
        if self.drop_class_token:
            features = features[:, 1:]
        features = self.connector(features)
        return features.reshape((b, m) + features.shape[1:])

    @nn.compact
    def place(self, tokens, segment_ids, image_segment_ids, features, feature_index=None):
        """(values [B, L, D], placed [B, L]): each example's features at its own placeholders, in order, or
        where `feature_index` says (LLaVA-NeXT, with its `image_newline` feature)."""
        placeholders = tokens == self.image_token_id
        if feature_index is None:
            return place_features(features, placeholders, segment_ids, image_segment_ids)
        newline = None
        if self.image_newline:
            init = nn.with_logical_partitioning(nn.initializers.normal(1.0 / features.shape[-1] ** 0.5), ("embed",))
            newline = self.param("image_newline", init, (features.shape[-1],))
        return place_by_index(features, placeholders, segment_ids, image_segment_ids, feature_index, newline)

    def __call__(self, tokens, segment_ids, positions, images, image_segment_ids, prefix_mask=None, feature_index=None):
        features = self.encode_images(images)
        values, placed = self.place(tokens, segment_ids, image_segment_ids, features, feature_index)
        placeholders = (tokens == self.image_token_id) & (segment_ids > 0)
        self.sow("intermediates", "unplaced", jnp.sum(placeholders & ~placed))
        return self.decoder(
            tokens, segment_ids, positions, prefix_mask=prefix_mask, features=values, feature_mask=placed
        )


class InSequenceSystem(System):
    """Next-token prediction on packed image-text rows whose image placeholders take the image features (batch:
    tokens, targets, loss_mask, segment_ids, positions, images, image_segment_ids, and prefix_mask under a
    prefix-LM template). Subclasses register a name and may override what differs (PaliGemma: `init`, `pretrained`)."""

    fusion = "in_sequence"

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        parts.check_lm_settings(m.lm)
        if m.lm.get("cross_attn_every"):
            raise ConfigError(f"model.lm.cross_attn_every must be 0 for the {m.name} system (no cross-attention).")
        connector_args = dict(m.connector)
        kind = connector_args.pop("kind")
        feature_layer = m.get("feature_layer", -2)
        encoder_kwargs = m.encoder_kwargs.to_dict()
        if feature_layer is not None:
            encoder_kwargs["taps"] = (int(feature_layer),)
        self.module = InSequenceModel(
            vision=parts.vision_encoder(m.encoder, encoder_kwargs),
            connector=connector(kind, int(m.lm.embed_dim), connector_args),
            decoder=DecoderLM(**m.lm.to_dict()),
            image_token_id=int(m.image_token_id),
            feature_layer=None if feature_layer is None else int(feature_layer),
            drop_class_token=bool(m.get("drop_class_token", True)),
            image_newline=bool(m.get("image_newline", False)),
        )
        self.image_size = int(m.image_size)
        self.seq_len = int(config.data.seq_len)
        self.max_images = int(config.data.get("max_images", 1))
        template = config.data.get("template")
        self.prefix_lm = bool(template) and templates.uses_prefix_mask(template)
        image = config.data.get("image", {})
        # LLaVA-NeXT's layout: the data names each placeholder's feature (data_pipelines/pipeline.py).
        self.indexed = image.get("mode") == "anyres" and image.get("anyres_layout") == "llava_next"
        features = self.features_per_image()
        if int(m.image_tokens) != features:
            raise ConfigError(
                f"model.image_tokens is {m.image_tokens}, but each image gives {features} features "
                f"(image_size {self.image_size}, its encoder and connector)."
            )

    def features_per_image(self) -> int:
        """How many features one image slot gives (abstract evaluation of the encoder and connector)."""
        images = jax.ShapeDtypeStruct((1, 1, self.image_size, self.image_size, 3), jnp.float32)
        method = functools.partial(self.module.apply, method=InSequenceModel.encode_images)
        variables = jax.eval_shape(
            functools.partial(self.module.init, method=InSequenceModel.encode_images), jax.random.key(0), images
        )
        return int(jax.eval_shape(method, variables, images).shape[2])

    # ---------------------------------------------------------------- training

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (batch_size, self.seq_len)
        tokens = np.zeros(shape, np.int32)
        tokens[:, : min(self.seq_len, self.image_tokens)] = self.module.image_token_id
        batch = {
            "tokens": tokens,
            "targets": np.zeros(shape, np.int32),
            "loss_mask": np.zeros(shape, np.float32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), shape).copy(),
            "images": np.zeros((batch_size, self.max_images, self.image_size, self.image_size, 3), np.float32),
            "image_segment_ids": np.ones((batch_size, self.max_images), np.int32),
        }
        if self.prefix_lm:
            batch["prefix_mask"] = np.zeros(shape, bool)
        if self.indexed:
            batch["feature_index"] = np.zeros(shape, np.int32)
            batch["feature_index"][:, : min(self.seq_len, self.image_tokens)] = np.arange(
                min(self.seq_len, self.image_tokens)
            )
        return batch

    def _inputs(self, batch):
        """The module's positional inputs and its keyword inputs (prefix_mask, feature_index) from a batch."""
        args = [batch[k] for k in ("tokens", "segment_ids", "positions", "images", "image_segment_ids")]
        kwargs = {k: batch[k] for k, on in (("prefix_mask", self.prefix_lm), ("feature_index", self.indexed)) if on}
        return args, kwargs

    def init(self, rng, batch):
        args, kwargs = self._inputs(batch)
        return self.module.init(rng, *args, **kwargs)["params"]

    def logits(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """[B, L, vocab] float32 logits."""
        args, kwargs = self._inputs(batch)
        return self.module.apply({"params": params}, *args, **kwargs)

    def loss(self, params, batch):
        args, kwargs = self._inputs(batch)
        logits, state = self.module.apply({"params": params}, *args, **kwargs, mutable=["intermediates"])
        loss, weight, metrics = next_token_loss(logits, batch)
        # Placeholders without a feature per row (times the weight, which the trainer divides by): should be 0.
        unplaced = state["intermediates"]["unplaced"][0]
        metrics["unplaced_image_tokens"] = unplaced.astype(jnp.float32) * weight / batch["tokens"].shape[0]
        return loss, weight, metrics

    def flops_per_example(self) -> float:
        """Training FLOPs per row from each part's forward matmul FLOPs (`vlm_jax.flops`), following
        `optim.freeze` (`parts.training_flops`): from the input up, the vision encoder, the connector, then the
        LM (`parts.decoder_chain`: embeddings, layers, head). A trained part costs 3x its forward; a frozen part
        2x when a trained part lies below it (its input gradient), else 1x: a frozen vision encoder 1x, a frozen
        LM 2x when the connector trains (LLaVA stage 1)."""
        m = self.module
        trains = parts.trained(self)
        images = jax.ShapeDtypeStruct((self.max_images, self.image_size, self.image_size, 3), jnp.float32)
        vision = parts.forward_flops(m.vision, images)
        out = parts.output_shape(m.vision, images)
        tokens = out["tokens"] if m.feature_layer is None else out["taps"][m.feature_layer]
        if m.drop_class_token:
            tokens = jax.ShapeDtypeStruct((tokens.shape[0], tokens.shape[1] - 1, tokens.shape[2]), tokens.dtype)
        connector = parts.forward_flops(m.connector, tokens)
        chain = [(vision, trains("vision")), (connector, trains("connector"))]
        return parts.training_flops(chain + parts.decoder_chain(m.decoder, "decoder", trains, self.seq_len))

    def tokens_in(self, batch):
        return int(np.count_nonzero(batch["segment_ids"]))

    def pretrained(self, params: dict, mesh: Any = None, rules: Any = None) -> dict:
        """`params` with parts started from checkpoints when training starts fresh: `model.stage_checkpoint` (an
        earlier stage of this system, e.g. LLaVA's stage 1: every part it has starts there, except those the
        next two fill), `model.lm_checkpoint` (an `lm`) and `model.vision_checkpoint` (a `vision_encoder`, or a
        `dual_encoder`'s image tower); "" skips one. Each is checked against the model's shapes, then read
        straight into the shardings training gives the part on `mesh` by `rules` (`parts.targets`; default: the
        config's), never through the host as a whole."""
        m = self.config.model
        target = parts.targets(self, mesh, rules)
        stage, reads = None, {}  # every checkpoint is checked before any is read
        if m.get("stage_checkpoint"):
            skip = tuple(k for k, key in (("decoder", "lm_checkpoint"), ("vision", "vision_checkpoint")) if m.get(key))
            stage = parts.load_stage(m.stage_checkpoint, m.name, target, skip)
        if m.get("lm_checkpoint"):
            reads["decoder"] = parts.load_lm(m.lm_checkpoint, target["decoder"])
        if m.get("vision_checkpoint"):
            reads["vision"] = parts.load_vision(m.vision_checkpoint, target["vision"])
        params = {**params, **(stage() if stage else {})}
        return {**params, **{name: read() for name, read in reads.items()}}

    def evaluate(self, trainer, params) -> dict[str, float]:
        """The generative evaluations of `config.eval_tasks` (`evaluators.generative.evaluate_system`)."""
        from vlm_jax.evaluators import generative

        return generative.evaluate_system(self, params, trainer.config)

    # ---------------------------------------------------------------- generation

    @functools.cached_property
    def _placed_features(self):
        def run(params, tokens, segment_ids, image_segment_ids, images, feature_index):
            variables = {"params": params}
            features = self.module.apply(variables, images, method=InSequenceModel.encode_images)
            return self.module.apply(
                variables, tokens, segment_ids, image_segment_ids, features, feature_index, method=InSequenceModel.place
            )

        return jax.jit(run)

    def decoding(self, params, batch, length):
        """For `vlm_jax.generate`: the LM with the prompt's image features in place of its placeholders (images
        encoded once); under a prefix-LM template the whole prompt is the prefix and new tokens are causal."""
        if self.indexed and "feature_index" not in batch:
            raise UserError("prompts for an AnyRes (LLaVA-NeXT) model need a feature_index (vlm_jax/generate.py).")
        values, placed = self._placed_features(
            params,
            batch["tokens"],
            batch["segment_ids"],
            batch["image_segment_ids"],
            batch["images"],
            batch.get("feature_index") if self.indexed else None,
        )
        prompt = {"features": values, "feature_mask": placed}
        cache = {}
        if self.prefix_lm:
            prompt["prefix_mask"] = jnp.asarray(batch["segment_ids"]) > 0
            cache["prefix_mask"] = jnp.zeros((values.shape[0], length), bool)
        return Decoding(self.module.decoder, params["decoder"], prompt, {}, cache)

    # ---------------------------------------------------------------- vlm-jax forward

    def forward(self, params, inputs):
        """transformers-style inputs -> logits: input_ids [B, L], pixel_values [N, 3, H, W] (all images of the
        batch in order, as LLaVA takes them: row r's placeholder runs take the next images) or [B, N, 3, H, W],
        optional attention_mask [B, L] (left padding), position_ids [B, L], and under a prefix-LM template
        token_type_ids [B, L] (0 = prefix, 1 = suffix: PaliGemma). LLaVA-NeXT (AnyRes): pixel_values
        [N, views, 3, H, W] (each image's base view and tiles, zero-padded to the most views) and image_sizes
        [N, 2] (each image's original height and width)."""
        tokens, present = parts.text_inputs(inputs, self.module.decoder.vocab_size, ("input_ids", "pixel_values"))
        known = {"input_ids", "pixel_values", "attention_mask", "position_ids"}
        known |= ({"token_type_ids"} if self.prefix_lm else set()) | ({"image_sizes"} if self.indexed else set())
        extra = sorted(set(inputs) - known)
        if extra:
            raise UserError(f"the {self.config.model.name} system does not read the inputs {', '.join(extra)}.")
        positions = inputs.get("position_ids")
        if positions is None:
            positions = np.maximum(np.cumsum(present, axis=1) - 1, 0)
        pixels = np.asarray(inputs["pixel_values"], np.float32)
        if self.indexed:
            if "image_sizes" not in inputs:
                raise UserError("the inputs have no image_sizes ([images, 2]: each image's height and width).")
            images = self._anyres_by_row(tokens, present, pixels, np.asarray(inputs["image_sizes"]))
        else:
            images = self._images_by_row(tokens, present, pixels)
        batch = {
            "tokens": tokens,
            "segment_ids": present.astype(np.int32),
            "positions": np.asarray(positions, np.int32),
            **images,
        }
        if self.prefix_lm:
            if "token_type_ids" not in inputs:
                raise UserError("the inputs have no token_type_ids (0 = prefix, 1 = suffix) for the prefix-LM mask.")
            batch["prefix_mask"] = (np.asarray(inputs["token_type_ids"]) == 0) & present
        return {"logits": np.asarray(jax.jit(self.logits)(params, batch))}

    def _images_by_row(self, tokens, present, pixels) -> dict[str, np.ndarray]:
        """images [B, M, H, W, 3] and image_segment_ids [B, M] from NCHW pixel_values, each row taking as many
        images as its placeholder count says (image_tokens placeholders per image)."""
        counts = np.count_nonzero((tokens == self.module.image_token_id) & present, axis=1)
        if np.any(counts % self.image_tokens):
            raise UserError(
                f"each row's image placeholders must come in runs of {self.image_tokens}; got counts {counts.tolist()}."
            )
        per_row = counts // self.image_tokens
        if pixels.ndim == 5:
            if pixels.shape[0] != tokens.shape[0]:
                raise UserError(f"pixel_values [B, N, 3, H, W] has {pixels.shape[0]} rows for {tokens.shape[0]}.")
            flat = [pixels[r, i] for r in range(tokens.shape[0]) for i in range(per_row[r])]
        elif pixels.ndim == 4:
            if pixels.shape[0] != per_row.sum():
                raise UserError(
                    f"pixel_values holds {pixels.shape[0]} images; the placeholders ask for {int(per_row.sum())}."
                )
            flat = list(pixels)
        else:
            raise UserError(f"pixel_values must be [N, 3, H, W] or [B, N, 3, H, W]; got shape {pixels.shape}.")
        if flat and flat[0].shape != (3, self.image_size, self.image_size):
            raise UserError(f"images must be 3 x {self.image_size} x {self.image_size}; got {flat[0].shape}.")
        slots = max(1, int(per_row.max()))
        images = np.zeros((tokens.shape[0], slots, self.image_size, self.image_size, 3), np.float32)
        ids = np.zeros((tokens.shape[0], slots), np.int32)
        start = 0
        for r, n in enumerate(per_row):
            for i in range(n):
                images[r, i] = flat[start + i].transpose(1, 2, 0)
                ids[r, i] = 1
            start += n
        return {"images": images, "image_segment_ids": ids}

    def _anyres_by_row(self, tokens, present, pixels, image_sizes) -> dict[str, np.ndarray]:
        """images, image_segment_ids and feature_index from LLaVA-NeXT's inputs: each row's placeholders take the
        next images in order, each image its views (base + tiles of its best pinpoint) and its feature order."""
        from data_pipelines import image_ops, pipeline

        settings = self.config.data.image
        size = self.image_size
        if pixels.ndim != 5 or pixels.shape[2:] != (3, size, size) or len(image_sizes) != pixels.shape[0]:
            raise UserError(
                f"pixel_values must be [images, views, 3, {size}, {size}] with one image_sizes row per image; got "
                f"{pixels.shape} and {np.shape(image_sizes)}."
            )
        pinpoints = [tuple(p) for p in settings.grid_pinpoints]
        rows, width = tokens.shape
        placeholder = self.module.image_token_id
        per_row, image = [], 0
        for r in range(rows):
            wanted = int(np.count_nonzero((tokens[r] == placeholder) & present[r]))
            mine = []
            while wanted > 0:
                if image >= len(image_sizes):
                    raise UserError(
                        f"row {r}'s image placeholders ask for more images than the {len(image_sizes)} given."
                    )
                h, w = (int(v) for v in image_sizes[image])
                order = pipeline.feature_order((h, w), settings, self.image_tokens)
                best_h, best_w = image_ops.select_best_resolution((h, w), pinpoints)
                mine.append((image, order, 1 + (best_h // size) * (best_w // size)))
                wanted -= len(order)
                image += 1
            if wanted < 0:
                raise UserError(f"row {r}'s image placeholders do not add up to whole images' LLaVA-NeXT features.")
            per_row.append(mine)
        slots = max(1, max(sum(v for _, _, v in mine) for mine in per_row))
        images = np.zeros((rows, slots, size, size, 3), np.float32)
        ids = np.zeros((rows, slots), np.int32)
        index = np.zeros((rows, width), np.int32)
        for r, mine in enumerate(per_row):
            slot = 0
            for j, _, views in mine:
                images[r, slot : slot + views] = pixels[j, :views].transpose(0, 2, 3, 1)
                ids[r, slot : slot + views] = 1
                slot += views
            ids_r = np.where(present[r], tokens[r], -1)
            index[r] = pipeline.feature_index(
                ids_r, placeholder, [o for _, o, _ in mine], [v for _, _, v in mine], self.image_tokens
            )
        return {"images": images, "image_segment_ids": ids, "feature_index": index}
