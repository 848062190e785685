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

import functools
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

    def pretrained(self, params: dict, mesh: Any = None, rules: Any = None) -> dict:
        """`InSequenceSystem.pretrained` with two PaliGemma-specific steps: `model.stage_checkpoint` (an earlier
        paligemma stage, or a converted PaliGemma) starts every part, its ViT position embedding resampled on
        device to this model's grid when that differs; `model.lm_checkpoint` (an `lm`) then starts the LM, and
        `model.vision_checkpoint` (a `vision_encoder` or `dual_encoder`) the ViT, its pooling head and
        projection not read. Every part is read straight into the shardings training gives it on `mesh` by
        `rules` (`parts.targets`; default: the config's)."""
        m = self.config.model
        mesh, rules = parts.placement(self.config, mesh, rules)
        target = parts.targets(self, mesh, rules)
        stage, reads = None, {}  # every checkpoint is checked before any is read
        if m.get("stage_checkpoint"):
            skip = tuple(k for k, key in (("decoder", "lm_checkpoint"), ("vision", "vision_checkpoint")) if m.get(key))
            stage = self._load_stage(m.stage_checkpoint, target, mesh, rules, skip)
        if m.get("lm_checkpoint"):
            reads["decoder"] = parts.load_lm(m.lm_checkpoint, target["decoder"])
        if m.get("vision_checkpoint"):
            drop = ("map_head", "proj")  # SigLIP's pooling head and a projection: PaliGemma reads the tokens
            reads["vision"] = parts.load_vision(m.vision_checkpoint, target["vision"], drop)
        params = {**params, **(stage() if stage else {})}
        return {**params, **{name: read() for name, read in reads.items()}}

    def _load_stage(self, path: str, target: Any, mesh: Any, rules: Any, skip: tuple[str, ...]) -> Any:
        """`parts.load_stage` (checks now, reads when called) with the ViT position embedding read in its saved
        shape (sharded by `rules` on `mesh`) and resampled on device into its target sharding when the grids
        differ."""
        saved = parts.checkpoint(path, "stage_checkpoint", (self.config.model.name,), f"a {self.config.model.name}")
        want = target["vision"].get("pos_embedding")
        have = saved.shapes["vision"].get("pos_embedding")
        if want is None or have is None or have.shape == want.shape:
            return parts.load_stage(path, self.config.model.name, target, skip)
        self._check_posemb(have.shape, want.shape)
        parts.same_shapes(
            target, {**saved.shapes, "vision": {**saved.shapes["vision"], "pos_embedding": want}}, "stage_checkpoint"
        )
        read = {k: v for k, v in target.items() if k not in skip}
        if "vision" in read:
            saved_pos = saved.abstract(mesh, rules)["vision"]["pos_embedding"]
            read["vision"] = {**read["vision"], "pos_embedding": saved_pos}

        def load():
            loaded = dict(saved.restore(read))
            if "vision" in loaded:
                pos = self._resampled_posemb(loaded["vision"]["pos_embedding"], want)
                loaded["vision"] = {**loaded["vision"], "pos_embedding": pos}
            return loaded

        return load

    def _check_posemb(self, have: tuple, want: tuple) -> None:
        """A ConfigError unless a checkpoint's ViT position embedding `have` [1, g*g, D] is a square grid of the
        model's width (`want` [1, G*G, D])."""
        old = int(round(np.sqrt(have[1])))
        if len(have) != 3 or old * old != have[1] or have[2] != want[2]:
            raise ConfigError(
                f"model.stage_checkpoint's ViT position embedding has shape {have}, not a square grid "
                f"of {want[2]}-wide rows."
            )

    def _resampled_posemb(self, posemb: jax.Array, want: jax.ShapeDtypeStruct) -> jax.Array:
        """A checkpoint's ViT position embedding [1, g*g, D] on this model's grid [1, G*G, D]
        (`model.encoder_kwargs.posemb_resample`: "bilinear" or "bicubic"), computed on device into `want`'s
        sharding."""
        from vlm_jax.encoders.vit import resample_posemb

        old, new = (int(round(np.sqrt(shape[1]))) for shape in (posemb.shape, want.shape))
        method = self.config.model.encoder_kwargs.get("posemb_resample", "bilinear")
        resample = functools.partial(resample_posemb, old_hw=(old, old), new_hw=(new, new), method=method)
        return jax.jit(resample, out_shardings=want.sharding)(posemb)
