"""Bad inputs by kind (issue 19) through `vlm-jax data build`, the training / evaluation pipeline (`data_stats`),
`vlm-jax forward` and `vlm-jax generate`: every bad record is counted under its reason, every valid record is kept
and decodes as it should (CMYK, 16-bit, palette with transparency, animated GIF, EXIF-rotated), and every bad
command input is one sentence with exit status 2. The corpus is generated here; every expected count and message
is worked out by hand from it (see the comment on each line)."""

import contextlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_lm
from data_pipelines import image_ops, sources
from data_pipelines.pipeline import data_stats
from vlm_jax import cli
from vlm_jax.config_lib import ConfigDict

RED, BLUE = (255, 0, 0), (0, 0, 255)
PALETTE = [255, 0, 0, 0, 200, 0, 1, 2, 250, 90, 90, 90]  # index 1 (green) is the transparent one
PALETTE_INDICES = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)


def encode(img, fmt, **kwargs):
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def bomb_png(side=30_000):
    """A valid 1-bit black PNG of side x side pixels (9e8: a decompression bomb) in about 110 kB."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + bytes((side + 7) // 8)) * 1000  # filter byte + packed pixels, 1000 rows at a time
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(rows) for _ in range(side // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg():
    """A 10 x 20 photo, left half red, right half blue, whose EXIF orientation 6 says: rotate 90 degrees clockwise
    to display (the stored left half becomes the top)."""
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :10], stored[:, 10:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)


def palette_png():
    img = Image.frombytes("P", (4, 2), PALETTE_INDICES.tobytes())
    img.putpalette(PALETTE)
    return encode(img, "PNG", transparency=1)


VALID_IMAGES = {  # name -> bytes: each must be kept by `data build` and decode to the expected pixels
    "rgb.png": lambda: encode(Image.new("RGB", (16, 12), RED), "PNG"),
    "cmyk.jpg": lambda: encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
    "deep.png": lambda: encode(Image.fromarray(np.repeat([[0] * 4 + [65535] * 4], 8, 0).astype(np.uint16)), "PNG"),
    "palette.png": palette_png,
    "animated.gif": lambda: encode(
        Image.new("RGB", (8, 6), RED), "GIF", save_all=True, append_images=[Image.new("RGB", (8, 6), BLUE)]
    ),
    "rotated.jpg": exif_rotated_jpeg,
}
BAD_IMAGES = {  # name -> (bytes, the reason `data build` counts)
    "truncated.jpg": (
        lambda: (lambda d: d[: len(d) // 2])(
            encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)), "JPEG")
        ),
        "corrupt_image",
    ),
    "empty.jpg": (lambda: b"", "empty_image"),
    "strip.png": (lambda: encode(Image.new("L", (1, 10_000)), "PNG"), "absurd_aspect_ratio"),
    "bomb.png": (bomb_png, "image_too_large"),
    "document.png": (lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "unsupported_format"),
}


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    """The image files (valid, bad, a folder named like an image; missing.png is not there) and the three JSONL
    files of the corpus."""
    root = tmp_path_factory.mktemp("bad_inputs")
    for name, make in VALID_IMAGES.items():
        (root / name).write_bytes(make())
    for name, (make, _) in BAD_IMAGES.items():
        (root / name).write_bytes(make())
    (root / "folder.png").mkdir()  # a directory where an image file is expected

    pairs = [
        b"\xef\xbb\xbf" + json.dumps({"image": "rgb.png", "caption": "a red square"}).encode(),  # BOM: kept
        *(
            json.dumps({"image": name, "caption": f"valid {name}"}).encode() for name in list(VALID_IMAGES)[1:]
        ),  # 5 kept
        *(json.dumps({"image": name, "caption": f"bad {name}"}).encode() for name in BAD_IMAGES),  # 5 image reasons
        json.dumps({"image": "folder.png", "caption": "a folder"}).encode(),  # image_is_a_directory
        json.dumps({"image": "missing.png", "caption": "nothing"}).encode(),  # missing_image_file
        b'{"image": "rgb.png", "caption": "caf\xe9 au lait"}',  # kept, invalid_utf8 repaired
        b'{"image": "rgb.png", "caption": "lone \\ud800 surrogate"}',  # kept, invalid_utf8 repaired
        b'{"image": "rgb.png", "caption": ',  # invalid_json
        b"[" * 100_000 + b"]" * 100_000,  # invalid_json (too deep to parse)
        b"[1, 2, 3]",  # not_an_object
        b"",  # a blank line: not a record
        json.dumps({"image": ["rgb.png"], "caption": "a list"}).encode(),  # bad_field_type
        json.dumps({"image": "rgb.png", "caption": 42}).encode(),  # bad_field_type
        json.dumps({"image": "rgb.png", "caption": ""}).encode(),  # empty_text
        json.dumps({"image": "rgb.png"}).encode(),  # missing_field
        json.dumps({"image": "rgb.png", "caption": "an <image> marker without its image"}).encode(),  # mismatch
    ]
    (root / "pairs.jsonl").write_bytes(b"\n".join(pairs) + b"\n")

    def chat(question, answer="Red."):
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    llava = [
        {"image": "rgb.png", "conversations": chat("<image>\nWhat colour?")},  # kept
        {"image": ["rgb.png", "cmyk.jpg"], "conversations": chat("<image> and <image>: colours?", "Red, red.")},  # kept
        {"image": "rgb.png", "conversations": chat("<image><image> Two markers, one image?")},  # placeholder_mismatch
        {"image": ["rgb.png", "animated.gif"], "conversations": chat("<image> One marker?")},  # placeholder_mismatch
        {"image": "rgb.png", "conversations": "<image> not a list"},  # bad_field_type
        {"image": "truncated.jpg", "conversations": chat("<image> What?")},  # corrupt_image
        {"conversations": chat("Hello?", "   ")},  # empty_text
    ]
    (root / "llava.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava))

    interleaved = [
        # kept; the empty image is dropped (dropped_image:empty_image), the GIF stays
        {"texts": ["Intro", None, "Middle", None, "End"], "images": [None, "animated.gif", None, "empty.jpg", None]},
        {"texts": ["See below.", None], "images": [None, "folder.png"]},  # kept; dropped_image:image_is_a_directory
        {"texts": ["a <image> marker", None], "images": [None, "rgb.png"]},  # placeholder_mismatch
        {"texts": ["a", "b"], "images": [None]},  # placeholder_mismatch (lists of different lengths)
        {"texts": "not a list", "images": []},  # bad_field_type
        {"texts": [None, None], "images": ["rgb.png", "missing.png"]},  # empty_text (its dropped image not counted)
        {"texts": ["Only text."], "images": [None]},  # kept
    ]
    (root / "interleaved.jsonl").write_text("".join(json.dumps(r) + "\n" for r in interleaved))
    return root


@pytest.fixture(scope="module")
def built(bad_corpus):
    """`vlm-jax data build` of the three files, in-process: {format: (folder, stdout)}."""
    out = {}
    for fmt in ("pairs", "llava", "interleaved"):
        folder = bad_corpus / f"{fmt}_records"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = cli.main(
                ["data", "build", "--format", fmt, "--input", str(bad_corpus / f"{fmt}.jsonl"), "--out", str(folder)]
            )
        assert status == 0
        out[fmt] = (folder, printed.getvalue())
    return out


def index(folder):
    return json.loads((folder / "index.json").read_text())


def test_the_corpus_images_are_the_kinds_they_claim(bad_corpus):
    def opened(name):
        return Image.open(io.BytesIO((bad_corpus / name).read_bytes()))

    assert opened("cmyk.jpg").mode == "CMYK"
    assert opened("deep.png").mode.startswith("I")  # 16 bits per sample
    assert opened("palette.png").mode == "P" and opened("palette.png").info["transparency"] == 1
    assert opened("animated.gif").n_frames == 2
    assert opened("rotated.jpg").getexif()[0x0112] == 6 and opened("rotated.jpg").size == (20, 10)
    assert (bad_corpus / "empty.jpg").stat().st_size == 0 and 0 < (bad_corpus / "truncated.jpg").stat().st_size
    assert Image.open(io.BytesIO((bad_corpus / "strip.png").read_bytes())).size == (1, 10_000)
    bomb = (bad_corpus / "bomb.png").read_bytes()
    assert struct.unpack(">II", bomb[16:24]) == (30_000, 30_000) and len(bomb) < 200_000
    assert (bad_corpus / "folder.png").is_dir() and not (bad_corpus / "missing.png").exists()


def test_build_counts_every_bad_pair_by_reason_and_keeps_every_valid_one(built, bad_corpus):
    folder, printed = built["pairs"]
    summary = index(folder)
    assert summary["skipped"] == {
        "corrupt_image": 1,
        "empty_image": 1,
        "absurd_aspect_ratio": 1,
        "image_too_large": 1,
        "unsupported_format": 1,
        "image_is_a_directory": 1,
        "missing_image_file": 1,
        "invalid_json": 2,
        "not_an_object": 1,
        "bad_field_type": 2,
        "empty_text": 1,
        "missing_field": 1,
        "placeholder_mismatch": 1,
    }
    assert summary["repaired"] == {"invalid_utf8": 2}
    assert summary["records"] == 8 and summary["images"] == 8
    assert "Wrote 8 pairs records with 8 images" in printed and "Skipped 15: " in printed
    assert "Repaired 2: invalid_utf8=2" in printed

    source = sources.ArrayRecordSource(str(folder))
    records = [source[i] for i in range(len(source))]
    assert [r["caption"] for r in records] == [
        "a red square",
        *(f"valid {name}" for name in list(VALID_IMAGES)[1:]),
        "caf\ufffd au lait",
        "lone \ufffd surrogate",
    ]
    for record, name in zip(records, VALID_IMAGES):  # the file's own bytes, unconverted
        assert record["images"] == [(bad_corpus / name).read_bytes()], name
    rgb, cmyk, deep, palette, gif, rotated = (image_ops.decode(r["images"][0]) for r in records[:6])
    np.testing.assert_array_equal(rgb, np.broadcast_to(RED, (12, 16, 3)))
    assert cmyk.shape == (16, 16, 3) and np.abs(cmyk.astype(int) - RED).max() <= 8
    np.testing.assert_array_equal(deep[:, :4], 0)  # 16-bit 0 and 65535 -> 0 and 255, not clipped
    np.testing.assert_array_equal(deep[:, 4:], 255)
    expected = np.array(PALETTE, np.uint8).reshape(4, 3)[PALETTE_INDICES]
    expected[PALETTE_INDICES == 1] = 255  # transparent over white
    np.testing.assert_array_equal(palette, expected)
    np.testing.assert_array_equal(gif, np.broadcast_to(RED, (6, 8, 3)))  # the first frame
    assert rotated.shape == (20, 10, 3)  # upright: 20 high, 10 wide
    assert np.abs(rotated[2:8, 2:8].astype(int) - RED).max() <= 24
    assert np.abs(rotated[12:18, 2:8].astype(int) - BLUE).max() <= 24


def test_build_counts_llava_placeholder_mismatches_both_ways(built):
    folder, printed = built["llava"]
    summary = index(folder)
    assert summary["skipped"] == {"placeholder_mismatch": 2, "bad_field_type": 1, "corrupt_image": 1, "empty_text": 1}
    assert summary["repaired"] == {} and summary["records"] == 2 and summary["images"] == 3
    assert "Skipped 5: bad_field_type=1, corrupt_image=1, empty_text=1, placeholder_mismatch=2" in printed


def test_build_interleaved_drops_bad_images_keeps_the_text_and_counts_both(built):
    folder, _ = built["interleaved"]
    summary = index(folder)
    assert summary["skipped"] == {"placeholder_mismatch": 2, "bad_field_type": 1, "empty_text": 1}
    assert summary["repaired"] == {"dropped_image:empty_image": 1, "dropped_image:image_is_a_directory": 1}
    assert summary["records"] == 3 and summary["images"] == 1
    source = sources.ArrayRecordSource(str(folder))
    assert [source[i]["texts"] for i in range(3)] == [["Intro", None, "Middle", "End"], ["See below."], ["Only text."]]


def pipeline_config(folder, tokenizer, template, max_images, seq_len):
    c = tiny_lm()
    c.batch_size = 8
    c.model.image_tokens = 2
    c.data = ConfigDict(
        dict(
            name="grain",
            source="array_record",
            train_path=str(folder),
            validation_path=str(folder),
            tokenizer=tokenizer,
            template=template,
            seq_len=seq_len,
            max_images=max_images,
            packing_bins=8,
            image=dict(mode="fixed", size=8, method="bilinear", normalization="siglip", max_aspect_ratio=20.0),
        )
    )
    return c


def test_pipeline_keeps_every_built_record_and_counts_images_over_the_row_slots(built, spm_model_path):
    # Training (train split) and evaluation (validation split) run the same Preprocessor and CountSkips.
    pairs = data_stats(pipeline_config(built["pairs"][0], spm_model_path, "flamingo", 4, 96), "train")
    assert (pairs["records"], pairs["kept"], pairs["skipped"], pairs["repaired"]) == (8, 8, {}, {})
    # llava: one image fits the row's one slot; the record with two images does not (too_many_images).
    llava = data_stats(pipeline_config(built["llava"][0], spm_model_path, "llava", 1, 256), "validation")
    assert (llava["records"], llava["kept"], llava["skipped"]) == (2, 1, {"too_many_images": 1})
    docs = data_stats(pipeline_config(built["interleaved"][0], spm_model_path, "flamingo", 4, 96), "train")
    assert (docs["records"], docs["kept"], docs["skipped"], docs["repaired"]) == (3, 3, {}, {})


def run(argv, capsys):
    """(exit status, stderr) of the `vlm-jax` command in-process."""
    status = cli.main(argv)
    return status, capsys.readouterr().err.strip()


def one_sentence(status, err, *parts):
    assert status == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


def test_build_command_arguments_are_one_sentence(bad_corpus, capsys):
    build = ["data", "build", "--format", "pairs"]
    one_sentence(
        *run([*build, "--input", str(bad_corpus), "--out", str(bad_corpus / "o1")], capsys),
        f"--input {bad_corpus} is a folder",
    )
    (bad_corpus / "a_file").write_text("x")
    args = ["--input", str(bad_corpus / "pairs.jsonl"), "--out", str(bad_corpus / "a_file")]
    one_sentence(*run([*build, *args], capsys), f"--out {bad_corpus / 'a_file'} is an existing file")
    (bad_corpus / "all_bad.jsonl").write_bytes(b"\xff\xfe not json\n[]\n")
    args = ["--input", str(bad_corpus / "all_bad.jsonl"), "--out", str(bad_corpus / "o2")]
    one_sentence(
        *run([*build, *args], capsys),
        f"no record of {bad_corpus / 'all_bad.jsonl'} could be converted "
        "(problems: skipped:invalid_json=1, skipped:not_an_object=1).",
    )


def forward(workdir, tmp_path, capsys, name="in.npz", **arrays):
    if arrays:
        np.savez(tmp_path / name, **arrays)
    return run(
        ["forward", "--checkpoint", workdir, "--inputs", str(tmp_path / name), "--out", str(tmp_path / "o.npz")], capsys
    )


def test_forward_wrong_dtype_shape_vocabulary_and_files_are_one_sentence(trained_lm, tmp_path, capsys):
    workdir = trained_lm[0]  # the tiny LM: vocabulary 256
    ids = np.array([[5, 6, 7, 8, 9, 10]], np.int32)
    one_sentence(
        *forward(workdir, tmp_path, capsys, input_ids=ids.astype(np.float32)),
        "input_ids must hold integers; got dtype float32.",
    )
    one_sentence(
        *forward(workdir, tmp_path, capsys, input_ids=ids[0]), "input_ids must be [batch, length]; got shape (6,)."
    )
    one_sentence(
        *forward(workdir, tmp_path, capsys, input_ids=ids, attention_mask=np.ones((1, 4), np.int32)),
        "attention_mask has shape (1, 4); it must have input_ids' shape (1, 6).",
    )
    one_sentence(
        *forward(workdir, tmp_path, capsys, input_ids=np.zeros((1, 0), np.int32)), "input_ids is empty (shape (1, 0))"
    )
    one_sentence(
        *forward(workdir, tmp_path, capsys, input_ids=ids + 250),
        "input_ids must lie in [0, 256); got values from 255 to 260.",
    )
    one_sentence(
        *forward(workdir, tmp_path, capsys, input_ids=-ids),
        "input_ids must lie in [0, 256); got values from -10 to -5.",
    )
    one_sentence(
        *forward(workdir, tmp_path, capsys, input_ids=ids, pixel_values=np.full((1, 1, 3, 8, 8), np.nan, np.float32)),
        "pixel_values holds NaN or infinite values.",
    )
    one_sentence(
        *forward(workdir, tmp_path, capsys, input_ids=ids, pixel_values=np.full((1, 1, 3, 8, 8), "x")),
        "pixel_values must hold real numbers; got dtype <U1.",
    )
    one_sentence(
        *forward(workdir, tmp_path, capsys, input_ids=np.array([[5, None]], object)),
        f"the input input_ids of {tmp_path / 'in.npz'} cannot be read as a numeric array",
    )
    np.save(tmp_path / "bare.npy", ids)
    one_sentence(*forward(workdir, tmp_path, capsys, name="bare.npy"), "holds one array, not named arrays")
    (tmp_path / "zero.npz").write_bytes(b"")
    one_sentence(*forward(workdir, tmp_path, capsys, name="zero.npz"), "is not an .npz archive written by numpy.savez")
    (tmp_path / "dir.npz").mkdir()
    one_sentence(*forward(workdir, tmp_path, capsys, name="dir.npz"), "is a folder; give an .npz file")


def test_generate_wrong_dtype_shape_vocabulary_and_lines_are_one_sentence(trained_lm, tmp_path, capsys):
    workdir = trained_lm[0]
    cases = [
        (b'{"input_ids": [5, 6.5]}', "line 1: input_ids must be integers; got 6.5 (float)."),
        (b'{"input_ids": ["5", 6]}', "line 1: input_ids must be integers; got '5' (str)."),
        (
            b'{"input_ids": [[5, 6], [7, 8]]}',
            "line 1: input_ids must be a flat list of token ids (one prompt per line); got a nested list.",
        ),
        (b'{"input_ids": 5}', "line 1: input_ids must be a flat list of token ids (one prompt per line); got int."),
        (b'{"input_ids": []}', "line 1: input_ids is empty"),
        (
            b'{"input_ids": [5, 6]}\n{"input_ids": [5, 256]}',
            "line 2: input_ids must lie in [0, 256); got values from 5 to 256.",
        ),
        (b'{"input_ids": [-1, 6]}', "line 1: input_ids must lie in [0, 256); got values from -1 to 6."),
        (b'{"input_ids": [5]}\n\n{"text": "caf\xe9"}', "line 3 is not valid UTF-8 (byte 14)."),
        (b'{"input_ids": [5, 6]', "line 1 is not JSON"),
        (b"[5, 6]", "line 1 is not a JSON object"),
        (b'{"input_ids": [5], "images": ["."]}', "line 1: the image . is a folder, not an image file."),
        (b'{"input_ids": [5], "images": "a.png"}', "line 1: images must be a list of image file paths"),
        (b'{"input_ids": [5], "images": ["a.png"]}', "line 1: the system takes no images, but the prompt has 1."),
    ]
    (tmp_path / "a.png").write_bytes(VALID_IMAGES["rgb.png"]())
    for k, (content, message) in enumerate(cases):
        path = tmp_path / f"prompts{k}.jsonl"
        path.write_bytes(content)
        one_sentence(*run(["generate", "--checkpoint", workdir, "--prompts", str(path)], capsys), f"{path} {message}")
    one_sentence(
        *run(["generate", "--checkpoint", workdir, "--prompts", str(tmp_path)], capsys),
        "is a folder; give the JSONL file",
    )
