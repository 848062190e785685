"""Training metrics: TensorBoard event files, a progress bar or log lines, and the FLOP/s peak for MFU."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense bfloat16 peak TFLOP/s per device, from the vendors' spec sheets.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "NVIDIA A100": 312.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
}


def measure_matmul_flops(devices: list, dtype=jnp.float32, size: int = 1024, repeats: int = 5) -> float:
    """Measured matmul FLOP/s of `devices` together.

    Method: one [size, size] x [size, size] matmul per device, all devices at
    once (a batched matmul sharded over a 1-D mesh of `devices`), timed after a
    warm-up; the best of `repeats` runs gives 2 * n_devices * size^3 / seconds.
    """
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    n = len(devices)
    a = jax.device_put(jnp.ones((n, size, size), dtype), spec)
    b = jax.device_put(jnp.ones((n, size, size), dtype), spec)
    matmul = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), out_shardings=spec)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n * size**3 / best


def peak_flops(devices: list, peak_tflops_per_device: float = 0.0, dtype=jnp.float32) -> tuple[float, str]:
    """(total peak FLOP/s of `devices`, where the number came from).

    A positive `peak_tflops_per_device` (config key `peak_tflops`) wins; then
    the spec-sheet table by device kind; otherwise (CPUs, unknown GPUs) the
    matmul peak measured on the devices themselves.
    """
    n = len(devices)
    if peak_tflops_per_device > 0:
        return peak_tflops_per_device * 1e12 * n, "config.peak_tflops"
    kind = devices[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return tflops * 1e12 * n, f"spec sheet ({kind})"
    return measure_matmul_flops(devices, dtype), f"measured matmul peak ({kind})"


# Step metrics that are running counts: a window reports their last value, not their mean.
COUNTERS = ("nonfinite_steps", "nonfinite_streak")


class ThroughputWindow:
    """Step metrics and throughput since the last log, kept on device until `summary` fetches them once."""

    def __init__(self, examples_per_step: int, flops_per_step: float, peak_flops: float):
        self.examples_per_step = examples_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.pending: list = []
        self.tokens = 0
        self.excluded_s = 0.0

    def add(self, step_metrics: dict, tokens: int) -> None:
        """Records one step's (device) metrics and its non-padding token count."""
        self.pending.append(step_metrics)
        self.tokens += tokens

    def exclude(self, seconds: float) -> None:
        """Time spent on something other than training (evaluation) in this window."""
        self.excluded_s += seconds

    def summary(self) -> dict[str, float]:
        """Window means of the step metrics (last values of the `COUNTERS`) plus examples/s, tokens/s and MFU;
        starts a new window."""
        fetched = jax.device_get(self.pending)
        seconds = time.perf_counter() - self.start - self.excluded_s
        steps_per_s = len(fetched) / seconds
        result = {
            k: float(fetched[-1][k]) if k in COUNTERS else float(np.mean([m[k] for m in fetched])) for k in fetched[0]
        }
        result.update(
            examples_per_s=steps_per_s * self.examples_per_step,
            tokens_per_s=self.tokens / seconds,
            mfu=self.flops_per_step * steps_per_s / self.peak_flops,
        )
        self.reset()
        return result


class Reporter:
    """Writes scalars to TensorBoard and shows progress: a bar on a terminal, plain lines otherwise."""

    def __init__(self, workdir: str | None, total_steps: int, start_step: int, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.total_steps = total_steps
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if workdir:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True)

    def step_done(self, step: int) -> None:
        """Advances the bar (host-side only; no device sync)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        """Logs `metrics` (Python floats) at `step`."""
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
            self.writer.flush()
        text = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.write(f"[{prefix}] step {step}: {text}", file=self.stream)
        else:
            print(f"[{prefix}] step {step}/{self.total_steps}: {text}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close_writer(self) -> None:
        """Closes the TensorBoard writer: tensorboardX writes events from a queue, and only closing waits for
        all of them to reach the file (the run report reads them right after training)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.close_writer()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)
