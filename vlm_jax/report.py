"""The run report: one self-contained HTML page (`WORKDIR/report/index.html`) that opens from disk.

`write_report` gathers what a researcher looks at after a run: the metrics table, loss and metric
curves (matplotlib PNGs drawn from the TensorBoard event files in `WORKDIR/tensorboard`), a grid of
samples with the model's predictions beside the references, throughput / MFU and the config. Every
image is embedded as a base64 data URI and the CSS is inline, so the page needs no network and no
other file; the curve PNGs are also written beside it for use elsewhere.
"""

import base64
import html
import io
import json
import os
import re
import struct

import numpy as np

THUMBNAIL_PX = 128  # small images are upscaled (nearest neighbour, integer factor) to at least this size

# (file stem, title, tag predicate, panel of a tag). Tags are "prefix/name"; tags with the same panel share axes.
CURVE_GROUPS = (
    ("loss", "Loss", lambda tag: tag.endswith("/loss"), lambda tag: "loss"),
    ("accuracy", "Training accuracy", lambda tag: tag == "train/accuracy", lambda tag: "accuracy"),
    ("eval", "Evaluation metrics", lambda tag: tag.startswith("eval/") and tag != "eval/loss" and "/gates/" not in tag,
     lambda tag: eval_panel(tag)),
    ("throughput", "Throughput", lambda tag: tag.rsplit("/", 1)[-1] in ("tokens_per_s", "mfu", "step_time_s"),
     lambda tag: tag),
)  # fmt: skip


def eval_panel(tag: str) -> str:
    """Evaluation tags of one family share a panel: every k of `.../fewshot_{k}shot_accuracy`, every question type
    of `eval/vqa_accuracy/{type}` (with the overall accuracy), every n of BLEU-n; a model-free baseline
    (`eval/baseline/NAME`) shares the panel of `eval/NAME`."""
    tag = tag.replace("eval/baseline/", "eval/")
    tag = re.sub(r"_\d+shot_", "_k-shot_", tag)
    tag = re.sub(r"bleu\d$", "bleu", tag)
    return "eval/vqa_accuracy" if tag.startswith("eval/vqa_accuracy") else tag


CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px; color: #1d2330; background: #fff; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #d8dce3; padding-bottom: 4px; }
.subtitle { color: #5a6270; margin-top: 0; }
table.kv { border-collapse: collapse; } table.kv td, table.kv th { padding: 4px 12px; border-bottom: 1px solid #e4e7ec; }
table.kv th { text-align: left; background: #f3f5f8; } table.kv td.num { text-align: right; font-family: monospace; }
.curves { display: flex; flex-wrap: wrap; gap: 8px; } .curves img { max-width: 100%; border: 1px solid #e4e7ec; }
.samples { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
.sample { display: flex; gap: 12px; border: 1px solid #d8dce3; border-radius: 6px; padding: 10px; background: #fafbfc; }
.sample .images { display: flex; flex-wrap: wrap; gap: 4px; flex: 0 0 auto; max-width: 270px; }
.sample .images img { image-rendering: pixelated; border: 1px solid #c9ced6; }
.sample .text { font-size: 14px; overflow-wrap: anywhere; }
.sample .task { font-size: 12px; color: #5a6270; text-transform: uppercase; letter-spacing: 0.05em; }
.correct { color: #137a2f; font-weight: 600; } .wrong { color: #b3261e; font-weight: 600; }
.label { color: #5a6270; }
.note { color: #8a5a00; background: #fff6e0; padding: 8px 12px; border-radius: 4px; }
pre { background: #f3f5f8; padding: 12px; overflow-x: auto; font-size: 12px; }
"""


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every TensorBoard event file under `logdir` (missing folder -> {}).

    Event files are TFRecord-framed (8-byte little-endian length, 4-byte CRC, an `Event` proto,
    4-byte CRC); they are parsed with tensorboardX's `event_pb2`, so TensorFlow is not needed. A
    truncated last record (a run still writing) is ignored.
    """
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    if not os.path.isdir(logdir):
        return scalars
    for root, _, files in os.walk(logdir):
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            i = 0
            while i + 12 <= len(data):
                (n,) = struct.unpack("<Q", data[i : i + 8])
                if i + 12 + n + 4 > len(data):
                    break
                event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
                i += 12 + n + 4
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plot_curves(scalars: dict[str, dict[int, float]]) -> list[tuple[str, str, bytes, list[str]]]:
    """(file stem, title, PNG bytes, plotted tags) for each group of `CURVE_GROUPS` with a tag in `scalars`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out = []
    for stem, title, wanted, panel_of in CURVE_GROUPS:
        tags = sorted(tag for tag in scalars if wanted(tag))
        if not tags:
            continue
        panels = list({panel_of(tag): [t for t in tags if panel_of(t) == panel_of(tag)] for tag in tags}.values())
        cols = min(3, len(panels))
        rows = -(-len(panels) // cols)
        figure, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.4 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            steps_seen = {step for tag in panel for step in scalars[tag]}
            if len(steps_seen) == 1 and len(panel) > 1:  # one evaluation: bars read better than lone points
                _bars(ax, panel, scalars, steps_seen.pop())
            else:
                for tag in panel:
                    steps = sorted(scalars[tag])
                    values = [scalars[tag][s] for s in steps]
                    ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=tag)
                ax.set_xlabel("step")
                if len(panel) > 1:
                    ax.legend(fontsize=8)
            ax.set_title(panel_of(panel[0]), fontsize=10)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        figure.suptitle(title)
        figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3.4 * rows)))  # keep the title clear of the first row
        out.append((stem, title, _png_bytes(figure), tags))
        plt.close(figure)
    return out


def _bars(ax, tags: list[str], scalars: dict[str, dict[int, float]], step: int) -> None:
    """One horizontal bar per tag (its value at `step`); model-free baselines grey, beside their metric."""
    order = sorted(tags, key=lambda t: (t.replace("eval/baseline/", "eval/"), "/baseline/" in t))
    values = [scalars[t][step] for t in order]
    colours = ["#9aa1ab" if "/baseline/" in t else "#2f6db5" for t in order]
    ax.barh(range(len(order)), values, color=colours)
    ax.set_yticks(range(len(order)), [t.removeprefix("eval/") for t in order], fontsize=7)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    baseline = " (grey: model-free baseline)" if any("/baseline/" in t for t in order) else ""
    ax.set_xlabel(f"value at step {step}{baseline}")


def thumbnail_png(image) -> bytes:
    """PNG bytes of a uint8 image array (HxW or HxWxC) or encoded image bytes, upscaled by an integer factor
    (nearest neighbour) so that its longer side is at least `THUMBNAIL_PX`."""
    from PIL import Image

    picture = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else Image.fromarray(np.asarray(image))
    scale = max(1, -(-THUMBNAIL_PX // max(picture.size)))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _format_value(name: str, value: float) -> str:
    if name.endswith("mfu"):
        return f"{100 * value:.2f}%"
    return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"


def _table(values: dict[str, float]) -> str:
    rows = "".join(
        f'<tr><td>{html.escape(k)}</td><td class="num">{html.escape(_format_value(k, float(v)))}</td></tr>'
        for k, v in values.items()
    )
    return f'<table class="kv"><tr><th>name</th><th>value</th></tr>{rows}</table>'


def _sample_html(sample: dict) -> str:
    images = "".join(
        f'<img src="{_data_uri(thumbnail_png(image))}" alt="sample image">' for image in sample.get("images", ())
    )
    references = sample.get("reference", "")
    if isinstance(references, str):
        references = [references]
    correct = sample.get("correct")
    css = "" if correct is None else (' class="correct"' if correct else ' class="wrong"')
    mark = "" if correct is None else (" &#10003;" if correct else " &#10007;")
    task = f'<div class="task">{html.escape(str(sample["task"]))}</div>' if sample.get("task") else ""
    return (
        f'<div class="sample"><div class="images">{images}</div><div class="text">{task}'
        f'<div><span class="label">prompt:</span> {html.escape(sample.get("prompt", ""))}</div>'
        f'<div><span class="label">prediction:</span> <span{css}>{html.escape(sample.get("prediction", ""))}{mark}'
        f"</span></div>"
        f'<div><span class="label">reference:</span> {" | ".join(html.escape(r) for r in references)}</div>'
        f"</div></div>"
    )


def _config_text(config) -> str:
    if hasattr(config, "to_json_best_effort"):
        return config.to_json_best_effort(indent=2)
    return json.dumps(config, indent=2, default=str)


def write_report(
    workdir: str,
    config,
    metrics: dict[str, float],
    samples: list[dict],
    throughput: dict[str, float] | None = None,
) -> str:
    """Writes `workdir/report/index.html` (plus the curve PNGs beside it) and returns the page's path.

    Args:
      workdir: the run's folder; curves are read from `workdir/tensorboard` (absent -> a note instead).
      config: the run's ml_collections ConfigDict (or a JSON-able dict); `config.model.name` names the system.
      metrics: final metrics for the table, e.g. {"eval/vqa_accuracy": 0.71, "eval/cider": 0.9}.
      samples: dicts with "images" (uint8 HxWx3 arrays or encoded image bytes), "prompt", "prediction",
        "reference" (a string or a list of strings), and optionally "task" and "correct" (bool: colours the
        prediction green / red).
      throughput: e.g. {"tokens_per_s": ..., "mfu": ..., "step_time_s": ...}; MFU is shown as a percentage.
    """
    out_dir = os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    scalars = read_scalars(os.path.join(workdir, "tensorboard"))
    last_step = max((step for values in scalars.values() for step in values), default=None)
    step = last_step if last_step is not None else config.get("total_steps", "?")
    model = config.get("model")
    system = model.get("name", "model") if model is not None else "model"

    if scalars:
        curves = plot_curves(scalars)
        for stem, _, png, _ in curves:
            with open(os.path.join(out_dir, f"{stem}.png"), "wb") as f:
                f.write(png)
        curves_html = "".join(
            f'<img src="{_data_uri(png)}" alt="{html.escape(title)}" title="{stem}.png" '
            f'data-tags="{html.escape(" ".join(tags))}">'
            for stem, title, png, tags in curves
        )
        if not curves:
            curves_html = '<p class="note">The TensorBoard logs hold none of the plotted tags.</p>'
    else:
        curves_html = (
            f'<p class="note">No TensorBoard logs were found in {html.escape(os.path.join(workdir, "tensorboard"))}; '
            "no curves to show.</p>"
        )

    sections = [
        f"<h1>{html.escape(str(system))} &mdash; step {html.escape(str(step))}</h1>",
        f'<p class="subtitle">Run report for {html.escape(os.path.abspath(workdir))}</p>',
        "<h2>Metrics</h2>",
        _table(metrics) if metrics else '<p class="note">No metrics were given.</p>',
        f'<h2>Curves</h2><div class="curves">{curves_html}</div>',
        "<h2>Samples</h2>",
        f'<div class="samples">{"".join(_sample_html(s) for s in samples)}</div>'
        if samples
        else '<p class="note">No samples were given.</p>',
    ]
    if throughput:
        sections += ["<h2>Throughput</h2>", _table(throughput)]
    sections += ["<h2>Config</h2>", f"<pre>{html.escape(_config_text(config))}</pre>"]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(str(system))} step {html.escape(str(step))} &mdash; vlm_jax report</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path
