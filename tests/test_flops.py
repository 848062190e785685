"""`vlm_jax.flops.matmul_flops`: XLA's count where XLA is right, and per-iteration counts of scanned loops."""

import os

import jax
import jax.numpy as jnp

from conftest import REPO
from vlm_jax.flops import matmul_flops
from vlm_jax.lm.decoder import DecoderLM


def xla_flops(fn, *args):
    return jax.jit(fn).lower(*args).cost_analysis()["flops"]


def test_matmuls_and_convolutions_count_as_xla_does():
    a, b = jax.ShapeDtypeStruct((3, 64, 128), jnp.float32), jax.ShapeDtypeStruct((3, 128, 32), jnp.float32)
    einsum = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)  # noqa: E731
    assert matmul_flops(einsum, a, b) == xla_flops(einsum, a, b) == 2 * 3 * 64 * 128 * 32
    x, w = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32), jax.ShapeDtypeStruct((3, 3, 4, 12), jnp.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
    )
    assert matmul_flops(conv, x, w) == xla_flops(conv, x, w) == 2 * (2 * 7 * 7 * 12) * 4 * 9


def test_scanned_layers_count_once_per_layer():
    row = jax.ShapeDtypeStruct((1, 32), jnp.int32)

    def count(layers):
        m = DecoderLM(vocab_size=128, embed_dim=32, num_layers=layers, num_heads=4, num_kv_heads=2, mlp_dim=64)
        params = jax.eval_shape(m.init, jax.random.key(0), row, row, row)
        return matmul_flops(m.apply, params, row, row, row), xla_flops(m.apply, params, row, row, row)

    (one, xla_one), (five, xla_five) = count(1), count(5)
    assert xla_one == xla_five  # XLA counts the scan body once, whatever its length
    per_layer = 32 * 2 * (32 * 8 * (4 + 2 + 2 + 4) + 3 * 32 * 64) + 2 * 2 * 4 * 8 * 32 * 32  # projections, MLP, scores
    assert five - one == 4 * per_layer
    assert one <= xla_one <= 1.15 * one  # XLA adds the elementwise work


# Training FLOPs follow optim.freeze (parts.training_flops): trained 3x, frozen with a trained part below 2x, else
# 1x. Expected numbers are counted by hand from the layer shapes of each tiny config.


def dense(tokens, d_in, d_out):
    return 2 * tokens * d_in * d_out


def scores(queries, keys, width):
    """QK^T and the weighted sum of V, `width` = heads x head_dim."""
    return 2 * dense(queries, keys, width)


def lm_layer(length, d, kv, mlp):
    """A LLaMA-style layer: q and o d -> d, k and v d -> kv, SwiGLU (three d x mlp matmuls), scores over the
    whole (unskipped) causal mask."""
    return 2 * dense(length, d, d) + 2 * dense(length, d, kv) + scores(length, length, d) + 3 * dense(length, d, mlp)


def flops(spec, model=None, **optim):
    """`flops_per_example` of the config `spec` with `model` and `optim` keys overridden."""
    from vlm_jax import models
    from vlm_jax.config_lib import load_config

    config = load_config(os.path.join(REPO, spec))
    config.model.update(model or {})
    config.optim.update(optim)
    return models.build(config).flops_per_example()


def test_flamingo_flops_follow_freeze():
    """configs/flamingo.py:variant=tiny: 4 images of 32 px, a ViT (patch 8, width 32, 1 layer, MLP 64), a resampler
    (4 latents, 2 x 16 heads, 1 layer, FF 128), an LM (64 tokens, width 64, 4 layers, 4 heads of 16, 2 KV heads,
    SwiGLU 128, vocab 256, untied head) with a cross-attention block (2 x 16 heads, FF 256) before layers 0 and 2."""
    images, patches, tokens = 4, 16, 17  # 16 patches + the class token
    vision = images * (
        dense(patches, 8 * 8 * 3, 32)
        + 4 * dense(tokens, 32, 32)
        + scores(tokens, tokens, 32)
        + 2 * dense(tokens, 32, 64)
    )
    kv = tokens + 4  # the latents read the features and themselves
    resampler = images * (2 * dense(4, 32, 32) + 2 * dense(kv, 32, 32) + scores(4, kv, 32) + 2 * dense(4, 32, 128))
    media = images * 4  # latents the text attends to
    block = dense(64, 64, 32) + 2 * dense(media, 32, 32) + scores(64, media, 32) + dense(64, 32, 64)
    block += 2 * dense(64, 64, 256)
    layers, head = 4 * lm_layer(64, 64, 32, 128), dense(64, 64, 256)
    assert (vision, resampler, block, layers, head) == (2048512, 714752, 4915200, 23068672, 2097152)  # by hand
    spec = "configs/flamingo.py:variant=tiny"
    # Nothing frozen (as the main job): every part 3x.
    assert flops(spec, freeze=()) == 3 * (vision + resampler + 2 * block + layers + head)
    # The paper's recipe (vision and LM frozen): vision 1x, resampler and blocks 3x, LM layers and head 2x (block 0
    # runs before layer 0, so gradients pass through every LM layer).
    assert flops(spec) == vision + 3 * resampler + 3 * 2 * block + 2 * (layers + head)
    # Only the head trains: nothing below it needs a gradient, every other part 1x.
    frozen = ("vision/.*", "perceiver/.*", "decoder/embed/.*", "decoder/layer_groups/.*", "decoder/final_norm/.*")
    assert flops(spec, freeze=frozen) == vision + resampler + 2 * block + layers + 3 * head


def test_lm_flops_follow_freeze():
    """configs/lm.py:variant=tiny: 64 tokens, width 64, 2 layers, 4 heads of 16, 2 KV heads, SwiGLU 128, vocab 256."""
    layers, head = 2 * lm_layer(64, 64, 32, 128), dense(64, 64, 256)
    spec = "configs/lm.py:variant=tiny"
    assert flops(spec, freeze=()) == 3 * (layers + head)
    assert flops(spec, freeze=("embed/.*", "layers/.*", "final_norm/.*")) == layers + 3 * head  # a head on top
    assert flops(spec, freeze=("layers/.*", "lm_head/.*")) == 2 * (layers + head)  # the embedding trains below
    # Tied: the head is the embedding's matmul, frozen with it (2x: the layers below train).
    assert flops(spec, {"tie_embeddings": True}, freeze=("embed/.*",)) == 3 * layers + 2 * head


def test_dual_encoder_flops_follow_freeze():
    """configs/clip.py:variant=tiny: a ViT (32 px, patch 8, width 48, 2 layers, MLP 96), a causal text tower (16
    tokens, width 48, 2 layers, MLP 96) and projections 48 -> 32."""
    image = dense(16, 8 * 8 * 3, 48) + 2 * (4 * dense(17, 48, 48) + scores(17, 17, 48) + 2 * dense(17, 48, 96))
    text = 2 * (4 * dense(16, 48, 48) + scores(16, 16, 48) + 2 * dense(16, 48, 96))
    proj = dense(1, 48, 32)
    spec = "configs/clip.py:variant=tiny"
    assert flops(spec, freeze=()) == 3 * (image + proj + text + proj)
    # LiT: the locked image tower costs its forward only.
    assert flops(spec, freeze=("image_encoder/.*", "visual_projection/.*")) == image + proj + 3 * (text + proj)
    # A frozen projection over a trained image encoder passes its gradient: 2x.
    assert flops(spec, freeze=("visual_projection/.*",)) == 3 * image + 2 * proj + 3 * (text + proj)


def test_the_main_job_with_nothing_frozen_counts_its_whole_forward_3x():
    """configs/flamingo.py:data=builtin with nothing frozen (it freezes the vision encoder and the LM; the frozen
    recipe's counts are checked part by part above): 3x the matmul FLOPs of the whole model's forward on one row
    (counted without the parts; the vocabulary is the built-in tokenizer's 640 once resolved)."""
    import flax.linen as nn

    from vlm_jax import models
    from vlm_jax.config_lib import load_config

    config = load_config(os.path.join(REPO, "configs/flamingo.py:data=builtin"))
    config.model.lm.vocab_size, config.model.media_token_id = 640, 3
    config.optim.freeze, config.optim.trainable_rows = (), ()
    system = models.build(config)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in system.dummy_batch(1).items()}
    params = jax.eval_shape(lambda b: nn.unbox(system.init(jax.random.key(0), b)), batch)
    assert system.flops_per_example() == 3 * matmul_flops(system.logits, params, batch)
