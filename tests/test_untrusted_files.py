"""Untrusted files are never unpickled (issue 19, point 6).

Checkpoints go through orbax, imported weights through safetensors only, `np.load` never with `allow_pickle`.
A planted malicious pickle (a `pytorch_model.bin` whose unpickling would create a marker file) is refused by
`vlm-jax convert-hf` with one sentence that says why and how to convert it, and it is never loaded, also when
safetensors weights lie beside it. A static check keeps pickle loaders out of the package sources.
"""

import json
import os
import pickle
import re

import numpy as np
import pytest

from conftest import REPO
from vlm_jax import cli

LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32, hidden_size=8, intermediate_size=16,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip


class _Payload:
    """Unpickling this object calls open(marker, "w"): the file appearing proves the pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(folder, marker, name="pytorch_model.bin"):
    """A model folder holding a config.json and the malicious pickle `name`; returns the folder."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA))
    (folder / name).write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(str(marker))}))
    return folder


def test_the_planted_pickle_is_live(tmp_path):
    """The plant is real: loading it (as `torch.load` without weights_only would) creates its marker file."""
    marker = tmp_path / "proof"
    folder = plant(tmp_path / "m", marker)
    with open(folder / "pytorch_model.bin", "rb") as f:
        pickle.load(f).popitem()[1].close()
    assert marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "open_clip_model.pth"])
def test_convert_hf_refuses_pickle_only_weights_without_loading_them(name, tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = plant(tmp_path / "hf", marker, name)
    out = tmp_path / "out"
    assert cli.main(["convert-hf", "--hf_dir", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for words in (name, "PyTorch pickle", "can run any code", "safetensors", "LlamaForCausalLM.from_pretrained"):
        assert words in err, (words, err)
    assert "safe_serialization=True" in err
    assert not marker.exists() and not out.exists()


def test_safetensors_beside_a_pickle_are_the_only_file_read(tmp_path, capsys, monkeypatch):
    """With safetensors weights present, the .bin beside them is never opened: the conversion reads the
    safetensors file (here an incomplete one, so it stops at its first missing tensor) and nothing else."""
    import safetensors.numpy
    from safetensors.numpy import save_file

    marker = tmp_path / "pwned"
    folder = plant(tmp_path / "hf", marker)
    save_file({"model.embed_tokens.weight": np.zeros((32, 8), np.float32)}, str(folder / "model.safetensors"))
    opened = []
    real_open = open

    def spy_open(file, *args, **kwargs):
        opened.append(os.path.basename(str(file)))
        return real_open(file, *args, **kwargs)

    read = []
    real_load = safetensors.numpy.load_file
    monkeypatch.setattr(safetensors.numpy, "load_file", lambda f: read.append(os.path.basename(f)) or real_load(f))
    monkeypatch.setattr("builtins.open", spy_open)
    status = cli.main(["convert-hf", "--hf_dir", str(folder), "--out", str(tmp_path / "out")])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert status == 2 and "lacks tensor" in err and "\n" not in err, err
    assert read == ["model.safetensors"] and "pytorch_model.bin" not in opened and not marker.exists()


# Pickle loaders, by pattern; a hit in the package sources fails unless allowed here with its reason.
FORBIDDEN = {
    "pickle module": r"\bimport\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b|\bfrom\s+(c?pickle|dill|cloudpickle|joblib)\b",
    "pickle loads": r"\b(c?pickle|dill|cloudpickle|joblib)\.(loads?|Unpickler)\b",
    "torch.load": r"\btorch\.(jit\.)?load\b",
    "pandas read_pickle": r"\bread_pickle\b",
    "allow_pickle other than False": r"allow_pickle\s*=\s*(?!False\b)",
    "trust_remote_code=True": r"trust_remote_code\s*=\s*True",
}
ALLOWED: dict[tuple[str, str], str] = {}  # (path, pattern name) -> why it is safe; empty: nothing needs it


def test_no_pickle_loader_in_the_package_sources():
    hits = []
    for top in ("vlm_jax", "data_pipelines", "launch", "benchmarks"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                for what, pattern in FORBIDDEN.items():
                    for m in re.finditer(pattern, text):
                        if (rel, what) not in ALLOWED:
                            line = text.count("\n", 0, m.start()) + 1
                            hits.append(f"{rel}:{line}: {what}")
    assert not hits, "pickle loaders in the package sources: " + "; ".join(hits)
