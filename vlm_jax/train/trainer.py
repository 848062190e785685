"""The training loop behind `vlm-jax train`.

Read it top to bottom: `Trainer` builds everything from a config (mesh,
system, optimizer, shardings, the jitted train step); `train` runs the loop
(restore or init, step, log, evaluate, checkpoint, stop on a signal).

The train step is one pure jitted function of (state, batch) with the state
donated. Frozen parameters (`optim.freeze`) are split off before
differentiation: they get no gradient and no optimizer state. Gradient
accumulation scans over micro-batches and normalises by the total loss weight
once, so it gives the same update as one large batch. An update whose gradients
are not finite is skipped (optax's `apply_if_finite`) and counted as
`nonfinite_steps`; `max_consecutive_nonfinite` of them in a row stop the run
(docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import signal
import sys
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

import data_pipelines
from vlm_jax import config_lib, models, prerequisites, report, sharding
from vlm_jax.errors import ConfigError, NonFiniteError
from vlm_jax.train import checkpoint as checkpoint_lib
from vlm_jax.train import optimizer as optim_lib
from vlm_jax.train.checkpoint import Checkpointer, abstract_like
from vlm_jax.train.metrics import Reporter, ThroughputWindow, peak_flops


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes: step counter, all params, optimizer state of the trainable ones."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass
class StateLayout:
    """The train state of a config on a mesh, before anything is allocated (`state_layout`)."""

    boxed: Any  # `jax.eval_shape` of the system's init: flax `LogicallyPartitioned` boxes of ShapeDtypeStructs
    tx: optax.GradientTransformation  # the optimizer of the trainable parameters
    schedule: optax.Schedule
    init_state: Any  # rng -> TrainState (params and optimizer state), the function the trainer jits
    abstract: TrainState  # its `jax.eval_shape`: ShapeDtypeStructs without shardings
    shardings: TrainState  # NamedShardings of every leaf of `abstract` on the mesh


def state_layout(config: ml_collections.ConfigDict, system: Any, mesh: Any, rules: Any) -> StateLayout:
    """Shapes and shardings of the train state of `config` (its system built as `system`) on `mesh` (a `Mesh`, or
    a `jax.sharding.AbstractMesh`: nothing here needs devices), by `jax.eval_shape`: nothing is allocated.

    Parameters are sharded by `rules`; optimizer state (of the parameters `optim.freeze` leaves trainable) as
    `_opt_state_shardings` says; the step counter is replicated. Checks the config's parameter regexes."""
    freeze = list(config.optim.get("freeze", ()))
    init_batch = system.dummy_batch(1)
    boxed = jax.eval_shape(system.init, jax.random.key(0), init_batch)
    param_names = sharding.logical_names(boxed)
    paths = [optim_lib.path_str(k) for k in traverse_util.flatten_dict(param_names)]
    config_lib.validate_patterns(config, paths)
    trainable_names, _ = optim_lib.split_trainable(param_names, freeze)
    tx, schedule = optim_lib.make_optimizer(config.optim, schedule_steps(config), trainable_names)
    # Skips (never applies) an update with a NaN or infinite gradient; the trainer stops the run after
    # `max_consecutive_nonfinite` in a row, so the optax limit is never reached.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=np.iinfo(np.int32).max)

    def init_state(rng):
        params = nn.unbox(system.init(rng, init_batch))
        trainable, _ = optim_lib.split_trainable(params, freeze)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable))

    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = sharding.tree_shardings(boxed, rules, mesh)
    abstract = jax.eval_shape(init_state, jax.random.key(0))
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=_opt_state_shardings(abstract.opt_state, abstract.params, param_shardings, replicated),
    )
    return StateLayout(boxed, tx, schedule, init_state, abstract, shardings)


def schedule_steps(config: ml_collections.ConfigDict) -> int:
    """The length of the learning-rate schedule: `schedule_steps`, or `total_steps` when that is 0 (unset)."""
    return int(config.get("schedule_steps", 0)) or int(config.total_steps)


def batch_layout(system: Any, batch_size: int, mesh: Any, rules: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(shardings, ShapeDtypeStructs with those shardings) of a global batch of `batch_size` rows of `system`:
    every key of its `dummy_batch`, split on the leading dim over the data-parallel axes of `mesh`."""
    dummy = system.dummy_batch(batch_size)
    shardings = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in dummy.items()}
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in dummy.items()}
    return shardings, abstract


class Trainer:
    """Mesh, system, optimizer, shardings and the jitted init / train / eval functions for a config."""

    def __init__(self, config: ml_collections.ConfigDict, devices: list | None = None):
        devices = list(jax.devices() if devices is None else devices)
        config_lib.validate(config, len(devices))
        self.config = config
        self.mesh = sharding.make_mesh(config.mesh, devices)
        self.rules = tuple(tuple(r) for r in config.get("logical_axis_rules", sharding.DEFAULT_RULES))
        self.system = models.build(config)
        self.freeze = list(config.optim.get("freeze", ()))
        self.accum = int(config.get("grad_accum_steps", 1))
        self._told_ignored = False  # put_batch names the ignored batch keys once

        layout = state_layout(config, self.system, self.mesh, self.rules)
        self.tx, self.schedule = layout.tx, layout.schedule
        replicated_dims = sharding.unsharded(layout.boxed, self.rules, self.mesh)
        if replicated_dims and jax.process_index() == 0:
            shown = "\n  ".join(replicated_dims[:10]) + (
                f"\n  ... {len(replicated_dims) - 10} more" if len(replicated_dims) > 10 else ""
            )
            print(
                f"Note: {len(replicated_dims)} parameter dimension(s) that the sharding rules map to mesh axes are "
                f"replicated instead:\n  {shown}",
                file=sys.stderr,
            )
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.state_shardings = layout.shardings
        param_shardings = layout.shardings.params
        self.abstract_state = abstract_like(layout.abstract, self.state_shardings)
        self.batch_shardings, self.abstract_batch = batch_layout(self.system, config.batch_size, self.mesh, self.rules)
        init_state = layout.init_state
        self.init = jax.jit(init_state, out_shardings=self.state_shardings)
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_shardings),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            self._eval_step, in_shardings=(param_shardings, self.batch_shardings), out_shardings=replicated
        )

    def put_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the data-parallel axes.

        Only the keys the system reads (its `dummy_batch`) are sent to the devices.
        A key the system does not read is an error unless the system documents
        it as ignored (`System.ignored_batch_keys`: an LM trained on image-text
        rows ignores the images), which is said once on stderr.
        """
        missing = [k for k in self.batch_shardings if k not in host_batch]
        if missing:
            raise ConfigError(
                f"the data pipeline {self.config.data.name!r} yields no {', '.join(missing)}, "
                f"which model {self.config.model.name!r} needs."
            )
        extra = sorted(set(host_batch) - set(self.batch_shardings))
        unused = [k for k in extra if k not in self.system.ignored_batch_keys]
        if unused:
            raise ConfigError(
                f"the data pipeline yields {', '.join(unused)}, which model {self.config.model.name!r} does not "
                "read; change the data config (e.g. its template) or the model."
            )
        if extra and not self._told_ignored:
            self._told_ignored = True
            reasons = "; ".join(f"{k}: {self.system.ignored_batch_keys[k]}" for k in extra)
            print(f"Note: the batches' {', '.join(extra)} are not sent to the model ({reasons}).", file=sys.stderr)
        return {k: jax.make_array_from_process_local_data(s, host_batch[k]) for k, s in self.batch_shardings.items()}

    def _loss_and_grads(self, trainable, frozen, batch):
        def loss_fn(trainable, micro):
            loss_sum, weight, extra = self.system.loss(optim_lib.merge(trainable, frozen), micro)
            return loss_sum, (weight, extra)

        value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
        if self.accum == 1:
            (loss_sum, (weight, extra)), grads = value_and_grad(trainable, batch)
            return grads, loss_sum, weight, extra

        # Micro-batch i takes rows i, i+A, i+2A, ...: each device keeps its own rows.
        def split(x):
            return x.reshape(x.shape[0] // self.accum, self.accum, *x.shape[1:]).swapaxes(0, 1)

        def body(carry, micro):
            (loss_sum, (weight, extra)), grads = value_and_grad(trainable, micro)
            return jax.tree.map(jnp.add, carry, (grads, loss_sum, weight, extra)), None

        micro = jax.tree.map(split, batch)
        (loss_s, (weight_s, extra_s)), grads_s = jax.eval_shape(
            value_and_grad, trainable, jax.tree.map(lambda x: x[0], micro)
        )
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_s, loss_s, weight_s, extra_s))
        (grads, loss_sum, weight, extra), _ = jax.lax.scan(body, zeros, micro)
        return grads, loss_sum, weight, extra

    def _train_step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        with sharding.use_rules(self.mesh, self.rules):
            trainable, frozen = optim_lib.split_trainable(state.params, self.freeze)
            grads, loss_sum, weight, extra = self._loss_and_grads(trainable, frozen, batch)
            denom = jnp.where(weight > 0, weight, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            metrics = {
                "loss": loss_sum / denom,
                **{k: v / denom for k, v in extra.items()},
                "grad_norm": optim_lib.global_norm(grads),
                # The optimizer's own count: skipped updates do not advance the schedule.
                "learning_rate": jnp.asarray(self.schedule(state.step - state.opt_state.total_notfinite), jnp.float32),
                # Counters of skipped updates (the window summary keeps their last value): in all, and in a row.
                "nonfinite_steps": opt_state.total_notfinite,
                "nonfinite_streak": opt_state.notfinite_count,
            }
            new_state = TrainState(step=state.step + 1, params=optim_lib.merge(trainable, frozen), opt_state=opt_state)
            return new_state, metrics

    def _eval_step(self, params, batch):
        with sharding.use_rules(self.mesh, self.rules):
            loss_sum, weight, extra = self.system.loss(params, batch)
            return {"loss": loss_sum, "weight": weight, **extra}


def _opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any, default: NamedSharding) -> Any:
    """Optimizer-state leaves shaped like a parameter take its sharding; the rest are replicated.

    An optimizer-state leaf belongs to the parameter whose dict path it ends
    with (optax nests per-parameter statistics like the params themselves) if
    it also has that parameter's shape (factored statistics do not).
    """
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(params).items()}
    by_path = traverse_util.flatten_dict(param_shardings)

    def leaf_sharding(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        return by_path[keys] if shapes.get(keys) == leaf.shape else default

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)


@dataclasses.dataclass
class TrainResult:
    """What a `train` call ended with."""

    step: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float]
    stopped_by_signal: int | None = None


class _StopOnSignal:
    """Turns SIGTERM / SIGINT into a stop after a step, at the same step on every process (a second SIGINT aborts).

    One process: the signal sets a flag the loop reads after each step. Several processes (JAX's distributed
    runtime): SIGTERM, a scheduler's preemption notice, belongs to JAX's preemption service, which tells every
    process; `stop_at(step)` is `multihost_utils.reached_preemption_sync_point`, true on all processes at the same
    step, so all save that step. A SIGINT is passed on to that service as a SIGTERM of this process.
    """

    def __init__(self):
        self.signum: int | None = None
        self.multi_process = jax.process_count() > 1
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.multi_process:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier, which owns SIGTERM

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT,) if self.multi_process else (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def stop_at(self, step: int) -> bool:
        """Whether to stop after `step` (called after every step, on every process)."""
        if not self.multi_process:
            return self.signum is not None
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False


class _NonFiniteWatch:
    """Stops a run after `limit` skipped (non-finite) updates in a row (0: never).

    Each step's count of skipped updates in a row is read one step late, once the next step is queued, so the
    device never waits for the host; every process reads the same replicated count and stops at the same step.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.pending: tuple[int, jax.Array] | None = None
        self.stopped_at: int | None = None

    def check(self, step: int, step_metrics: dict[str, jax.Array]) -> int | None:
        """Queues `step`'s count and reads the previous step's; the step the run must stop at, or None."""
        previous, self.pending = self.pending, (step, step_metrics["nonfinite_streak"])
        return self._read(previous)

    def flush(self) -> int | None:
        """Reads the last queued step's count (at the end of the loop)."""
        previous, self.pending = self.pending, None
        return self._read(previous)

    def _read(self, pending: tuple[int, jax.Array] | None) -> int | None:
        if pending is None or self.limit <= 0:
            return None
        step, streak = pending
        if int(jax.device_get(streak)) >= self.limit:
            self.stopped_at = step
        return self.stopped_at

    def error(self, saved_step: int | None, directory: str) -> NonFiniteError:
        first = self.stopped_at - self.limit + 1
        kept = (
            f"its last checkpoint, step {saved_step} in {directory}, is kept (a skipped update never reaches the "
            "parameters)"
            if saved_step is not None
            else "it saved no checkpoint"
        )
        return NonFiniteError(
            f"the gradients were not finite in {self.limit} steps in a row (steps {first} to {self.stopped_at}), "
            f"so the run stopped at step {self.stopped_at} and {kept}: look at the data of those steps or lower "
            "optim.lr (max_consecutive_nonfinite sets how many in a row stop a run)."
        )


def evaluate(trainer: Trainer, params: Any) -> dict[str, float]:
    """Loss and metrics over `config.eval_steps` validation batches (the same every time; fewer, said on stderr,
    where the validation data ends sooner), plus the system's own evaluators."""
    config = trainer.config
    totals: dict[str, float] = {}
    steps, batches = int(config.get("eval_steps", 4)), 0
    # closed at once: with data.worker_count > 0 each evaluation's pipeline has its own worker process
    with contextlib.closing(
        data_pipelines.build(config, "validation", jax.process_index(), jax.process_count())
    ) as data:
        for batch in itertools.islice(data, steps):
            sums = jax.device_get(trainer.eval_step(params, trainer.put_batch(batch)))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            batches += 1
    if batches == 0 and steps > 0:
        raise ConfigError(
            f"the validation data gives no batch of batch_size={config.batch_size} rows: use more validation "
            "records, a smaller batch_size, or eval_every=0 (no evaluation)."
        )
    if batches < steps:
        print(f"[eval] the validation data ended after {batches} of eval_steps={steps} batches.", file=sys.stderr)
    weight = max(totals.pop("weight", 0.0), 1e-9)
    metrics = {k: v / weight for k, v in totals.items()}
    if hasattr(trainer.system, "evaluate"):
        metrics.update(trainer.system.evaluate(trainer, params))
    return metrics


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

    The config's prerequisites (data builds, runs such as a pretrained LM) are resolved first, each built or
    trained once and cached (`vlm_jax/prerequisites.py`); the resolved config, with concrete paths, is the
    one trained and saved beside the checkpoints."""
    config_lib.validate(config, jax.device_count(), resolved=False)  # before any prerequisite is built or trained
    checkpoint_lib.check_writable(workdir)
    ckpt = Checkpointer(workdir, keep=int(config.get("keep_checkpoints", 3)))
    _check_resumable(ckpt, config, workdir)  # before any prerequisite is built or trained
    config = prerequisites.resolve(config)
    trainer = Trainer(config)
    system = trainer.system
    is_main = jax.process_index() == 0
    data = data_pipelines.build(config, "train", jax.process_index(), jax.process_count())

    restored = ckpt.restore_newest(
        trainer.abstract_state, data, lambda saved: _check_resumable_with(saved, config, workdir)
    )
    latest = restored[0] if restored else None
    if restored:
        state = restored[1]
    else:
        state = trainer.init(jax.random.key(config.seed))
        if hasattr(system, "pretrained"):  # e.g. a Flamingo's frozen LM and vision encoder from checkpoints
            # Each loaded part is read straight into its shardings on the trainer's mesh (no host copy).
            params = system.pretrained(state.params, trainer.mesh, trainer.rules)
            state = state.replace(params=jax.device_put(params, trainer.state_shardings.params))
    step = int(jax.device_get(state.step))
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))

    reporter = Reporter(workdir if is_main else None, config.total_steps, step, enabled=is_main)
    reporter.message(
        f"{'Resuming from step ' + str(step) if latest is not None else 'Starting'}: "
        f"{_count(state.params):,} parameters on mesh {dict(trainer.mesh.shape)} in {workdir}"
    )
    start = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch).compile()
    compile_s = time.perf_counter() - start
    reporter.message(f"Compiled the train step in {compile_s:.1f}s.")
    peak, peak_source = peak_flops(jax.devices(), float(config.get("peak_tflops", 0.0)))
    window = ThroughputWindow(config.batch_size, system.flops_per_example() * config.batch_size, peak)

    metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    windows: list[dict[str, float]] = []  # every logged window's throughput, for the report
    eval_s = 0.0
    loop_start = time.perf_counter()
    saved_step = latest
    watch = _NonFiniteWatch(int(config.get("max_consecutive_nonfinite", 10)))
    # the pipeline is closed (its Grain workers stopped) once the last checkpoint holding its state is on disk
    with contextlib.closing(data), _StopOnSignal() as stop:
        stopping = False
        while step < config.total_steps and not stopping:
            host_batch = next(data)
            batch = trainer.put_batch(host_batch)
            with jax.transfer_guard("disallow"):
                state, step_metrics = compiled(state, batch)
            step += 1
            window.add(step_metrics, system.tokens_in(host_batch) * jax.process_count())
            reporter.step_done(step)
            if watch.check(step, step_metrics) is not None:
                break  # the newest state is not saved: the last checkpoint is the run's result
            stopping = stop.stop_at(step)

            if config.log_every and (step % config.log_every == 0 or step == config.total_steps):
                metrics = window.summary()
                windows.append(metrics)
                reporter.write(step, metrics)
                if hasattr(data, "stats"):
                    reporter.write(step, data.stats(), prefix="data")
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                ckpt.save(step, state, data, config)
                saved_step = step
            if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
                eval_start = time.perf_counter()
                eval_metrics = evaluate(trainer, state.params)
                reporter.write(step, eval_metrics, prefix="eval")
                window.exclude(time.perf_counter() - eval_start)
                eval_s += time.perf_counter() - eval_start
        if watch.stopped_at is None and watch.flush() is None and saved_step != step:
            ckpt.save(step, state, data, config, force=True)
        ckpt.close()
        if watch.stopped_at is not None:
            reporter.close()
            raise watch.error(saved_step, ckpt.directory)
        if stopping:
            name = signal.Signals(stop.signum).name
            reporter.message(
                f"Caught {name} at step {step}: saved a checkpoint to {ckpt.directory}/{step}; "
                "run the same command to resume."
            )
    reporter.message(f"Done at step {step}; peak FLOP/s for MFU: {peak:.3e} ({peak_source}).")
    if is_main:
        names = ("examples_per_s", "tokens_per_s", "mfu") if windows else ()
        throughput = {k: float(np.mean([w[k] for w in windows])) for k in names}  # means over logged windows
        throughput.update(
            compile_s=compile_s,
            train_loop_s=time.perf_counter() - loop_start - eval_s,
            eval_s=eval_s,
            peak_tflop_s=peak / 1e12,
        )
        final = {f"train/{k}": v for k, v in metrics.items() if k in ("loss", "accuracy")}
        final.update({f"eval/{k}": v for k, v in eval_metrics.items()})
        reporter.close_writer()  # every scalar on disk before the report plots them
        path = report.write_report(workdir, config, final, getattr(system, "eval_samples", []), throughput)
        reporter.message(f"Report: {path}")
    reporter.close()
    return TrainResult(
        step=step, metrics=metrics, eval_metrics=eval_metrics, stopped_by_signal=stop.signum if stopping else None
    )


def _check_resumable(ckpt: Checkpointer, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Before any compute: the newest checkpoint in `workdir`, if any, was written by a run of this model, and
    its learning-rate schedule is kept (`_keep_schedule`). The full check, `_check_resumable_with`, runs once
    the config's prerequisites are resolved; an unreadable config is left to `Checkpointer.restore_newest`."""
    latest = ckpt.latest_step()
    if latest is None:
        return
    try:
        saved = ckpt.config(latest)
    except Exception:
        return
    _check_resumable_with(saved, config, workdir, structure=False)
    _keep_schedule(saved, config, workdir)


def _keep_schedule(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str) -> None:
    """A resumed run keeps the learning-rate schedule it was written with. Another `total_steps` only moves the
    end of the run: `schedule_steps` is set to the saved schedule's length, said on stderr (past it the rate
    stays at its final value). An explicit `schedule_steps` that changes the schedule is refused."""
    saved_steps = int(saved.get("schedule_steps", 0)) or int(saved.total_steps)
    if schedule_steps(config) == saved_steps:
        return
    if int(config.get("schedule_steps", 0)):
        raise ConfigError(
            f"the checkpoint in {workdir} follows a {saved_steps}-step learning-rate schedule but the config gives "
            f"schedule_steps={config.schedule_steps}: a schedule cannot change under a running optimizer; resume "
            f"with --config.schedule_steps={saved_steps}, or start a new --workdir."
        )
    config.schedule_steps = saved_steps
    if jax.process_index() == 0:
        print(
            f"Note: the checkpoint in {workdir} was written with total_steps={saved.total_steps} and this run goes to "
            f"{config.total_steps}; it keeps its {saved_steps}-step learning-rate schedule (schedule_steps="
            f"{saved_steps}), whose final rate holds past step {saved_steps}.",
            file=sys.stderr,
        )


def _check_resumable_with(
    saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str, structure: bool = True
) -> None:
    """A checkpoint resumes only under a config of the same model (`model.name`, said before anything else) and
    the same model and optimizer structure (`config_lib.validate_checkpoint_config`)."""
    if saved.get("model", {}).get("name") != config.model.name:
        raise ConfigError(
            f"the workdir {workdir} holds a run of model {saved.get('model', {}).get('name')!r}, not "
            f"{config.model.name!r}: give a new --workdir."
        )
    if structure:
        config_lib.validate_checkpoint_config(saved, config, workdir)


def _count(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
