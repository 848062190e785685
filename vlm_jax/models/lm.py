"""The decoder-only language model as a trainable system (`model.name = "lm"`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import templates
from vlm_jax.errors import ConfigError
from vlm_jax.lm.decoder import DecoderLM
from vlm_jax.models import parts, register
from vlm_jax.models.base import Decoding, System


def next_token_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, dict]:
    """(cross-entropy summed over `loss_mask`, its weight, {"accuracy": correct top-1 sum}) of next-token logits.

    A prediction is correct when the target's logit is the largest (a tie for the top counts as correct): a max
    over the vocabulary, which the cross-entropy's log-sum-exp computes too, instead of an argmax, whose
    (value, index) reduction XLA's CPU backend runs ~8x slower (120 ms a step at 4 x 512 x 32,000 logits)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask), {"accuracy": jnp.sum(correct * mask)}


@register("lm")
class LanguageModel(System):
    """Next-token prediction on packed token rows (batch keys: tokens, targets, loss_mask, segment_ids, positions).

    `model.image_tokens` (placeholder tokens per media slot) is read by the data
    pipeline; the LM itself treats placeholders as ordinary tokens and reads no
    image (`ignored_batch_keys`). A template with a prefix-LM mask (PaliGemma's)
    gives the batch a `prefix_mask`, which the LM follows.
    """

    ignored_batch_keys = {
        "images": "a language model reads the text of image-text rows only",
        "image_segment_ids": "a language model reads the text of image-text rows only",
    }

    def __init__(self, config):
        super().__init__(config)
        fields = {f.name for f in dataclasses.fields(DecoderLM)} - {"parent", "name"}
        unknown = set(config.model) - fields - {"name", "image_tokens"}
        if unknown:
            raise ConfigError(
                f"model.{sorted(unknown)[0]} is not a setting of the lm system (it takes {', '.join(sorted(fields))})."
            )
        self.module = DecoderLM(**{k: v for k, v in config.model.items() if k in fields})
        self.seq_len = int(config.data.seq_len)
        template = config.data.get("template")
        self.prefix_lm = bool(template) and templates.uses_prefix_mask(template)

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (batch_size, self.seq_len)
        batch = {
            "tokens": np.zeros(shape, np.int32),
            "targets": np.zeros(shape, np.int32),
            "loss_mask": np.zeros(shape, np.float32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), shape).copy(),
        }
        if self.prefix_lm:
            batch["prefix_mask"] = np.zeros(shape, bool)
        return batch

    def init(self, rng, batch):
        return self.module.init(rng, batch["tokens"], batch["segment_ids"], batch["positions"])["params"]

    def logits(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """[B, L, vocab] float32 logits (prefix-LM attention where the batch has a `prefix_mask`)."""
        args = (batch["tokens"], batch["segment_ids"], batch["positions"])
        return self.module.apply({"params": params}, *args, prefix_mask=batch.get("prefix_mask"))

    def loss(self, params, batch):
        return next_token_loss(self.logits(params, batch), batch)

    def flops_per_example(self) -> float:
        """Training FLOPs per row from the forward matmul FLOPs (`vlm_jax.flops`: projections, MLPs, attention
        scores over the full mask, the head) of the embeddings, layers and head (`parts.decoder_chain`),
        following `optim.freeze` (`parts.training_flops`): 3x for a trained part; a frozen part 2x when a
        trained part lies below it (frozen layers under a trained head: 1x; over a trained embedding: 2x),
        else 1x."""
        return parts.training_flops(parts.decoder_chain(self.module, "", parts.trained(self), self.seq_len))

    def decoding(self, params, batch, length):
        """For `vlm_jax.generate`: the decoder and its params; a prefix-LM sees its whole prompt as the prefix."""
        if not self.prefix_lm:
            return Decoding(self.module, params)
        prefix = np.asarray(batch["segment_ids"]) > 0
        empty = np.zeros((prefix.shape[0], length), bool)
        return Decoding(self.module, params, {"prefix_mask": prefix}, {}, {"prefix_mask": empty})

    def tokens_in(self, batch):
        return int(np.count_nonzero(batch["segment_ids"]))

    def forward(self, params, inputs):
        tokens, present = parts.text_inputs(inputs, self.module.vocab_size)
        positions = inputs.get("position_ids")
        if positions is None:
            positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
        batch = {
            "tokens": tokens,
            "segment_ids": present.astype(np.int32),
            "positions": np.asarray(positions, np.int32),
        }
        logits = jax.jit(self.logits)(params, batch)
        return {"logits": np.asarray(logits)}
