"""Templates: verbatim strings of each system, answer-only targets, image expansion, shifted layout, bad records.

The expected strings are written out by hand from the sources each template
cites (notes, model cards, the systems' release code), independently of the
code under test.
"""

import numpy as np
import pytest

from data_pipelines import templates
from data_pipelines.templates import RenderError, TokenizedExample, render
from vlm_jax.errors import UserError

LLAVA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
INTERNVL_SYS = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)

PAIR = {"images": [b"jpeg bytes"], "caption": "A red ball on the mat."}
CHAT = {
    "image": "a.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the mat?"},
        {"from": "gpt", "value": "A red ball."},
        {"from": "human", "value": "What color is it?"},
        {"from": "gpt", "value": "Red."},
    ],
}


@pytest.fixture(scope="session")
def tok(spm_tokenizer):
    return spm_tokenizer


def runs(tok, ex):
    """Decoded text of each maximal run of target tokens."""
    out, start = [], None
    for i, p in enumerate([*ex.predict.tolist(), False]):
        if p and start is None:
            start = i
        elif not p and start is not None:
            out.append(tok.decode(ex.ids[start:i]))
            start = None
    return out


def check_images(ex, placeholder_id, counts):
    """Image k owns the next counts[k] placeholders, contiguous, never targets."""
    positions = np.flatnonzero(ex.ids == placeholder_id)
    assert len(positions) == sum(counts)
    assert not ex.predict[positions].any()
    assert ex.num_images == len(counts) and ex.image_token_id == placeholder_id
    bounds = np.cumsum([0, *counts])
    for k in range(len(counts)):
        chunk = positions[bounds[k] : bounds[k + 1]]
        assert (np.diff(chunk) == 1).all()


def check_shifted(ex):
    s = ex.shifted()
    np.testing.assert_array_equal(s["tokens"], ex.ids[:-1])
    np.testing.assert_array_equal(s["targets"], ex.ids[1:])
    np.testing.assert_array_equal(s["loss_mask"], ex.predict[1:].astype(np.float32))
    assert s["tokens"].dtype == np.int32 and s["loss_mask"].dtype == np.float32
    # position t predicts targets[t] == ids[t + 1]; the loss counts exactly where ids[t + 1] is a target
    for t in np.flatnonzero(s["loss_mask"]):
        assert ex.predict[t + 1] and s["targets"][t] == ex.ids[t + 1]
    if ex.prefix_mask is None:
        assert "prefix_mask" not in s
    else:
        np.testing.assert_array_equal(s["prefix_mask"], ex.prefix_mask[:-1])


def test_registry_has_every_system():
    assert {"paligemma", "minigpt4", "llava", "qwen_vl", "internvl", "flamingo"} <= set(templates.TEMPLATES)
    assert templates.image_placeholder("internvl") == ("<IMG_CONTEXT>", ("<img>", "</img>"))
    assert templates.image_placeholder("qwen_vl") == ("<imgpad>", ("<img>", "</img>"))
    assert templates.image_placeholder("minigpt4") == ("<ImageHere>", ())
    assert [n for n in templates.TEMPLATES if templates.uses_prefix_mask(n)] == ["paligemma"]
    assert "interleaved" in templates.supported_formats("flamingo")
    with pytest.raises(UserError, match="not one of"):
        render("blip3", None, PAIR, 1)


# ----------------------------------------------------------------------------- LLaVA


def test_llava_multi_turn(tok):
    ex = render("llava", tok, CHAT, 3)
    assert tok.decode(ex.ids) == (
        "<s>" + LLAVA_SYS + " USER: <image><image><image>\nWhat is on the mat? ASSISTANT: A red ball.</s>"
        "USER: What color is it? ASSISTANT: Red.</s>"
    )
    assert runs(tok, ex) == ["A red ball.</s>", "Red.</s>"]
    check_images(ex, tok.token_id("<image>"), [3])
    check_shifted(ex)
    assert ex.prefix_mask is None


def test_llava_moves_a_trailing_image_to_the_front_and_pairs_get_a_prompt(tok):
    record = {
        "images": [b"x"],
        "conversations": [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."}],
    }
    ex = render("llava", tok, record, 2)
    assert tok.decode(ex.ids) == "<s>" + LLAVA_SYS + " USER: <image><image>\nWhat is it? ASSISTANT: A cat.</s>"
    ex = render("llava", tok, PAIR, 1)
    assert tok.decode(ex.ids) == (
        "<s>" + LLAVA_SYS + " USER: <image>\nDescribe the image concisely. ASSISTANT: A red ball on the mat.</s>"
    )
    assert runs(tok, ex) == ["A red ball on the mat.</s>"]


def test_llava_system_turn_leading_gpt_and_generation_prompt(tok):
    record = {
        "image": ["a.jpg"],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "gpt", "value": "ignored"},
            {"from": "human", "value": "<image>\nWho is there?"},
        ],
    }
    ex = render("llava", tok, record, 1)
    assert tok.decode(ex.ids) == "<s>Be brief. USER: <image>\nWho is there? ASSISTANT:"
    assert not ex.predict.any()


def test_llava_text_only_conversation(tok):
    record = {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]}
    ex = render("llava", tok, record, 5)
    assert tok.decode(ex.ids) == "<s>" + LLAVA_SYS + " USER: Hi. ASSISTANT: Hello.</s>"
    assert ex.num_images == 0 and runs(tok, ex) == ["Hello.</s>"]


def test_llava_plain_pretraining(tok):
    ex = render("llava_plain", tok, PAIR, 4)
    assert tok.decode(ex.ids) == "<s><image><image><image><image>A red ball on the mat.\n"
    assert runs(tok, ex) == ["A red ball on the mat.\n"]
    check_images(ex, tok.token_id("<image>"), [4])


# ----------------------------------------------------------------------------- MiniGPT-4


def test_minigpt4(tok):
    ex = render("minigpt4", tok, PAIR, 3)
    assert tok.decode(ex.ids) == (
        "<s>###Human: <Img><ImageHere><ImageHere><ImageHere></Img> Describe this image in detail. "
        "###Assistant: A red ball on the mat.###"
    )
    assert runs(tok, ex) == ["A red ball on the mat.###"]
    check_images(ex, tok.token_id("<ImageHere>"), [3])
    check_shifted(ex)
    ex = render("minigpt4", tok, CHAT, 2)
    assert tok.decode(ex.ids) == (
        "<s>###Human: <Img><ImageHere><ImageHere></Img> What is on the mat? ###Assistant: A red ball.###"
        "Human: What color is it? ###Assistant: Red.###"
    )
    assert runs(tok, ex) == ["A red ball.###", "Red.###"]


# ----------------------------------------------------------------------------- Qwen-VL


def test_qwen_vl_chatml_with_grounding(tok):
    box = templates.qwen_box(40, 30, 360, 240, width=400, height=300, ref="the ball")
    assert box == "<ref>the ball</ref><box>(100,100),(900,800)</box>"
    record = {
        "images": [b"x"],
        "conversations": [
            {"from": "human", "value": "<image>\nWhere is the ball?"},
            {"from": "gpt", "value": f"It is here: {box}"},
            {"from": "human", "value": "Thanks."},
            {"from": "gpt", "value": "You are welcome."},
        ],
    }
    ex = render("qwen_vl", tok, record, 3)
    assert tok.decode(ex.ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img><imgpad><imgpad><imgpad></img>\nWhere is the ball?<|im_end|>\n"
        "<|im_start|>assistant\nIt is here: <ref>the ball</ref><box>(100,100),(900,800)</box><|im_end|>\n"
        "<|im_start|>user\nThanks.<|im_end|>\n"
        "<|im_start|>assistant\nYou are welcome.<|im_end|>\n"
    )
    assert runs(tok, ex) == [
        "It is here: <ref>the ball</ref><box>(100,100),(900,800)</box><|im_end|>",
        "You are welcome.<|im_end|>",
    ]
    assert ex.ids[0] == tok.token_id("<|im_start|>")  # no bos, no stray space piece
    check_images(ex, tok.token_id("<imgpad>"), [3])
    check_shifted(ex)


def test_qwen_box_normalises_into_0_999():
    assert templates.qwen_box(0, 0, 640, 480, 640, 480) == "<box>(0,0),(999,999)</box>"
    assert templates.qwen_box(1, 1, 2, 2, 3, 3) == "<box>(333,333),(666,666)</box>"
    with pytest.raises(ValueError):
        templates.qwen_box(0, 0, 1, 1, 0, 10)


def test_qwen_vl_numbers_pictures_across_turns(tok):
    record = {
        "images": [b"a", b"b"],
        "conversations": [
            {"from": "human", "value": "<image>\nAnd this?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "<image>\nAnd this one?"},
            {"from": "gpt", "value": "A dog."},
        ],
    }
    ex = render("qwen_vl", tok, record, [1, 2])
    text = tok.decode(ex.ids)
    assert "user\nPicture 1: <img><imgpad></img>\nAnd this?" in text
    assert "user\nPicture 2: <img><imgpad><imgpad></img>\nAnd this one?" in text
    assert runs(tok, ex) == ["A cat.<|im_end|>", "A dog.<|im_end|>"]


# ----------------------------------------------------------------------------- InternVL


def test_internvl_internlm2_chat_with_tiles(tok):
    record = {
        "images": [b"a", b"b"],
        "conversations": [
            {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nDescribe the two images in detail."},
            {"from": "gpt", "value": "Two cats."},
            {"from": "human", "value": "Which is larger?"},
            {"from": "gpt", "value": "The first."},
        ],
    }
    ex = render("internvl", tok, record, [2, 4])  # e.g. 256 x tiles, scaled down
    ctx = "<IMG_CONTEXT>"
    assert tok.decode(ex.ids) == (
        "<s><|im_start|>system\n" + INTERNVL_SYS + "<|im_end|>"
        "<|im_start|>user\nImage-1: <img>" + ctx * 2 + "</img>\nImage-2: <img>" + ctx * 4 + "</img>\n"
        "Describe the two images in detail.<|im_end|><|im_start|>assistant\nTwo cats.<|im_end|>"
        "<|im_start|>user\nWhich is larger?<|im_end|><|im_start|>assistant\nThe first.<|im_end|>"
    )
    assert runs(tok, ex) == ["Two cats.<|im_end|>", "The first.<|im_end|>"]
    check_images(ex, tok.token_id(ctx), [2, 4])
    # each image's run is wrapped by <img> ... </img>
    ids = ex.ids.tolist()
    first = ids.index(tok.token_id(ctx))
    assert ids[first - 1] == tok.token_id("<img>") and ids[first + 2] == tok.token_id("</img>")
    check_shifted(ex)


def test_internvl_phi3_pairs_use_the_card_prompt(tok):
    ex = render("internvl", tok, PAIR, 3, style="phi3")
    assert tok.decode(ex.ids) == (
        "<s><|system|>\n" + INTERNVL_SYS + "<|end|><|user|>\n<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\n"
        "Please describe the image shortly.<|end|><|assistant|>\nA red ball on the mat.<|end|>"
    )
    assert runs(tok, ex) == ["A red ball on the mat.<|end|>"]


# ----------------------------------------------------------------------------- PaliGemma


def test_paligemma_caption_prefix_lm(tok):
    ex = render("paligemma", tok, PAIR, 4)
    assert tok.decode(ex.ids) == "<image><image><image><image><s>caption en\nA red ball on the mat.</s>"
    assert runs(tok, ex) == ["A red ball on the mat.</s>"]
    assert tok.decode(ex.ids[ex.prefix_mask]) == "<image><image><image><image><s>caption en\n"
    assert not (ex.prefix_mask & ex.predict).any() and (ex.prefix_mask | ex.predict).all()
    assert ex.prefix_mask[: int(ex.prefix_mask.sum())].all()  # one contiguous prefix
    check_images(ex, tok.token_id("<image>"), [4])
    check_shifted(ex)


def test_paligemma_vqa_and_llava_single_turn(tok):
    ex = render("paligemma", tok, {"images": [b"x"], "question": "What is on the mat?", "answer": "ball"}, 2)
    assert tok.decode(ex.ids) == "<image><image><s>answer en What is on the mat?\nball</s>"
    assert runs(tok, ex) == ["ball</s>"]
    one_turn = {"images": [b"x"], "conversations": CHAT["conversations"][:2]}
    ex = render("paligemma", tok, one_turn, 1, lang="de")
    assert tok.decode(ex.ids) == "<image><s>What is on the mat?\nA red ball.</s>"
    ex = templates.paligemma(tok, "caption es", None, num_images=1, image_tokens=1)
    assert tok.decode(ex.ids) == "<image><s>caption es\n" and ex.prefix_mask.all() and not ex.predict.any()


# ----------------------------------------------------------------------------- Flamingo


def test_flamingo_interleaved_document(tok):
    record = {
        "texts": [
            "Cute pics of my pets!",
            None,
            "My puppy sitting in the grass.",
            None,
            "My cat looking very dignified.",
        ],
        "images": [None, b"a", None, b"b", None],
    }
    ex = render("flamingo", tok, record, 1)
    assert tok.decode(ex.ids) == (
        "<s>Cute pics of my pets!<|endofchunk|><image>My puppy sitting in the grass.<|endofchunk|>"
        "<image>My cat looking very dignified.<|endofchunk|></s>"
    )
    assert runs(tok, ex) == [
        "Cute pics of my pets!<|endofchunk|>",
        "My puppy sitting in the grass.<|endofchunk|>",
        "My cat looking very dignified.<|endofchunk|></s>",
    ]
    check_images(ex, tok.token_id("<image>"), [1, 1])
    check_shifted(ex)
    # the first caption token is predicted from the <image> position
    s = ex.shifted()
    at_image = np.flatnonzero(s["tokens"] == tok.token_id("<image>"))
    assert (s["loss_mask"][at_image] == 1).all()


def test_flamingo_pairs_and_consecutive_texts(tok):
    ex = render("flamingo", tok, PAIR, 1)
    assert tok.decode(ex.ids) == "<s><image>A red ball on the mat.<|endofchunk|></s>"
    record = {"texts": [None, "One.", "Two.", ""], "images": [b"a", None, None, None]}
    ex = render("flamingo", tok, record, 2)
    assert tok.decode(ex.ids) == "<s><image><image>One. Two.<|endofchunk|></s>"


def test_flamingo_renders_a_one_turn_chat_as_openflamingo_vqa(tok):
    record = {
        "images": [b"a"],
        "conversations": [
            {"from": "system", "value": "Be brief."},  # Flamingo has no system message: ignored
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    ex = render("flamingo", tok, record, 2)
    image, eoc = tok.token_id("<image>"), tok.token_id("<|endofchunk|>")
    assert (
        tok.decode(ex.ids) == "<s><image><image>Question:What colour is the square? Short answer:red<|endofchunk|></s>"
    )
    # The whole layout, id by id. The text is encoded as one string (after the image, so with no leading "▁").
    prompt = tok.encode("<image>Question:What colour is the square? Short answer:")[1:]
    answer = tok.encode("<image>Question:What colour is the square? Short answer:red")[1 + len(prompt) :]
    assert tok.decode(answer) == "red"
    np.testing.assert_array_equal(ex.ids, [tok.bos_id, image, image, *prompt, *answer, eoc, tok.eos_id])
    np.testing.assert_array_equal(ex.predict, [False] * (3 + len(prompt)) + [True] * (len(answer) + 2))
    assert runs(tok, ex) == ["red<|endofchunk|></s>"]
    check_images(ex, image, [2])
    check_shifted(ex)
    # The same question in the few-shot prompt tokenizes to the same ids up to the answer.
    query = templates.flamingo_fewshot(
        tok, [], {"question": "What colour is the square?", "answer": "red"}, image_tokens=2
    )
    np.testing.assert_array_equal(query.ids, ex.ids[:-2])


def test_flamingo_renders_each_turn_with_its_own_images(tok):
    record = {
        "images": [b"a", b"b"],
        "conversations": [
            {"from": "human", "value": "<image>\nWhere is the red circle?"},
            {"from": "gpt", "value": "<ref>the red circle</ref><box>(1,2),(3,4)</box>"},
            {"from": "human", "value": "And now? <image> "},
            {"from": "gpt", "value": "yes"},
        ],
    }
    ex = render("flamingo", tok, record, 1)
    assert tok.decode(ex.ids) == (
        "<s><image>Question:Where is the red circle? Short answer:<ref>the red circle</ref><box>(1,2),(3,4)</box>"
        "<|endofchunk|><image>Question:And now? Short answer:yes<|endofchunk|></s>"
    )
    # Only the answers, their <|endofchunk|> and the eos are trained: never the questions or the images.
    assert runs(tok, ex) == [
        "<ref>the red circle</ref><box>(1,2),(3,4)</box><|endofchunk|>",
        "yes<|endofchunk|></s>",
    ]
    # Exact layout: bos, then per turn its image, the question (prompt) and the answer + <|endofchunk|> (targets).
    image, eoc = tok.token_id("<image>"), tok.token_id("<|endofchunk|>")
    q1 = tok.encode("<image>Question:Where is the red circle? Short answer:")[1:]
    a1 = tok.encode("<image><ref>the red circle</ref><box>(1,2),(3,4)</box>")[1:]
    q2 = tok.encode("<image>Question:And now? Short answer:")[1:]
    a2 = tok.encode("<image>yes")[1:]
    np.testing.assert_array_equal(ex.ids, [tok.bos_id, image, *q1, *a1, eoc, image, *q2, *a2, eoc, tok.eos_id])
    np.testing.assert_array_equal(
        ex.predict,
        [False] * (2 + len(q1)) + [True] * (len(a1) + 1) + [False] * (1 + len(q2)) + [True] * (len(a2) + 2),
    )
    check_images(ex, image, [1, 1])
    check_shifted(ex)
    # vqa records take the same form; a final question without answer is the generation prompt.
    ex = render("flamingo", tok, {"images": [b"a"], "question": "Color?", "answer": "red"}, 1)
    assert tok.decode(ex.ids) == "<s><image>Question:Color? Short answer:red<|endofchunk|></s>"
    ex = render("flamingo", tok, {**record, "conversations": record["conversations"][:3]}, 1)
    assert tok.decode(ex.ids).endswith("<|endofchunk|><image>Question:And now? Short answer:")
    assert runs(tok, ex) == ["<ref>the red circle</ref><box>(1,2),(3,4)</box><|endofchunk|>"]


def test_flamingo_fewshot_prompts(tok):
    shots = [{"question": "What is it?", "answer": "cat"}, {"question": "Color?", "answer": "red"}]
    ex = templates.flamingo_fewshot(tok, shots, {"question": "How many?"})
    assert tok.decode(ex.ids) == (
        "<s><image>Question:What is it? Short answer:cat<|endofchunk|>"
        "<image>Question:Color? Short answer:red<|endofchunk|><image>Question:How many? Short answer:"
    )
    assert not ex.predict.any() and ex.num_images == 3
    ex = templates.flamingo_fewshot(tok, [{"caption": "A dog."}], {"caption": "A cat."}, task="caption")
    assert tok.decode(ex.ids) == "<s><image>Output:A dog.<|endofchunk|><image>Output:A cat."
    assert runs(tok, ex) == ["A cat."]


# ----------------------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    "name, record, reason",
    [
        ("llava", {"images": [b"a", b"b"], "conversations": CHAT["conversations"]}, "placeholder_mismatch"),
        ("llava", {"conversations": CHAT["conversations"]}, "placeholder_mismatch"),
        (
            "qwen_vl",
            {
                "images": [b"a"],
                "conversations": [{"from": "human", "value": "No marker."}, {"from": "gpt", "value": "Ok."}],
            },
            "placeholder_mismatch",
        ),
        (
            "internvl",
            {
                "images": [b"a"],
                "conversations": [
                    {"from": "human", "value": "<image>\nHi <IMG_CONTEXT>"},
                    {"from": "gpt", "value": "Ok."},
                ],
            },
            "placeholder_mismatch",
        ),
        (
            "llava",
            {
                "images": [b"a"],
                "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "See <image>"}],
            },
            "placeholder_mismatch",
        ),
        ("minigpt4", {"images": [b"a"], "caption": "   "}, "empty_text"),
        ("paligemma", {"images": [], "caption": "A cat."}, "placeholder_mismatch"),
        (
            "llava",
            {
                "images": [b"a"],
                "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": ""}],
            },
            "empty_text",
        ),
        ("llava", {"images": [b"a"], "conversations": []}, "empty_text"),
        (
            "llava",
            {
                "images": [b"a"],
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "human", "value": "Hi"}],
            },
            "bad_roles",
        ),
        ("llava", {"images": [b"a"], "conversations": [{"from": "robot", "value": "<image>"}]}, "bad_roles"),
        ("llava", {"images": [b"a"], "conversations": [{"from": "human", "value": 3}]}, "bad_record"),
        ("paligemma", CHAT, "multi_turn"),
        ("flamingo", {"texts": [None, ""], "images": [b"a", None]}, "empty_text"),
        ("flamingo", {"texts": ["a", None], "images": [b"a"]}, "bad_record"),
        ("flamingo", {"texts": ["a"], "images": [b"a"]}, "bad_record"),
        ("flamingo", {"texts": ["Look <image> here"], "images": [None]}, "placeholder_mismatch"),
        ("flamingo", {"image": "a.jpg", "label": 3}, "bad_record"),
        (
            "flamingo",
            {"images": [b"a"], "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A"}]},
            "empty_text",
        ),
        ("llava", {"texts": ["a"], "images": [None]}, "unsupported_format"),
        ("llava", {"image": "a.jpg", "label": 3}, "bad_record"),
    ],
)
def test_bad_records_raise_user_error_with_reason(tok, name, record, reason):
    with pytest.raises(UserError) as info:
        render(name, tok, record, 2)
    assert isinstance(info.value, RenderError) and info.value.reason == reason
    message = str(info.value)
    assert message.endswith(".") and message.count(". ") == 0  # one sentence


def test_image_tokens_must_match_the_images(tok):
    with pytest.raises(ValueError, match="2 counts for 1 images"):
        render("llava", tok, PAIR, [3, 4])
    with pytest.raises(ValueError, match=">= 1"):
        render("llava", tok, PAIR, 0)


def test_tokenized_example_validates_and_shifts_prefix_mask():
    ex = TokenizedExample([5, 6, 7], [False, True, True], 0, prefix_mask=[True, False, False])
    s = ex.shifted()
    assert s["prefix_mask"].tolist() == [True, False] and s["loss_mask"].tolist() == [1.0, 1.0]
    assert ex.ids.dtype == np.int32 and ex.predict.dtype == np.bool_ and len(ex) == 3
    with pytest.raises(ValueError):
        TokenizedExample([1, 2], [True], 0)
    with pytest.raises(ValueError):
        TokenizedExample([1, 2], [True, False], 0, prefix_mask=[True])
