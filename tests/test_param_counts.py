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
