"""DeepSeek-VL (`model.name = "deepseek_vl"`, Lu et al. 2024, arXiv:2403.05525): SigLIP-L features at 384 px,
with (7B, "hybrid") or without (1.3B) SAM-B features at 1024 px, aligned into 576 features per image in place of
`<image_placeholder>` tokens of a DeepSeek LLM (LLaMA-shaped).

    hybrid (model.sam set; transformers' `DeepseekVLHybridForConditionalGeneration`):
      1024 px slot -> SAM-B (`encoders/sam.py`) -> neck -> [64 x 64 x 256]  ---------------------------.
                   `-> output of SAM's first global layer -> a second neck (neck_hd) -> [64 x 64 x 256] |
           each bilinearly resized to 96 x 96, then two 3 x 3 stride-2 convs (shared) -> 24 x 24 x 1024:
           high = down(neck) + alpha * down(neck_hd)  (alpha learned, 0 at init)
      384 px view -> SigLIP-L/16 (final LayerNorm, no head) -> 576 x 1024 = low
      aligner: proj(GELU(concat(high_res_vision_proj(high), vision_proj(low))))  (each half D_lm / 2)
    SigLIP only (transformers' `DeepseekVLForConditionalGeneration`): aligner linear_2(GELU(linear_1(low))).

The image slot of a batch (`images`) holds the hybrid model's 1024 px view (else the 384 px one); the 384 px
view is derived from it inside the model (un-normalised with `model.high_res_normalization`, resized with an
antialiased bilinear filter, normalised with `model.low_res_normalization`), so packing and generation carry one
image array as every in-sequence system does. transformers' processor instead resizes the padded uint8 image
twice (`DeepseekVLHybridImageProcessor`); on a real photo the two 384 px views agree within one uint8 level
(tests/test_deepseek_vl.py). `vlm-jax forward` takes both of transformers' arrays (`pixel_values`,
`high_res_pixel_values`) as they are.

Everything else (placement within packed examples, the loss, generation, evaluation, `pretrained`) is
`InSequenceSystem`'s.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import templates
from data_pipelines.image_ops import NORMALIZATION
from vlm_jax.connectors.projector import MLPProjector
from vlm_jax.encoders.sam import SAMEncoder, SAMNeck, conv
from vlm_jax.encoders.vit import ViT, _interp_matrix
from vlm_jax.errors import ConfigError, UserError
from vlm_jax.lm.decoder import DecoderLM
from vlm_jax.models import parts, register
from vlm_jax.models.base import System
from vlm_jax.models.in_sequence import InSequenceSystem
from vlm_jax.nn.activations import activation
from vlm_jax.nn.layers import DenseGeneral
from vlm_jax.nn.placement import place_features


class Downsample(nn.Module):
    """[B, g, g, C] -> [B, n, n, 4C]: bilinear resize to 4n x 4n (PyTorch `interpolate`, align_corners=False),
    then 3 x 3 stride-2 convs to 2C and 4C channels (DeepSeek-VL's `downsamples`, transformers'
    `DeepseekVLSamVisionProj`)."""

    grid: int  # n: the low-resolution grid side (24)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        g, c, side = x.shape[1], x.shape[-1], 4 * self.grid
        m = jnp.asarray(_interp_matrix(g, side, "bilinear"))
        x = jnp.einsum("Hh,Ww,bhwc->bHWc", m, m, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        x = conv(2 * c, 3, 2, 1, "conv1", self.dtype)(x.astype(self.dtype))
        return conv(4 * c, 3, 2, 1, "conv2", self.dtype)(x)


class HighResBranch(nn.Module):
    """1024 px images [B, H, W, 3] -> SAM features [B, n * n, 4 * out_channels], row-major."""

    sam: SAMEncoder  # with taps=(its first global layer,)
    grid: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        out = self.sam(images)
        down = Downsample(self.grid, self.dtype, name="downsample")
        alpha = self.param("alpha", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (1,))
        hd = SAMNeck(self.sam.out_channels, self.dtype, name="neck_hd")(out["taps"][self.sam.taps[0]])
        x = down(out["tokens"]) + down(hd) * alpha.astype(self.dtype)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class HybridAligner(nn.Module):
    """(low [..., Dv], high [..., Dh]) -> proj(GELU(concat(high_res_vision_proj(high), vision_proj(low))))
    [..., out_dim] (DeepSeek-VL's hybrid MLP: each branch to half the LM width)."""

    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, low: jax.Array, high: jax.Array) -> jax.Array:
        half = dict(features=self.out_dim // 2, kernel_axes=(None, "mlp"), use_bias=True, dtype=self.dtype)
        h = jnp.concatenate(
            [DenseGeneral(name="high_res_vision_proj", **half)(high), DenseGeneral(name="vision_proj", **half)(low)],
            axis=-1,
        )
        h = activation("gelu")(h)
        return DenseGeneral(self.out_dim, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="proj")(h)


class DeepseekVLModel(nn.Module):
    """(tokens, segment_ids, positions, images, image_segment_ids[, low_res_images]) -> logits [B, L, vocab].

    `images` [B, M, S, S, 3] are the slots (hybrid: the high-resolution view); `low_res_images` [B, M, s, s, 3]
    the SigLIP view, derived from `images` when not given. Sows the placeholders left without a feature
    ("intermediates", "unplaced"), as `InSequenceModel` does."""

    vision: ViT
    aligner: nn.Module
    decoder: DecoderLM
    image_token_id: int
    high_res: HighResBranch | None = None
    low_res_size: int = 384
    high_res_normalization: str = "clip"
    low_res_normalization: str = "siglip"

    def low_res_view(self, images: jax.Array) -> jax.Array:
        """[N, S, S, 3] high-resolution slots (normalised) -> [N, s, s, 3] SigLIP views (normalised)."""
        hi_mean, hi_std = (jnp.asarray(v, jnp.float32) for v in NORMALIZATION[self.high_res_normalization])
        lo_mean, lo_std = (jnp.asarray(v, jnp.float32) for v in NORMALIZATION[self.low_res_normalization])
        pixels = images.astype(jnp.float32) * hi_std + hi_mean
        size = (images.shape[0], self.low_res_size, self.low_res_size, 3)
        return (jax.image.resize(pixels, size, "linear", antialias=True) - lo_mean) / lo_std

    def encode_images(self, images: jax.Array, low_res_images: jax.Array | None = None) -> jax.Array:
        """images [B, M, S, S, 3] (and optionally low_res_images [B, M, s, s, 3]) -> features [B, M, n, D_lm]."""
        b, m = images.shape[:2]
        flat = images.reshape((b * m,) + images.shape[2:])
        if low_res_images is not None:
            low = low_res_images.reshape((b * m,) + low_res_images.shape[2:])
        else:  # the slot itself (SigLIP only), or the SigLIP view derived from the 1024 px slot (hybrid)
            low = flat if self.high_res is None else self.low_res_view(flat)
        tokens = self.vision(low)["tokens"]
        features = self.aligner(tokens) if self.high_res is None else self.aligner(tokens, self.high_res(flat))
        return features.reshape((b, m) + features.shape[1:])

    def place(self, tokens, segment_ids, image_segment_ids, features):
        """(values [B, L, D], placed [B, L]): each example's features at its own placeholders, in order."""
        return place_features(features, tokens == self.image_token_id, segment_ids, image_segment_ids)

    def __call__(self, tokens, segment_ids, positions, images, image_segment_ids, low_res_images=None):
        values, placed = self.place(tokens, segment_ids, image_segment_ids, self.encode_images(images, low_res_images))
        self.sow("intermediates", "unplaced", jnp.sum((tokens == self.image_token_id) & (segment_ids > 0) & ~placed))
        return self.decoder(tokens, segment_ids, positions, features=values, feature_mask=placed)


@register("deepseek_vl")
class DeepseekVL(InSequenceSystem):
    """SigLIP-L (+ SAM-B) -> (hybrid) aligner -> 576 features at the `<image_placeholder>` placeholders of a
    LLaMA-shaped DeepSeek LLM.

    Config (`config.model`): `encoder_kwargs` (the SigLIP ViT's fields; its final-normed tokens are the features),
    `sam` (SAMEncoder fields; empty: the SigLIP-only model), `low_res_size` (SigLIP's input side), `image_size`
    (the slot side: SAM's input when hybrid, else `low_res_size`), `high_res_normalization` /
    `low_res_normalization` (names in `image_ops.NORMALIZATION`), `lm`, `image_token_id`, `image_tokens`."""

    def __init__(self, config):
        System.__init__(self, config)
        m = config.model
        parts.check_lm_settings(m.lm)
        if m.lm.get("cross_attn_every"):
            raise ConfigError("model.lm.cross_attn_every must be 0 for deepseek_vl (no cross-attention).")
        for key in ("high_res_normalization", "low_res_normalization"):
            if m.get(key, "clip") not in NORMALIZATION:
                raise ConfigError(f"model.{key} {m.get(key)!r} is not one of {', '.join(NORMALIZATION)}.")
        vision = ViT(**dict(m.encoder_kwargs.to_dict(), pool="none"))
        self.low_res_size = int(m.low_res_size)
        patch = vision.shape()["patch_size"]
        grid = self.low_res_size // patch
        lm_width = int(m.lm.embed_dim)
        high_res, aligner = None, MLPProjector(lm_width, depth=2, act="gelu", dtype=m.lm.get("dtype", "float32"))
        if m.get("sam"):
            sam = SAMEncoder(**m.sam.to_dict())
            sam = sam.clone(taps=(sam.period() - 1,))  # the first global layer (period() checks the layout)
            if int(m.image_size) != sam.image_size:
                raise ConfigError(f"model.image_size {m.image_size} must be SAM's input size {sam.image_size}.")
            high_res = HighResBranch(sam, grid, jnp.dtype(sam.dtype))
            aligner = HybridAligner(lm_width, m.lm.get("dtype", "float32"))
        elif int(m.image_size) != self.low_res_size:
            raise ConfigError(f"model.image_size {m.image_size} must be model.low_res_size without a SAM branch.")
        self.module = DeepseekVLModel(
            vision=vision,
            aligner=aligner,
            decoder=DecoderLM(**m.lm.to_dict()),
            image_token_id=int(m.image_token_id),
            high_res=high_res,
            low_res_size=self.low_res_size,
            high_res_normalization=str(m.get("high_res_normalization", "clip")),
            low_res_normalization=str(m.get("low_res_normalization", "siglip")),
        )
        self.image_size = int(m.image_size)
        self.seq_len = int(config.data.seq_len)
        self.max_images = int(config.data.get("max_images", 1))
        template = config.data.get("template")
        if template and templates.uses_prefix_mask(template):
            raise ConfigError(f"data.template {template!r} is a prefix-LM template; deepseek_vl is causal.")
        self.prefix_lm = self.indexed = False
        if int(m.image_tokens) != grid * grid:
            raise ConfigError(
                f"model.image_tokens is {m.image_tokens}, but a {self.low_res_size} px SigLIP view with patch "
                f"{patch} gives {grid * grid} features."
            )

    def flops_per_example(self) -> float:
        """Training FLOPs of one row (`parts.training_flops`, following `optim.freeze`): the SAM branch and the
        SigLIP tower (two branches that meet at the aligner), the aligner, then the LM."""
        m, trains = self.module, parts.trained(self)
        n = self.max_images
        slots = jax.ShapeDtypeStruct((n, self.image_size, self.image_size, 3), jnp.float32)
        low = jax.ShapeDtypeStruct((n, self.low_res_size, self.low_res_size, 3), jnp.float32)
        tokens = parts.output_shape(m.vision, low)["tokens"]
        chain = [(parts.forward_flops(m.vision, low), trains("vision"))]
        aligner_args = (tokens,)
        if m.high_res is not None:
            chain.insert(0, (parts.forward_flops(m.high_res, slots), trains("high_res")))
            aligner_args += (parts.output_shape(m.high_res, slots),)
        chain.append((parts.forward_flops(m.aligner, *aligner_args), trains("aligner")))
        return parts.training_flops(chain + parts.decoder_chain(m.decoder, "decoder", trains, self.seq_len))

    @functools.cached_property
    def _placed_features(self):
        def run(params, tokens, segment_ids, image_segment_ids, images, feature_index):
            del feature_index  # no AnyRes layout here (InSequenceSystem.decoding passes None)
            variables = {"params": params}
            features = self.module.apply(variables, images, method=DeepseekVLModel.encode_images)
            return self.module.apply(
                variables, tokens, segment_ids, image_segment_ids, features, method=DeepseekVLModel.place
            )

        return jax.jit(run)

    def forward(self, params, inputs):
        """transformers-style inputs -> logits: input_ids [B, L], optional attention_mask [B, L] (left padding)
        and position_ids, pixel_values [N, 3, 384, 384] and, for the hybrid model, high_res_pixel_values
        [N, 3, 1024, 1024] (the images of the whole batch in order: row r's runs of `image_tokens` placeholders
        take the next images), as `DeepseekVL(Hybrid)ForConditionalGeneration` takes them."""
        tokens, present = parts.text_inputs(inputs, self.module.decoder.vocab_size, ("input_ids", "pixel_values"))
        hybrid = self.module.high_res is not None
        known = {"input_ids", "pixel_values", "attention_mask", "position_ids"} | (
            {"high_res_pixel_values"} if hybrid else set()
        )
        extra = sorted(set(inputs) - known)
        if extra:
            raise UserError(f"the {self.config.model.name} system does not read the inputs {', '.join(extra)}.")
        if hybrid and "high_res_pixel_values" not in inputs:
            raise UserError("the hybrid DeepSeek-VL needs high_res_pixel_values beside pixel_values.")
        positions = inputs.get("position_ids")
        if positions is None:
            positions = np.maximum(np.cumsum(present, axis=1) - 1, 0)
        low = self._by_row(tokens, present, np.asarray(inputs["pixel_values"], np.float32), self.low_res_size)
        batch = {
            "tokens": tokens,
            "segment_ids": present.astype(np.int32),
            "positions": np.asarray(positions, np.int32),
        }
        batch["images"], batch["image_segment_ids"] = low
        if hybrid:  # the slots are the 1024 px views; transformers' own 384 px views go in beside them
            high = np.asarray(inputs["high_res_pixel_values"], np.float32)
            batch["images"], batch["image_segment_ids"] = self._by_row(tokens, present, high, self.image_size)
        run = jax.jit(lambda p, b, lo: self.module.apply({"params": p}, *self._inputs(b)[0], lo))
        return {"logits": np.asarray(run(params, batch, low[0] if hybrid else None))}

    def _by_row(self, tokens, present, pixels, size) -> tuple[np.ndarray, np.ndarray]:
        """(images [B, M, size, size, 3], image_segment_ids [B, M]) from NCHW pixels [N, 3, size, size]: each row
        takes as many of the next images as its placeholders ask for (`image_tokens` per image)."""
        counts = np.count_nonzero((tokens == self.module.image_token_id) & present, axis=1)
        if np.any(counts % self.image_tokens):
            raise UserError(
                f"each row's image placeholders must come in runs of {self.image_tokens}; got counts {counts.tolist()}."
            )
        per_row = counts // self.image_tokens
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size) or len(pixels) != per_row.sum():
            raise UserError(
                f"pixel arrays must be [{int(per_row.sum())}, 3, {size}, {size}] for these placeholders; got "
                f"{pixels.shape}."
            )
        images = np.zeros((tokens.shape[0], max(1, int(per_row.max())), size, size, 3), np.float32)
        ids = np.zeros(images.shape[:2], np.int32)
        starts = np.concatenate([[0], np.cumsum(per_row)])
        for r, n in enumerate(per_row):
            images[r, :n] = pixels[starts[r] : starts[r] + n].transpose(0, 2, 3, 1)
            ids[r, :n] = 1
        return images, ids
