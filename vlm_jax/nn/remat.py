"""Rematerialisation (gradient checkpointing) policies by name, for the scanned layer stacks."""

from __future__ import annotations

import flax.linen as nn
import jax

from vlm_jax.errors import UserError

# What the backward pass may keep from the forward pass: "none" keeps everything (no remat), "full" nothing,
# "dots" the matmul outputs, "dots_no_batch" the matmul outputs without batch dimensions (weights-like).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat(block: type[nn.Module], policy: str) -> type[nn.Module]:
    """`block` rematerialised under the policy called `policy` (unchanged for "none"); an unknown name is a
    UserError listing the known ones."""
    if policy not in REMAT_POLICIES:
        raise UserError(f"unknown remat policy {policy!r}; use one of {', '.join(REMAT_POLICIES)}.")
    if REMAT_POLICIES[policy] is None:
        return block
    return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=False)
