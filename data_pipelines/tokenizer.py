"""SentencePiece tokenizer with the special tokens of the seed VLM systems.

`Tokenizer` loads any SentencePiece `.model` and makes sure every token of
`SPECIAL_TOKENS` (plus optional `extra_tokens`) is one USER_DEFINED piece, so
`encode` never splits it and `decode` writes it back as its text. Tokens the
model lacks are appended to its ModelProto, as big_vision does for PaliGemma's
`<loc....>` tokens.

Id rule (stable: independent of call order, process and pickling):
  * a token the base model already has keeps its id (a NORMAL or non-reserved
    CONTROL piece is turned into USER_DEFINED in place, so it becomes atomic);
  * the missing tokens of `SPECIAL_TOKENS` are appended after the base
    vocabulary in `SPECIAL_TOKENS` order;
  * then the missing `extra_tokens`, deduplicated and sorted by code point.
So ids are a function of (base model, set of extra tokens) only. New entries
are only ever appended to the end of `SPECIAL_TOKENS`, so ids of older ones do
not move. `train_tokenizer` puts the same tokens at ids 4.. of a new model
(pad=0, unk=1, bos=2, eos=3), so nothing needs appending there.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from vlm_jax.errors import UserError

SPECIAL_TOKENS: tuple[str, ...] = (
    "<image>",  # image placeholder: LLaVA, PaliGemma, Flamingo (media marker); the user-data marker everywhere
    "<|endofchunk|>",  # Flamingo / OpenFlamingo end of a text chunk
    "<img>",  # Qwen-VL and InternVL: start of an image's feature span
    "</img>",
    "<ref>",  # Qwen-VL grounding: the referring expression
    "</ref>",
    "<box>",  # Qwen-VL grounding: (x1,y1),(x2,y2) in [0, 1000)
    "</box>",
    "<quad>",  # Qwen-VL / InternVL: quadrilaterals (OCR)
    "</quad>",
    "<imgpad>",  # Qwen-VL: the 256 placeholders between <img> and </img>
    "<IMG_CONTEXT>",  # InternVL: 256 per 448px tile between <img> and </img>
    "<ImageHere>",  # MiniGPT-4: where the 32 Q-Former tokens go, inside <Img>...</Img> (plain text there)
    "<|im_start|>",  # ChatML roles: Qwen-VL, InternVL 1.5 (InternLM2-chat)
    "<|im_end|>",
    "<|system|>",  # Phi-3 chat roles: Mini-InternVL-Chat-4B-V1-5
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "|SPEAKER|",  # Fuyu: image patch placeholder
    "|NEWLINE|",  # Fuyu: end of a row of image patches
    "<|vision_start|>",  # Qwen2-VL / Qwen2.5-VL: around an image's <|image_pad|> run
    "<|vision_end|>",
    "<|image_pad|>",  # Qwen2-VL: one per merged (2 x 2) patch token, as many as the image's native size gives
    "<|video_pad|>",
    "<image_placeholder>",  # DeepSeek-VL: one per image feature (576)
    "<fake_token_around_image>",  # Idefics2 / Idefics3: around each image or tile
    "<global-img>",  # Idefics3: the whole image after its tiles
)

_Piece = model_pb2.ModelProto.SentencePiece


class UnknownPieceError(KeyError):
    """`Tokenizer.token_id` of a piece the vocabulary lacks (a KeyError whose message reads plainly)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def paligemma_extra_tokens() -> list[str]:
    """PaliGemma's 1024 location tokens `<loc0000>`..`<loc1023>` and 128 `<seg000>`..`<seg127>` tokens.

    Opt-in (`Tokenizer(path, extra_tokens=paligemma_extra_tokens())`): they add
    1152 rows to the embedding table, too many for the tiny configs. Sorted
    order equals big_vision's order (loc first, then seg).
    """
    return [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]


def _read_proto(model: str | os.PathLike | bytes) -> model_pb2.ModelProto:
    if isinstance(model, (bytes, bytearray)):
        data, where = bytes(model), "(given as bytes)"
    else:
        where = os.fspath(model)
        if not os.path.isfile(where):
            raise UserError(f"tokenizer model {where} does not exist (train one with `vlm-jax data train-tokenizer`).")
        with open(where, "rb") as f:
            data = f.read()
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError (a version-dependent class)
        proto = None
    if proto is None or not proto.pieces:
        raise UserError(f"tokenizer model {where} is not a SentencePiece model file.")
    return proto


class Tokenizer:
    """A SentencePiece model plus the VLM special tokens, each one id; picklable (keeps the serialized proto)."""

    def __init__(self, model: str | os.PathLike | bytes, extra_tokens: Iterable[str] = ()):
        """Loads `model` (a `.model` path or serialized ModelProto bytes) and adds missing special tokens.

        `extra_tokens`: more atomic tokens (e.g. `paligemma_extra_tokens()`);
        their order does not matter (see the module docstring for the id rule).
        """
        proto = _read_proto(model)
        extras = sorted(set(extra_tokens) - set(SPECIAL_TOKENS))
        if any(not t for t in extras):
            raise UserError("extra_tokens contains an empty string.")
        index = {p.piece: i for i, p in enumerate(proto.pieces)}
        spec = proto.trainer_spec
        reserved = {i for i in (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) if i >= 0}
        added = []
        for token in (*SPECIAL_TOKENS, *extras):
            i = index.get(token)
            if i is None:
                proto.pieces.append(_Piece(piece=token, score=0.0, type=_Piece.USER_DEFINED))
                index[token] = len(proto.pieces) - 1
                added.append(token)
            elif i not in reserved and proto.pieces[i].type in (_Piece.NORMAL, _Piece.CONTROL, _Piece.UNUSED):
                proto.pieces[i].type = _Piece.USER_DEFINED
        self._proto = proto.SerializeToString()
        self._added = tuple(added)
        self._dummy_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
        self._user_defined = frozenset(i for i, p in enumerate(proto.pieces) if p.type == _Piece.USER_DEFINED)
        self._control = frozenset(i for i, p in enumerate(proto.pieces) if p.type == _Piece.CONTROL)
        self._space_id = index.get("\u2581", -1)
        self._sp: spm.SentencePieceProcessor | None = None
        self._processor()  # fail now, not in a worker, if SentencePiece rejects the proto

    # -- pickling: the processor is rebuilt lazily from the serialized proto.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_sp"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _processor(self) -> spm.SentencePieceProcessor:
        if self._sp is None:
            sp = spm.SentencePieceProcessor()
            try:
                sp.LoadFromSerializedProto(self._proto)
            except Exception as e:
                raise UserError(f"SentencePiece cannot load the tokenizer model: {e}") from None
            self._sp = sp
        return self._sp

    @property
    def vocab_size(self) -> int:
        """Number of ids (base vocabulary plus appended tokens); the LM embedding needs at least this many rows."""
        return self._processor().get_piece_size()

    @property
    def pad_id(self) -> int:
        """The model's pad id; models without one (LLaMA) pad with unk, as LLaVA does."""
        pad = self._processor().pad_id()
        return pad if pad >= 0 else self.unk_id

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id, or -1 if the model defines none."""
        return self._processor().bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id, or -1 if the model defines none."""
        return self._processor().eos_id()

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (never produced for text when the model has byte fallback)."""
        return self._processor().unk_id()

    @property
    def image_token_id(self) -> int:
        """Id of `<image>`, the generic image placeholder (each template names its own; see templates.py)."""
        return self.token_id("<image>")

    @property
    def added_tokens(self) -> tuple[str, ...]:
        """The tokens this instance appended to the base model, in id order."""
        return self._added

    @property
    def serialized_model(self) -> bytes:
        """The ModelProto with the special tokens, as bytes (`Tokenizer(bytes)` rebuilds the same tokenizer)."""
        return self._proto

    def save(self, path: str | os.PathLike) -> str:
        """Writes the model with its special tokens to `path` (a `.model` file other tools can load); returns it."""
        path = os.fspath(path)
        with open(path, "wb") as f:
            f.write(self._proto)
        return path

    def token_id(self, piece: str) -> int:
        """The id of one piece (e.g. `"<image>"`, `"</s>"`); UnknownPieceError (a KeyError) if the model lacks it."""
        sp = self._processor()
        i = sp.piece_to_id(piece)
        if sp.id_to_piece(i) != piece:
            raise UnknownPieceError(
                f"{piece!r} is not a piece of this tokenizer (vocabulary of {sp.get_piece_size()})."
            )
        return i

    def piece(self, token_id: int) -> str:
        """The piece string of one id."""
        self._check_ids([token_id])
        return self._processor().id_to_piece(int(token_id))

    def is_control(self, token_id: int) -> bool:
        """True for CONTROL ids (pad, bos, eos): never produced by `encode` from text."""
        return int(token_id) in self._control

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = self._processor().get_piece_size()
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {n}.")

    def _strip_stray_prefix(self, ids: list[int], text: str) -> bool:
        """True if ids[0] is the lone dummy-prefix "▁" SentencePiece puts before a leading special token.

        Such a piece carries no text (decode gives the same string without it),
        so `encode` drops it, like transformers' non-legacy LLaMA tokenizer.
        """
        return (
            self._dummy_prefix
            and len(ids) > 1
            and ids[0] == self._space_id
            and ids[1] in self._user_defined
            and not text[:1].isspace()
        )

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens in the text become their single ids; optional bos/eos ids."""
        ids = self._processor().encode(text)
        if self._strip_stray_prefix(ids, text):
            ids = ids[1:]
        if add_bos:
            ids = [self._need(self.bos_id, "bos"), *ids]
        if add_eos:
            ids = [*ids, self._need(self.eos_id, "eos")]
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` (as `encode`) and each token's [start, end) character span in `text`.

        A byte-fallback character owns its last byte piece; its earlier byte
        pieces have empty spans at the character's start.
        """
        out = self._processor().encode(text, return_type="offset_mapping")
        ids, offsets = list(out["ids"]), [tuple(o) for o in out["offsets"]]
        if self._strip_stray_prefix(ids, text):
            ids, offsets = ids[1:], offsets[1:]
        return ids, offsets

    def decode(self, ids: Iterable[int], skip_control: bool = False) -> str:
        """Text of `ids`; special tokens come back as their text, and so do control tokens (`<s>`, `</s>`,
        `<pad>`) unless `skip_control`. Text between control tokens decodes as its own run, which is how
        `encode` of each run (as the templates build them) reads back exactly.
        """
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        sp = self._processor()
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._control:
                if run:
                    parts.append(sp.decode(run))
                    run = []
                if not skip_control:
                    parts.append(sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            parts.append(sp.decode(run))
        return "".join(parts)

    def _need(self, token_id: int, name: str) -> int:
        if token_id < 0:
            raise UserError(f"the tokenizer model defines no {name} token, which this use needs.")
        return token_id

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, added={len(self._added)})"


def _check_input_file(path: str) -> None:
    if not os.path.isfile(path):
        raise UserError(f"tokenizer training file {path} does not exist.")
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return
    raise UserError(f"tokenizer training file {path} is empty.")


def train_tokenizer(
    input_files: str | os.PathLike | Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "unigram",
    *,
    extra_tokens: Iterable[str] = (),
    character_coverage: float = 1.0,
    input_sentence_size: int = 0,
    seed: int = 0,
    num_threads: int = 1,
    **options,
) -> str:
    """Trains a SentencePiece model on text files (one sentence or document per line); returns "PREFIX.model".

    Conventions (LLaMA's, plus the special tokens): pad=0, unk=1, bos=2, eos=3
    (`<pad>`, `<unk>`, `<s>`, `</s>`), then `SPECIAL_TOKENS` and the sorted
    `extra_tokens` as user-defined pieces from id 4; byte fallback, so no text
    is ever unknown; identity normalization and no whitespace collapsing, so
    `decode(encode(text)) == text` (newlines included); digits split; a dummy
    prefix space. Deterministic: a fixed random seed and, by default, one
    thread. `input_sentence_size` > 0 samples that many lines. `options` go to
    `sentencepiece.SentencePieceTrainer.train` unchanged and override all of
    the above. Raises UserError if a file is missing or empty, or if
    SentencePiece rejects the settings (e.g. a vocabulary too large for the text).
    """
    files = (
        [os.fspath(input_files)] if isinstance(input_files, (str, os.PathLike)) else list(map(os.fspath, input_files))
    )
    if not files:
        raise UserError("train_tokenizer needs at least one input file.")
    for path in files:
        if "," in path:
            raise UserError(f"tokenizer training file {path} has a comma in its path, which SentencePiece cannot read.")
        _check_input_file(path)
    if model_type not in ("unigram", "bpe"):
        raise UserError(f"model_type {model_type!r} is not one of unigram, bpe.")
    prefix = os.fspath(model_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    extras = sorted(set(extra_tokens) - set(SPECIAL_TOKENS))
    args = dict(
        input=files,
        model_prefix=prefix,
        vocab_size=int(vocab_size),
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=[*SPECIAL_TOKENS, *extras],
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=float(character_coverage),
        input_sentence_size=int(input_sentence_size),
        shuffle_input_sentence=True,
        max_sentence_length=1 << 16,
        num_threads=int(num_threads),
        minloglevel=2,
    )
    args.update(options)
    spm.set_random_generator_seed(int(seed))
    try:
        spm.SentencePieceTrainer.train(**args)
    except (RuntimeError, ValueError, OSError) as e:
        message = " ".join(str(e).split())
        message = message.rsplit("] ", 1)[-1].rstrip(".").replace(". ", "; ")  # drop SentencePiece's source location
        raise UserError(f"SentencePiece could not train a {vocab_size}-piece {model_type} model: {message}.") from None
    return prefix + ".model"
