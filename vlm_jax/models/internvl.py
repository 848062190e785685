"""InternVL 1.5, Mini-InternVL and InternVL2 (`model.name = "internvl"`): InternViT tiles, pixel-shuffled, in place
of `<IMG_CONTEXT>` tokens.

InternVL 1.5 (Chen et al. 2024, arXiv:2404.16821, "How Far Are We to GPT-4V?"): "ViT-MLP-LLM". Each image is
cut into 1 to 12 tiles of 448 x 448 (up to 40 at test time) on the grid whose aspect ratio is closest to the
image's, plus a 448 x 448 thumbnail of the whole image when there is more than one tile
(`data_pipelines/image_ops.internvl_tiles`, the seed's `dynamic_preprocess`). Every tile is one media slot: the
InternViT (6B with QK-RMSNorm, RMSNorm and layer scale; 300M distilled from it with LayerNorm) encodes it to a
32 x 32 grid, the class token is dropped, a pixel shuffle turns each 2 x 2 block into one token of 4x the
channels (256 tokens per tile) and an MLP (LayerNorm, linear, GELU, linear: `connectors/token_merge.PixelShuffleMLP`)
maps them to the LM width. The features are InternViT-6B's 4th-from-last layer: InternViT-6B-448px-V1.5 keeps 45
of its 48 layers and the features are the last of them, before any final norm (transformers'
`vision_feature_layer=-1` of a model without a final LayerNorm). The "internvl" data template writes
`<img>` + 256 x tiles `<IMG_CONTEXT>` + `</img>` per image and renders InternLM2 / Phi-3 chat
(`data_pipelines/templates.internvl`).

Everything else — each example's tile features at its own placeholders in packed rows, the loss, generation,
evaluation, `vlm-jax forward` with transformers' `InternVLForConditionalGeneration` inputs (pixel_values
[tiles, 3, 448, 448], 256 placeholders per tile) — is `InSequenceSystem`'s.
"""

from vlm_jax.errors import ConfigError
from vlm_jax.models import register
from vlm_jax.models.in_sequence import InSequenceSystem


@register("internvl")
class InternVL(InSequenceSystem):
    """InternViT (final or tapped layer, class token dropped) -> pixel shuffle + MLP -> features at the
    `<IMG_CONTEXT>` placeholders, one media slot per tile."""

    def __init__(self, config):
        super().__init__(config)
        image = config.data.get("image", {})
        if image and image.get("mode") == "internvl" and int(image.get("size", 0)) != self.image_size:
            raise ConfigError(
                f"data.image.size {image.get('size')} must be the tile size model.image_size {self.image_size}."
            )
