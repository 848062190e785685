"""Two-tower (CLIP / SigLIP) dual encoder: image and text embeddings plus the learned logit scale/bias.

`logits_per_image = logit_scale * image_embeds @ text_embeds.T (+ logit_bias)`
equals transformers' `CLIPModel` / `SiglipModel` `logits_per_image`.

Params: image_encoder/... (ViT), text_encoder/... (TextTransformer),
visual_projection/kernel and text_projection/kernel (projection="clip"),
logit_scale (log of the scale), logit_bias (when `logit_bias_init` is set).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.encoders.text import TextTransformer
from vlm_jax.encoders.vit import ViT
from vlm_jax.errors import UserError
from vlm_jax.nn.layers import DenseGeneral


def l2_normalize(x: jax.Array, eps: float = 0.0) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class TwoTower(nn.Module):
    """Dual encoder. `vision` / `text` are ViT / TextTransformer kwargs."""

    vision: dict
    text: dict
    embed_dim: int = 512
    projection: str = "clip"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None

    def setup(self):
        if self.projection not in ("clip", "siglip"):
            raise UserError(f"unknown two-tower projection {self.projection!r}; use 'clip' or 'siglip'.")
        self.image_encoder = ViT(**dict(self.vision))
        self.text_encoder = TextTransformer(**dict(self.text))
        if self.projection == "clip":
            self.visual_projection = DenseGeneral(self.embed_dim, ("embed", None), name="visual_projection")
            self.text_projection = DenseGeneral(self.embed_dim, ("embed", None), name="text_projection")
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(self.logit_scale_init), ()), ()
        )
        if self.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", nn.with_logical_partitioning(nn.initializers.constant(self.logit_bias_init), ()), ()
            )
        else:
            self.logit_bias = None

    def embed_images(self, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> L2-normalised [B, embed_dim]."""
        pooled = self.image_encoder(images)["pooled"]
        if self.projection == "clip":
            pooled = self.visual_projection(pooled)
        return l2_normalize(pooled)

    def embed_texts(self, ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """[B, L] ids -> L2-normalised [B, embed_dim]."""
        pooled = self.text_encoder(ids, attention_mask)["pooled"]
        if self.projection == "clip":
            pooled = self.text_projection(pooled)
        return l2_normalize(pooled)

    def __call__(self, images: jax.Array, ids: jax.Array, attention_mask: jax.Array | None = None) -> dict[str, Any]:
        return {
            "image_embeds": self.embed_images(images),
            "text_embeds": self.embed_texts(ids, attention_mask),
            "logit_scale": jnp.exp(self.logit_scale),
            "logit_bias": self.logit_bias,
        }


def logits_per_image(out: dict[str, Any]) -> jax.Array:
    """scale * img @ txt.T (+ bias), from a TwoTower output dict."""
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    if out.get("logit_bias") is not None:
        logits = logits + out["logit_bias"]
    return logits
