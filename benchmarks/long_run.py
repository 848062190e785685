"""A long tiny training run: host memory, logs and checkpoints stay bounded, and the process exits cleanly.

    python benchmarks/long_run.py [--steps 3000] [--warmup 300] [--out long_run.json] [--no_tty]

Builds a small built-in VQA split (`data_pipelines/builtin`, with its tokenizer), then runs
`vlm-jax train` of the tiny Flamingo on it through the Grain pipeline with one worker process
(`data.worker_count=1`, as the main job), checkpointing every `--checkpoint_every` steps with
`keep_checkpoints=--keep`, as a subprocess whose stdout and stderr are a pseudo-terminal of 120 columns
(so the tqdm bar is drawn; on a terminal the trainer's log lines go through `tqdm.write`, which writes to
stdout; `--no_tty`: a pipe, where it prints plain log lines, no bar). Every second it samples the RSS
of the training process and of its children (the Grain worker, the resource tracker) with psutil, and
every 10 s the checkpoint and TensorBoard folders. It reports (JSON, also written to `--out`):
the median RSS over 200 steps at the end of warm-up and at the end, the least-squares slope of RSS after warm-up in MB per
1000 steps, the checkpoint step folders kept against `keep` and the folder's size over the run, the
TensorBoard event bytes per step (scalars are appended every log step: linear by nature), the bytes,
newlines and carriage returns of the output (the bar redraws in place with '\\r'; a newline is a log
line or a message), the exit status, and any resource-tracker / leaked shared-memory warning.
"""

import argparse
import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

import numpy as np
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = re.compile(rb"\[train\] step (\d+)|\| *(\d+)/\d+ \[")  # a log line, or the tqdm bar's "n/total ["


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def step_dirs(path):
    return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--checkpoint_every", type=int, default=100)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--no_tty", action="store_true")
    p.add_argument("--workdir", default="")
    p.add_argument("--out", default="long_run.json")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="long_run_")
    data, run = os.path.join(work, "data"), os.path.join(work, "run")
    shutil.rmtree(run, ignore_errors=True)  # a fresh run, not a resumed one
    if not os.path.isfile(os.path.join(data, "spm.model")):
        sys.path.insert(0, REPO)
        from data_pipelines.builtin import build

        build.build(data, sizes={"vqa": {"train": 500, "validation": 50}}, image_size=64, workers=1)
    config = f"{REPO}/configs/flamingo.py:variant=tiny,data={data}/vqa/train,tokenizer={data}/spm.model"
    overrides = dict(total_steps=args.steps, checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep,
                     log_every=args.log_every, eval_every=0, peak_tflops=1.0, **{"data.worker_count": 1})  # fmt: skip
    cmd = [sys.executable, "-m", "vlm_jax.cli", "train", "--config", config, "--workdir", run]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if args.no_tty:
        reader_fd, writer_fd = os.pipe()
    else:
        reader_fd, writer_fd = pty.openpty()  # 120 columns: tqdm draws nothing on a terminal 0 columns wide
        fcntl.ioctl(writer_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        attrs = termios.tcgetattr(writer_fd)
        attrs[1] &= ~termios.ONLCR  # keep "\n" as written (a terminal shows "\r\n"), so '\r' counts redraws only
        termios.tcsetattr(writer_fd, termios.TCSANOW, attrs)
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=writer_fd, stderr=writer_fd, cwd=REPO, env=env)  # as on a terminal
    os.close(writer_fd)
    err, steps = bytearray(), [(start, 0)]  # (time, step) whenever the output shows a step

    def read():
        while True:
            try:
                chunk = os.read(reader_fd, 65536)
            except OSError:  # EIO: every writer of the pseudo-terminal is gone
                chunk = b""
            if not chunk:
                return
            tail = bytes(err[-200:]) + chunk
            err.extend(chunk)
            found = [int(a or b) for a, b in STEP.findall(tail)]
            if found:
                steps.append((time.time(), max(found)))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples, folders = [], []  # (time, main RSS, children RSS); (time, step dirs, checkpoint bytes, TB bytes)
    main_proc = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            children = main_proc.children(recursive=True)
            rss = main_proc.memory_info().rss
            kids = sum(c.memory_info().rss for c in children if c.is_running())
            if proc.poll() is None:  # not a sample of an exited process
                samples.append((time.time(), rss / 2**20, kids / 2**20))
        except psutil.Error:
            pass
        if len(samples) % 10 == 1:
            ckpt = os.path.join(run, "checkpoints")
            tb = os.path.join(run, "tensorboard")
            folders.append(
                (time.time(), step_dirs(ckpt), folder_bytes(ckpt), folder_bytes(tb) if os.path.isdir(tb) else 0)
            )
        time.sleep(1.0)
    reader.join(timeout=30)
    wall = time.time() - start
    st, ss = np.array([t for t, _ in steps]), np.array([s for _, s in steps], float)
    done = np.maximum.accumulate(ss)
    step_at = lambda t: float(done[np.searchsorted(st, t, side="right") - 1])  # noqa: E731  (the last step shown)
    S = np.array([(step_at(t), m, c) for t, m, c in samples])
    after = S[(S[:, 0] >= args.warmup) & (S[:, 0] < args.steps)]  # training after warm-up (not the report at the end)

    def slope(y, rows=slice(None)):  # least squares, MB per 1000 steps
        return float(np.polyfit(after[rows, 0], y[rows], 1)[0] * 1000) if len(after[rows]) > 2 else None

    window = min(200, (args.steps - args.warmup) // 2)

    def at(lo, hi):  # median RSS (MB) of the samples at steps [lo, hi): single samples catch a save's transient
        rows = S[(S[:, 0] >= lo) & (S[:, 0] < hi)]
        return {
            "steps": [lo, hi],
            **{k: round(float(np.median(rows[:, i])), 1) for k, i in (("main_mb", 1), ("children_mb", 2))},
        }

    F = [(step_at(t), d, cb, tb) for t, d, cb, tb in folders]
    G = np.array([(s, tb) for s, _, _, tb in F if s > 0]).reshape(-1, 2)
    tb_fit = np.polyfit(G[:, 0], G[:, 1], 1)[0] if len(G) > 3 else None
    text = err.decode("utf-8", "replace")
    with open(os.path.join(work, "train.out"), "wb") as f:
        f.write(err)
    summary = {
        "config": config.replace(data, "DATA"),
        "overrides": overrides,
        "output_is_tty": not args.no_tty,
        "exit_status": proc.returncode,
        "wall_s": round(wall, 1),
        "last_step_seen": int(ss.max()),
        "rss": {
            "warmup_steps": args.warmup,
            "samples": len(samples),
            "at_warmup_end": at(args.warmup, args.warmup + window),
            "at_end": at(args.steps - window, args.steps),
            "after_training_mb": float(S[-1, 1]),  # the last sample (final save, run report)
            "peak_main_mb": round(float(S[:, 1].max()), 1),
            "slope_main_mb_per_1000_steps": slope(after[:, 1]),
            "slope_total_mb_per_1000_steps": slope(after[:, 1] + after[:, 2]),
            "slope_main_second_half_mb_per_1000_steps": slope(
                after[:, 1], after[:, 0] >= (args.warmup + args.steps) / 2
            ),
            "curve_step_main_children_mb": [[round(x), round(y), round(z)] for x, y, z in S[:: max(1, len(S) // 40)]],
        },
        "checkpoints": {
            "keep": args.keep,
            "final_step_dirs": step_dirs(os.path.join(run, "checkpoints")),
            "max_step_dirs_seen": max((len(d) for _, d, _, _ in F), default=0),
            "mb_at_step": {round(s): round(cb / 2**20, 2) for s, _, cb, _ in F[:: max(1, len(F) // 8)]},
            "final_mb": round(folder_bytes(os.path.join(run, "checkpoints")) / 2**20, 2),
        },
        "tensorboard": {
            "final_bytes": folder_bytes(os.path.join(run, "tensorboard")),
            "bytes_per_step": None if tb_fit is None else round(float(tb_fit), 2),
        },
        "output": {
            "bytes": len(err),
            "newlines": text.count("\n"),
            "carriage_returns": text.count("\r"),
            "bytes_per_1000_steps": round(len(err) * 1000 / max(ss.max(), 1)),
        },
        "exit_warnings": [line.strip() for line in text.splitlines() if re.search(r"resource_tracker|leaked", line)],
    }
    for key, value in summary.items():  # a table, then one JSON line
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if not k.startswith("curve")}
        print(f"{key:<15} {value}")
    print(json.dumps(summary))
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
