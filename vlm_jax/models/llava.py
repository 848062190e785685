"""LLaVA, LLaVA-1.5 (`model.name = "llava"`): a CLIP ViT's patch features, projected, in place of `<image>` tokens.

LLaVA (Liu et al. 2023, arXiv:2304.08485): CLIP ViT-L/14 at 224 px, the
penultimate layer's 256 patch features (class token dropped), one linear map
to the LM width, Vicuna / LLaMA. LLaVA-1.5 (arXiv:2310.03744): ViT-L/14 at
336 px (576 features), a 2-layer GELU MLP ("mlp2x_gelu"), Vicuna-1.5.
Both train in two stages (configs/llava.py): the projector alone on caption
pairs with the "plain" template, then projector + LM on instructions with the
"llava" chat template, the loss on the answers only.

Everything else — placement of each example's features at its own
placeholders in packed rows, the loss, generation, evaluation, `vlm-jax
forward` with transformers' inputs — is `InSequenceSystem`'s.
"""

from vlm_jax.models import register
from vlm_jax.models.in_sequence import InSequenceSystem


@register("llava")
class Llava(InSequenceSystem):
    """LLaVA / LLaVA-1.5: ViT (tapped layer) -> linear or MLP projector -> features at the `<image>` placeholders."""
