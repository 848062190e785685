"""A vision encoder on its own (`model.name = "vision_encoder"`): what `convert-hf` makes of a vision-only checkpoint.

`model.encoder` is "vit" (`encoders/vit.py`) or "nfnet" (`encoders/nfnet.py`);
`model.kwargs` are the encoder's fields. `vlm-jax forward` maps
`pixel_values` [B, 3, H, W] to `pooled` (and `last_hidden_state` for a ViT,
`features` for an NFNet). It is not trainable on its own yet: its `loss`
raises (supervised image classification is a later addition).
"""

from __future__ import annotations

import jax
import numpy as np

from vlm_jax.errors import ConfigError, UserError
from vlm_jax.models import register
from vlm_jax.models.base import System

ENCODERS = ("vit", "nfnet")


@register("vision_encoder")
class VisionEncoder(System):
    """A ViT or NFNet image encoder for inference and feature extraction."""

    def __init__(self, config):
        super().__init__(config)
        m = config.model
        kwargs = m.kwargs.to_dict()
        if m.encoder == "vit":
            from vlm_jax.encoders.vit import ViT

            self.module = ViT(**kwargs)
            self.image_size = int(kwargs.get("image_size", 224))
        elif m.encoder == "nfnet":
            from vlm_jax.encoders.nfnet import NFNet

            self.module = NFNet(**kwargs)
            self.image_size = int(m.get("image_size", 224))
        else:
            raise ConfigError(f"model.encoder {m.encoder!r} is not one of {', '.join(ENCODERS)}.")

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return {"images": np.zeros((batch_size, self.image_size, self.image_size, 3), np.float32)}

    def init(self, rng, batch):
        return self.module.init(rng, batch["images"])["params"]

    def loss(self, params, batch):
        raise ConfigError("a vision_encoder has no training objective yet; use it inside a system (e.g. dual_encoder).")

    def forward(self, params, inputs):
        if "pixel_values" not in inputs:
            raise UserError(f"the inputs have no 'pixel_values' (found: {', '.join(sorted(inputs)) or 'nothing'}).")
        pixels = np.asarray(inputs["pixel_values"], np.float32)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise UserError(f"pixel_values must be [batch, 3, height, width]; got shape {pixels.shape}.")
        out = jax.jit(lambda p, x: self.module.apply({"params": p}, x))(params, pixels.transpose(0, 2, 3, 1))
        names = {"pooled": "pooled", "tokens": "last_hidden_state", "features": "features", "logits": "logits"}
        return {names[k]: np.asarray(v) for k, v in out.items() if k in names and v is not None}
