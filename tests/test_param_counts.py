"""Paper-size configs build the published parameter counts (abstract init only: nothing is allocated)."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import REPO
from vlm_jax import models
from vlm_jax.config_lib import load_config


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# Published totals (image + text tower, projections, temperature/bias), from the released checkpoints'
# model cards on the Hugging Face hub: openai/clip-vit-base-patch16 (149.6M), openai/clip-vit-large-patch14
# (427.6M), google/siglip-base-patch16-224 (203.2M), google/siglip-so400m-patch14-384 (878M, "SigLIP
# SoViT-400m"; its image tower is 428M).
@pytest.mark.parametrize(
    "config, total, vision",
    [
        ("configs/clip.py:variant=B/16", 149.6e6, 86e6),  # ViT-B/16 image tower: 86M (ViT paper, Table 1)
        ("configs/clip.py:variant=L/14", 427.6e6, 304e6),  # ViT-L/14 image tower of openai/clip-vit-large-patch14: 304M
        ("configs/siglip.py:variant=B/16", 203.2e6, None),
        ("configs/siglip.py:variant=So400m/14", 878.0e6, 428e6),
    ],
)
def test_dual_encoder_paper_sizes(config, total, vision):
    c = load_config(os.path.join(REPO, config))
    system = models.build(c)
    params = nn.unbox(jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(1)))
    assert count(params) == pytest.approx(total, rel=0.01)
    if vision:
        assert count(params["image_encoder"]) == pytest.approx(vision, rel=0.01)


def test_nfnet_f6_config():
    """NFNet-F6 with its ImageNet head: 438.4M (Brock et al. 2021, arXiv:2102.06171, Table of F0-F7)."""
    c = load_config(os.path.join(REPO, "configs/nfnet.py:variant=F6"))
    system = models.build(c)
    params = jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(1))
    assert count(nn.unbox(params)) == pytest.approx(438.4e6, rel=0.01)


# Flamingo (Alayrac et al. 2022, arXiv:2204.14198), appendix B.1.1, Table 5 "Parameter counts for Flamingo models":
#            frozen LM, frozen vision, trainable GATED XATTN-DENSE, trainable resampler, total
FLAMINGO_TABLE_5 = {
    "3B": (1.4e9, 435e6, 1.2e9, 194e6, 3.2e9),
    "9B": (7.1e9, 435e6, 1.6e9, 194e6, 9.3e9),
    "80B": (70e9, 435e6, 10e9, 194e6, 80e9),
}


@pytest.mark.parametrize("variant", list(FLAMINGO_TABLE_5))
def test_flamingo_paper_sizes(variant):
    """Each component within 2% of Table 5, with one documented exception.

    The exception is the 80B cross-attention. Per block, Table 5 implies 1.2B / 24 = 11.9 d^2 (3B), 1.6B / 8 =
    11.9 d^2 (9B) but 10B / 12 = 12.4 d^2 (80B, 12 blocks as in Table 4): no block design is within 2% of all
    three (ours: 12 d^2 + one shared media map, 9.68B, -3.2%). For 80B we check instead the paper's own sum in
    B.1.1 ("... before every seventh ... 10B" additional learned parameters: cross-attention + resampler).
    """
    lm, vision, xattn, resampler, total = FLAMINGO_TABLE_5[variant]
    system = models.build(load_config(os.path.join(REPO, f"configs/flamingo.py:variant={variant}")))
    params = nn.unbox(jax.eval_shape(system.init, jax.random.key(0), system.dummy_batch(1)))
    decoder = params["decoder"]
    blocks = [decoder[k]["xattn"] for k in ("layer_groups", "layer_groups_tail") if k in decoder]
    counts = {
        "vision": count(params["vision"]),
        "resampler": count(params["perceiver"]),
        "xattn": count(blocks) + count(params["media_proj"]),
        "lm": count(decoder) - count(blocks),
        "total": count(params),
    }
    assert counts["vision"] == pytest.approx(vision, rel=0.02)
    assert counts["resampler"] == pytest.approx(resampler, rel=0.02)
    assert counts["lm"] == pytest.approx(lm, rel=0.02)
    assert counts["total"] == pytest.approx(total, rel=0.02)
    if variant == "80B":
        assert counts["xattn"] + counts["resampler"] == pytest.approx(10e9, rel=0.02)
        assert len(blocks) == 2 and count(blocks[1]) * 12 == pytest.approx(count(blocks), rel=1e-6)  # 11 + 1 blocks
    else:
        assert counts["xattn"] == pytest.approx(xattn, rel=0.02)
