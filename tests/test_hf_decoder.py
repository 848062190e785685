"""LLaMA / Qwen2 / Gemma / MPT -> `vlm-jax convert-hf` -> `vlm-jax forward`: logits equal transformers' (random weights)."""

import numpy as np
import pytest

from conftest import convert_and_forward, perturb

torch = pytest.importorskip("torch", reason="the reference model is PyTorch: pip install -e '.[interop]'")
transformers = pytest.importorskip(
    "transformers", reason="the reference is transformers' model: pip install -e '.[interop]'"
)


FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    "mpt": (transformers.MptConfig, transformers.MptForCausalLM),
}


def reference_config(family, tied):
    if family == "mpt":  # ALiBi with 5 heads (not a power of two: interleaved slopes), bias-free LayerNorm
        return transformers.MptConfig(
            vocab_size=101, d_model=40, n_heads=5, n_layers=2, max_seq_len=64, tie_word_embeddings=tied
        )
    return FAMILIES[family][0](
        vocab_size=101,
        hidden_size=40,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        head_dim=12,  # not hidden_size / heads
        max_position_embeddings=64,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )


@pytest.mark.parametrize(
    "family, tied", [("llama", False), ("llama", True), ("qwen2", False), ("gemma", True), ("mpt", True)]
)
def test_decoder_logits_match_through_the_command_line(tmp_path, family, tied):
    torch.manual_seed(0)
    model = perturb(FAMILIES[family][1](reference_config(family, tied)), 1)
    model.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)

    ids = np.array([[3, 17, 42, 99, 5, 8, 13], [7, 7, 21, 64, 0, 0, 0]], np.int64)
    mask = np.array([[1] * 7, [1, 1, 1, 1, 0, 0, 0]], np.int64)  # right padding in row 2
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = convert_and_forward(tmp_path / "hf", tmp_path, input_ids=ids, attention_mask=mask)["logits"]
    keep = mask.astype(bool)
    assert np.max(np.abs(got[keep] - want[keep])) <= 1e-4
