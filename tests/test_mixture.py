"""Dataset mixtures in the Grain pipeline: proportions, per-component templates, resume, one validation pass, errors.

Each component is a tiny `data build` folder whose images have their own red
value, so every packed example can be traced back to its component.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_lm
from data_pipelines import convert
from data_pipelines.pipeline import GrainPipeline, data_stats
from vlm_jax.config_lib import ConfigDict
from vlm_jax.errors import UserError

SIZE = 8  # pixels per side of a media slot
RED = {"captions": 30, "vqa": 120, "docs": 210, "crowded": 90}  # red channel of each component's images
SIZES = {  # records per split: small components repeat many times during training
    "captions": {"train": 7, "validation": 5},
    "vqa": {"train": 20, "validation": 6},
    "docs": {"train": 5, "validation": 4},
    "crowded": {"train": 3, "validation": 3},
}


def line(component, i):
    """Input line i of a component (`vlm-jax data build` JSONL); "crowded" records hold 5 images."""
    image = f"{component}.png"
    if component == "captions":
        return {"image": image, "caption": f"picture {i} of a cat"}
    if component == "vqa":
        turns = [{"from": "human", "value": f"<image>\nWhat is {i}?"}, {"from": "gpt", "value": "a cat"}]
        return {"image": [image], "conversations": turns}
    if component == "docs":
        return {"texts": [f"Intro {i}.", None, "The end."], "images": [None, image, None]}
    turns = [{"from": "human", "value": "<image>" * 5 + "Which?"}, {"from": "gpt", "value": "the cat"}]
    return {"image": [image] * 5, "conversations": turns}


FORMAT = {"captions": "pairs", "vqa": "llava", "docs": "interleaved", "crowded": "llava"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{component: {split: `data build` folder}}."""
    root = tmp_path_factory.mktemp("mixture")
    out = {}
    for component, red in RED.items():
        buffer = io.BytesIO()
        Image.new("RGB", (12, 10), (red, 255 - red, 7)).save(buffer, format="PNG")
        (root / f"{component}.png").write_bytes(buffer.getvalue())
        for split, count in SIZES[component].items():
            jsonl = root / f"{component}-{split}.jsonl"
            jsonl.write_text("".join(json.dumps(line(component, i)) + "\n" for i in range(count)))
            folder = str(root / component / split)
            convert.build(FORMAT[component], str(jsonl), folder, progress=False)
            out.setdefault(component, {})[split] = folder
    return out


def component(folders, name, weight, **extra):
    return dict(train_path=folders[name]["train"], validation_path=folders[name]["validation"], weight=weight, **extra)


def config_for(tokenizer, mixture, seq_len=64, max_images=4):
    c = tiny_lm()
    c.batch_size = 8
    c.model.image_tokens = 1
    c.data = ConfigDict(
        dict(
            name="grain",
            source="array_record",
            mixture=mixture,
            tokenizer=tokenizer,
            template="flamingo",
            seq_len=seq_len,
            max_images=max_images,
            packing_bins=8,
            image=dict(mode="fixed", size=SIZE, method="bilinear", normalization="siglip", max_aspect_ratio=20.0),
        )
    )
    return c


def examples(rows, tokenizer):
    """(component, decoded text) of every packed example in `rows`, the component read from its images' colour."""
    by_red = {red: name for name, red in RED.items()}
    out = []
    for row in rows:
        seg, img_seg = row["segment_ids"], row["image_segment_ids"]
        for s in range(1, int(seg.max()) + 1):
            slots = row["images"][img_seg == s]
            reds = {int(round((float(slot[..., 0].mean()) + 1) * 127.5)) for slot in slots}
            assert len(reds) == 1  # every example has images, all from its own component
            out.append((by_red[reds.pop()], tokenizer.decode(row["tokens"][seg == s])))
    return out


def test_training_mixes_components_by_weight_each_with_its_own_template(folders, spm_model_path, spm_tokenizer):
    mixture = [
        component(folders, "captions", 2.0, template="llava_plain"),
        component(folders, "vqa", 1.0),
        component(folders, "docs", 1.0),
    ]
    pipeline = GrainPipeline(config_for(spm_model_path, mixture), "train")
    batches = [next(pipeline) for _ in range(6)]
    rows = [{k: b[k][r] for k in b} for b in batches for r in range(8)]
    seen = examples(rows, spm_tokenizer)
    counts = {name: sum(1 for c, _ in seen if c == name) for name in ("captions", "vqa", "docs")}
    total = sum(counts.values())
    assert total > 3 * sum(SIZES[n]["train"] for n in counts)  # every component repeated, independently
    for name, share in {"captions": 0.5, "vqa": 0.25, "docs": 0.25}.items():
        assert counts[name] / total == pytest.approx(share, abs=0.06), counts
    for name, text in seen:
        if name == "captions":  # llava_plain: "<s><image>{caption}\n", no <|endofchunk|>
            assert text.startswith("<s><image>picture ") and "<|endofchunk|>" not in text
        elif name == "vqa":  # flamingo renders llava records as OpenFlamingo VQA
            assert text.startswith("<s><image>Question:What is ") and "Short answer:a cat<|endofchunk|>" in text
        else:
            assert "Question:" not in text and "The end.<|endofchunk|>" in text
    stats = pipeline.stats()
    assert stats["records"] >= total and not any(k.startswith("skipped/") for k in stats)  # the packer holds a few


def test_mixture_iterator_state_restores_the_same_batches(folders, spm_model_path):
    mixture = [component(folders, "captions", 3.0), component(folders, "vqa", 1.0), component(folders, "docs", 0.5)]
    config = config_for(spm_model_path, mixture)
    pipeline = GrainPipeline(config, "train")
    for _ in range(3):
        next(pipeline)
    state = json.loads(json.dumps(pipeline.get_state()))  # what the checkpoint stores
    want = [next(pipeline) for _ in range(3)]
    resumed = GrainPipeline(config, "train")
    resumed.set_state(state)
    for expected in want:
        got = next(resumed)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    assert resumed.stats() == pipeline.stats()


def test_validation_reads_every_component_once_and_counts_skips_of_all(folders, spm_model_path, spm_tokenizer):
    mixture = [
        component(folders, "captions", 5.0),
        component(folders, "vqa", 0.1),
        component(folders, "crowded", 1.0),  # 5 images per record > max_images: every record is skipped
        component(folders, "docs", 1.0),
    ]
    config = config_for(spm_model_path, mixture)
    pipeline = GrainPipeline(config, "validation")
    seen = examples(pipeline.rows, spm_tokenizer)
    # Weights do not matter for one pass: each component's validation records, once each.
    counts = {name: sum(1 for c, _ in seen if c == name) for name in RED}
    assert counts == {"captions": 5, "vqa": 6, "docs": 4, "crowded": 0}
    texts = [text for name, text in seen if name == "vqa"]
    assert sorted(texts) == sorted(
        f"<s><image>Question:What is {i}? Short answer:a cat<|endofchunk|>" for i in range(6)
    )
    stats = data_stats(config, "validation")
    assert stats["records"] == 18 and stats["kept"] == 15 and stats["skipped"] == {"too_many_images": 3}
    stats = data_stats(config, "train")  # `data stats` on a mixture: one pass over every component's train split
    assert stats["records"] == sum(s["train"] for s in SIZES.values())
    assert stats["skipped"] == {"too_many_images": SIZES["crowded"]["train"]}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m, d: m[1].update(weight=0), r"data.mixture\[1\].weight must be a positive number, got 0\."),
        (lambda m, d: m[0].update(weight="1"), r"data.mixture\[0\].weight must be a positive number, got '1'\."),
        (lambda m, d: m[1].pop("weight"), r"data.mixture\[1\].weight must be a positive number, got None\."),
        (lambda m, d: m[1].pop("train_path"), r"data.mixture\[1\].train_path is not set"),
        (lambda m, d: m[0].update(train_path="/no/such/folder"), r"data.mixture\[0\]: the data folder /no/such/folder"),
        (lambda m, d: m[1].update(wieght=1.0), r"data.mixture\[1\] has unknown key\(s\) wieght; the keys are"),
        (lambda m, d: m.append("captions"), r"data.mixture\[2\] must be a dict"),
        (lambda m, d: m.clear(), r"data.mixture must be a non-empty list"),
        (lambda m, d: d.update(source="memory"), r"data.mixture needs data.source = 'array_record', not 'memory'\."),
        (
            lambda m, d: m[1].update(template="llava"),
            r"data.mixture\[1\]: template 'llava' does not render the interleaved records of .* \(it renders",
        ),
        (lambda m, d: m[0].update(template="paligemma"), r"data.mixture mixes prefix-LM and causal templates"),
    ],
)
def test_a_bad_component_is_one_clear_error(folders, spm_model_path, change, message):
    mixture = [component(folders, "captions", 1.0), component(folders, "docs", 1.0)]
    config = config_for(spm_model_path, mixture)
    data = {"source": "array_record"}
    change(mixture, data)
    config.data.mixture = mixture
    config.data.source = data["source"]
    with pytest.raises(UserError, match=message) as info:
        GrainPipeline(config, "train")
    assert str(info.value).endswith(".") and str(info.value).count(". ") == 0  # one sentence
