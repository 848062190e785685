"""In-sequence fusion: image features take the places of their placeholder tokens, inside their own packed example.

LLaVA, PaliGemma, InternVL, Qwen-VL and the like put image features into the
LM's input sequence where the template wrote placeholder ids. In a packed row
(several examples, `segment_ids` 1..S) the k-th placeholder of example s
takes the k-th feature of example s's images (its media slots in order, as
`image_segment_ids` name them), so an image never reaches another example's
text, whatever else shares the row.

Slots of one row are in example order, as the packer writes them (and
tokens are, by construction). Per image slot `feature_valid` can drop
features; the placement order is the slots' valid features in order. Where
the order is not that (LLaVA-NeXT: the base view, then the unpadded grid
row by row across tiles, a newline after each row), the data names each
placeholder's feature (`place_by_index`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def place_features(
    features: jax.Array,
    placeholders: jax.Array,
    segment_ids: jax.Array,
    image_segment_ids: jax.Array,
    feature_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(values [B, L, D], placed [B, L] bool): the features that replace the placeholders' embeddings.

    features [B, M, n, D] (n features for each of M slots), placeholders [B, L]
    bool, segment_ids [B, L] (0 = padding), image_segment_ids [B, M] (0 = empty
    slot), feature_valid [B, M, n] bool (default: all features of used slots).
    `placed` is False where a placeholder has no feature left in its example
    (the example's images give fewer features than it has placeholders); callers
    should report such counts rather than let them pass silently.
    """
    b, m, n, d = features.shape
    length = placeholders.shape[1]
    slot_segment = jnp.repeat(image_segment_ids, n, axis=1)  # [B, M*n]
    valid = slot_segment > 0
    if feature_valid is not None:
        valid = valid & feature_valid.reshape(b, m * n)
    flat = features.reshape(b, m * n, d)

    def one_row(flat, valid, slot_segment, placeholders, segment_ids):
        # Valid features, compacted in order: compact[c] = index of the c-th valid feature.
        rank = jnp.cumsum(valid) - 1
        compact = (
            jnp.zeros((m * n,), jnp.int32)
            .at[jnp.where(valid, rank, m * n)]
            .set(jnp.arange(m * n, dtype=jnp.int32), mode="drop")
        )
        # Valid features per example, and how many come before each example's first one.
        per_segment = jax.ops.segment_sum(valid.astype(jnp.int32), slot_segment, num_segments=length + 1)
        before = jnp.cumsum(per_segment) - per_segment
        # The rank of each placeholder within its example.
        count = jnp.cumsum(placeholders.astype(jnp.int32))
        starts = jnp.concatenate([jnp.ones((1,), bool), segment_ids[1:] != segment_ids[:-1]])
        before_segment = jax.lax.cummax(jnp.where(starts, count - placeholders, 0), axis=0)
        within = count - 1 - before_segment
        placed = placeholders & (segment_ids > 0) & (within < per_segment[segment_ids])
        index = compact[jnp.clip(before[segment_ids] + within, 0, m * n - 1)]
        return jnp.take(flat, index, axis=0), placed

    values, placed = jax.vmap(one_row)(flat, valid, slot_segment, placeholders, segment_ids)
    return jnp.where(placed[..., None], values, 0).astype(features.dtype), placed


def place_by_index(
    features: jax.Array,
    placeholders: jax.Array,
    segment_ids: jax.Array,
    image_segment_ids: jax.Array,
    feature_index: jax.Array,
    newline: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(values [B, L, D], placed [B, L]) when the data says which feature each placeholder takes (LLaVA-NeXT).

    feature_index [B, L] int: at a placeholder, slot * n + token counted over its own example's slots (the
    example's first slot is 0), or -1 for `newline` [D] (LLaVA-NeXT's `image_newline`). A placeholder whose
    index falls outside its example's slots is not placed.
    """
    b, m, n, d = features.shape
    length = placeholders.shape[1]
    flat = features.reshape(b, m * n, d)

    def one_row(flat, image_segment_ids, placeholders, segment_ids, feature_index):
        used = (image_segment_ids > 0).astype(jnp.int32)
        slots = jax.ops.segment_sum(used, image_segment_ids, num_segments=length + 1)
        first = jnp.cumsum(slots) - slots  # the first slot of each example (slots are in example order)
        own = segment_ids > 0
        in_range = (feature_index >= 0) & (feature_index < slots[segment_ids] * n)
        index = jnp.clip(first[segment_ids] * n + feature_index, 0, m * n - 1)
        values = jnp.take(flat, index, axis=0)
        is_newline = feature_index == -1
        if newline is not None:
            values = jnp.where(is_newline[:, None], newline.astype(values.dtype), values)
        placed = placeholders & own & (in_range | (is_newline & (newline is not None)))
        return values, placed

    values, placed = jax.vmap(one_row)(flat, image_segment_ids, placeholders, segment_ids, feature_index)
    return jnp.where(placed[..., None], values, 0).astype(features.dtype), placed
