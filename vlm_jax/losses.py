"""Losses shared by systems: contrastive (CLIP softmax, SigLIP sigmoid, chunked over devices) and token LM.

Embeddings passed here are already L2-normalised; `scale` is the temperature
multiplier (already exponentiated) and `bias` SigLIP's learned bias.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec


def softmax_contrastive(image_embeds: jax.Array, text_embeds: jax.Array, scale: jax.Array) -> jax.Array:
    """CLIP's symmetric cross-entropy over the global batch (mean over pairs and both directions)."""
    logits = scale * image_embeds @ text_embeds.T
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    return (i2t.mean() + t2i.mean()) / 2


def sigmoid_loss(image_embeds: jax.Array, text_embeds: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """SigLIP: -sum_j log sigmoid(z_ij * logit_ij), z = +1 on matching pairs else -1, averaged over images.

    Materialises the B x B logits; see `chunked_sigmoid_loss` for the version
    that never does.
    """
    logits = scale * image_embeds @ text_embeds.T + bias
    signs = 2 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]


def chunked_sigmoid_loss(
    image_embeds: jax.Array,
    text_embeds: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    mesh: Mesh,
    axes: Sequence[str],
) -> jax.Array:
    """The SigLIP loss with the batch sharded over mesh `axes`, never forming the global B x B logits.

    Each device keeps its b = B / n images and passes its text chunk around a
    ring (`ppermute`, n - 1 hops): at hop k it scores its images against the
    texts of device (i - k) mod n, holding one b x b block at a time. Positives
    exist only at hop 0 (its own texts). The backward pass (a custom VJP) runs
    the ring again, recomputing each block, and sends every text chunk's
    gradient around with it, so memory per device stays O(b^2 + b * dim) in
    both passes. Equal to `sigmoid_loss`, gradients included.
    """
    axes = tuple(axes)
    n = math.prod(mesh.shape[a] for a in axes)
    if n == 1:
        return sigmoid_loss(image_embeds, text_embeds, scale, bias)
    batch_spec = PartitionSpec(axes)
    ring = functools.partial(_ring_loss, axes=axes, n=n, global_batch=image_embeds.shape[0])
    return jax.shard_map(
        ring,
        mesh=mesh,
        in_specs=(batch_spec, batch_spec, PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec(),
    )(image_embeds, text_embeds, jnp.asarray(scale, image_embeds.dtype), jnp.asarray(bias, image_embeds.dtype))


def _signs(b: int, positives: bool, dtype) -> jax.Array:
    return (2 * jnp.eye(b, dtype=dtype) - 1) if positives else -jnp.ones((b, b), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring_loss(images, texts, scale, bias, axes, n, global_batch):
    return _ring_forward(images, texts, scale, bias, axes, n, global_batch)


def _ring_forward(images, texts, scale, bias, axes, n, global_batch):
    perm = [(i, (i + 1) % n) for i in range(n)]

    def block(texts, positives):
        logits = scale * images @ texts.T + bias
        return -jnp.sum(jax.nn.log_sigmoid(_signs(images.shape[0], positives, logits.dtype) * logits))

    def hop(carry, _):
        texts, total = carry
        texts = jax.lax.ppermute(texts, axes, perm)
        return (texts, total + block(texts, False)), None

    (_, total), _ = jax.lax.scan(hop, (texts, block(texts, True)), None, length=n - 1)
    return jax.lax.psum(total, axes) / global_batch


def _ring_fwd(images, texts, scale, bias, axes, n, global_batch):
    return _ring_forward(images, texts, scale, bias, axes, n, global_batch), (images, texts, scale, bias)


def _ring_bwd(axes, n, global_batch, residuals, g):
    images, texts, scale, bias = residuals
    perm = [(i, (i + 1) % n) for i in range(n)]

    def block_grads(texts, positives):
        dots = images @ texts.T
        signs = _signs(images.shape[0], positives, dots.dtype)
        # d/dlogit of -log sigmoid(s * logit) is -s * sigmoid(-s * logit).
        dlogits = (g / global_batch) * -signs * jax.nn.sigmoid(-signs * (scale * dots + bias))
        return scale * dlogits @ texts, scale * dlogits.T @ images, jnp.sum(dlogits * dots), jnp.sum(dlogits)

    def hop(carry, _):
        texts, d_texts, d_images, d_scale, d_bias = carry
        texts, d_texts = jax.lax.ppermute((texts, d_texts), axes, perm)
        di, dt, ds, db = block_grads(texts, False)
        return (texts, d_texts + dt, d_images + di, d_scale + ds, d_bias + db), None

    d_images, d_texts, d_scale, d_bias = block_grads(texts, True)
    (_, d_texts, d_images, d_scale, d_bias), _ = jax.lax.scan(
        hop, (texts, d_texts, d_images, d_scale, d_bias), None, length=n - 1
    )
    d_texts = jax.lax.ppermute(d_texts, axes, perm)  # one more hop brings each chunk's gradient home
    return d_images, d_texts, jax.lax.psum(d_scale, axes), jax.lax.psum(d_bias, axes)


_ring_loss.defvjp(_ring_fwd, _ring_bwd)
