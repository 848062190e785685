"""What the transformers interop reads, refuses and renders, checked without PyTorch or transformers: decoder
settings we do not implement are refused from config.json alone, Llama 3.1 RoPE scaling follows Meta's published
formula, and the "idefics3" template renders Idefics3's published chat template. The logit parity tests that need
PyTorch are in tests/test_hf_*.py."""

import json
import math

import numpy as np
import pytest

from data_pipelines import templates
from vlm_jax.errors import UserError
from vlm_jax.interop.hf_decoder import load_decoder_dir
from vlm_jax.nn.rope import inverse_frequencies

SIZES = dict(
    vocab_size=101,
    hidden_size=44,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


@pytest.mark.parametrize("attn_config", [{"clip_qkv": 6.0}, {"qk_ln": True}, {"alibi_bias_max": 16}])
def test_mpt_options_we_do_not_implement_are_refused(tmp_path, attn_config):
    config = {"architectures": ["MptForCausalLM"], "d_model": 8, "n_heads": 2, "attn_config": attn_config}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=next(iter(attn_config))):
        load_decoder_dir(str(tmp_path))


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "linear, llama3"),
        ({"rope_scaling": {"type": "llama3", "factor": 8.0}, "max_position_embeddings": 64}, "low_freq_factor"),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "sliding-window"),
        ({"hidden_act": "gelu"}, "activation"),
    ],
)
def test_decoder_settings_we_do_not_implement_are_refused(tmp_path, extra, match):
    config = {"architectures": ["LlamaForCausalLM"], **SIZES, **extra}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=match):
        load_decoder_dir(str(tmp_path))


def meta_apply_scaling(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
    """Llama 3.1's `apply_scaling` (meta-llama/llama-models, reference implementation), one frequency at a time."""
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def test_llama3_scaling_follows_metas_formula_in_all_three_bands():
    """theta 500, head_dim 12, a 32-token original context: wavelengths 6.3 (below 32 / 4: kept), 17.7 (between 8
    and 32: smoothed) and 50 .. 1122 (divided by the factor); tests/test_hf_decoder_options.py's parity test uses
    these settings."""
    settings = dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
    plain = 500.0 ** (-np.arange(0, 12, 2) / 12)
    want = meta_apply_scaling(plain, 4.0, 1.0, 4.0, 32)
    np.testing.assert_allclose(np.asarray(inverse_frequencies(12, 500.0)), plain, rtol=1e-6)
    got = np.asarray(inverse_frequencies(12, 500.0, {"rope_type": "llama3", **settings}))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    ratio = plain / want
    assert ratio[0] == 1.0 and 1.0 < ratio[1] < 4.0 and np.allclose(ratio[2:], 4.0)  # all three bands occur


# The Idefics3 processor's chat template (chat_template.json of the Idefics3 checkpoints, e.g.
# hf-internal-testing/tiny-random-Idefics3ForConditionalGeneration and HuggingFaceM4/Idefics3-8B-Llama3).
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]"
    "['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if "
    "line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@pytest.mark.parametrize("image_first", [True, False])
def test_idefics3_chat_equals_the_processors_chat_template(spm_tokenizer, image_first):
    """A two-turn conversation rendered by the "idefics3" template decodes to the chat template's string with
    each `<image>` expanded as the processor expands it (tests/test_hf_idefics3.py checks that expansion against
    `replace_image_token`), bos for `<|begin_of_text|>` and eos for `<end_of_utterance>` (the built-in vocabulary
    has no such piece); the generation prompt likewise."""
    jinja2 = pytest.importorskip(
        "jinja2", reason="the chat template is Jinja, as transformers renders it: pip install jinja2"
    )
    tok = spm_tokenizer
    image = {"type": "image"}
    first = [image, {"type": "text", "text": "What is it?"}] if image_first else [
        {"type": "text", "text": "What is it?"}, image,
    ]  # fmt: skip
    messages = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": [{"type": "text", "text": "A red ball."}]},
        {"role": "user", "content": [{"type": "text", "text": "And its size?"}]},
    ]
    want = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    want = want.replace("<image>", templates.idefics3_image_text(2, 1).replace("<image>", "<image>" * 16))
    want = want.replace("<|begin_of_text|>", tok.piece(tok.bos_id)).replace("<end_of_utterance>", tok.piece(tok.eos_id))
    question = "<image>\nWhat is it?" if image_first else "What is it?<image>"
    record = {
        "images": [b""],
        "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": "A red ball."},
            {"from": "human", "value": "And its size?"},
        ],
    }  # fmt: skip
    rendered = templates.render("idefics3", tok, record, [16 * 3], tile_tokens=16, grids=[(2, 1)])
    assert tok.decode(rendered.ids.tolist()) == want
