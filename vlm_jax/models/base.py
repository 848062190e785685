"""The interface every trainable system implements: what the trainer, `generate`, the evaluators and the CLI ask.

A system composes encoder(s) -> connector -> fusion -> decoder LM and
answers for itself; the shared machinery never assumes one family:

* training: `dummy_batch` (the batch keys it reads, with their shapes),
  `ignored_batch_keys` (keys a pipeline may yield that it reads no values of,
  each with the reason: any other extra key is an error, never a silent
  drop), `init`, `loss`, `flops_per_example`, `tokens_in`;
* `forward`: transformers-style inputs -> named outputs (`vlm-jax forward`);
* text generation (`vlm_jax/generate.py`, `evaluators/generative.py`,
  `vlm-jax generate`): `template` (the chat template its prompts are
  rendered with), `image_tokens` (placeholder ids per image slot),
  `stop_tokens` and `decoding` (its decoder with a KV cache and the inputs of
  the prompt pass and of each step, in a `Decoding`).

`fusion` says how images reach the text: "in_sequence" (image features
replace placeholder tokens in the LM's input: LLaVA, PaliGemma),
"cross_attention" (the LM attends to media latents through gated blocks:
Flamingo), "dual_encoder" (two towers and a contrastive loss), or "none".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from vlm_jax.errors import UserError

FUSIONS = ("in_sequence", "cross_attention", "dual_encoder", "none")


@dataclasses.dataclass(frozen=True)
class Decoding:
    """What a system hands `vlm_jax.generate` to decode with a KV cache.

    `decoder` is called as `decoder.apply({"params": params, "cache": c}, tokens, segment_ids, positions,
    **inputs, decode=True, mutable=["cache"])` and returns logits [B, T, vocab]. `prompt_inputs` are the
    keyword inputs of the prompt pass (Flamingo: media latents and the prompt's media mask; LLaVA: the image
    features and where they go; PaliGemma also the prefix mask), `step_inputs` those of every one-token step,
    and `cache_inputs` those that size an empty cache of the whole length (prompt + new tokens) for its shapes.
    """

    decoder: nn.Module
    params: Any
    prompt_inputs: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    step_inputs: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
    cache_inputs: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)


class System:
    """A model family plus how to initialise, score, run and decode it.

    Subclasses set `self.module` (a flax Module) in `__init__` and implement the
    methods below. All array methods are pure and jittable; `loss` returns
    *sums* so that gradient accumulation and data parallelism normalise
    exactly once, by the total weight.
    """

    module: nn.Module
    fusion: str = "none"
    # Batch keys a data pipeline may yield that this system reads no values of -> why (a documented no-op).
    ignored_batch_keys: Mapping[str, str] = {}

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of the right shapes and dtypes (used to initialise and compile); its keys are the ones read."""
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

    # ------------------------------------------------------------------ text generation

    @property
    def template(self) -> str:
        """The chat template prompts are rendered with (`data_pipelines/templates.py`): `data.template`."""
        template = self.config.get("data", {}).get("template")
        if not template:
            raise UserError(f"the {self.config.model.name} config names no data.template to render prompts with.")
        return str(template)

    @property
    def template_options(self) -> dict[str, Any]:
        """The template's options (`data.template_options`, e.g. a system message), as training rendered them."""
        return dict(self.config.get("data", {}).get("template_options", {}) or {})

    @property
    def image_tokens(self) -> int:
        """Placeholder ids per image slot in the token sequence (`model.image_tokens`)."""
        return int(self.config.model.get("image_tokens", 1))

    def stop_tokens(self, tokenizer: Any) -> tuple[int, ...]:
        """The ids that end a generated answer: the tokenizer's eos and the end-of-turn pieces of the template as
        `template_options` render it."""
        from data_pipelines import templates

        return templates.stop_ids(self.template, tokenizer, **self.template_options)

    def decoding(self, params: Any, batch: dict[str, np.ndarray], length: int) -> Decoding:
        """The decoder, its params and its extra inputs for a left-padded prompt batch (`generate.left_pad`,
        plus `generate.pad_images` for systems with images) that will grow to `length` tokens."""
        raise UserError(f"the {self.config.model.name} system cannot generate text.")

    # Optional: `evaluate(trainer, params) -> dict[str, float]`, the system's own evaluators
    # (retrieval, zero-shot, generative tasks), run by `vlm-jax eval` and every `eval_every` steps;
    # `pretrained(params, mesh=None, rules=None) -> params`, parts loaded from other checkpoints when training
    # starts fresh, each read straight into the shardings the trainer gives it on `mesh` by `rules`
    # (`parts.targets`; default: the config's), never through the host whole.
