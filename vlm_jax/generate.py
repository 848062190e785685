"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling, stop tokens.

`generate(system, params, prompts, settings)` takes prompts of different
lengths — and, for a Flamingo system, different numbers of images — as one
batch. Prompts are left-padded (padding is segment 0, so no token attends to
it; positions start at 0 at each prompt's first token); media are encoded
once per prompt before decoding starts. The prompt fills the cache in one
pass and gives the first new token; then one jitted `lax.while_loop` runs
the decoder on the latest token and samples the next, until every row has
produced a stop token or `max_new_tokens` tokens, so no forward pass follows
the last token (n new tokens: the prompt pass and n - 1 steps). A new token
sees the same media as the last prompt token (the latest image of its
prompt); a Flamingo LM projects the media to cross-attention keys and values
once per prompt, in the prompt pass, and its steps read them from the cache.

A system supports generation through its `decoding(params, batch, length)`
(`vlm_jax/models/base.py`): its decoder with a KV cache and the inputs of
the prompt pass and of each step (Flamingo's media latents and masks,
LLaVA's image features in place of their placeholders, PaliGemma's prefix
mask); prompts are rendered with the system's template, image tokens and
stop tokens (`parse_prompt`).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError

PAD = -1  # marks the steps after a row stopped, in the returned token array


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1; got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0; got {self.temperature}.")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0; got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must lie in (0, 1]; got {self.top_p}.")


def sample(logits: jax.Array, rng: jax.Array, settings: Sampling) -> jax.Array:
    """Next tokens [B] from logits [B, vocab] (float32)."""
    if settings.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / settings.temperature
    if settings.top_k:
        kth = jax.lax.top_k(logits, min(settings.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if settings.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = before < settings.top_p  # the smallest prefix whose mass reaches top_p (always >= 1 token)
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(
    prompts: Sequence[Sequence[int]], length: int | None = None, feature_index: Sequence[np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """tokens, segment_ids (0 = padding) and positions of left-padded prompts, `length` wide (default: the
    longest prompt; a fixed length keeps one compilation for batches of different prompts); with
    `feature_index` (one array per prompt, LLaVA-NeXT's) that too, padded alike."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token.")
    longest = max(len(p) for p in prompts)
    length = longest if length is None else length
    if longest > length:
        raise UserError(f"a prompt has {longest} tokens, more than the {length} allowed.")
    tokens = np.zeros((len(prompts), length), np.int32)
    segment_ids = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    index = np.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        start = length - len(prompt)
        tokens[row, start:] = prompt
        segment_ids[row, start:] = 1
        positions[row, start:] = np.arange(len(prompt))
        if feature_index is not None:
            index[row, start:] = feature_index[row]
    out = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
    if feature_index is not None:
        out["feature_index"] = index
    return out


def pad_images(images: Sequence[np.ndarray], size: int, slots: int | None = None) -> dict[str, np.ndarray]:
    """images [B, M, size, size, 3] (zeros in unused slots) and image_segment_ids [B, M] (0 = no image); M is
    `slots` or the most images of a prompt."""
    most = max(1, max(len(x) for x in images))
    slots = most if slots is None else slots
    if most > slots:
        raise UserError(f"a prompt has {most} images, more than the {slots} slots.")
    out = np.zeros((len(images), slots, size, size, 3), np.float32)
    ids = np.zeros((len(images), slots), np.int32)
    for row, row_images in enumerate(images):
        for slot, image in enumerate(row_images):
            if image.shape != (size, size, 3):
                raise UserError(
                    f"prompt {row} image {slot} has shape {image.shape}; the model takes ({size}, {size}, 3)."
                )
            out[row, slot], ids[row, slot] = image, 1
    return {"images": out, "image_segment_ids": ids}


def generate(system: Any, params: Any, batch: dict[str, np.ndarray], settings: Sampling, seed: int = 0) -> np.ndarray:
    """Generated tokens [B, max_new_tokens] for a left-padded prompt batch (`left_pad`, plus `pad_images` for
    systems with images); steps after a row's stop token hold PAD (-1); the stop token itself is kept."""
    length = batch["tokens"].shape[1] + settings.max_new_tokens
    d = system.decoding(params, batch, length)
    return np.asarray(
        _decode(
            _Static(d.decoder),
            settings,
            d.params,
            jnp.asarray(batch["tokens"]),
            jnp.asarray(batch["segment_ids"]),
            jnp.asarray(batch["positions"]),
            dict(d.prompt_inputs),
            dict(d.step_inputs),
            dict(d.cache_inputs),
            jax.random.PRNGKey(seed),
        )
    )


class _Static:
    """A static jit argument compared by identity (flax modules with dict fields are not hashable)."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value)

    def __eq__(self, other):
        return isinstance(other, _Static) and other.value is self.value


@partial(jax.jit, static_argnums=(0, 1))
def _decode(
    static_decoder, settings: Sampling, params, tokens, segment_ids, positions, prompt_inputs, step_inputs,
    cache_inputs, rng,
):  # fmt: skip
    decoder = static_decoder.value
    batch, prompt_len = tokens.shape
    total = prompt_len + settings.max_new_tokens

    def run(cache, tokens, segment_ids, positions, inputs):
        logits, variables = decoder.apply(
            {"params": params, "cache": cache}, tokens, segment_ids, positions, **inputs, decode=True, mutable=["cache"]
        )
        return logits[:, -1], variables["cache"]

    # An empty cache of `total` slots: the shapes of an init call, filled with zeros. Positions are [B, L], or
    # [B, 3, L] for M-RoPE (Qwen2-VL), whose new tokens are text: the same position on all three axes.
    dummy = jnp.zeros((batch, total), jnp.int32)
    dummy_positions = jnp.zeros(positions.shape[:-1] + (total,), jnp.int32)
    shapes = jax.eval_shape(
        lambda: decoder.init(jax.random.PRNGKey(0), dummy, dummy, dummy_positions, **cache_inputs, decode=True)["cache"]
    )
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    logits, cache = run(cache, tokens, segment_ids, positions, prompt_inputs)
    stop = jnp.asarray(settings.stop_tokens or (-2,), jnp.int32)

    def choose(step, logits, done, out, rng):
        """Samples new token `step` from its logits and records it (PAD in rows that stopped before it)."""
        rng, key = jax.random.split(rng)
        token = sample(logits, key, settings)
        out = out.at[:, step].set(jnp.where(done, PAD, token))
        return token, done | jnp.isin(token, stop), out, rng

    # The prompt pass gave the first new token's logits; each step runs the decoder on the latest token only
    # because another token follows it, so no forward pass comes after the last token.
    def body(state):
        step, cache, token, position, done, out, rng = state
        position = position + 1
        ones = jnp.ones((batch, 1), jnp.int32)
        logits, cache = run(cache, token[:, None], ones, position[..., None], step_inputs)
        token, done, out, rng = choose(step, logits, done, out, rng)
        return step + 1, cache, token, position, done, out, rng

    def cond(state):
        step, done = state[0], state[4]
        return (step < settings.max_new_tokens) & ~jnp.all(done)

    out = jnp.full((batch, settings.max_new_tokens), PAD, jnp.int32)
    token, done, out, rng = choose(0, logits, jnp.zeros((batch,), bool), out, rng)
    # The next position: one past the prompt's last; M-RoPE's new (text) tokens go on from the prompt's largest
    # position on all three axes (transformers' rope_deltas).
    if positions.ndim == 3:
        last = jnp.broadcast_to(positions.max(axis=(1, 2))[:, None], positions.shape[:2])
    else:
        last = positions[:, -1]
    state = (jnp.ones((), jnp.int32), cache, token, last, done, out, rng)
    return jax.lax.while_loop(cond, body, state)[5]


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a system's prompts become ids and its images media slots: the tokenizer, the chat template (None:
    text is encoded as written) and its options, feature placeholders per image slot, and the image
    preprocessing of its data config (`data.image`: fixed size, or tiles, as in training)."""

    tokenizer: Any
    template: str | None
    image_tokens: int
    image_size: int
    image_settings: Any
    template_options: Any = None
    vocab_size: int = 0  # the model's; prompt ids must lie in [0, vocab_size) (0: not checked)

    @classmethod
    def of(cls, system: Any, tokenizer: Any) -> "PromptFormat":
        """The format of `system` (its config's template, image tokens, image size and preprocessing)."""
        import ml_collections

        config = system.config
        return cls(
            tokenizer,
            config.get("data", {}).get("template") or None,
            system.image_tokens,
            int(config.model.get("image_size", 0)),
            ml_collections.ConfigDict(dict(config.get("data", {}).get("image", {}) or {})),
            system.template_options,
            _vocab_size(system),
        )

    @property
    def native(self) -> bool:
        """Whether images go in at native resolution (Qwen2-VL: patches and M-RoPE positions, no media slots)."""
        return bool(self.image_settings) and self.image_settings.get("mode") == "native"

    @property
    def indexed(self) -> bool:
        """Whether prompts carry a `feature_index` (LLaVA-NeXT's AnyRes layout)."""
        from data_pipelines.pipeline import uses_feature_index

        return bool(self.image_settings) and uses_feature_index(self.image_settings)

    def prompt(self, encoded_images: Sequence[bytes], render: Callable[..., list[int]]) -> dict[str, Any]:
        """A prompt from encoded images and `render(placeholders per image) -> ids`: {"tokens", "images" (the
        media slots: each image's views, as the pipeline makes them), "encoded", "feature_index" (or None)}.
        Under Idefics3's tiling `render` also gets the template option `grids` (each image's rows x cols of
        tiles, which the placeholder count alone does not fix). Raises `image_ops.BadImage` for an unreadable
        image."""
        from data_pipelines import image_ops, native_resolution, pipeline, templates

        encoded = [b for b in encoded_images if b is not None]
        views, orders, slots, grids = [], [], [], []
        if self.native:  # each image its (patches, grid) and as many placeholders as merged tokens
            views = [native_resolution.image_patches(image_ops.decode(d), self.image_settings) for d in encoded]
            tokens = render([native_resolution.merged_tokens(grid) for _, grid in views])
            return {"tokens": tokens, "images": views, "encoded": encoded, "feature_index": None}
        for data in encoded:
            image = image_ops.decode(data)
            image_views = pipeline.image_views(image, self.image_settings)
            views += image_views
            slots.append(len(image_views))
            if self.indexed:
                orders.append(pipeline.feature_order(image.shape[:2], self.image_settings, self.image_tokens))
            if self.image_settings.get("mode") == "idefics3":
                size, longest = int(self.image_settings.size), int(self.image_settings.longest_edge)
                grids.append(image_ops.idefics3_grid(*image.shape[:2], size, longest))
        counts = [len(o) for o in orders] if self.indexed else [self.image_tokens * k for k in slots]
        tokens = render(counts, grids=grids) if grids else render(counts)
        index = None
        if self.indexed:
            placeholder = self.tokenizer.token_id(templates.image_placeholder(self.template)[0])
            index = pipeline.feature_index(tokens, placeholder, orders, slots, self.image_tokens)
        return {"tokens": tokens, "images": views, "encoded": encoded, "feature_index": index}


def batch_of(prompts: Sequence[dict], fmt: PromptFormat, length: int | None = None, slots: int | None = None):
    """The left-padded batch of `PromptFormat.prompt` prompts (their images in media slots, feature indices
    where the format has them)."""
    index = [p["feature_index"] for p in prompts] if fmt.indexed else None
    batch = left_pad([p["tokens"] for p in prompts], length, index)
    if fmt.native:  # `slots` is the patch budget of a row; positions become M-RoPE's [B, 3, L]
        from data_pipelines import native_resolution, templates

        placeholder = fmt.tokenizer.token_id(templates.image_placeholder(fmt.template)[0])
        batch.update(native_resolution.row_inputs([(p["tokens"], p["images"]) for p in prompts], slots))
        positions = np.zeros((len(prompts), 3, batch["tokens"].shape[1]), np.int32)
        for row, p in enumerate(prompts):
            grids = [grid for _, grid in p["images"]]
            positions[row, :, -len(p["tokens"]) :] = native_resolution.mrope_positions(p["tokens"], grids, placeholder)
        batch["positions"] = positions
    elif fmt.image_size:
        batch.update(pad_images([p["images"] for p in prompts], fmt.image_size, slots))
    elif any(p["images"] for p in prompts):
        raise UserError("the system takes no images, but a prompt has some.")
    return batch


def _vocab_size(system: Any) -> int:
    """The vocabulary size of `system`'s language model (its module's, or its decoder's); 0 if it has none."""
    module = getattr(system, "module", None)
    for part in (module, getattr(module, "decoder", None)):
        size = getattr(part, "vocab_size", None)
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return 0


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def parse_prompt(item: dict, fmt: PromptFormat, where: str, root: str) -> dict:
    """One prompt {"text": ...} or {"input_ids": [...]}, with optional "images" (paths relative to `root`) ->
    a `PromptFormat.prompt`; `where` names it in error messages.

    A text is rendered by the system's template as the user's turn, ending
    with the template's generation prompt (`templates.user_prompt`: LLaVA's
    "USER: <image>\\n{text} ASSISTANT:", Flamingo's document `<s>{text}`);
    `<image>` marks where each image goes and expands to the system's image
    tokens for it. Without a template the text is encoded as written.
    "input_ids" are used as given: a non-empty flat list of integer ids in
    [0, vocab_size). Anything else (a field of the wrong type or shape, an id
    outside the vocabulary, an image that is missing, a folder or unreadable)
    is one UserError sentence naming `where`."""
    import os

    from data_pipelines import image_ops, templates

    if not isinstance(item, dict):
        raise UserError(f'{where} is not a JSON object like {{"text": ..., "images": [...]}}.')
    names = item.get("images", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{where}: images must be a list of image file paths; got {names!r:.80}.")
    encoded = []
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            raise UserError(f"{where}: the image {name} is a folder, not an image file.")
        if not os.path.isfile(path):
            raise UserError(f"{where}: the image {name} does not exist.")
        try:
            with open(path, "rb") as f:
                encoded.append(f.read())
        except OSError as e:
            raise UserError(f"{where}: the image {name} cannot be read ({e.strerror}).") from None
    if encoded and not fmt.image_size and not fmt.native:
        raise UserError(f"{where}: the system takes no images, but the prompt has {len(encoded)}.")
    if "input_ids" in item:
        ids = item["input_ids"]
        if not isinstance(ids, list) or any(isinstance(i, list) for i in ids):
            shape = "a nested list" if isinstance(ids, list) else type(ids).__name__
            raise UserError(f"{where}: input_ids must be a flat list of token ids (one prompt per line); got {shape}.")
        if not ids:
            raise UserError(f"{where}: input_ids is empty; a prompt needs at least one token.")
        wrong = [i for i in ids if not _is_id(i)]
        if wrong:
            raise UserError(f"{where}: input_ids must be integers; got {wrong[0]!r} ({type(wrong[0]).__name__}).")

        def render(counts, **extra):
            return [int(i) for i in ids]

    elif "text" in item:
        if not isinstance(item["text"], str):
            raise UserError(f"{where}: text must be a string; got {type(item['text']).__name__}.")
        try:
            item["text"].encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"{where}: the text is not valid UTF-8.") from None
        if fmt.tokenizer is None:
            raise UserError(f"{where} has text but no tokenizer is known (give --tokenizer).")

        def render(counts, **extra):
            if fmt.template is None:
                return fmt.tokenizer.encode(item["text"], add_bos=True)
            options = {**(fmt.template_options or {}), **extra}
            return templates.user_prompt(fmt.template, fmt.tokenizer, item["text"], len(counts), counts, **options)

    else:
        raise UserError(f"{where} has neither 'text' nor 'input_ids'.")
    try:
        prompt = fmt.prompt(encoded, render)
    except image_ops.BadImage as e:
        raise UserError(f"{where}: an image cannot be read ({e.reason}).") from None
    except templates.RenderError as e:
        raise UserError(f"{where}: {e}") from None
    tokens = prompt["tokens"]
    if fmt.vocab_size and tokens and (min(tokens) < 0 or max(tokens) >= fmt.vocab_size):
        low, high = min(tokens), max(tokens)
        if "input_ids" in item:
            raise UserError(f"{where}: input_ids must lie in [0, {fmt.vocab_size}); got values from {low} to {high}.")
        raise UserError(
            f"{where}: the tokenizer gives ids up to {high}, beyond the model's vocabulary of {fmt.vocab_size} "
            "(give the tokenizer the model was trained with)."
        )
    return prompt


def read_prompts(path: str, fmt: PromptFormat) -> list[dict[str, Any]]:
    """Prompts from a JSONL file, one `parse_prompt` item per line (image paths relative to the file); a line that
    is not UTF-8, not JSON or not an object is one UserError sentence naming the line."""
    import json
    import os

    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        raw = raw[3:]
    root = os.path.dirname(os.path.abspath(path))
    prompts = []
    for number, data in enumerate(raw.split(b"\n"), 1):
        if not data.strip():
            continue
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} line {number} is not valid UTF-8 (byte {e.start + 1}).") from None
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise UserError(f"{path} line {number} is not JSON ({getattr(e, 'msg', 'nested too deeply')}).") from None
        prompts.append(parse_prompt(item, fmt, f"{path} line {number}", root))
    if not prompts:
        raise UserError(f"{path} holds no prompts.")
    return prompts
