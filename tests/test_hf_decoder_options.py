"""RoPE scaling (Llama 3.1, linear), Mistral's sliding window, PaliGemma's prefix-LM with image features:
logits equal transformers'.

Random-weight PyTorch references saved with `save_pretrained`, then read by `vlm-jax convert-hf` (or
`convert.to_system_config`); float32 logits compared on real tokens.
"""

import json

import jax
import numpy as np
import pytest

from conftest import convert_and_forward, perturb
from vlm_jax.interop.convert import to_system_config
from vlm_jax.models.lm import LanguageModel

torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
transformers = pytest.importorskip(
    "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
)


SIZES = dict(
    vocab_size=101,
    hidden_size=44,  # odd multiple: 4 heads of 12 are 48, not 44
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    head_dim=12,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
# Llama 3.1 scaling with a 32-token original context: with theta 500 and head_dim 12 the wavelengths 2 pi / freq are
# 6.3 (below 32 / high_freq_factor = 8: kept), 17.7 (between 8 and 32: smoothed) and 50 .. 1122 (divided by factor).
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def reference_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


@pytest.mark.parametrize("rope", ["llama3", "linear_old_config"])
def test_llama_rope_scaling_logits_match_through_the_command_line(tmp_path, rope):
    """40 positions, past the 32 of the original context; the linear case is saved with the pre-transformers-5
    keys (`rope_theta`, `rope_scaling` with `type`)."""
    parameters = LLAMA3 if rope == "llama3" else {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}
    torch.manual_seed(0)
    model = perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, rope_parameters=parameters)), 1)
    model.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    if rope == "linear_old_config":
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        del config["rope_parameters"]
        config.update(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config))

    ids = np.random.default_rng(0).integers(0, 101, size=(2, 40)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 30:] = 0  # right padding in row 2
    want = reference_logits(model, ids, mask)
    got = convert_and_forward(tmp_path / "hf", tmp_path, input_ids=ids, attention_mask=mask)["logits"]
    keep = mask.astype(bool)
    assert np.max(np.abs(got[keep] - want[keep])) <= 1e-4


def test_mistral_sliding_window_logits_match_and_the_window_matters(tmp_path):
    """A window of 4 over 9 tokens, row 2 left-padded by 3 (transformers counts positions over the padding too)."""
    config = transformers.MistralConfig(
        **{**SIZES, "hidden_size": 40}, sliding_window=4, rope_parameters={"rope_type": "default", "rope_theta": 500.0}
    )
    torch.manual_seed(0)
    model = perturb(transformers.MistralForCausalLM(config), 1)
    model.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)

    ids = np.random.default_rng(1).integers(0, 101, size=(2, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    want = reference_logits(model, ids, mask)
    converted, params = to_system_config(str(tmp_path / "hf"))
    assert converted.model.sliding_window == 4 and converted.model.head_dim == 12
    keep = mask.astype(bool)
    got = LanguageModel(converted).forward(params, {"input_ids": ids, "attention_mask": mask})["logits"]
    assert np.max(np.abs(got[keep] - want[keep])) <= 1e-4

    converted.model.sliding_window = 0  # the same weights without the window: tokens 4 .. 8 see further back
    unwindowed = LanguageModel(converted).forward(params, {"input_ids": ids, "attention_mask": mask})["logits"]
    assert np.max(np.abs(unwindowed[keep] - want[keep])) > 1e-2


def test_paligemma_language_model_with_image_features_and_prefix_matches_transformers(tmp_path):
    """PaliGemma's LM (Gemma) fed the image features where image tokens stand, with the bidirectional prefix of
    image + prompt (token_type_ids 0) and a causal suffix; row 2 left-padded. Its Gemma is converted by convert-hf."""
    text = {k: v for k, v in SIZES.items() if k != "max_position_embeddings"}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8, projection_dim=44)  # fmt: skip
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_id=100, projection_dim=44)
    torch.manual_seed(0)
    paligemma = perturb(transformers.PaliGemmaForConditionalGeneration(config), 1)
    gemma = transformers.GemmaForCausalLM(paligemma.config.text_config)  # tied head, as PaliGemma's
    gemma.model.load_state_dict(paligemma.model.language_model.state_dict())
    gemma.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)

    image, pad = 100, 0
    ids = np.array([[image] * 4 + [2, 17, 42, 99, 5, 8, 13], [pad] * 2 + [image] * 4 + [2, 7, 21, 64, 3]], np.int64)
    mask = np.array([[1] * 11, [0] * 2 + [1] * 9], np.int64)
    token_type = np.array([[0] * 8 + [1] * 3, [0] * 9 + [1] * 2], np.int64)  # suffixes of 3 and 2 tokens
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = paligemma(
            input_ids=torch.from_numpy(ids), pixel_values=pixels, attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(token_type),
        ).logits.numpy()  # fmt: skip
        image_features = paligemma.model.get_image_features(pixels).pooler_output.numpy()  # [2, 4 patches, 44]

    where = ids == image
    features = np.zeros((2, 11, 44), np.float32)
    features[where] = image_features.reshape(-1, 44)
    converted, params = to_system_config(str(tmp_path / "hf"))
    decoder = LanguageModel(converted).module
    positions = np.broadcast_to(np.arange(1, 12, dtype=np.int32), ids.shape)  # PaliGemma counts from 1
    run = jax.jit(
        lambda prefix: decoder.apply(
            {"params": params}, ids.astype(np.int32), mask.astype(np.int32), positions,
            prefix_mask=prefix, features=features, feature_mask=where,
        )
    )  # fmt: skip
    keep = mask.astype(bool)
    got = np.asarray(run((token_type == 0) & keep))
    assert np.max(np.abs(got[keep] - want[keep])) <= 1e-4
    causal = np.asarray(run(np.zeros_like(keep)))  # without the prefix the image and prompt tokens differ
    assert np.max(np.abs(causal[keep] - want[keep])) > 1e-2
