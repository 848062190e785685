"""MiniGPT-v2 (Chen et al. 2023, arXiv:2310.09478) (`model.name = "minigpt_v2"`): EVA ViT-g features at 448 px,
every 4 consecutive tokens concatenated and linearly projected into LLaMA-2-chat's input.

The 1024 patch features of a 448 px image (class token dropped, after the ViT's final LayerNorm, MiniGPT-4's
`ln_vision`) become 256 tokens (`connectors/token_merge.py`); they replace the `<ImageHere>` placeholders of
MiniGPT's template. No PyTorch reference class exists in transformers, so the system is checked by its
configuration and parameter counts (tests/test_minigpt_v2.py); everything else is `InSequenceSystem`'s.
"""

from vlm_jax.models import register
from vlm_jax.models.in_sequence import InSequenceSystem


@register("minigpt_v2")
class MiniGPTv2(InSequenceSystem):
    """EVA ViT-g (final tokens) -> 4-token concatenation + linear -> LLaMA-2 at the `<ImageHere>` placeholders."""
