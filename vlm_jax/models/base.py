"""The interface every trainable system implements (what the trainer needs to know)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np


class System:
    """A model family plus how to initialise, score and run it.

    Subclasses set `self.module` (a flax Module) in `__init__` and implement the
    methods below. All array methods are pure and jittable; `loss` returns
    *sums* so that gradient accumulation and data parallelism normalise
    exactly once, by the total weight.
    """

    module: nn.Module

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the right shapes and dtypes (used to initialise and compile)."""
        raise NotImplementedError

    def init(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
        """Boxed (logically partitioned) parameters from a dummy batch."""
        raise NotImplementedError

    def loss(self, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """(loss summed over the batch, total weight, other metric sums; each is later divided by the weight)."""
        raise NotImplementedError

    def flops_per_example(self) -> float:
        """Training FLOPs (forward + backward) for one example (one packed row)."""
        raise NotImplementedError

    def tokens_in(self, batch: dict[str, np.ndarray]) -> int:
        """Non-padding tokens in a host batch, for tokens/s."""
        raise NotImplementedError

    def forward(self, params: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`vlm-jax forward`: transformers-style inputs -> named outputs (e.g. logits)."""
        raise NotImplementedError

    # Optional: `evaluate(trainer, params) -> dict[str, float]`, the system's own evaluators
    # (retrieval, zero-shot, ...), run by `vlm-jax eval` and every `eval_every` steps;
    # `pretrained(params) -> params`, parts loaded from other checkpoints when training starts fresh;
    # `generation_parts(params, batch)`, what `vlm_jax/generate.py` needs to decode.
