"""The run report: content, escaping, embedded curve PNGs, and a real rendering in headless Chromium."""

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from vlm_jax import report

MATPLOTLIB_BLUE = (31, 119, 180)  # the first line colour of matplotlib's default cycle


def fake_workdir(path):
    """A workdir whose TensorBoard logs hold a falling train/loss, two eval points and throughput."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(path / "tensorboard"))
    for step in range(1, 11):
        writer.add_scalar("train/loss", 3.0 / step + 0.1, step)
        writer.add_scalar("train/mfu", 0.2 + 0.01 * step, step)
        writer.add_scalar("train/tokens_per_s", 1000.0 + 50 * step, step)
    writer.add_scalar("eval/vqa_accuracy", 0.25, 5)
    writer.add_scalar("eval/vqa_accuracy", 0.6, 10)
    writer.close()
    return str(path)


def fake_samples():
    rng = np.random.default_rng(0)
    image = lambda: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # noqa: E731
    encoded = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(encoded, format="PNG")
    return [
        dict(images=[image()], prompt="What colour is the square?", prediction="red", reference="red", task="vqa",
             correct=True),
        dict(images=[image(), image()], prompt="Q: how many?", prediction="<b>two</b> & more", reference="three",
             task="vqa", correct=False),
        dict(images=[encoded.getvalue()], prompt="Describe the image.", prediction="a blue circle",
             reference=["a blue circle", "one circle, blue"], task="captioning"),
    ]  # fmt: skip


def config():
    c = ConfigDict(dict(seed=0, total_steps=10, batch_size=8))
    c.model = ConfigDict(dict(name="flamingo", lm=dict(num_layers=4)))
    return c


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(workdir, path of index.html, its text) of one report."""
    workdir = fake_workdir(tmp_path_factory.mktemp("run"))
    metrics = {"eval/vqa_accuracy": 0.6, "eval/cider": 0.8125}
    throughput = {"tokens_per_s": 1500.0, "mfu": 0.3, "step_time_s": 0.25}
    path = report.write_report(workdir, config(), metrics, fake_samples(), throughput)
    return workdir, path, open(path, encoding="utf-8").read()


def test_reads_tensorboard_scalars(written):
    scalars = report.read_scalars(written[0] + "/tensorboard")
    assert scalars["eval/vqa_accuracy"] == {5: 0.25, 10: pytest.approx(0.6)}
    assert sorted(scalars["train/loss"]) == list(range(1, 11))


def test_report_contents_and_escaping(written):
    workdir, path, page = written
    assert path == workdir + "/report/index.html"
    assert "<h1>flamingo &mdash; step 10</h1>" in page
    for text in ("eval/vqa_accuracy", "0.6", "eval/cider", "0.8125", "30.00%", "1,500.0", "step_time_s"):
        assert text in page
    assert "&lt;b&gt;two&lt;/b&gt; &amp; more" in page and "<b>two</b>" not in page
    assert 'class="correct">red' in page and 'class="wrong">&lt;b&gt;' in page
    assert "a blue circle | one circle, blue" in page
    assert "&quot;num_layers&quot;: 4" in page  # the config, as escaped JSON
    assert "http://" not in page and "https://" not in page and "<script" not in page  # opens offline
    for stem in ("loss", "eval", "throughput"):
        assert Image.open(f"{workdir}/report/{stem}.png").format == "PNG"


def test_embedded_images_are_real_pngs(written):
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', written[2])
    assert len(uris) == 3 + 4  # three curve groups (no train/accuracy logged), four sample images
    curve = np.asarray(Image.open(io.BytesIO(base64.b64decode(uris[0]))).convert("RGB"))
    assert curve.shape[0] > 200 and len(np.unique(curve.reshape(-1, 3), axis=0)) > 20
    thumbnail = Image.open(io.BytesIO(base64.b64decode(uris[3])))
    assert thumbnail.size == (128, 128)  # 32 px upscaled by 4, nearest neighbour
    assert len(np.unique(np.asarray(thumbnail).reshape(-1, 3), axis=0)) > 100


def test_missing_tensorboard_logs_give_a_note(tmp_path):
    path = report.write_report(str(tmp_path), config(), {"eval/cider": 1.0}, [])
    page = open(path, encoding="utf-8").read()
    assert "No TensorBoard logs were found" in page and "No samples were given" in page


def test_renders_in_headless_chromium(written, tmp_path):
    """The honest check: Chromium renders the page from disk, and the screenshot shows curves and samples."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip(
            "no chromium or chromium-browser on PATH: apt-get install chromium (tests/setup_and_run.sh installs it as root)"
        )
    shot = tmp_path / "shot.png"
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'p'}"]
    args += ["--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    args += [f"--screenshot={shot}", "--window-size=1200,2000", "file://" + written[1]]
    subprocess.run([browser, *args], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (2000, 1200, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # text, curves and random thumbnails, not blank
    near_blue = np.abs(pixels.astype(int) - MATPLOTLIB_BLUE).sum(-1) < 30
    assert near_blue.sum() > 500  # the embedded loss curve was decoded and drawn
    rows = np.flatnonzero(near_blue.any(1))
    band = pixels[rows.min() : rows.max() + 1]
    assert band.std() > 20  # the curve area is a plot, not a uniform block
    assert (pixels[1000:] != 255).any(-1).mean() > 0.05  # content reaches the lower half of the window


def test_evaluation_tags_of_one_family_share_a_panel():
    panel = report.eval_panel
    assert panel("eval/fewshot_0shot_accuracy") == panel("eval/fewshot_4shot_accuracy") != panel("eval/cider")
    assert panel("eval/digits/fewshot_2shot_accuracy") == "eval/digits/fewshot_k-shot_accuracy"
    assert panel("eval/vqa_accuracy/colour") == panel("eval/vqa_accuracy") == "eval/vqa_accuracy"
    assert panel("eval/bleu1") == panel("eval/bleu4") == "eval/bleu"
    assert panel("eval/baseline/cider") == panel("eval/cider") != panel("eval/baseline/vqa_accuracy/size")
    assert panel("eval/baseline/vqa_accuracy/size") == "eval/vqa_accuracy"


def test_a_single_evaluation_is_drawn_as_bars_of_its_values():
    # Two tags of one panel at one step: two bars of the model colour whose lengths are in the values' ratio;
    # a baseline's bar is grey.
    from PIL import Image

    scalars = {"eval/cider": {50: 0.8}, "eval/baseline/cider": {50: 0.4}, "eval/fewshot_1shot_accuracy": {50: 0.2},
               "eval/fewshot_2shot_accuracy": {50: 0.8}}  # fmt: skip
    ((stem, _, png, tags),) = [c for c in report.plot_curves(scalars) if c[0] == "eval"]
    assert sorted(tags) == sorted(scalars)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    half = pixels.shape[1] // 2
    for region, colour, expected in (
        (pixels[:, half:], (47, 109, 181), 4.0),
        (pixels[:, :half], (154, 161, 171), None),
    ):
        rows = np.all(np.abs(region - colour) <= 2, axis=-1).sum(1)
        lengths = sorted({int(n) for n in rows if n > 20})
        assert lengths, colour
        if expected:  # the few-shot panel: bars 0.2 and 0.8
            assert lengths[-1] / lengths[0] == pytest.approx(expected, rel=0.08)
