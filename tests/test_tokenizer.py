"""SentencePiece tokenizer: atomic and stable special tokens, lossless round trips, training, pickling."""

import pickle

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from data_pipelines.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    UnknownPieceError,
    paligemma_extra_tokens,
    train_tokenizer,
)
from vlm_jax.errors import UserError


@pytest.fixture(scope="session")
def base_without_specials(corpus, tmp_path_factory):
    """A plain SentencePiece model (LLaMA-like settings) that has none of the special tokens."""
    prefix = str(tmp_path_factory.mktemp("plain") / "plain")
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        vocab_size=330,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    return prefix + ".model"


@pytest.fixture(scope="session")
def model_path(spm_model_path):
    return spm_model_path


@pytest.fixture(scope="session")
def tok(spm_tokenizer):
    return spm_tokenizer


def test_trained_model_layout(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(4, 4 + len(SPECIAL_TOKENS)))
    assert tok.vocab_size == 400
    assert tok.added_tokens == ()  # training already put every special token in
    assert tok.image_token_id == tok.token_id("<image>") == 4


@pytest.mark.parametrize("which", ["trained", "plain"])
def test_special_tokens_are_single_ids(which, tok, base_without_specials):
    t = tok if which == "trained" else Tokenizer(base_without_specials)
    ids = [t.token_id(s) for s in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for special, i in zip(SPECIAL_TOKENS, ids):
        assert t.encode(special) == [i]
        for text in (f"cat{special}dog", f"the {special} red", f"{special}{special}\n"):
            got = t.encode(text)
            assert got.count(i) == text.count(special), (special, [t.piece(x) for x in got])
            assert t.decode(got) == text
        assert t.decode([i]) == special


def test_missing_specials_are_appended_in_fixed_order_and_ids_are_stable(base_without_specials):
    raw = spm.SentencePieceProcessor(model_file=base_without_specials)
    base = raw.get_piece_size()
    a = Tokenizer(base_without_specials)
    assert a.added_tokens == SPECIAL_TOKENS
    assert [a.token_id(s) for s in SPECIAL_TOKENS] == list(range(base, base + len(SPECIAL_TOKENS)))
    assert a.vocab_size == base + len(SPECIAL_TOKENS)
    # the base vocabulary keeps its ids
    assert all(a.piece(i) == raw.id_to_piece(i) for i in range(base))
    # a second instance, used in another order, and extra tokens listed in another order: same ids
    b = Tokenizer(base_without_specials, extra_tokens=["<y>", "<x>"])
    c = Tokenizer(base_without_specials, extra_tokens=["<x>", "<y>", "<x>"])
    c.encode("warm up <x> on c first")
    for special in SPECIAL_TOKENS:
        assert b.token_id(special) == c.token_id(special) == a.token_id(special)
    assert b.token_id("<x>") == c.token_id("<x>") == base + len(SPECIAL_TOKENS)
    assert b.token_id("<y>") == c.token_id("<y>") == base + len(SPECIAL_TOKENS) + 1
    assert b.serialized_model == c.serialized_model
    assert c.encode("a <y><x> b") == b.encode("a <y><x> b")


def test_existing_special_pieces_keep_their_ids(corpus, tmp_path):
    prefix = str(tmp_path / "partial")
    present = ["</img>", "<|im_end|>", "<image>"]  # a subset, in another order than SPECIAL_TOKENS
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        vocab_size=340,
        model_type="bpe",
        user_defined_symbols=present,
        byte_fallback=True,
        num_threads=1,
        minloglevel=2,
    )
    # Also plant "<ref>" as an ordinary (NORMAL) piece, which BPE never reaches by merges,
    # so plain SentencePiece splits it; the Tokenizer must keep its id and make it atomic.
    proto = model_pb2.ModelProto()
    proto.ParseFromString(open(prefix + ".model", "rb").read())
    proto.pieces.append(model_pb2.ModelProto.SentencePiece(piece="<ref>", score=proto.pieces[-1].score - 1))
    ref_id = len(proto.pieces) - 1
    planted = tmp_path / "planted.model"
    planted.write_bytes(proto.SerializeToString())
    raw = spm.SentencePieceProcessor(model_file=str(planted))
    assert raw.encode("x<ref>y").count(ref_id) == 0  # the setup really splits it

    t = Tokenizer(str(planted))
    for piece in present:
        assert t.token_id(piece) == raw.piece_to_id(piece)
    assert t.token_id("<ref>") == ref_id
    assert t.encode("x<ref>y").count(ref_id) == 1
    assert t.added_tokens == tuple(s for s in SPECIAL_TOKENS if s not in (*present, "<ref>"))
    assert t.token_id(t.added_tokens[0]) == raw.get_piece_size()


def test_round_trip_is_lossless_with_byte_fallback(tok):
    texts = [
        "USER: <image>\nWhat is the cat doing? ASSISTANT: Sitting.",
        "  two leading spaces,  inner  spaces and a tab\there\n\n",
        "猫が座っている。一只猫 😀🐈 naïve café — “quotes”",
        "<|im_start|>user\nPicture 1: <img><imgpad></img>\n<ref>a dog</ref><box>(1,2),(30,40)</box><|im_end|>",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    ids = tok.encode("😀")
    assert [tok.piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    ids = tok.encode("猫", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "<s>猫</s>"
    assert tok.decode(ids, skip_control=True) == "猫"
    assert tok.decode(np.asarray(ids, np.int32)) == "<s>猫</s>"


def test_no_stray_space_before_a_leading_special_token(tok):
    ids = tok.encode("<image>cat")
    assert ids[0] == tok.image_token_id
    assert tok.decode(ids) == "<image>cat"
    ids = tok.encode(" <image>")  # a real leading space is kept
    assert tok.decode(ids) == " <image>" and ids[-1] == tok.image_token_id
    ids, offsets = tok.encode_with_offsets("<|im_start|>user")
    assert ids == tok.encode("<|im_start|>user") and offsets[0] == (0, len("<|im_start|>"))


def test_encode_with_offsets_spans_characters(tok):
    text = "A cat 猫<image>."
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert "".join(text[b:e] for b, e in offsets) == text
    assert offsets[ids.index(tok.image_token_id)] == (text.index("<image>"), text.index("<image>") + 7)


def test_pickle_rebuilds_the_processor(tok):
    tok.encode("warm up")
    blob = pickle.dumps(tok)
    again = pickle.loads(blob)
    assert again._sp is None  # the processor is rebuilt lazily, not pickled
    text = "A red ball <image> on the mat 猫"
    assert again.encode(text) == tok.encode(text)
    assert again.token_id("<IMG_CONTEXT>") == tok.token_id("<IMG_CONTEXT>")
    assert again.vocab_size == tok.vocab_size


def test_serialized_model_and_save_round_trip(tok, tmp_path):
    same = Tokenizer(tok.serialized_model)
    assert [same.token_id(s) for s in SPECIAL_TOKENS] == [tok.token_id(s) for s in SPECIAL_TOKENS]
    path = tok.save(tmp_path / "saved.model")
    raw = spm.SentencePieceProcessor(model_file=path)
    assert raw.encode("a <|im_end|> b") == tok.encode("a <|im_end|> b")


def test_unknown_piece_is_a_clear_key_error(tok):
    with pytest.raises(KeyError, match="'<nope>' is not a piece"):
        tok.token_id("<nope>")
    with pytest.raises(UnknownPieceError):
        tok.token_id("")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_bad_model_files_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        Tokenizer(junk)


def test_paligemma_extra_tokens_follow_the_specials(base_without_specials):
    extra = paligemma_extra_tokens()
    assert len(extra) == 1152 and extra[0] == "<loc0000>" and extra[1023] == "<loc1023>" and extra[-1] == "<seg127>"
    t = Tokenizer(base_without_specials, extra_tokens=list(reversed(extra)))
    first = spm.SentencePieceProcessor(model_file=base_without_specials).get_piece_size() + len(SPECIAL_TOKENS)
    assert [t.token_id(x) for x in extra] == list(range(first, first + 1152))
    assert t.encode("<loc0012><loc1000> cat")[:2] == [first + 12, first + 1000]


def _pieces(path):
    proto = model_pb2.ModelProto()
    proto.ParseFromString(open(path, "rb").read())
    return [(p.piece, p.score, p.type) for p in proto.pieces]


def test_training_is_deterministic(corpus, model_path, tmp_path):
    again = train_tokenizer(corpus, str(tmp_path / "again"), 400)
    assert _pieces(again) == _pieces(model_path)


def test_bpe_training_keeps_specials_atomic(corpus, tmp_path):
    t = Tokenizer(train_tokenizer([corpus], str(tmp_path / "bpe"), 400, model_type="bpe"))
    assert [t.token_id(s) for s in SPECIAL_TOKENS] == list(range(4, 4 + len(SPECIAL_TOKENS)))
    text = "cat<IMG_CONTEXT><IMG_CONTEXT>dog 猫\n<|endofchunk|>"
    ids = t.encode(text)
    assert ids.count(t.token_id("<IMG_CONTEXT>")) == 2 and t.decode(ids) == text


def test_training_input_errors_are_one_sentence(tmp_path, corpus):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(UserError, match=f"{missing} does not exist"):
        train_tokenizer([corpus, missing], str(tmp_path / "m"), 300)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(UserError, match="empty.txt is empty"):
        train_tokenizer(str(empty), str(tmp_path / "m"), 300)
    with pytest.raises(UserError, match="model_type"):
        train_tokenizer(corpus, str(tmp_path / "m"), 300, model_type="wordpiece")
    with pytest.raises(UserError, match="could not train a 100000-piece"):
        train_tokenizer(corpus, str(tmp_path / "m"), 100000)
