"""The converter registry of `vlm_jax.interop` and the shared tensor helpers of `interop/tensors.py`."""

import json

import numpy as np
import pytest

import vlm_jax.interop as interop
from vlm_jax.errors import UserError
from vlm_jax.interop import hf_decoder
from vlm_jax.interop.convert import to_system_config
from vlm_jax.interop.tensors import Tensors, heads_bias, heads_kernel, out_kernel, read_safetensors, stack_layers


def _config_for(key: str) -> dict:
    """A config.json that offers registry key `key`."""
    if key.startswith("timm:"):
        return {"architecture": key[len("timm:") :]}
    if key.startswith("model_type:"):
        return {"model_type": key[len("model_type:") :]}
    return {"architectures": [key]}


def test_every_registered_key_maps_to_its_converter():
    table = interop.converters()
    expected = {
        "CLIPModel": "hf_clip",
        "SiglipModel": "hf_clip",
        "CLIPVisionModel": "hf_clip",
        "CLIPVisionModelWithProjection": "hf_clip",
        "SiglipVisionModel": "hf_clip",
        "model_type:siglip": "hf_clip",
        "IdeficsForVisionText2Text": "hf_idefics",
        "LlavaForConditionalGeneration": "hf_llava",
        "LlavaNextForConditionalGeneration": "hf_llava_next",
        **{f"timm:dm_nfnet_f{i}": "timm_nfnet" for i in range(7)},
        **{arch: "hf_decoder" for arch in hf_decoder.ARCHITECTURES},
    }
    for key, module in expected.items():
        assert table[key].__module__ == f"vlm_jax.interop.{module}", key
    for key, fn in table.items():
        assert callable(fn) and fn.__module__.startswith("vlm_jax.interop."), key
        assert interop.find_converter(_config_for(key), "dir") is fn, key


def test_a_config_with_several_architectures_takes_the_first_one_known():
    raw = {"architectures": ["GPT2LMHeadModel", "Qwen2ForCausalLM", "CLIPModel"]}
    assert interop.find_converter(raw, "dir") is interop.converters()["Qwen2ForCausalLM"]


@pytest.mark.parametrize(
    "raw, named",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
        ({"architecture": "resnet50"}, "timm:resnet50"),
        ({}, "no architectures, architecture or model_type"),
    ],
)
def test_an_unknown_architecture_is_one_sentence_naming_the_known_ones(tmp_path, raw, named):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError) as info:
        to_system_config(str(tmp_path))
    message = str(info.value)
    assert named in message and "no converter reads" in message
    assert message.endswith(".") and "\n" not in message
    listed = message.split("known: ", 1)[1].rstrip(".").split(", ")
    assert listed == sorted(interop.converters()) and "LlamaForCausalLM" in listed and "timm:dm_nfnet_f0" in listed


def test_registering_two_converters_for_one_key_is_refused(monkeypatch):
    monkeypatch.setattr(interop.CONVERTERS, "_entries", interop.converters())
    with pytest.raises(ValueError, match="two converters"):
        interop.register_converter("CLIPModel")(lambda path, raw: None)


def test_sharded_safetensors_are_read_through_their_index(tmp_path):
    pytest.importorskip(
        "safetensors", reason="writing and reading safetensors files needs it: pip install -e '.[interop]'"
    )
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": b}, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file({"stale": a}, str(tmp_path / "old.safetensors"))  # not in the index: not read
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = read_safetensors(str(tmp_path))
    assert sorted(tensors) == ["a", "b"]
    np.testing.assert_array_equal(tensors["a"], a)
    np.testing.assert_array_equal(tensors["b"], b)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="lacks the shard"):
        read_safetensors(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(UserError, match="weight_map"):
        read_safetensors(str(tmp_path))


def test_prefix_accessor_reads_float32_and_names_a_missing_key():
    t = Tensors({"model.w": np.ones((2,), np.float16)}, "model.", "/ckpt")
    assert t("w").dtype == np.float32 and "w" in t and "v" not in t
    with pytest.raises(UserError, match=r"\(/ckpt\) lacks tensor 'model.v'"):
        t("v")


def test_head_reshapers_compute_what_torch_linear_computes():
    torch = pytest.importorskip("torch", reason="the reference is torch's Linear: pip install -e '.[interop]'")
    torch.manual_seed(0)
    heads, head_dim, width = 3, 4, 5
    into = torch.nn.Linear(width, heads * head_dim)
    out_of = torch.nn.Linear(heads * head_dim, width, bias=False)
    x = torch.randn(width)
    with torch.no_grad():
        hidden = into(x)
        y = out_of(hidden)
    w, b = into.weight.detach().numpy(), into.bias.detach().numpy()
    ours = np.einsum("i,ihd->hd", x.numpy(), heads_kernel(w, heads)) + heads_bias(b, heads)
    np.testing.assert_allclose(ours, hidden.numpy().reshape(heads, head_dim), atol=1e-6)
    back = np.einsum("hd,hdo->o", ours, out_kernel(out_of.weight.detach().numpy(), heads))
    np.testing.assert_allclose(back, y.numpy(), atol=1e-6)


def test_stack_layers_puts_the_layer_axis_first():
    layers = [{"a": {"k": np.full((2,), i)}} for i in range(3)]
    np.testing.assert_array_equal(stack_layers(layers)["a"]["k"], [[0, 0], [1, 1], [2, 2]])
