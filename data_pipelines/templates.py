"""Prompt and chat templates: one record -> token ids plus which tokens are training targets.

Entry point for the pipeline::

    example = render(name, tokenizer, record, image_tokens, **options)   # -> TokenizedExample
    example.shifted()  # {"tokens", "targets", "loss_mask"[, "prefix_mask"]}, the packer's per-example layout

`record` is a dict in a user-data shape of docs/design.md (paths or encoded
bytes under "image"/"images" are only counted, never read):
  pairs        {"images": [img], "caption": str}           (or "image": img)
  llava        {"images": [...], "conversations": [{"from": "human"|"gpt", "value": str}, ...]}
  vqa          {"images": [img], "question": str, "answer": str}
  interleaved  {"texts": [str | None, ...], "images": [img | None, ...]}   (aligned lists)
`image_tokens` is the number of placeholder ids per image: an int, or one int
per image in order (InternVL: 256 x that image's tile count). A record that
cannot be rendered raises `RenderError` (a UserError) whose `reason` is a short
counter key: placeholder_mismatch, empty_text, bad_roles, multi_turn,
bad_record, unsupported_format.

How a sequence is tokenized: the template is a list of text pieces (each a
prompt or a target) and single ids (bos/eos). Consecutive text is encoded as
ONE string, as the systems' own code does, and a token is a target if its
character span overlaps target text (so a piece like "▁A" that carries the
separator space before an answer is a target). Image markers are encoded as
one placeholder id each and then expanded to `image_tokens` copies; image
placeholders, bos and prompt text are never targets.

Each template's exact string is written in its docstring; sources:
seeds_000_002_003_004_notes.md and seed001_survey_notes.md (cited as notes),
and, where the notes are silent, the systems' public code (cited by file).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from data_pipelines.tokenizer import Tokenizer
from vlm_jax.errors import UserError

IMAGE_MARKER = "<image>"  # where an image goes in user-data text (LLaVA's DEFAULT_IMAGE_TOKEN)

Turn = tuple[str, "str | None"]  # (user text with <image> markers, assistant answer; None = generation prompt)

# LLaVA `conv_vicuna_v1` (llava/conversation.py), used by LLaVA v1 and LLaVA-1.5 (`--version v1`).
LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# DeepSeek-VL deepseek_vl/utils/conversation.py, template "deepseek" (also transformers' DeepSeek-VL chat template).
DEEPSEEK_VL_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
# Qwen-VL finetune.py default system message.
QWEN_VL_SYSTEM = "You are a helpful assistant."
# InternVL internvl_chat/internvl/conversation.py, templates 'internlm2-chat' and 'phi3-chat' (same message).
INTERNVL_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)

# Instruction used when a pairs record (image + caption) goes through a chat template.
CAPTION_PROMPTS = {
    "llava": "Describe the image concisely.",  # first of LLaVA's brief-description instructions
    "minigpt4": "Describe this image in detail.",  # first line of MiniGPT-4's prompts/alignment.txt
    "qwen_vl": "Describe the image concisely.",  # assumption: Qwen-VL publishes no caption instruction for chat
    "internvl": "Please describe the image shortly.",  # the Mini-InternVL card's single-image example
    "qwen2_vl": "Describe this image.",  # the Qwen2-VL model card's example
    "idefics3": "Can you describe this image?",  # assumption: the Idefics3-8B model card's example question
    "deepseek_vl": "Describe the image concisely.",  # assumption: DeepSeek-VL publishes no caption instruction
}


class RenderError(UserError):
    """A record no template can render; `reason` is its snake_case counter key for the pipeline's skip stats."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One rendered example.

    ids:          int32 [n], the whole sequence with image placeholder ids expanded.
    predict:      bool [n], True where ids[i] is a training target (predicted from ids[:i]).
    num_images:   images in the sequence (each is a run of placeholder ids).
    prefix_mask:  bool [n] or None; True on the bidirectional prefix (PaliGemma only).
    image_token_id: the placeholder id the model replaces with image features.
    """

    ids: np.ndarray
    predict: np.ndarray
    num_images: int
    prefix_mask: np.ndarray | None = None
    image_token_id: int = -1

    def __post_init__(self):
        object.__setattr__(self, "ids", np.asarray(self.ids, np.int32))
        object.__setattr__(self, "predict", np.asarray(self.predict, np.bool_))
        if self.ids.ndim != 1 or self.predict.shape != self.ids.shape:
            raise ValueError(f"ids {self.ids.shape} and predict {self.predict.shape} must be equal 1-D shapes.")
        if self.prefix_mask is not None:
            object.__setattr__(self, "prefix_mask", np.asarray(self.prefix_mask, np.bool_))
            if self.prefix_mask.shape != self.ids.shape:
                raise ValueError(f"prefix_mask {self.prefix_mask.shape} must have the shape of ids {self.ids.shape}.")

    def __len__(self) -> int:
        return len(self.ids)

    def shifted(self) -> dict[str, np.ndarray]:
        """Next-token layout: tokens=ids[:-1], targets=ids[1:], loss_mask=predict[1:] as float32,
        and prefix_mask[:-1] when there is one (the per-example rows the packer concatenates)."""
        out = {
            "tokens": self.ids[:-1],
            "targets": self.ids[1:],
            "loss_mask": self.predict[1:].astype(np.float32),
        }
        if self.prefix_mask is not None:
            out["prefix_mask"] = self.prefix_mask[:-1]
        return out


# ----------------------------------------------------------------------------- sequence builder


class _Builder:
    """Collects prompt/target text and single ids, then tokenizes them as described in the module docstring."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.parts: list[tuple[str | int, bool]] = []

    def prompt(self, text: str) -> None:
        if text:
            self.parts.append((text, False))

    def target(self, text: str) -> None:
        if text:
            self.parts.append((text, True))

    def token(self, token_id: int, target: bool = False) -> None:
        self.parts.append((int(token_id), target))

    def bos(self) -> None:
        if self.tok.bos_id >= 0:  # models without bos (Qwen's style) simply start with text
            self.token(self.tok.bos_id)

    def eos(self, target: bool = True) -> None:
        if self.tok.eos_id < 0:
            raise UserError("this template needs an eos token, which the tokenizer model does not define.")
        self.token(self.tok.eos_id, target)

    def _encode_chunk(self, text: str, ranges: list[tuple[int, int]], ids: list[int], predict: list[bool]) -> None:
        toks, offsets = self.tok.encode_with_offsets(text)
        if not toks:
            return
        spans = np.asarray(offsets, np.int64).reshape(-1, 2)
        begin, end = spans[:, 0], np.maximum(spans[:, 1], spans[:, 0] + 1)
        hit = np.zeros(len(toks), bool)
        for start, stop in ranges:
            hit |= (begin < stop) & (end > start)
        ids.extend(toks)
        predict.extend(hit.tolist())

    def build(
        self, placeholder: str, image_tokens: int | Sequence[int], num_images: int, prefix_lm: bool = False
    ) -> TokenizedExample:
        ids: list[int] = []
        predict: list[bool] = []
        chunk: list[str] = []
        ranges: list[tuple[int, int]] = []
        length = 0
        for value, is_target in self.parts:
            if isinstance(value, str):
                if is_target:
                    ranges.append((length, length + len(value)))
                chunk.append(value)
                length += len(value)
                continue
            self._encode_chunk("".join(chunk), ranges, ids, predict)
            chunk, ranges, length = [], [], 0
            ids.append(value)
            predict.append(is_target)
        self._encode_chunk("".join(chunk), ranges, ids, predict)

        placeholder_id = self.tok.token_id(placeholder)
        counts = _image_counts(image_tokens, num_images)
        found = sum(1 for t in ids if t == placeholder_id)
        if found != num_images:
            raise RenderError(
                "placeholder_mismatch", f"the text holds {found} {placeholder} placeholders for {num_images} images."
            )
        out_ids: list[int] = []
        out_predict: list[bool] = []
        image = 0
        for t, p in zip(ids, predict):
            if t == placeholder_id:
                out_ids.extend([t] * counts[image])
                out_predict.extend([False] * counts[image])
                image += 1
            else:
                out_ids.append(t)
                out_predict.append(p)
        predict_arr = np.asarray(out_predict, np.bool_)
        prefix_mask = None
        if prefix_lm:
            first_target = int(np.argmax(predict_arr)) if predict_arr.any() else len(predict_arr)
            prefix_mask = np.arange(len(predict_arr)) < first_target
        return TokenizedExample(np.asarray(out_ids, np.int32), predict_arr, num_images, prefix_mask, placeholder_id)


def _image_counts(image_tokens: int | Sequence[int], num_images: int) -> list[int]:
    if isinstance(image_tokens, (int, np.integer)):
        counts = [int(image_tokens)] * num_images
    else:
        counts = [int(c) for c in image_tokens]
        if len(counts) != num_images:
            raise ValueError(f"image_tokens gives {len(counts)} counts for {num_images} images.")
    if any(c < 1 for c in counts):
        raise ValueError(f"image_tokens must be >= 1 per image, got {counts}.")
    return counts


def _count_markers(turns: Sequence[Turn]) -> int:
    return sum(q.count(IMAGE_MARKER) for q, _ in turns)


def _check_turns(turns: Sequence[Turn]) -> None:
    if not turns:
        raise RenderError("empty_text", "the conversation has no turns.")
    for i, (q, a) in enumerate(turns):
        if a is None and i != len(turns) - 1:
            raise RenderError("bad_roles", f"turn {i + 1} has no answer but is not the last turn.")
        if not q.strip() or (a is not None and not a.strip()):
            raise RenderError("empty_text", f"turn {i + 1} has an empty question or answer.")
        if a is not None and IMAGE_MARKER in a:
            raise RenderError("placeholder_mismatch", f"the answer of turn {i + 1} contains an {IMAGE_MARKER} marker.")


def _replace_markers(text: str, make: Callable[[int], str], first_index: int) -> str:
    """Replaces each <image> marker in place by make(k), k counting images from `first_index`."""
    pieces = text.split(IMAGE_MARKER)
    out = [pieces[0]]
    for k, rest in enumerate(pieces[1:]):
        out.append(make(first_index + k))
        out.append(rest)
    return "".join(out)


def _marker_first(text: str, separator: str) -> str:
    """LLaVA's normalisation of a turn with one image: the marker moves to the front, then `separator`."""
    if text.count(IMAGE_MARKER) != 1:
        return text
    rest = text.replace(IMAGE_MARKER, "").strip()
    return IMAGE_MARKER + separator + rest if rest else IMAGE_MARKER


# ----------------------------------------------------------------------------- templates


def llava(
    tokenizer: Tokenizer, turns: Sequence[Turn], image_tokens: int | Sequence[int] = 576, *, system: str = LLAVA_SYSTEM
) -> TokenizedExample:
    """LLaVA v1 / LLaVA-1.5 `conv_vicuna_v1` (SeparatorStyle.TWO, sep " ", sep2 "</s>"), multi-turn::

        <s>{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

    `</s>` is the eos id. Targets: each answer and its `</s>` (LLaVA's
    preprocess_v1 masks everything up to " ASSISTANT: "). A turn with one
    <image> has it moved to the front followed by "\\n" (preprocess_multimodal).
    A final turn without answer ends with "ASSISTANT:" (the generation prompt).
    Each `<image>` expands to `image_tokens` placeholders (576 for 336px CLIP-L/14).
    """
    turns = [(_marker_first(q, "\n"), a) for q, a in turns]
    _check_turns(turns)
    b = _Builder(tokenizer)
    b.bos()
    for i, (q, a) in enumerate(turns):
        b.prompt((system + " " if i == 0 else "") + f"USER: {q} ASSISTANT:")
        if a is None:
            break
        b.prompt(" ")
        b.target(a)
        b.eos()
    return b.build(IMAGE_MARKER, image_tokens, _count_markers(turns))


def llava_plain(
    tokenizer: Tokenizer, caption: str, num_images: int = 1, image_tokens: int | Sequence[int] = 576
) -> TokenizedExample:
    """LLaVA's stage-1 (feature alignment) `plain` template::

        <s><image>{caption}\\n

    Targets: the caption and its "\\n" (preprocess_plain masks the image only).
    """
    if not caption.strip():
        raise RenderError("empty_text", "the caption is empty.")
    b = _Builder(tokenizer)
    b.bos()
    b.prompt(IMAGE_MARKER * num_images)
    b.target(caption + "\n")
    return b.build(IMAGE_MARKER, image_tokens, num_images)


def minigpt4(tokenizer: Tokenizer, turns: Sequence[Turn], image_tokens: int | Sequence[int] = 32) -> TokenizedExample:
    """MiniGPT-4 stage-2 (Vicuna) template::

        <s>###Human: <Img><ImageHere></Img> {instruction} ###Assistant: {answer}###

    The notes give `###Human: <Img><ImageFeature></Img><Instruction>###Assistant:`
    (blog shorthand) and the stage-1 prompt `... Say everything you see. ###Assistant:`;
    the spacing here is the release code's: prompt_template '###Human: {} ###Assistant: ',
    instructions '<Img><ImageHere></Img> Describe this image in detail.' (prompts/alignment.txt),
    end_sym '###', and a bos before the image. Targets: the answer and its
    "###" end symbol (the prompt's loss is not counted, notes §1.1). A turn
    with one <image> gets it at the front as `<Img><ImageHere></Img> `.
    Multi-turn (an extension; MiniGPT-4 trains single-turn) follows its demo
    conversation, where "###" both ends an answer and opens the next turn:
    `...{a1}###Human: {q2} ###Assistant: {a2}###`. A final turn without
    answer ends with "###Assistant:". `<ImageHere>` expands to `image_tokens`
    (32 Q-Former queries); `<Img>`/`</Img>` are plain text, as in MiniGPT-4.
    """
    turns = [(_marker_first(q, " "), a) for q, a in turns]
    _check_turns(turns)
    b = _Builder(tokenizer)
    b.bos()
    for i, (q, a) in enumerate(turns):
        q_text = q.replace(IMAGE_MARKER, "<Img><ImageHere></Img>")
        b.prompt(("###" if i == 0 else "") + f"Human: {q_text} ###Assistant:")
        if a is None:
            break
        b.prompt(" ")
        b.target(a + "###")
    return b.build("<ImageHere>", image_tokens, _count_markers(turns))


def qwen_vl(
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    image_tokens: int | Sequence[int] = 256,
    *,
    system: str = QWEN_VL_SYSTEM,
) -> TokenizedExample:
    """Qwen-VL-Chat ChatML (the notes are silent; Qwen-VL's finetune.py and tokenizer's from_list_format)::

        <|im_start|>system\\n{system}<|im_end|>\\n
        <|im_start|>user\\nPicture 1: <img><imgpad>..</img>\\n{q}<|im_end|>\\n
        <|im_start|>assistant\\n{a}<|im_end|>\\n   (repeated per turn)

    No bos (Qwen's tokenizer adds none). Each <image> marker is replaced in
    place by `Picture {k}: <img>...</img>`, k counting images over the whole
    conversation (assumption; from_list_format counts per query), with
    `image_tokens` `<imgpad>` ids inside (256 in Qwen-VL). Targets: each
    answer and its `<|im_end|>` (Qwen's finetune.py also trains on the
    <|im_start|>/<|im_end|>/"\\n" structure tokens of every turn; we do not).
    A final turn without answer ends with "<|im_start|>assistant\\n".
    Grounding text goes inside answers or questions as written by `qwen_box`.
    """
    _check_turns(turns)
    b = _Builder(tokenizer)
    b.prompt(f"<|im_start|>system\n{system}<|im_end|>\n")
    seen = 0
    for q, a in turns:
        q_text = _replace_markers(q, lambda k: f"Picture {k}: <img><imgpad></img>", seen + 1)
        seen += q.count(IMAGE_MARKER)
        b.prompt(f"<|im_start|>user\n{q_text}<|im_end|>\n<|im_start|>assistant\n")
        if a is None:
            break
        b.target(a + "<|im_end|>")
        b.prompt("\n")
    return b.build("<imgpad>", image_tokens, _count_markers(turns))


def qwen2_vl(
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    image_tokens: int | Sequence[int],
    *,
    system: str = QWEN_VL_SYSTEM,
) -> TokenizedExample:
    """Qwen2-VL / Qwen2.5-VL chat (the checkpoints' `chat_template`)::

        <|im_start|>system\n{system}<|im_end|>\n
        <|im_start|>user\n<|vision_start|><|image_pad|>..<|vision_end|>{q}<|im_end|>\n
        <|im_start|>assistant\n{a}<|im_end|>\n   (repeated per turn)

    No bos. Each <image> marker becomes `<|vision_start|>` + one `<|image_pad|>`
    per merged token of that image (its own count: native resolution) +
    `<|vision_end|>`, in place. Targets: each answer and its `<|im_end|>`. A
    final turn without answer ends with "<|im_start|>assistant\n".
    """
    _check_turns(turns)
    b = _Builder(tokenizer)
    b.prompt(f"<|im_start|>system\n{system}<|im_end|>\n")
    for q, a in turns:
        q_text = q.replace(IMAGE_MARKER, "<|vision_start|><|image_pad|><|vision_end|>")
        b.prompt(f"<|im_start|>user\n{q_text}<|im_end|>\n<|im_start|>assistant\n")
        if a is None:
            break
        b.target(a + "<|im_end|>")
        b.prompt("\n")
    return b.build("<|image_pad|>", image_tokens, _count_markers(turns))


def qwen_box(x1: float, y1: float, x2: float, y2: float, width: float, height: float, ref: str | None = None) -> str:
    """Qwen-VL grounding text for a pixel box: `<ref>{ref}</ref><box>(x1,y1),(x2,y2)</box>`.

    Coordinates are normalised to integers in [0, 1000): int(v / size * 1000),
    clipped to 999 (Qwen-VL paper: "normalized within the range [0, 1000)").
    Without `ref` only the `<box>...</box>` part is returned.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}.")

    def norm(v: float, size: float) -> int:
        return min(999, max(0, int(v / size * 1000)))

    box = f"<box>({norm(x1, width)},{norm(y1, height)}),({norm(x2, width)},{norm(y2, height)})</box>"
    return box if ref is None else f"<ref>{ref}</ref>{box}"


_INTERNVL_STYLES = {
    # name: (system template, user role, assistant role, separator); SeparatorStyle.MPT
    "internlm2": ("<|im_start|>system\n{}", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "phi3": ("<|system|>\n{}", "<|user|>\n", "<|assistant|>\n", "<|end|>"),
}


def internvl(
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    image_tokens: int | Sequence[int] = 256,
    *,
    style: str = "internlm2",
    system: str = INTERNVL_SYSTEM,
) -> TokenizedExample:
    """InternVL 1.5 chat (InternVL's conversation.py; the notes call the literal template silent).

    style="internlm2" (InternVL-Chat-V1-5, template 'internlm2-chat')::

        <s><|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n{q}<|im_end|><|im_start|>assistant\\n{a}<|im_end|>

    style="phi3" (Mini-InternVL-Chat-4B-V1-5, template 'phi3-chat', LMDeploy 'internvl-phi3')::

        <s><|system|>\\n{system}<|end|><|user|>\\n{q}<|end|><|assistant|>\\n{a}<|end|>

    (SeparatorStyle.MPT: no newline between turns.) Each <image> marker is
    replaced in place by `<img>` + `<IMG_CONTEXT>` x image_tokens + `</img>`,
    exactly as the card's chat() does with num_image_token (256) x num_patches;
    pass image_tokens per image = 256 x tiles. A pairs record becomes
    `<image>\\nPlease describe the image shortly.` (the card's example).
    Targets: each answer and its separator (preprocess_internlm / preprocess_phi3).
    """
    if style not in _INTERNVL_STYLES:
        raise UserError(f"InternVL style {style!r} is not one of {', '.join(_INTERNVL_STYLES)}.")
    system_template, user, assistant, sep = _INTERNVL_STYLES[style]
    _check_turns(turns)
    b = _Builder(tokenizer)
    b.bos()
    b.prompt(system_template.format(system) + sep)
    for q, a in turns:
        q_text = q.replace(IMAGE_MARKER, "<img><IMG_CONTEXT></img>")
        b.prompt(f"{user}{q_text}{sep}{assistant}")
        if a is None:
            break
        b.target(a + sep)
    return b.build("<IMG_CONTEXT>", image_tokens, _count_markers(turns))


IDEFICS3_FAKE, IDEFICS3_GLOBAL = "<fake_token_around_image>", "<global-img>"


def idefics3_image_text(rows: int, cols: int) -> str:
    """One image's text in Idefics3's prompt (transformers' `Idefics3Processor.replace_image_token`), with ONE
    `<image>` per tile (the builder expands each to the tile's placeholders). Unsplit ((0, 0))::

        <fake_token_around_image><global-img><image><fake_token_around_image>

    Split into rows x cols tiles: `<fake_token_around_image><row_{r}_col_{c}><image>` per tile, a newline after
    each row, then `\\n<fake_token_around_image><global-img><image><fake_token_around_image>`."""
    glob = f"{IDEFICS3_FAKE}{IDEFICS3_GLOBAL}{IMAGE_MARKER}{IDEFICS3_FAKE}"
    if rows == 0 and cols == 0:
        return glob
    grid = "".join(
        "".join(f"{IDEFICS3_FAKE}<row_{r}_col_{c}>{IMAGE_MARKER}" for c in range(1, cols + 1)) + "\n"
        for r in range(1, rows + 1)
    )
    return grid + "\n" + glob


def idefics3_grids(counts: Sequence[int], tile_tokens: int, tiles_per_side: int = 0) -> list[tuple[int, int]]:
    """Each image's (rows, cols) from its placeholder count alone, where that is unambiguous: one tile is an
    unsplit image, `tiles_per_side`^2 + 1 tiles the square grid (Idefics3 gives the longest side
    `tiles_per_side` tiles, so a 1 x 4 and a 4 x 1 grid have the same count); anything else raises
    RenderError "ambiguous_grid" (the caller must pass `grids`)."""
    grids = []
    for count in counts:
        tiles, rest = divmod(int(count), int(tile_tokens))
        if rest or tiles < 1:
            raise RenderError("placeholder_mismatch", f"{count} placeholders are not whole tiles of {tile_tokens}.")
        if tiles == 1:
            grids.append((0, 0))
        elif tiles_per_side and tiles == tiles_per_side**2 + 1:
            grids.append((tiles_per_side, tiles_per_side))
        else:
            raise RenderError(
                "ambiguous_grid", f"an image of {tiles} Idefics3 tiles has no unique grid; the template needs its grid."
            )
    return grids


def idefics3(
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    image_tokens: int | Sequence[int],
    *,
    grids: Sequence[tuple[int, int]],
    system: str | None = None,
) -> TokenizedExample:
    """Idefics3 chat (the Idefics3 processors' chat_template.json, e.g. hf-internal-testing's tiny Idefics3;
    tests/test_hf_idefics3.py renders it with jinja2 and compares)::

        <|begin_of_text|>User:{q}<end_of_utterance>\\nAssistant: {a}<end_of_utterance>\\n

    ("User:" takes a space unless the turn starts with an image; an optional system message is a first
    "System: {system}<end_of_utterance>\\n" turn). The built-in vocabulary has no `<end_of_utterance>`: the
    tokenizer's eos stands in its place (and is where answers stop). Each <image> marker (the newline a
    LLaVA-style record puts after one is dropped: the chat template writes an image item straight before the
    text) becomes that image's `idefics3_image_text(*grids[i])` with `image_tokens[i] / tiles` placeholders per
    tile. `<fake_token_around_image>` and `<global-img>` are single pieces; `<row_r_col_c>` is plain text (several
    pieces with the built-in tokenizer; one added token in Idefics3's own). Targets: " {a}" and its end of
    utterance.
    """
    _check_turns(turns)
    counts = _image_counts(image_tokens, _count_markers(turns))
    if len(grids) != len(counts):
        raise RenderError("placeholder_mismatch", f"{len(grids)} image grids for {len(counts)} images.")
    per_tile = []
    for count, (rows, cols) in zip(counts, grids):
        tiles = rows * cols + 1 if rows or cols else 1
        if count % tiles:
            raise RenderError("placeholder_mismatch", f"{count} placeholders do not share out over {tiles} tiles.")
        per_tile += [count // tiles] * tiles
    b = _Builder(tokenizer)
    b.bos()
    if system:
        b.prompt(f"System: {system}")
        b.eos(target=False)
        b.prompt("\n")
    images = 0
    for q, a in turns:
        q = q.replace(IMAGE_MARKER + "\n", IMAGE_MARKER)
        text = _replace_markers(q, lambda k: idefics3_image_text(*grids[k]), images)
        images += q.count(IMAGE_MARKER)
        b.prompt(("User:" if q.startswith(IMAGE_MARKER) else "User: ") + text)
        b.eos(target=False)
        b.prompt("\nAssistant:")
        if a is None:
            break
        b.target(" " + a)
        b.eos()
        b.prompt("\n")
    built = b.build(IMAGE_MARKER, per_tile, len(per_tile))
    return dataclasses.replace(built, num_images=len(counts))


def deepseek_vl(
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    image_tokens: int | Sequence[int] = 576,
    *,
    system: str = DEEPSEEK_VL_SYSTEM,
) -> TokenizedExample:
    """DeepSeek-VL chat (DeepSeek-VL's deepseek_vl/utils/conversation.py, template "deepseek",
    SeparatorStyle.DeepSeek; the same string as the chat template transformers' conversion script writes)::

        <s>{system}\\n\\nUser: {q}\\n\\nAssistant: {a}<eos>User: {q2}\\n\\nAssistant: {a2}<eos>

    (sep "\\n\\n" after the system message and each user turn, sep2 = eos `<｜end▁of▁sentence｜>` after each
    answer; a generation prompt ends "Assistant:"). Each <image> marker becomes `<image_placeholder>` in place,
    expanded to image_tokens (576) copies as `VLChatProcessor` does; a newline right after a marker is dropped,
    as DeepSeek-VL's examples write `<image_placeholder>Describe ...`. Targets: each answer (with the space
    after "Assistant:") and its eos (the loss on the language part only, arXiv:2403.05525).
    """
    _check_turns(turns)
    b = _Builder(tokenizer)
    b.bos()
    b.prompt(system + "\n\n" if system else "")
    for q, a in turns:
        q_text = q.replace(IMAGE_MARKER + "\n", IMAGE_MARKER).replace(IMAGE_MARKER, "<image_placeholder>")
        b.prompt(f"User: {q_text}\n\nAssistant:")
        if a is None:
            break
        b.target(" " + a)
        b.eos()
    return b.build("<image_placeholder>", image_tokens, _count_markers(turns))


def paligemma(
    tokenizer: Tokenizer,
    prefix: str,
    suffix: str | None,
    num_images: int = 1,
    image_tokens: int | Sequence[int] = 256,
) -> TokenizedExample:
    """PaliGemma prefix-LM (transformers' PaliGemmaProcessor / big_vision)::

        <image> x image_tokens x num_images  <bos>{prefix}\\n{suffix}<eos>

    prefix_mask is True on the images, bos, prefix and "\\n" (full attention,
    no loss); the suffix and its eos are the targets (big_vision also trains
    on the eos). `suffix=None` gives the generation prompt (ending at "\\n").
    Task prefixes: "caption en", "answer en {question}" (notes: task prefixes
    select the task).
    """
    if not prefix.strip() or (suffix is not None and not suffix.strip()):
        raise RenderError("empty_text", "the PaliGemma prefix or suffix is empty.")
    if IMAGE_MARKER in prefix or (suffix is not None and IMAGE_MARKER in suffix):
        raise RenderError("placeholder_mismatch", "PaliGemma text must not contain <image> markers.")
    b = _Builder(tokenizer)
    b.prompt(IMAGE_MARKER * num_images)
    b.bos()
    b.prompt(prefix + "\n")
    if suffix is not None:
        b.target(suffix)
        b.eos()
    return b.build(IMAGE_MARKER, image_tokens, num_images, prefix_lm=True)


# Fuyu's beginning-of-answer marker: FuyuProcessor appends the byte piece <0x04> ("<boa>") to every prompt.
FUYU_BOA = "\x04"
# Fuyu-8B model card's example prompts: "Generate a coco-style caption.\n" and "What color is the bus?\n".
FUYU_CAPTION_PROMPT = "Generate a coco-style caption.\n"


def fuyu(
    tokenizer: Tokenizer,
    prompt: str,
    answer: str | None,
    num_images: int = 1,
    image_tokens: int | Sequence[int] = 36 * 37,  # configs/fuyu.py's 8b: a square image's 36 x (36 + newline)
) -> TokenizedExample:
    """Fuyu (transformers' FuyuProcessor: `prepare_inputs_layout`, `replace_image_token`)::

        |SPEAKER| x image_tokens x num_images  <s>{prompt}<0x04>{answer}</s>

    Each image is one contiguous run of `image_tokens` `|SPEAKER|` placeholders:
    rows * (cols + 1) for an image of rows x cols patches, the processor's
    `(|SPEAKER| x cols, |NEWLINE|) x rows`, where the data's `feature_index`
    marks the newlines (data_pipelines/pipeline.py::fuyu_feature_order) and the
    fuyu model gives them the `|NEWLINE|` token (vlm_jax/models/fuyu.py; the
    packer never splits a run). `<0x04>` is the beginning-of-answer byte piece
    the processor appends to every prompt. Targets: the answer and the eos
    (Fuyu publishes no training format; this is the processor's prompt with the
    answer and eos after it). `answer=None` gives the generation prompt,
    ending with `<0x04>`.
    """
    if not prompt.strip() or (answer is not None and not answer.strip()):
        raise RenderError("empty_text", "the Fuyu prompt or answer is empty.")
    if IMAGE_MARKER in prompt or (answer is not None and IMAGE_MARKER in answer):
        raise RenderError("placeholder_mismatch", "Fuyu text must not contain <image> markers.")
    b = _Builder(tokenizer)
    b.prompt("|SPEAKER|" * num_images)
    b.bos()
    b.prompt(prompt + FUYU_BOA)
    if answer is not None:
        b.target(answer)
        b.eos()
    return b.build("|SPEAKER|", image_tokens, num_images)


def flamingo(
    tokenizer: Tokenizer,
    items: Sequence[str | None],
    image_tokens: int | Sequence[int] = 1,
    *,
    text_separator: str = " ",
) -> TokenizedExample:
    """Flamingo interleaved document; `items` in order, None for an image, str for text::

        <s>Intro<|endofchunk|><image>Text after the image.<|endofchunk|><image>More.<|endofchunk|></s>

    Every text chunk ends with <|endofchunk|> (Flamingo's <EOC>, "before every
    image and at the end"); consecutive text items join with `text_separator`
    (" ", as OpenFlamingo joins MMC4 sentences). A pair is `<s><image>{caption}<|endofchunk|></s>`
    (OpenFlamingo's LAION format). Targets: all text, each <|endofchunk|> and
    the eos; never bos or <image> (OpenFlamingo additionally masks MMC4 text
    before the first image; we keep it, as the brief and the paper do).
    `<image>` expands to `image_tokens` ids (1: Flamingo attends to images by
    cross-attention, the token only marks where).
    """
    b = _Builder(tokenizer)
    b.bos()
    text: list[str] = []
    num_images = 0

    def flush() -> None:
        if text:
            b.target(text_separator.join(text) + "<|endofchunk|>")
            text.clear()

    for item in items:
        if item is None:
            flush()
            b.prompt(IMAGE_MARKER)
            num_images += 1
        elif item.strip():
            text.append(item)
    if not any(item is not None and item.strip() for item in items):
        raise RenderError("empty_text", "the document has no text.")
    flush()
    b.eos()
    return b.build(IMAGE_MARKER, image_tokens, num_images)


def flamingo_vqa(
    tokenizer: Tokenizer, turns: Sequence[Turn], image_tokens: int | Sequence[int] = 1
) -> TokenizedExample:
    """Flamingo question answering (a llava or vqa record), in OpenFlamingo's VQA prompt (see `flamingo_fewshot`)::

        <s><image>Question:{q1} Short answer:{a1}<|endofchunk|>Question:{q2} Short answer:{a2}<|endofchunk|></s>

    Each turn starts with its own images (one `<image>` per marker in its
    question, in order), then `Question:{q} Short answer:{a}<|endofchunk|>`; q
    is the question without its `<image>` markers and the whitespace around
    them. Targets: each answer, its <|endofchunk|> and the eos; never bos,
    `<image>` or the question. A final turn without answer ends with
    "Short answer:" (the generation prompt, no eos), as the few-shot query does.
    A turn whose question is only images raises RenderError "empty_text".
    """
    _check_turns(turns)
    b = _Builder(tokenizer)
    b.bos()
    for i, (q, a) in enumerate(turns):
        question = " ".join(part.strip() for part in q.split(IMAGE_MARKER) if part.strip())
        if not question:
            raise RenderError("empty_text", f"turn {i + 1} has no question text besides its images.")
        b.prompt(IMAGE_MARKER * q.count(IMAGE_MARKER) + f"Question:{question} Short answer:")
        if a is None:
            return b.build(IMAGE_MARKER, image_tokens, _count_markers(turns))
        b.target(a + "<|endofchunk|>")
    b.eos()
    return b.build(IMAGE_MARKER, image_tokens, _count_markers(turns))


def flamingo_fewshot(
    tokenizer: Tokenizer,
    shots: Sequence[Mapping[str, str]],
    query: Mapping[str, str],
    task: str = "vqa",
    image_tokens: int | Sequence[int] = 1,
) -> TokenizedExample:
    """OpenFlamingo's few-shot evaluation prompt (open_flamingo/eval), one image per shot and query::

        vqa:     <s><image>Question:{q} Short answer:{a}<|endofchunk|>...<image>Question:{q} Short answer:
        caption: <s><image>Output:{caption}<|endofchunk|>...<image>Output:

    shots: dicts with "question"/"answer" (vqa) or "caption" (caption); query
    the same, its answer/caption optional. Only the query's answer (if
    given, without <|endofchunk|>) is a target, for scoring by likelihood.
    """
    if task == "vqa":

        def prompt(ex: Mapping[str, str]) -> tuple[str, str | None]:
            return f"{IMAGE_MARKER}Question:{ex['question']} Short answer:", ex.get("answer")

    elif task == "caption":

        def prompt(ex: Mapping[str, str]) -> tuple[str, str | None]:
            return f"{IMAGE_MARKER}Output:", ex.get("caption")

    else:
        raise UserError(f"few-shot task {task!r} is not one of vqa, caption.")
    b = _Builder(tokenizer)
    b.bos()
    for shot in shots:
        text, answer = prompt(shot)
        if answer is None:
            raise UserError("every few-shot example needs its answer or caption.")
        b.prompt(f"{text}{answer}<|endofchunk|>")
    text, answer = prompt(query)
    b.prompt(text)
    if answer is not None:
        b.target(answer)
    return b.build(IMAGE_MARKER, image_tokens, len(shots) + 1)


# ----------------------------------------------------------------------------- records -> templates


def _num_images(example: Mapping[str, Any]) -> int:
    images = example.get("images", example.get("image"))
    if images is None:
        return 0
    if isinstance(images, (list, tuple)):
        return sum(1 for i in images if i is not None)
    return 1


def _text_field(example: Mapping[str, Any], key: str) -> str:
    value = example.get(key)
    if not isinstance(value, str):
        raise RenderError("bad_record", f"the record's {key!r} is not a string.")
    if not value.strip():
        raise RenderError("empty_text", f"the record's {key!r} is empty.")
    if IMAGE_MARKER in value and key != "question":
        raise RenderError("placeholder_mismatch", f"the record's {key!r} contains an {IMAGE_MARKER} marker.")
    return value


def record_format(example: Mapping[str, Any]) -> str:
    """Which user-data shape a record has: "llava", "interleaved", "pairs" or "vqa" (RenderError if none)."""
    if "conversations" in example:
        return "llava"
    if "texts" in example:
        return "interleaved"
    if "caption" in example:
        return "pairs"
    if "question" in example and "answer" in example:
        return "vqa"
    raise RenderError("bad_record", "the record has none of conversations, texts, caption, question/answer.")


_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")


def conversation(example: Mapping[str, Any], caption_prompt: str) -> tuple[str | None, list[Turn]]:
    """(system message or None, turns) of a pairs, vqa or llava record, checked against its image count.

    pairs and vqa become one turn `"<image>\\n" * images + prompt` -> answer.
    LLaVA records: "from" human/user and gpt/assistant must alternate; a
    leading gpt turn is dropped (as LLaVA does); an optional first "system"
    turn sets the system message; a last human turn has no answer.
    """
    kind = record_format(example)
    n = _num_images(example)
    if kind in ("pairs", "vqa"):
        if n == 0:
            raise RenderError("placeholder_mismatch", f"the {kind} record has no image.")
        if kind == "pairs":
            question, answer = caption_prompt, _text_field(example, "caption").strip()
        else:
            question, answer = _text_field(example, "question"), _text_field(example, "answer")
            if IMAGE_MARKER in question:
                raise RenderError("placeholder_mismatch", "a vqa question must not contain <image> markers.")
        return None, [((IMAGE_MARKER + "\n") * n + question, answer)]
    if kind != "llava":
        raise RenderError("unsupported_format", f"a {kind} record cannot go through a chat template.")
    raw = example["conversations"]
    if not isinstance(raw, (list, tuple)):
        raise RenderError("bad_record", "the record's conversations is not a list.")
    system = None
    messages: list[tuple[str, str]] = []
    for turn in raw:
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise RenderError("bad_record", "a conversation turn is not {'from': ..., 'value': str}.")
        role = str(turn.get("from", "")).lower()
        if role == "system" and not messages and system is None:
            system = turn["value"]
        elif role in _USER_ROLES:
            messages.append(("user", turn["value"]))
        elif role in _ASSISTANT_ROLES:
            messages.append(("assistant", turn["value"]))
        else:
            raise RenderError(
                "bad_roles", f"conversation role {turn.get('from')!r} is not human, gpt or a first system."
            )
    if messages and messages[0][0] == "assistant":
        messages = messages[1:]
    turns: list[Turn] = []
    for i in range(0, len(messages), 2):
        pair = messages[i : i + 2]
        if pair[0][0] != "user" or (len(pair) == 2 and pair[1][0] != "assistant"):
            raise RenderError("bad_roles", "conversation turns do not alternate human and gpt.")
        turns.append((pair[0][1], pair[1][1] if len(pair) == 2 else None))
    _check_turns(turns)
    markers = _count_markers(turns)
    if markers != n:
        raise RenderError(
            "placeholder_mismatch", f"the conversation has {markers} {IMAGE_MARKER} markers for {n} images."
        )
    return system, turns


def document(example: Mapping[str, Any]) -> list[str | None]:
    """The items of an interleaved record (None = image, str = non-empty text), or of a pairs record."""
    kind = record_format(example)
    if kind == "pairs":
        n = _num_images(example)
        if n == 0:
            raise RenderError("placeholder_mismatch", "the pairs record has no image.")
        return [None] * n + [_text_field(example, "caption")]
    if kind != "interleaved":
        raise RenderError("unsupported_format", f"a {kind} record is not an interleaved document.")
    texts, images = example.get("texts"), example.get("images")
    if not isinstance(texts, (list, tuple)) or not isinstance(images, (list, tuple)) or len(texts) != len(images):
        raise RenderError("bad_record", "texts and images must be lists of the same length.")
    items: list[str | None] = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if image is not None:
            if text is not None:
                raise RenderError("bad_record", f"position {i} holds both a text and an image.")
            items.append(None)
        elif text is not None:
            if not isinstance(text, str):
                raise RenderError("bad_record", f"text {i} is not a string.")
            if text.strip():
                items.append(text)
    if not any(item is not None for item in items):
        raise RenderError("empty_text", "the document has no text.")
    return items


def _render_llava(tokenizer, example, image_tokens, *, system: str = LLAVA_SYSTEM, caption_prompt: str | None = None):
    own_system, turns = conversation(example, caption_prompt or CAPTION_PROMPTS["llava"])
    return llava(tokenizer, turns, image_tokens, system=own_system or system)


def _render_llava_plain(tokenizer, example, image_tokens):
    kind = record_format(example)
    if kind == "pairs":
        caption, n = _text_field(example, "caption").strip(), _num_images(example)
    else:
        _, turns = conversation(example, "")
        if len(turns) != 1 or turns[0][1] is None:
            raise RenderError("multi_turn", "the plain template takes one human/gpt exchange.")
        caption, n = turns[0][1], _count_markers(turns)
    if n == 0:
        raise RenderError("placeholder_mismatch", "the plain template needs an image.")
    return llava_plain(tokenizer, caption, n, image_tokens)


def _render_minigpt4(tokenizer, example, image_tokens, *, caption_prompt: str | None = None):
    _, turns = conversation(example, caption_prompt or CAPTION_PROMPTS["minigpt4"])
    return minigpt4(tokenizer, turns, image_tokens)


def _render_qwen_vl(
    tokenizer, example, image_tokens, *, system: str = QWEN_VL_SYSTEM, caption_prompt: str | None = None
):
    own_system, turns = conversation(example, caption_prompt or CAPTION_PROMPTS["qwen_vl"])
    return qwen_vl(tokenizer, turns, image_tokens, system=own_system or system)


def _render_qwen2_vl(tokenizer, example, image_tokens, *, system: str = QWEN_VL_SYSTEM, caption_prompt=None):
    own_system, turns = conversation(example, caption_prompt or CAPTION_PROMPTS["qwen2_vl"])
    return qwen2_vl(tokenizer, turns, image_tokens, system=own_system or system)


def _render_internvl(
    tokenizer,
    example,
    image_tokens,
    *,
    style: str = "internlm2",
    system: str = INTERNVL_SYSTEM,
    caption_prompt: str | None = None,
):
    own_system, turns = conversation(example, caption_prompt or CAPTION_PROMPTS["internvl"])
    return internvl(tokenizer, turns, image_tokens, style=style, system=own_system or system)


def _render_deepseek_vl(
    tokenizer, example, image_tokens, *, system: str = DEEPSEEK_VL_SYSTEM, caption_prompt: str | None = None
):
    own_system, turns = conversation(example, caption_prompt or CAPTION_PROMPTS["deepseek_vl"])
    return deepseek_vl(tokenizer, turns, image_tokens, system=own_system or system)


def _render_idefics3(
    tokenizer,
    example,
    image_tokens,
    *,
    tile_tokens: int,
    tiles_per_side: int = 0,
    grids: Sequence[tuple[int, int]] | None = None,
    system: str | None = None,
    caption_prompt: str | None = None,
):
    """`idefics3` with each image's grid: `grids` (rows, cols) as the pipeline tiles them, or else inferred from
    the placeholder counts (`idefics3_grids`: `tile_tokens` per tile, `tiles_per_side` on the longest side)."""
    own_system, turns = conversation(example, caption_prompt or CAPTION_PROMPTS["idefics3"])
    if grids is None:
        grids = idefics3_grids(_image_counts(image_tokens, _count_markers(turns)), tile_tokens, tiles_per_side)
    return idefics3(tokenizer, turns, image_tokens, grids=[tuple(g) for g in grids], system=own_system or system)


def _render_paligemma(tokenizer, example, image_tokens, *, lang: str = "en", prefix: str | None = None):
    kind = record_format(example)
    n = _num_images(example)
    if kind == "pairs":
        head, tail = prefix or f"caption {lang}", _text_field(example, "caption").strip()
    elif kind == "vqa":
        head, tail = f"answer {lang} {_text_field(example, 'question')}", _text_field(example, "answer")
    elif kind == "llava":
        _, turns = conversation(example, "")
        if len(turns) != 1 or turns[0][1] is None:
            raise RenderError("multi_turn", "PaliGemma is single-turn: the record must be one human/gpt exchange.")
        head, tail = turns[0][0].replace(IMAGE_MARKER, "").strip(), turns[0][1]
    else:
        raise RenderError("unsupported_format", f"a {kind} record cannot go through the PaliGemma template.")
    if n == 0:
        raise RenderError("placeholder_mismatch", "the PaliGemma template needs an image.")
    return paligemma(tokenizer, head, tail, n, image_tokens)


def _render_flamingo(tokenizer, example, image_tokens, *, text_separator: str = " "):
    """pairs and interleaved records as documents (`flamingo`); llava and vqa records as VQA (`flamingo_vqa`).

    A llava record's "system" turn is ignored (Flamingo has no system message), as in minigpt4 and paligemma.
    """
    if record_format(example) in ("llava", "vqa"):
        _, turns = conversation(example, "")
        return flamingo_vqa(tokenizer, turns, image_tokens)
    return flamingo(tokenizer, document(example), image_tokens, text_separator=text_separator)


def _render_fuyu(tokenizer, example, image_tokens, *, caption_prompt: str = FUYU_CAPTION_PROMPT):
    """pairs (the caption prompt), vqa (`{question}\\n`, the model card's form) and single-turn llava records
    (the question without its <image> markers) through `fuyu`: the images first, as FuyuProcessor puts them."""
    kind = record_format(example)
    n = _num_images(example)
    if kind == "pairs":
        prompt, answer = caption_prompt, _text_field(example, "caption").strip()
    elif kind == "vqa":
        prompt, answer = _text_field(example, "question").strip() + "\n", _text_field(example, "answer")
    elif kind == "llava":
        _, turns = conversation(example, "")
        if len(turns) != 1:
            raise RenderError("multi_turn", "Fuyu is single-turn: the record must be one human/gpt exchange.")
        prompt, answer = turns[0][0].replace(IMAGE_MARKER, "").strip() + "\n", turns[0][1]
    else:
        raise RenderError("unsupported_format", f"a {kind} record cannot go through the Fuyu template.")
    if n == 0:
        raise RenderError("placeholder_mismatch", "the Fuyu template needs an image.")
    return fuyu(tokenizer, prompt, answer, n, image_tokens)


Renderer = Callable[..., TokenizedExample]

TEMPLATES: dict[str, Renderer] = {
    "paligemma": _render_paligemma,
    "minigpt4": _render_minigpt4,
    "llava": _render_llava,
    "llava_plain": _render_llava_plain,
    "qwen_vl": _render_qwen_vl,
    "internvl": _render_internvl,
    "qwen2_vl": _render_qwen2_vl,
    "flamingo": _render_flamingo,
    "fuyu": _render_fuyu,
    "idefics3": _render_idefics3,
    "deepseek_vl": _render_deepseek_vl,
}
"""name -> fn(tokenizer, example, image_tokens, **options) -> TokenizedExample (options: see render)."""

# name -> (placeholder piece, wrapper pieces around each image's placeholders, prefix-LM, record formats)
_SPECS: dict[str, tuple[str, tuple[str, ...], bool, tuple[str, ...]]] = {
    "paligemma": ("<image>", (), True, ("pairs", "vqa", "llava")),
    "minigpt4": ("<ImageHere>", (), False, ("pairs", "vqa", "llava")),
    "llava": ("<image>", (), False, ("pairs", "vqa", "llava")),
    "llava_plain": ("<image>", (), False, ("pairs", "llava")),
    "qwen_vl": ("<imgpad>", ("<img>", "</img>"), False, ("pairs", "vqa", "llava")),
    "internvl": ("<IMG_CONTEXT>", ("<img>", "</img>"), False, ("pairs", "vqa", "llava")),
    "qwen2_vl": ("<|image_pad|>", ("<|vision_start|>", "<|vision_end|>"), False, ("pairs", "vqa", "llava")),
    "flamingo": ("<image>", (), False, ("pairs", "vqa", "llava", "interleaved")),
    "fuyu": ("|SPEAKER|", (), False, ("pairs", "vqa", "llava")),
    "idefics3": ("<image>", ("<fake_token_around_image>", "<global-img>"), False, ("pairs", "vqa", "llava")),
    "deepseek_vl": ("<image_placeholder>", (), False, ("pairs", "vqa", "llava")),
}


def _spec(name: str):
    if name not in _SPECS:
        raise UserError(f"template {name!r} is not one of {', '.join(sorted(_SPECS))}.")
    return _SPECS[name]


def render(
    name: str, tokenizer: Tokenizer, example: Mapping[str, Any], image_tokens: int | Sequence[int], **options
) -> TokenizedExample:
    """Renders one record with template `name` (a key of TEMPLATES).

    image_tokens: placeholder ids per image (int, or one per image in order).
    options (all optional): system (llava, qwen_vl, qwen2_vl, internvl, deepseek_vl; a record's own
    first "system" turn wins), caption_prompt (chat templates, for pairs
    records and fuyu), style ("internlm2" | "phi3", internvl), lang / prefix
    (paligemma: "caption {lang}", "answer {lang} {question}"), text_separator
    (flamingo), tile_tokens / tiles_per_side / grids (idefics3: placeholders
    per tile, tiles on the longest side, each image's (rows, cols)). Raises RenderError (a UserError, with `.reason`) for a record
    the template cannot render.
    """
    _spec(name)
    return TEMPLATES[name](tokenizer, example, image_tokens, **options)


def image_placeholder(name: str) -> tuple[str, tuple[str, ...]]:
    """(placeholder piece repeated per image, wrapper pieces directly around each run) of template `name`."""
    placeholder, wrappers, _, _ = _spec(name)
    return placeholder, wrappers


def uses_prefix_mask(name: str) -> bool:
    """True if template `name` yields a prefix_mask (prefix-LM attention: PaliGemma)."""
    return _spec(name)[2]


def supported_formats(name: str) -> tuple[str, ...]:
    """The record formats template `name` renders (others raise RenderError "unsupported_format")."""
    return _spec(name)[3]


# Pieces that end a generated answer, besides the tokenizer's eos: where each template's answers stop.
_STOP_PIECES: dict[str, tuple[str, ...]] = {
    "flamingo": ("<|endofchunk|>",),  # every text chunk ends with it
    "qwen_vl": ("<|im_end|>",),  # ChatML turns
    "qwen2_vl": ("<|im_end|>",),
}


def stop_ids(name: str, tokenizer: Tokenizer, **options) -> tuple[int, ...]:
    """The ids that end a generated answer under template `name` rendered with `options` (`render`'s): the
    tokenizer's eos, then the template's own end-of-turn pieces (Flamingo's `<|endofchunk|>`, ChatML's
    `<|im_end|>`, InternVL's style's separator: `<|im_end|>` or Phi-3's `<|end|>`)."""
    _spec(name)
    pieces = _STOP_PIECES.get(name, ())
    if name == "internvl":
        style = options.get("style", "internlm2")
        if style not in _INTERNVL_STYLES:
            raise UserError(f"InternVL style {style!r} is not one of {', '.join(_INTERNVL_STYLES)}.")
        pieces = (_INTERNVL_STYLES[style][3],)  # each answer ends with its style's separator
    ids = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    return tuple(ids + [tokenizer.token_id(piece) for piece in pieces])


def prompt_before_answer(
    name: str, tokenizer: Tokenizer, example: Mapping[str, Any], image_tokens: int | Sequence[int], **options
) -> list[int]:
    """The ids template `name` renders for `example` before its first training target: what a model is given
    to generate that target (VQA: up to "ASSISTANT:" or "Short answer:"; captions: up to where the caption
    starts). Raises RenderError if the example has no target."""
    rendered = render(name, tokenizer, example, image_tokens, **options)
    if not rendered.predict.any():
        raise RenderError("nothing_to_predict", f"template {name} renders no target for this record.")
    return [int(i) for i in rendered.ids[: int(np.argmax(rendered.predict))]]


def user_prompt(
    name: str, tokenizer: Tokenizer, text: str, num_images: int, image_tokens: int | Sequence[int], **options
) -> list[int]:
    """The ids of a user's free-form prompt (`vlm-jax generate --prompt`) under template `name`.

    Chat templates render `text` as the user's turn and end with their
    generation prompt (LLaVA: "... USER: <image>\\n{text} ASSISTANT:",
    PaliGemma: "<image>...<bos>{text}\\n"); `<image>` markers in `text` say
    where the images go (without any, they go first). The "flamingo"
    template is a document: `<s>` then `text` itself, continued as written
    (`<image>A photo of` -> the caption's next words). `options` are the
    template's (`render`), e.g. the system message."""
    markers = text.count(IMAGE_MARKER)
    if markers not in (0, num_images):
        raise RenderError(
            "placeholder_mismatch", f"the prompt has {markers} {IMAGE_MARKER} markers for {num_images} images."
        )
    if IMAGE_MARKER not in text:
        text = (IMAGE_MARKER + "\n") * num_images + text if name != "flamingo" else IMAGE_MARKER * num_images + text
    if name == "flamingo":
        b = _Builder(tokenizer)
        b.bos()
        b.prompt(text)
        return [int(i) for i in b.build(IMAGE_MARKER, image_tokens, num_images).ids]
    if name == "paligemma":
        rendered = paligemma(tokenizer, text.replace(IMAGE_MARKER, "").strip(), None, num_images, image_tokens)
        return [int(i) for i in rendered.ids]
    record = {"images": [b""] * num_images, "conversations": [{"from": "human", "value": text}]}
    return [int(i) for i in render(name, tokenizer, record, image_tokens, **options).ids]
