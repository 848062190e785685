"""Idefics3 (`model.name = "idefics3"`): SigLIP tiles, pixel-shuffled and linearly projected, in place of `<image>`
tokens of a Llama 3 LM.

Idefics3 (Laurençon et al. 2024, arXiv:2408.12637; transformers' `Idefics3ForConditionalGeneration`): each image
is resized so its longest side is 4 x 364 px, both sides rounded up to multiples of 364, cut into rows x cols
tiles of 364 px plus the whole image at 364 px (the global image; an image that fits one tile is that tile alone:
`data_pipelines/image_ops.idefics3_tiles`). Every tile is one media slot: the SigLIP so400m/14 tower gives 26 x 26
post-LayerNormed tokens, the pixel shuffle (scale factor 2) turns each 2 x 2 block into one token of 4x the
channels (169 per tile) and one bias-free linear map (`connectors/token_merge.PixelShuffleLinear`) takes them to
the LM width. The "idefics3" template writes `<fake_token_around_image><row_r_col_c>` + 169 `<image>` per tile, a
newline after each row, then `\\n<fake_token_around_image><global-img>` + 169 `<image>` +
`<fake_token_around_image>`, and renders Idefics3 chat (`data_pipelines/templates.idefics3`).

Everything else — each example's tile features at its own placeholders in packed rows, the loss, generation,
evaluation, `vlm-jax forward` with transformers' inputs — is `InSequenceSystem`'s; `forward` also reads
`pixel_values` [B, N, 3, H, W] whose all-zero images are padding, and `pixel_attention_mask`, refused unless it
is all ones on the real images (padded tiles are not modelled).
"""

import numpy as np

from vlm_jax.errors import ConfigError, UserError
from vlm_jax.models import register
from vlm_jax.models.in_sequence import InSequenceSystem


@register("idefics3")
class Idefics3(InSequenceSystem):
    """SigLIP (post-LayerNormed final tokens) -> pixel shuffle + bias-free linear -> features at the `<image>`
    placeholders, one media slot per tile (the tiles of a grid, then the global image)."""

    def __init__(self, config):
        super().__init__(config)
        image = config.data.get("image", {})
        if image and image.get("mode") == "idefics3" and int(image.get("size", 0)) != self.image_size:
            raise ConfigError(
                f"data.image.size {image.get('size')} must be the tile size model.image_size {self.image_size}."
            )
        options = self.template_options
        if config.data.get("template") != "idefics3":
            return
        if int(options.get("tile_tokens", 0)) != self.image_tokens:
            raise ConfigError(
                f"data.template_options.tile_tokens is {options.get('tile_tokens')}, but each tile gives "
                f"{self.image_tokens} features (model.image_tokens)."
            )
        per_side = int(options.get("tiles_per_side", 0))
        if image and image.get("mode") == "idefics3" and int(image.longest_edge) != per_side * self.image_size:
            raise ConfigError(
                f"data.image.longest_edge {image.longest_edge} must be data.template_options.tiles_per_side "
                f"({per_side}) tiles of {self.image_size} px."
            )

    def forward(self, params, inputs):
        """transformers' `Idefics3ForConditionalGeneration` inputs -> logits: input_ids [B, L], attention_mask,
        pixel_values [B, N, 3, H, W] (each row's tiles in order, all-zero padding images after them) and
        optionally pixel_attention_mask [B, N, H, W], which must be all ones on every real image."""
        inputs = dict(inputs)
        mask = inputs.pop("pixel_attention_mask", None)
        if mask is not None:
            pixels = np.asarray(inputs["pixel_values"])
            real = np.any(pixels.reshape(pixels.shape[:2] + (-1,)) != 0, axis=-1)
            if not np.all(np.asarray(mask)[real]):
                raise UserError(
                    "pixel_attention_mask has padded pixels in a real image; padded Idefics3 tiles are not supported."
                )
        return super().forward(params, inputs)
