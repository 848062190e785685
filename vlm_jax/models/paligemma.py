"""PaliGemma (`model.name = "paligemma"`): SigLIP tokens, one linear map, Gemma as a prefix-LM.

PaliGemma (Beyer et al. 2024, arXiv:2407.07726): a SigLIP-So400m/14 ViT at
224, 448 or 896 px gives 256, 1024 or 4096 tokens (its final, post-LayerNormed
outputs: no pooling head, no class token), a zero-initialised linear
projection maps them to Gemma-2B's width, and they take the places of the
`<image>` placeholders before `<bos>{prefix}\\n{suffix}<eos>`. Attention is
full over the image and the prefix and causal over the suffix (prefix-LM); the
loss is on the suffix only. Both come from the "paligemma" data template
(`data_pipelines/templates.py::paligemma`), which this system requires.

Feature scale: Gemma multiplies its token embeddings by sqrt(width). The
image features are not scaled relative to the residual stream in any
implementation: big_vision scales only the text embeddings; transformers 4.x
divided the projected features by sqrt(width) because its Gemma then scaled
every input embedding, image ones included; transformers 5 applies the scale
in the embedding table, before the features are placed. `DecoderLM` places
features after its embedding scale, so the features go in as the projection
gives them; tests/test_paligemma.py checks this against
transformers' `PaliGemmaForConditionalGeneration` logits.

Beyond `InSequenceSystem`: the zero-initialised projection (`init`), and in
`pretrained`: `model.stage_checkpoint` (a stage-1 run, or `vlm-jax
convert-hf` of a PaliGemma directory) starts every part with the ViT position
embedding resampled to this config's resolution when it differs (stage 2's
resolution increase, as big_vision resamples it when loading), and
`model.vision_checkpoint` (stage 1) loses the SigLIP checkpoint's
attention-pooling head, since PaliGemma reads the tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config_lib import ConfigError
from vlm_jax.models import parts, register
from vlm_jax.models.in_sequence import InSequenceSystem


@register("paligemma")
class PaliGemma(InSequenceSystem):
    """SigLIP ViT (final tokens) -> zero-initialised linear projection -> features at the `<image>`
    placeholders of a prefix-LM Gemma."""

    def __init__(self, config):
        super().__init__(config)
        if not self.prefix_lm:
            raise ConfigError(
                f"the paligemma system needs a prefix-LM data.template ('paligemma'); "
                f"got {config.data.get('template')!r}."
            )

    def init(self, rng, batch):
        """Parameters as `InSequenceSystem.init`, with the projection's kernel and bias zero (the paper's
        zero-initialised linear projection: at step 0 the image tokens enter the LM as zeros)."""
        params = super().init(rng, batch)
        return {**params, "connector": jax.tree.map(jnp.zeros_like, params["connector"])}

    def pretrained(self, params: dict) -> dict:
        """`InSequenceSystem.pretrained` with two PaliGemma-specific steps (host arrays): `model.stage_checkpoint`
        (an earlier paligemma stage, or a converted PaliGemma) starts every part, its ViT position embedding
        resampled to this model's grid; `model.lm_checkpoint` (an `lm`) then starts the LM, and
        `model.vision_checkpoint` (a `vision_encoder` or `dual_encoder`) the ViT, its pooling head dropped."""
        m = self.config.model
        params = dict(params)
        if m.get("stage_checkpoint"):
            loaded = dict(parts.load_stage(m.stage_checkpoint, m.name))
            vision = dict(loaded["vision"])
            if "pos_embedding" in vision:
                vision["pos_embedding"] = self._resampled_posemb(
                    vision["pos_embedding"], params["vision"]["pos_embedding"]
                )
            params = dict(parts.same_shapes(params, {**loaded, "vision": vision}, "stage_checkpoint"))
        if m.get("lm_checkpoint"):
            params["decoder"] = parts.same_shapes(params["decoder"], parts.load_lm(m.lm_checkpoint), "lm_checkpoint")
        if m.get("vision_checkpoint"):
            params["vision"] = parts.same_shapes(
                params["vision"], _vit_tokens(m.vision_checkpoint), "vision_checkpoint"
            )
        return params

    def _resampled_posemb(self, posemb: Any, want: Any) -> np.ndarray:
        """A checkpoint's ViT position embedding [1, g*g, D] on this model's grid [1, G*G, D]
        (`model.encoder_kwargs.posemb_resample`: "bilinear" or "bicubic")."""
        from vlm_jax.encoders.vit import resample_posemb

        old, new = (int(round(np.sqrt(np.shape(p)[1]))) for p in (posemb, want))
        if old * old != np.shape(posemb)[1] or np.shape(posemb)[2] != np.shape(want)[2]:
            raise ConfigError(
                f"model.stage_checkpoint's ViT position embedding has shape {np.shape(posemb)}, not a square grid "
                f"of {np.shape(want)[2]}-wide rows."
            )
        method = self.config.model.encoder_kwargs.get("posemb_resample", "bilinear")
        return np.asarray(resample_posemb(jnp.asarray(posemb), (old, old), (new, new), method))


def _vit_tokens(path: str) -> dict:
    """The ViT params of a `vision_encoder` or `dual_encoder` checkpoint (host arrays) without its pooling head
    (SigLIP's `map_head`) or projection (`proj`): PaliGemma reads the tokens and has neither."""
    from vlm_jax.train.checkpoint import load_params

    config, _, params = load_params(path)
    if config.model.name not in ("vision_encoder", "dual_encoder"):
        raise ConfigError(f"model.vision_checkpoint {path} holds a {config.model.name}, not a vision encoder.")
    vision = jax.device_get(params)
    vision = vision["image_encoder"] if config.model.name == "dual_encoder" else vision
    return {k: v for k, v in vision.items() if k not in ("map_head", "proj")}
