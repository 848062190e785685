"""Flamingo as a trainable system (`model.name = "flamingo"`): frozen vision encoder and LM, trained resampler and
gated cross-attention.

Per packed row: images [B, M, H, W, 3] (M media slots, `image_segment_ids`
[B, M] naming each slot's example, 0 = empty) -> vision encoder features
[B*M, V, Dv] -> Perceiver resampler -> latents [B, M, n, Dv] -> the decoder LM
with GATED XATTN-DENSE blocks (`vlm_jax/lm/decoder.py`, `cross_attn_every`).
A text token attends to the media of its own example only: the latest
`<image>` at or before it (`only_attend_immediate_media`) or every earlier
one; `media_token_id` marks the placeholders in `tokens`.

`model.encoder` is "vit" or "nfnet", `model.encoder_kwargs` its fields;
`model.resampler` holds `PerceiverResampler` fields and `model.lm` the
`DecoderLM` fields. Freezing is the optimizer's business (`optim.freeze`,
see configs/flamingo.py); to train only new token rows, give the LM
`extra_vocab_size` and leave `lm/extra_embed` (and `lm/extra_head`) unfrozen.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.connectors.perceiver import PerceiverResampler
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.lm.decoder import DecoderLM, flamingo_layout
from vlm_jax.lm.gated_xattn import media_mask
from vlm_jax.models import parts, register
from vlm_jax.models.base import Decoding, System
from vlm_jax.models.lm import next_token_loss
from vlm_jax.nn.layers import DenseGeneral


class FlamingoModel(nn.Module):
    """(tokens, segment_ids, positions, images, image_segment_ids[, mask]) -> logits [B, L, vocab]."""

    vision: nn.Module
    perceiver: PerceiverResampler | None  # None: the LM attends to the vision tokens themselves (IDEFICS option)
    decoder: DecoderLM
    media_token_id: int
    only_attend_immediate_media: bool = True
    project_media: bool = False  # one shared linear map of the latents to the LM width before cross-attention

    def setup(self):
        if self.project_media:
            self.media_proj = DenseGeneral(self.decoder.embed_dim, (None, "embed"), name="media_proj")

    def encode_media(self, images: jax.Array) -> jax.Array:
        """images [B, M, H, W, 3] -> resampled latents [B, M, num_latents, Dv] (vision features computed once)."""
        b, m = images.shape[:2]
        out = self.vision(images.reshape((b * m,) + images.shape[2:]))
        features = out["tokens"] if "tokens" in out else out["features"]
        if self.perceiver is None:
            latents = features.reshape(b, m, -1, features.shape[-1])
        else:
            latents = self.perceiver(features.reshape(b, m, 1, -1, features.shape[-1]))  # one frame per slot
        if self.project_media:
            latents = self.media_proj(latents)
        return latents

    def media_mask(self, tokens, segment_ids, image_segment_ids) -> jax.Array:
        """[B, L, M]: which media slots each token may attend to."""
        return media_mask(
            tokens == self.media_token_id, segment_ids, image_segment_ids, self.only_attend_immediate_media
        )

    def __call__(self, tokens, segment_ids, positions, images, image_segment_ids, mask=None):
        latents = self.encode_media(images)
        if mask is None:
            mask = self.media_mask(tokens, segment_ids, image_segment_ids)
        return self.decoder(tokens, segment_ids, positions, latents, mask)

    def decode_with_latents(self, tokens, segment_ids, positions, latents, mask):
        """The LM on precomputed media latents (generation encodes images once)."""
        return self.decoder(tokens, segment_ids, positions, latents, mask)


@register("flamingo")
class Flamingo(System):
    """Next-token prediction on packed interleaved rows (batch: tokens, targets, loss_mask, segment_ids, positions,
    images, image_segment_ids)."""

    fusion = "cross_attention"

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        parts.check_lm_settings(m.lm)
        if not m.lm.get("cross_attn_every"):
            raise ConfigError("model.lm.cross_attn_every must be > 0 for a Flamingo model.")
        if int(m.image_tokens) != 1:
            raise ConfigError(
                f"model.image_tokens must be 1 for Flamingo (one <image> marker per image); got {m.image_tokens}."
            )
        self.module = FlamingoModel(
            vision=parts.vision_encoder(m.encoder, m.encoder_kwargs.to_dict()),
            perceiver=PerceiverResampler(**m.resampler.to_dict()) if m.get("resampler") else None,
            decoder=DecoderLM(**m.lm.to_dict()),
            media_token_id=int(m.media_token_id),
            only_attend_immediate_media=bool(m.get("only_attend_immediate_media", True)),
            project_media=bool(m.get("project_media", False)),
        )
        self.image_size = int(m.image_size)
        self.seq_len = int(config.data.seq_len)
        self.max_images = int(config.data.get("max_images", 1))

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (batch_size, self.seq_len)
        tokens = np.zeros(shape, np.int32)
        tokens[:, 1] = self.config.model.media_token_id
        return {
            "tokens": tokens,
            "targets": np.zeros(shape, np.int32),
            "loss_mask": np.zeros(shape, np.float32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), shape).copy(),
            "images": np.zeros((batch_size, self.max_images, self.image_size, self.image_size, 3), np.float32),
            "image_segment_ids": np.ones((batch_size, self.max_images), np.int32),
        }

    def _inputs(self, batch):
        return (
            batch["tokens"],
            batch["segment_ids"],
            batch["positions"],
            batch["images"],
            batch["image_segment_ids"],
        )

    def init(self, rng, batch):
        return self.module.init(rng, *self._inputs(batch))["params"]

    def logits(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        return self.module.apply({"params": params}, *self._inputs(batch))

    def loss(self, params, batch):
        loss, weight, metrics = next_token_loss(self.logits(params, batch), batch)
        # Mean |tanh(gate)| of the cross-attention blocks, scaled by the weight because the trainer divides by it.
        blocks = [
            params["decoder"][k]["xattn"] for k in ("layer_groups", "layer_groups_tail") if k in params["decoder"]
        ]
        for name in ("attn_gate", "ff_gate"):
            gates = jnp.concatenate([jnp.abs(jnp.tanh(b[name])).reshape(-1) for b in blocks])
            metrics[f"gates/{name}"] = jnp.mean(gates) * weight
        return loss, weight, metrics

    def flops_per_example(self) -> float:
        """Training FLOPs per row, from each part's forward matmul FLOPs (`vlm_jax.flops`, on abstract shapes),
        following `optim.freeze` (`parts.training_flops`): from the input up, the vision encoder, the resampler,
        the media projection, then the LM (`parts.decoder_chain`: embeddings, each group's cross-attention block
        then its layers, the head). A trained part costs 3x its forward; a frozen part 2x when a trained part
        lies below it (its input gradient), else 1x. The paper's recipe (vision and LM frozen): vision 1x,
        resampler and cross-attention 3x, and every LM layer and the head 2x, as a block runs before layer 0;
        the main job (nothing frozen): every part 3x."""
        m = self.module
        trains = parts.trained(self)
        images = jax.ShapeDtypeStruct((self.max_images, self.image_size, self.image_size, 3), jnp.float32)
        chain = [(parts.forward_flops(m.vision, images), trains("vision"))]
        out = parts.output_shape(m.vision, images)
        features = out["tokens"] if "tokens" in out else out["features"]
        width, tokens = features.shape[-1], int(np.prod(features.shape[1:-1]))
        latents = jax.ShapeDtypeStruct((1, self.max_images, tokens, width), jnp.float32)
        if m.perceiver is not None:
            media = jax.ShapeDtypeStruct((1, self.max_images, 1, tokens, width), jnp.float32)
            chain.append((parts.forward_flops(m.perceiver, media), trains("perceiver")))
            latents = parts.output_shape(m.perceiver, media)
        if m.project_media:
            proj = DenseGeneral(m.decoder.embed_dim, (None, "embed"))
            chain.append((parts.forward_flops(proj, latents), trains("media_proj")))
            latents = parts.output_shape(proj, latents)
        mask = jax.ShapeDtypeStruct((1, self.seq_len, self.max_images), jnp.bool_)
        chain += parts.decoder_chain(m.decoder, "decoder", trains, self.seq_len, latents, mask)
        return parts.training_flops(chain)

    def tokens_in(self, batch):
        return int(np.count_nonzero(batch["segment_ids"]))

    def pretrained(self, params: dict, mesh: Any = None, rules: Any = None) -> dict:
        """`params` with the frozen parts filled from checkpoints at the start of training: `model.lm_checkpoint`
        (an `lm` system: its layers regrouped for the cross-attention groups) and `model.vision_checkpoint` (a
        `vision_encoder`, or a `dual_encoder`'s image tower); "" skips one. Both are checked against the
        model's shapes first, then read straight into the shardings training gives them on `mesh` by `rules`
        (`parts.targets`; default: the config's): the LM's layers in its own sharding on that mesh, regrouped
        on device by one jit whose outputs have the target shardings; nothing passes through the host whole."""
        m = self.config.model
        mesh, rules = parts.placement(self.config, mesh, rules)
        target = parts.targets(self, mesh, rules)
        params = dict(params)
        # Both checkpoints are checked before either is read.
        read_vision = None
        if m.get("vision_checkpoint"):
            drop = ("map_head", "proj")  # a dual encoder's pooling head and projection: Flamingo reads the tokens
            read_vision = parts.load_vision(m.vision_checkpoint, target["vision"], drop)
        if m.get("lm_checkpoint"):
            saved = parts.checkpoint(m.lm_checkpoint, "lm_checkpoint", ("lm",), "an lm")
            want = target["decoder"]
            depth = jax.tree.leaves(saved.shapes["layers"])[0].shape[0]
            if depth != self.module.decoder.num_layers:
                raise ConfigError(f"model.lm_checkpoint has {depth} layers; model.lm.num_layers is {m.lm.num_layers}.")
            regroup = functools.partial(_regroup, every=self.module.decoder.cross_attn_every)
            regrouped = jax.eval_shape(regroup, saved.shapes["layers"])
            for name, value in saved.shapes.items():
                if name != "layers":
                    parts.same_shapes(want.get(name), value, f"lm_checkpoint {name}")
            for group, value in regrouped.items():
                parts.same_shapes(want[group]["layers"], value, "lm_checkpoint layers")
            read = {name: want[name] for name in saved.shapes if name != "layers"}
            read["layers"] = saved.abstract(mesh, rules)["layers"]  # the LM's own sharding on this mesh
            loaded = dict(saved.restore(read))
            out = {group: parts.shardings_of(want[group]["layers"]) for group in regrouped}
            regrouped = jax.jit(regroup, out_shardings=out)(loaded.pop("layers"))
            decoder = {**params["decoder"], **loaded}
            for group, layers in regrouped.items():
                decoder[group] = {**decoder[group], "layers": layers}
            params["decoder"] = decoder
        if read_vision:
            params["vision"] = read_vision()
        return params

    def evaluate(self, trainer, params) -> dict[str, float]:
        """The generative evaluations of `config.eval_tasks` (`evaluators.generative.evaluate_system`)."""
        from vlm_jax.evaluators import generative

        return generative.evaluate_system(self, params, trainer.config)

    def decoding(self, params, batch, length):
        """For `vlm_jax.generate`: the LM with its media latents (images encoded once) and the prompt's media mask;
        each new token sees the media of the last prompt token (the latest image of its prompt) through the media
        keys and values the prompt pass cached, so steps get no media."""
        latents = self._encode_media({"params": params}, batch["images"])
        mask = self._media_mask({"params": params}, batch["tokens"], batch["segment_ids"], batch["image_segment_ids"])
        empty = jnp.zeros((mask.shape[0], length, mask.shape[-1]), bool)
        return Decoding(
            self.module.decoder,
            params["decoder"],
            prompt_inputs={"media": latents, "media_mask": mask},
            step_inputs={"media_mask": mask[:, -1:]},
            cache_inputs={"media": latents, "media_mask": empty},
        )

    @functools.cached_property
    def _encode_media(self):
        return jax.jit(functools.partial(self.module.apply, method=FlamingoModel.encode_media))

    @functools.cached_property
    def _media_mask(self):
        return jax.jit(functools.partial(self.module.apply, method=FlamingoModel.media_mask))

    def forward(self, params, inputs):
        """transformers-style inputs -> logits: input_ids [B, L], pixel_values [B, N, 3, H, W], optional
        attention_mask [B, L], position_ids and image_attention_mask [B, L, N] (IDEFICS's processor mask;
        without it each token sees the latest `<image>` of its row, as in training)."""
        tokens, present = parts.text_inputs(inputs, self.module.decoder.vocab_size, ("input_ids", "pixel_values"))
        pixels = np.asarray(inputs["pixel_values"], np.float32)
        if pixels.ndim != 5 or pixels.shape[0] != tokens.shape[0] or pixels.shape[2] != 3:
            raise UserError(f"pixel_values must be [batch, images, 3, height, width]; got shape {pixels.shape}.")
        positions = inputs.get("position_ids")
        if positions is None:
            positions = np.maximum(np.cumsum(present, axis=1) - 1, 0)
        num_images = pixels.shape[1]
        image_segment_ids = np.ones(pixels.shape[:2], np.int32)
        if "image_attention_mask" in inputs:
            mask = np.asarray(inputs["image_attention_mask"]) > 0
            if mask.shape != tokens.shape + (num_images,):
                raise UserError(f"image_attention_mask must be [batch, length, {num_images}]; got shape {mask.shape}.")
        else:
            counts = np.count_nonzero(tokens == self.module.media_token_id, axis=1)
            image_segment_ids = (np.arange(num_images)[None] < counts[:, None]).astype(np.int32)
            mask = None
        batch = dict(
            tokens=tokens,
            segment_ids=present.astype(np.int32),
            positions=np.asarray(positions, np.int32),
            images=pixels.transpose(0, 1, 3, 4, 2),
            image_segment_ids=image_segment_ids,
        )

        def run(params, batch, mask):
            args = (batch["tokens"], batch["segment_ids"], batch["positions"], batch["images"])
            return self.module.apply({"params": params}, *args, batch["image_segment_ids"], mask)

        return {"logits": np.asarray(jax.jit(run)(params, batch, mask))}


def _regroup(layers: Any, every: int) -> dict:
    """A plain LM's stacked layers [depth, ...] -> the Flamingo LM's `layer_groups` [depth // every, every, ...]
    (`flamingo_layout`) and, when `every` does not divide the depth, `layer_groups_tail` [depth % every, ...]."""
    depth = jax.tree.leaves(layers)[0].shape[0]
    full = depth - depth % every
    out = {"layer_groups": flamingo_layout(jax.tree.map(lambda a: a[:full], layers), every)}
    if depth % every:
        out["layer_groups_tail"] = jax.tree.map(lambda a: a[full:], layers)
    return out
