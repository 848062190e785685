"""Native-resolution vision transformer (Qwen2-VL, Qwen2.5-VL): the patches of many images of any size, packed.

An image keeps its aspect ratio and (nearly) its resolution: it is resized to
sides that are multiples of patch x merge (28 px), cut into 14 px patches
(two frames deep: a still image is repeated, a video gives pairs of frames),
and its patches are flattened exactly as transformers' `Qwen2VLImageProcessor`
flattens them (channel, frame, row, column), in 2 x 2 merge blocks
(`data_pipelines/native_resolution.py`). Several images — of one example or of
several packed examples — share one patch sequence per row:

    patches          [B, P, 3 * 2 * 14 * 14]  flattened patches, image after image
    patch_positions  [B, P, 2]  int32 (row, column) of each patch within its image
    patch_groups     [B, P]     int32 attention group: a patch attends only within its group (one image, or
                                one video frame), 0 = padding

Blocks are the shared `nn/encoder.EncoderBlock` (scanned) with 2D RoPE
(`nn/rope.axial_angles`: half of each head turned by the row, half by the
column) and a block-diagonal mask from `patch_groups`, so a packed row gives
every image the tokens it would get alone. Qwen2-VL: LayerNorm, quick-GELU MLP,
no position table, no class token, a bias-free patch embedding (transformers'
Conv3d over [channels, 2 frames, 14, 14]). Qwen2.5-VL: RMSNorm, a gated SiLU MLP
with biases, and window attention: every layer but `full_attention_layers`
attends only within windows of `window_size` pixels (`window_merge` x
`window_merge` merged tokens) of its image.

Output: tokens [B, P, width] in the input order (the merge blocks' order, as the
patch merger `connectors/token_merge.PatchMerger` reads them).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax import sharding
from vlm_jax.errors import UserError
from vlm_jax.nn.encoder import EncoderBlock
from vlm_jax.nn.layers import DenseGeneral
from vlm_jax.nn.remat import remat as remat_block
from vlm_jax.nn.rope import axial_angles


class NativeViT(nn.Module):
    """(patches [B, P, C*T*p*p], patch_positions [B, P, 2], patch_groups [B, P]) -> tokens [B, P, width]."""

    width: int = 1280
    depth: int = 32
    mlp_dim: int = 5120
    num_heads: int = 16
    patch_size: int = 14
    temporal_patch_size: int = 2
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    mlp: str = "plain"  # "gated": Qwen2.5-VL's SiLU-gated MLP with biases
    mlp_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    merge: int = 2  # patches per side of a merge block (the patch merger's 2 x 2)
    # Qwen2.5-VL window attention: windows of window_merge x window_merge merged tokens (112 px / 28 px = 4) in
    # every layer except `full_attention_layers`; window_merge = 0 attends over the whole image in every layer.
    window_merge: int = 0
    full_attention_layers: tuple[int, ...] = ()
    dtype: str = "float32"
    remat: str = "none"

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: 3 channels x frames x patch_size^2."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @nn.compact
    def __call__(self, patches: jax.Array, patch_positions: jax.Array, patch_groups: jax.Array) -> jax.Array:
        if patches.shape[-1] != self.patch_dim:
            raise UserError(
                f"patches have {patches.shape[-1]} values each; this ViT takes {self.patch_dim} "
                f"(3 x {self.temporal_patch_size} frames x {self.patch_size}^2)."
            )
        if self.width % self.num_heads:
            raise UserError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
        for layer in self.full_attention_layers:
            if not 0 <= layer < self.depth:
                raise UserError(f"full_attention_layers has {layer}, outside the {self.depth} layers.")
        dtype = jnp.dtype(self.dtype)
        x = DenseGeneral(self.width, (None, "embed"), use_bias=False, dtype=dtype, name="patch_embed")(
            patches.astype(dtype)
        )
        x = sharding.constrain(x, ("batch", "length", "embed"))
        rope = axial_angles(patch_positions, self.width // self.num_heads, self.rope_theta)
        same_group = patch_groups[:, :, None] == patch_groups[:, None, :]  # padding attends to padding
        full = same_group[:, None]
        if self.window_merge:
            side = self.window_merge * self.merge
            window = patch_positions // side  # [B, P, 2] window (row, column) within the image
            same_window = jnp.all(window[:, :, None, :] == window[:, None, :, :], axis=-1)
            windowed = (same_group & same_window)[:, None]
        else:
            windowed = full
        is_full = jnp.asarray([i in self.full_attention_layers or not self.window_merge for i in range(self.depth)])

        def body(block, x, is_full):
            mask = jnp.where(is_full, full, windowed)
            return block(x, mask, rope)

        block = remat_block(EncoderBlock, self.remat)(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            norm=self.norm,
            norm_eps=self.norm_eps,
            mlp_act=self.mlp_act,
            mlp=self.mlp,
            attn_bias=True,
            dtype=dtype,
            name="layers",
        )
        stack = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=0,
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(block, x, is_full)
        return x
