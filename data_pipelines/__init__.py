"""Input pipelines: each yields host batches in the batch format of docs/design.md.

`build(config, split, process_index, process_count)` returns an iterator over
this process's share of each global batch, with `get_state()` / `set_state()`
so the trainer can checkpoint it beside the model.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import ml_collections
import numpy as np

from vlm_jax.errors import ConfigError


class BatchIterator(Protocol):
    """What the trainer needs from a pipeline: batches and a JSON-able resumable state."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...

    # Optional: `stats() -> dict[str, int]`, counts of kept / skipped / repaired records (logged as data/*).


# data.name -> "module:class"; imported on use (the Grain pipeline pulls in PIL and sentencepiece).
PIPELINES = {
    "synthetic_lm": "data_pipelines.synthetic:SyntheticTokens",
    "grain": "data_pipelines.pipeline:GrainPipeline",
    "pairs": "data_pipelines.pairs:PairsPipeline",
}


def build(
    config: ml_collections.ConfigDict, split: str, process_index: int = 0, process_count: int = 1
) -> BatchIterator:
    """The pipeline named by `config.data.name` for `split` ("train" or "validation")."""
    import importlib

    name = config.data.name
    if name not in PIPELINES:
        raise ConfigError(f"data.name {name!r} is not a known pipeline; known: {', '.join(sorted(PIPELINES))}.")
    if config.batch_size % process_count:
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {process_count} processes.")
    module, cls = PIPELINES[name].split(":")
    return getattr(importlib.import_module(module), cls)(config, split, process_index, process_count)
