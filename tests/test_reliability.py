"""Faults a long run meets, on the tiny LM: non-finite gradients, unreadable or foreign checkpoints, storage that
cannot be written. Each ends in a skipped update that is counted, a fallback that is said, or one sentence
(docs/reliability.md)."""

import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import data_pipelines
from conftest import REPO, read_tensorboard_scalars, tiny_lm
from vlm_jax.errors import ConfigError, NonFiniteError, UserError
from vlm_jax.train import trainer as trainer_lib
from vlm_jax.train.checkpoint import Checkpointer, load_params


def poison_batches(monkeypatch, steps: set[int]):
    """Makes the training batches of `steps` (1-based) carry NaN loss weights."""
    original = data_pipelines.build

    def build(config, split, *args):
        it = original(config, split, *args)
        if split != "train":
            return it
        real_next = type(it).__next__

        class Poisoned(type(it)):
            def __next__(self):
                batch = real_next(self)
                if self.next_batch in steps:  # the batch just made is the next_batch-th
                    batch = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
                return batch

        it.__class__ = Poisoned
        return it

    monkeypatch.setattr(data_pipelines, "build", build)


def params_at(workdir: str, step: int):
    return jax.device_get(load_params(os.path.join(workdir, "checkpoints", str(step)))[2])


def same(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    # Step 3 is NaN alone; steps 5, 6, 7 are three in a row, the limit.
    poison_batches(monkeypatch, {3, 5, 6, 7})
    config = tiny_lm()
    config.log_every, config.checkpoint_every, config.keep_checkpoints = 2, 2, 4
    config.max_consecutive_nonfinite = 3
    workdir = str(tmp_path)
    with pytest.raises(NonFiniteError) as raised:
        trainer_lib.train(config, workdir)
    message = str(raised.value)
    assert "not finite in 3 steps in a row (steps 5 to 7)" in message and "stopped at step 7" in message
    assert f"step 6 in {os.path.join(workdir, 'checkpoints')}, is kept" in message and "\n" not in message
    # Steps 2, 4, 6 were saved; the newest state (step 8) was not.
    assert Checkpointer(workdir).manager.all_steps() == [2, 4, 6]
    p2, p4, p6 = (params_at(workdir, s) for s in (2, 4, 6))
    assert same(p6, p4)  # steps 5 and 6 were skipped
    assert not same(p4, p2)  # step 4 was applied (step 3 skipped)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(p6))
    scalars = read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    assert scalars["train/nonfinite_steps"] == {2: 0.0, 4: 1.0, 6: 3.0}


@pytest.fixture
def copied_run(trained_lm, tmp_path):
    """A copy of the shared 8-step tiny-LM run (checkpoints at steps 4 and 8)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_lm[0], workdir)
    return workdir


def truncate_biggest_file(step_dir: str) -> None:
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)


@pytest.mark.parametrize("damage", ["truncated file", "missing item"])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_newest_intact_step(damage, copied_run, trained_lm, capsys):
    step8 = os.path.join(copied_run, "checkpoints", "8")
    if damage == "truncated file":
        truncate_biggest_file(step8)
    else:
        shutil.rmtree(os.path.join(step8, "state"))
    result = trainer_lib.train(tiny_lm(), copied_run)
    err = capsys.readouterr().err
    moved = os.path.join(copied_run, "unreadable_checkpoints", "8")
    assert "Note: the checkpoint of step 8 cannot be read" in err and f"it was moved to {moved}" in err
    assert "Resuming from step 4" in err and os.path.isdir(moved)
    # Steps 5-8 again from step 4 give the uninterrupted run's parameters.
    assert result.step == 8 and same(params_at(copied_run, 8), params_at(trained_lm[0], 8))


def test_no_readable_checkpoint_is_one_sentence(copied_run):
    for step in (4, 8):
        truncate_biggest_file(os.path.join(copied_run, "checkpoints", str(step)))
    with pytest.raises(UserError, match="none of the 2 checkpoint\\(s\\) in .* can be read"):
        trainer_lib.train(tiny_lm(), copied_run)


def test_a_workdir_of_another_run_is_refused_before_any_compute(trained_lm, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("a prerequisite was resolved before the workdir was checked")

    monkeypatch.setattr(trainer_lib.prerequisites, "resolve", no_compute)
    from vlm_jax.config_lib import load_config

    other = load_config(os.path.join(REPO, "configs/siglip.py:variant=tiny"))
    with pytest.raises(ConfigError, match="holds a run of model 'lm', not 'dual_encoder': give a new --workdir"):
        trainer_lib.train(other, trained_lm[0])


def test_a_longer_run_keeps_its_learning_rate_schedule(copied_run, capsys):
    longer = tiny_lm()
    longer.total_steps, longer.schedule_steps = 12, 16
    with pytest.raises(ConfigError, match="follows a 8-step learning-rate schedule but the config gives schedule_st"):
        trainer_lib.train(longer, copied_run)
    longer.schedule_steps = 0
    result = trainer_lib.train(longer, copied_run)
    assert "keeps its 8-step learning-rate schedule (schedule_steps=8)" in capsys.readouterr().err
    assert result.step == 12
    # Warmup 2, then cosine decay over the 6 steps to 8 down to min_lr_ratio x lr, held from there on.
    assert (longer.optim.lr, longer.optim.min_lr_ratio) == (3e-3, 0.1)
    rates = read_tensorboard_scalars(os.path.join(copied_run, "tensorboard"))["train/learning_rate"]
    assert rates[12] == pytest.approx(3e-4, rel=1e-6)  # the mean over steps 9-12, each at 3e-3 x 0.1


def test_an_optimizer_change_on_resume_is_one_sentence(trained_lm):
    config = tiny_lm()
    config.optim.clip_norm = 0.0  # one part fewer in the optimizer chain: other optimizer-state arrays
    with pytest.raises(ConfigError, match="the checkpoint of step 8 in .* (has no|holds) opt_state/") as raised:
        trainer_lib.train(config, trained_lm[0])
    assert "another model or optimizer" in str(raised.value) and "\n" not in str(raised.value)


def test_an_unwritable_workdir_is_one_sentence_before_any_compute(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_lib.prerequisites, "resolve", lambda c: pytest.fail("compute before the check"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    as_root = os.geteuid() == 0
    try:
        if as_root:  # root writes anywhere: check as user "nobody"
            os.seteuid(65534)
        with pytest.raises(UserError, match=r"the workdir .*/locked/run cannot be written \(Permission denied\)"):
            trainer_lib.train(tiny_lm(), str(locked / "run"))
    finally:
        if as_root:
            os.seteuid(0)
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(UserError, match="cannot be written"):
        trainer_lib.train(tiny_lm(), str(blocked / "run"))


def test_a_disk_that_fills_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    original_save = Checkpointer.save

    def save_then_fill_the_disk(self, step, *args, **kwargs):
        original_save(self, step, *args, **kwargs)
        if step == 4:  # step 4 on disk, then no file may grow past 1 KiB
            self.manager.wait_until_finished()
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    monkeypatch.setattr(Checkpointer, "save", save_then_fill_the_disk)
    workdir = str(tmp_path)
    try:
        with pytest.raises(UserError) as raised:
            trainer_lib.train(tiny_lm(), workdir)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    message = str(raised.value)
    assert "writing a checkpoint to" in message and "File too large" in message
    assert "the newest complete checkpoint, step 4, is intact" in message and "\n" not in message
    assert Checkpointer(workdir).manager.all_steps() == [4]
    assert load_params(workdir)[0].total_steps == 8


def test_kill_9_during_a_run_then_resume_ends_bit_identical(trained_lm, tmp_path):
    """The tiny LM's 8 steps with a SIGKILL right after the step-4 checkpoint starts (its asynchronous write
    likely in flight), then the same command again, end with the uninterrupted run's parameters."""
    workdir = str(tmp_path / "run")
    command = [
        sys.executable, "-m", "vlm_jax.cli", "train", "--config", os.path.join(REPO, "configs/lm.py:variant=tiny"),
        "--workdir", workdir, "--config.total_steps=8", "--config.log_every=4", "--config.checkpoint_every=4",
        "--config.eval_every=0", "--config.eval_steps=1", "--config.peak_tflops=1.0", "--config.optim.warmup_steps=2",
    ]  # fmt: skip
    assert tiny_lm().total_steps == 8 and tiny_lm().optim.warmup_steps == 2  # the shared run's settings
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 300
    for line in proc.stderr:
        if "step 4/8" in line or time.time() > deadline:
            break
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Done at step 8" in done.stderr
    assert same(params_at(workdir, 8), params_at(trained_lm[0], 8))
