"""Qwen-VL / Qwen-VL-Chat (`model.name = "qwen_vl"`): an OpenCLIP ViT-bigG, a one-layer cross-attention resampler
to 256 tokens, `<img>` + 256 `<imgpad>` + `</img>` in a Qwen-7B LM.

Qwen-VL (Bai et al. 2023, arXiv:2308.12966): the ViT-bigG/14 at 448 px (1024 patch tokens; no class token, a
learned position table, `ln_pre`, no final norm) feeds the position-aware adapter
(`connectors/xattn_resampler.CrossAttentionResampler`: 256 learned queries with 2D sin-cos positions, one
multi-head attention into the ViT tokens, `ln_post`, a projection to the LM width). The "qwen_vl" data
template writes each image as `Picture k: <img>` + 256 `<imgpad>` + `</img>` in ChatML, and grounding as
`<ref>...</ref><box>(x1,y1),(x2,y2)</box>` text (`templates.qwen_box`).

No transformers class exists for Qwen-VL (its checkpoints run with remote code), so there is no `convert-hf`
import or logits parity: the config's parameter count is checked against the paper's table and the resampler
against a PyTorch transcription of Qwen-VL's `Resampler` (`tests/test_qwen_vl.py`). Everything else is
`InSequenceSystem`'s.
"""

from vlm_jax.models import register
from vlm_jax.models.in_sequence import InSequenceSystem


@register("qwen_vl")
class QwenVL(InSequenceSystem):
    """ViT-bigG (all tokens, no class token) -> cross-attention resampler (256 queries) -> features at the
    `<imgpad>` placeholders of a Qwen LM."""
