"""The Grain pipeline: multimodal packing invariants, determinism, resume, hosts, bad data, stats, training."""

import io
import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, read_tensorboard_scalars, tiny_lm
from data_pipelines import convert, image_ops
from data_pipelines.pipeline import GrainPipeline, data_stats, records_dataset
from data_pipelines.sources import ListSource
from vlm_jax import cli
from vlm_jax.config_lib import ConfigDict, load_config
from vlm_jax.errors import UserError
from vlm_jax.prerequisites import resolve

SIZE = 8  # pixels per side of a media slot


def png(value, size=(12, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def pair(i, words=3):
    """Record i: an image whose red channel is 10 * (i % 25), and a caption that names i."""
    return {"images": [png(10 * (i % 25))], "caption": f"number {i} " + " ".join(["cat"] * words)}


def config_for(records, tokenizer, fmt="pairs", template="flamingo", seq_len=96, max_images=4, **data):
    c = tiny_lm()
    c.batch_size = 8
    c.model.image_tokens = 2
    c.data = ConfigDict(
        dict(
            name="grain",
            source="memory",
            format=fmt,
            records={"train": records, "validation": records},
            tokenizer=tokenizer,
            template=template,
            seq_len=seq_len,
            max_images=max_images,
            packing_bins=8,
            image=dict(mode="fixed", size=SIZE, method="bilinear", normalization="siglip", max_aspect_ratio=20.0),
            **data,
        )
    )
    return c


def red_value(slot):
    """Undo the siglip normalisation of a solid slot and read its red channel."""
    return int(round((float(slot[..., 0].mean()) + 1) * 127.5))


def test_packed_rows_keep_every_image_with_its_own_text(spm_model_path, spm_tokenizer):
    rng = np.random.default_rng(0)
    records = [pair(i, words=int(rng.integers(1, 12))) for i in range(60)]
    pipeline = GrainPipeline(config_for(records, spm_model_path), "train")
    placeholder = spm_tokenizer.token_id("<image>")
    rows = checked = 0
    for _ in range(3):
        batch = next(pipeline)
        assert batch["images"].shape == (8, 4, SIZE, SIZE, 3) and batch["tokens"].shape == (8, 96)
        for b in range(8):
            rows += 1
            seg, img_seg = batch["segment_ids"][b], batch["image_segment_ids"][b]
            assert int(seg.max()) > 1  # several examples per row
            for s in range(1, int(seg.max()) + 1):
                tokens = batch["tokens"][b][seg == s]
                slots = batch["images"][b][img_seg == s]
                # Two placeholder tokens per image slot, and the image is this example's own.
                assert (tokens == placeholder).sum() == 2 * len(slots) == 2
                number = int(
                    re.search(r"number ([0-9 ]+?) cat", spm_tokenizer.decode(tokens)).group(1).replace(" ", "")
                )
                assert red_value(slots[0]) == 10 * (number % 25)
                checked += 1
            assert (img_seg[img_seg > 0] <= seg.max()).all() and (batch["images"][b][img_seg == 0] == 0).all()
            # Positions restart in each segment.
            for s in range(1, int(seg.max()) + 1):
                np.testing.assert_array_equal(batch["positions"][b][seg == s], np.arange((seg == s).sum()))
    assert checked > rows


def test_same_seed_same_batches_other_seed_other_batches(spm_model_path):
    records = [pair(i) for i in range(40)]
    a = [next(p) for p in [GrainPipeline(config_for(records, spm_model_path), "train")] for _ in range(3)]
    b = [next(p) for p in [GrainPipeline(config_for(records, spm_model_path), "train")] for _ in range(3)]
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other = config_for(records, spm_model_path)
    other.seed = 1
    assert not np.array_equal(next(GrainPipeline(other, "train"))["tokens"], a[0]["tokens"])


def test_a_worker_process_makes_the_same_batches_and_resumes(spm_model_path):
    """data.worker_count=1 (the main job's setting) moves the pipeline to a Grain worker process: same batches."""
    records = [pair(i) for i in range(40)]
    local = GrainPipeline(config_for(records, spm_model_path), "train")
    want = [next(local) for _ in range(4)]
    worker = GrainPipeline(config_for(records, spm_model_path, worker_count=1), "train")
    got = [next(worker) for _ in range(2)]
    resumed = GrainPipeline(config_for(records, spm_model_path, worker_count=1), "train")
    resumed.set_state(json.loads(json.dumps(worker.get_state())))
    got += [next(resumed) for _ in range(2)]
    for x, y in zip(want, got):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_resume_from_state_reproduces_the_batch_sequence(spm_model_path):
    config = config_for([pair(i) for i in range(40)], spm_model_path)
    reference = GrainPipeline(config, "train")
    want = [next(reference) for _ in range(5)]
    first = GrainPipeline(config, "train")
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # what the checkpoint stores
    resumed = GrainPipeline(config, "train")
    resumed.set_state(state)
    for expected in want[3:]:
        got = next(resumed)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
    assert resumed.stats() == reference.stats()


def test_two_hosts_read_disjoint_shards_and_make_the_global_batch(spm_model_path):
    records = [pair(i) for i in range(41)]
    config = config_for(records, spm_model_path)
    source = ListSource(records, "pairs")
    shards = [list(records_dataset(config, source, i, 2, repeat=False)) for i in range(2)]
    ids = [{r["caption"] for r in shard} for shard in shards]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {r["caption"] for r in records}
    hosts = [GrainPipeline(config, "train", i, 2) for i in range(2)]
    again = [GrainPipeline(config, "train", i, 2) for i in range(2)]
    for _ in range(2):
        local = [next(h) for h in hosts]
        assert all(batch["tokens"].shape[0] == 4 for batch in local)  # each host: half of batch_size
        replay = [next(h) for h in again]
        global_batch = {k: np.concatenate([batch[k] for batch in local]) for k in local[0]}
        assert global_batch["tokens"].shape == (8, 96)
        # The global batch (what the trainer assembles from the hosts' rows) is deterministic.
        for k in global_batch:
            np.testing.assert_array_equal(global_batch[k], np.concatenate([batch[k] for batch in replay]))


def truncated_png():
    data = png(100, size=(40, 40))
    return data[: len(data) // 2]


def test_bad_records_are_skipped_or_repaired_and_counted(spm_model_path):
    good = [pair(i) for i in range(6)]
    bad = [
        {"images": [b"\x89PNG\r\n\x1a\n but then garbage"], "caption": "corrupt"},
        {"images": [truncated_png()], "caption": "truncated"},
        {"images": [b""], "caption": "empty image"},
        {"images": [b"just some text, not an image"], "caption": "unsupported"},
        {"images": [png(5, size=(1, 10000))], "caption": "absurd"},
        {"images": [png(5)], "caption": b"caf\xe9 invalid utf8"},
        {"images": [png(5)], "caption": "   "},
    ]
    stats = data_stats(config_for(good + bad, spm_model_path), "train")
    assert stats["skipped"] == {
        "corrupt_image": 2,
        "empty_image": 1,
        "unsupported_format": 1,
        "absurd_aspect_ratio": 1,
        "empty_text": 1,
    }
    assert stats["repaired"] == {"invalid_utf8": 1}
    assert stats["records"] == 13 and stats["kept"] == 7

    turns = [{"from": "human", "value": "<image><image><image> What?"}, {"from": "gpt", "value": "Cats."}]
    chats = [
        {
            "images": [png(1)],
            "conversations": [{"from": "human", "value": "<image> What?"}, {"from": "gpt", "value": "A cat."}],
        },
        {"images": [png(1), png(2), png(3)], "conversations": turns},  # 3 images, 2 slots
        {
            "images": [png(1)],
            "conversations": [{"from": "human", "value": "No marker?"}, {"from": "gpt", "value": "No."}],
        },
    ]
    stats = data_stats(
        config_for(chats, spm_model_path, fmt="llava", template="llava", seq_len=256, max_images=2), "train"
    )
    assert stats["skipped"] == {"too_many_images": 1, "placeholder_mismatch": 1} and stats["kept"] == 1

    docs = [{"texts": ["Intro text", None, "middle", None, "end"], "images": [None, png(1), None, b"broken", None]}]
    stats = data_stats(config_for(docs, spm_model_path, fmt="interleaved"), "train")
    assert stats["repaired"] == {"dropped_image/unsupported_format": 1} and stats["kept"] == 1
    assert stats["image_slot_fill"] == pytest.approx(1 / 4)


def test_all_records_bad_is_one_clear_error(spm_model_path):
    config = config_for([{"images": [b""], "caption": "x"}] * 3, spm_model_path)
    pipeline = GrainPipeline(config, "train")
    with pytest.raises(UserError, match=r"the last 1000 records were all skipped \(empty_image=1000\)"):
        next(pipeline)


def test_interleaved_windows_respect_token_and_image_budgets(spm_model_path, spm_tokenizer):
    rng = np.random.default_rng(1)
    docs = []
    for d in range(12):
        texts, images = [], []
        for k in range(int(rng.integers(3, 9))):
            texts += [" ".join(["dog"] * int(rng.integers(2, 20))), None]
            images += [None, png(10 * k)]
        docs.append({"texts": texts, "images": images})
    config = config_for(
        docs,
        spm_model_path,
        fmt="interleaved",
        seq_len=128,
        max_images=8,
        interleaved=dict(max_tokens=40, max_images=3),
    )
    pipeline = GrainPipeline(config, "train")
    placeholder = spm_tokenizer.token_id("<image>")
    for _ in range(2):
        batch = next(pipeline)
        for b in range(8):
            seg, img_seg = batch["segment_ids"][b], batch["image_segment_ids"][b]
            for s in range(1, int(seg.max()) + 1):
                n_img = int((img_seg == s).sum())
                assert (seg == s).sum() <= 40 and n_img <= 3
                assert (batch["tokens"][b][seg == s] == placeholder).sum() == 2 * n_img


def test_internvl_tiles_take_one_slot_each(spm_model_path, spm_tokenizer):
    wide = {"images": [png(50, size=(48, 16))], "caption": "a wide picture"}  # 3:1 -> 3 tiles + thumbnail
    config = config_for([wide] * 4, spm_model_path, template="internvl", seq_len=256, max_images=8)
    config.data.image = ConfigDict(
        dict(
            mode="internvl",
            size=SIZE,
            min_tiles=1,
            max_tiles=6,
            use_thumbnail=True,
            normalization="imagenet",
            max_aspect_ratio=20.0,
        )
    )
    grid = image_ops.internvl_closest_ratio(48, 16, image_ops.internvl_target_ratios(1, 6), SIZE)
    assert grid == (3, 1)
    row = next(iter(GrainPipeline(config, "train").rows))
    context = spm_tokenizer.token_id("<IMG_CONTEXT>")
    for s in range(1, int(row["segment_ids"].max()) + 1):
        assert (row["image_segment_ids"] == s).sum() == 4
        assert (row["tokens"][row["segment_ids"] == s] == context).sum() == 2 * 4


def test_data_stats_command_prints_json_last(spm_model_path, tmp_path, capsys):
    (tmp_path / "red.png").write_bytes(png(200))
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"image": "red.png", "caption": f"number {i} cat cat"}) + "\n")
    convert.build("pairs", str(tmp_path / "pairs.jsonl"), str(tmp_path / "data"), progress=False)
    config_arg = os.path.join(REPO, f"configs/lm.py:data={tmp_path / 'data'},tokenizer={spm_model_path}")
    assert cli.main(["data", "stats", "--config", config_arg]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"records", "skipped", "token_fill", "image_slot_fill", "examples_per_row", "rows_per_s"} <= set(stats)
    assert stats["records"] == 30 and stats["skipped"] == {} and stats["examples_per_row"] > 1


def test_lm_trains_on_grain_batches_and_the_checkpoint_carries_the_iterator(spm_model_path, tmp_path):
    from vlm_jax.train import trainer
    from vlm_jax.train.checkpoint import Checkpointer

    (tmp_path / "img.png").write_bytes(png(30))
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for i in range(50):
            f.write(json.dumps({"image": "img.png", "caption": f"number {i} " + "cat " * (i % 7)}) + "\n")
    convert.build("pairs", str(tmp_path / "pairs.jsonl"), str(tmp_path / "data"), progress=False)
    spec = f"configs/lm.py:data={tmp_path / 'data'},tokenizer={spm_model_path}"
    config = resolve(load_config(os.path.join(REPO, spec)))  # the vocabulary size comes from the tokenizer
    config.total_steps, config.checkpoint_every, config.log_every, config.eval_every, config.peak_tflops = (
        4,
        2,
        2,
        0,
        1.0,
    )
    result = trainer.train(config, str(tmp_path / "run"))
    # steps 3-4 average below ln 400 = 5.99, the loss of a uniform guess over the tokenizer's 400 ids
    assert result.step == 4 and config.model.vocab_size == 400 and result.metrics["loss"] < math.log(400)
    scalars = read_tensorboard_scalars(str(tmp_path / "run" / "tensorboard"))

    fresh = GrainPipeline(config, "train")
    batches = [next(fresh) for _ in range(4)]  # the batches of the 4 training steps
    # the pipeline's counts reach the training metrics: every example packed into those batches is a record read
    assert scalars["data/records"][4] >= sum(int(b["segment_ids"].max(axis=-1).sum()) for b in batches)
    want = batches[2:]
    ckpt = Checkpointer(str(tmp_path / "run"))
    resumed = GrainPipeline(config, "train")
    ckpt.restore(2, trainer.Trainer(config).abstract_state, resumed)  # through Grain's checkpoint handler
    saved = os.listdir(tmp_path / "run" / "checkpoints" / "2" / "data")
    assert [n for n in saved if n.endswith(".json")] == ["process_0-of-1.json"]
    for expected in want:
        got = next(resumed)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])


def test_anyres_and_video_become_one_slot_per_patch_or_frame(spm_model_path, spm_tokenizer):
    tall = {"images": [png(90, size=(16, 32))], "caption": "a tall picture"}
    config = config_for([tall] * 3, spm_model_path, seq_len=128, max_images=8)
    config.data.image = ConfigDict(
        dict(
            mode="anyres",
            size=SIZE,
            grid_pinpoints=[[16, 8], [8, 16], [16, 16]],
            normalization="clip",
            max_aspect_ratio=20.0,
        )
    )
    row = next(iter(GrainPipeline(config, "train").rows))
    placeholder = spm_tokenizer.token_id("<image>")
    # Best fit for 32x16 (h x w) among the pinpoints is 16x8: base image + 2x1 patches.
    assert image_ops.select_best_resolution((32, 16), [(16, 8), (8, 16), (16, 16)]) == (16, 8)
    for s in range(1, int(row["segment_ids"].max()) + 1):
        assert (row["image_segment_ids"] == s).sum() == 3
        assert (row["tokens"][row["segment_ids"] == s] == placeholder).sum() == 2 * 3

    video = {"images": [[png(10 * f) for f in range(10)]], "caption": "a short video"}
    config = config_for([video] * 3, spm_model_path, seq_len=128, max_images=8)
    config.data.image.video_frames = 4
    row = next(iter(GrainPipeline(config, "validation").rows))
    frames = row["images"][row["image_segment_ids"] == 1]
    # Evaluation takes the middle frame of each of 4 segments of 10 frames: 1, 3, 6, 8.
    assert [red_value(f) for f in frames] == [10 * i for i in image_ops.sample_frame_indices(10, 4)]
    assert (row["tokens"][row["segment_ids"] == 1] == placeholder).sum() == 2 * 4
