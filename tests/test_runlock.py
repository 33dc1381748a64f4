"""One run per output directory: the flock (released when its holder dies, however it dies),
the gs:// lease (its logic run against a local directory through etils.epath, the path layer
gs:// goes through), and two real runs on one directory."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from etils import epath

from sft_jax import train
from sft_jax.core.step import TRACE_COUNTS
from sft_jax.runtime.runlock import LOCK_NAME, DirectoryLock, Lease, RunLockedError
from train_fixtures import REPO, losses, train_cli, write_tiny_yaml

train_cli = functools.partial(train_cli, devices=None)


def wait_for_holder(path, proc, timeout=300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        text = path.read_text() if path.exists() else ""
        if text.strip():
            return json.loads(text)
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def test_the_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    first = DirectoryLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(RunLockedError, match=rf"run directory .*run is in use .*pid {os.getpid()}, started 20"):
        DirectoryLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run").exists()  # a directory made only for the lock goes with it
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sft_jax.runtime.runlock import DirectoryLock; "
                               "DirectoryLock(sys.argv[1]).acquire(); time.sleep(600)", str(tmp_path / "run")],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for_holder(tmp_path / "run" / LOCK_NAME, holder)["pid"] == holder.pid
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            DirectoryLock(tmp_path / "run").acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs
        holder.wait()
    again = DirectoryLock(tmp_path / "run")
    again.acquire()  # no stale lock
    again.release()


def test_lease_is_renewed_respected_and_taken_over_when_expired(tmp_path):
    directory = epath.Path(tmp_path)
    # ttl 1.5 s, renewed every 0.5 s: a renewal can be a whole second late on a loaded machine
    holder = Lease(directory, ttl_s=1.5, settle_s=0.0)
    holder.acquire()
    time.sleep(2.0)  # longer than the ttl: only the renewals keep it
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        Lease(directory, ttl_s=1.5, settle_s=0.0).acquire()
    holder._stop.set()  # the holder dies: no more renewals, nobody deletes the lease
    holder._thread.join()
    time.sleep(1.7)
    newcomer = Lease(directory, ttl_s=1.5, settle_s=0.0)
    newcomer.acquire()
    assert newcomer.read()["token"] == newcomer.me["token"]
    newcomer.release()
    assert newcomer.read() is None
    # an unexpired lease is respected whatever the newcomer's clock says about the past
    Lease(directory, ttl_s=100.0, settle_s=0.0).acquire()
    with pytest.raises(RunLockedError):
        Lease(directory, ttl_s=100.0, settle_s=0.0, clock=lambda: time.time() + 99).acquire()
    Lease(directory, ttl_s=100.0, settle_s=0.0, clock=lambda: time.time() + 101).acquire()  # expired: taken


def test_lost_lease_race_refuses(tmp_path):
    """Two newcomers on a free lease: the one whose write was overwritten refuses."""
    directory = epath.Path(tmp_path)
    loser, winner = Lease(directory, ttl_s=60, settle_s=0.0), Lease(directory, ttl_s=60, settle_s=0.0)
    loser._write()
    original = loser._write
    loser._write = lambda: (original(), winner._write())  # the rival writes inside the settle window
    with pytest.raises(RunLockedError):
        loser.acquire()


def test_two_runs_on_one_directory(tmp_path, capsys):
    """The second run exits 2 at once naming the holder; metrics hold one run's records; the
    holder killed with SIGKILL, the same command resumes without any cleanup."""
    out = tmp_path / "run"
    config = write_tiny_yaml(tmp_path / "run.yaml", out, "train.steps=4", "checkpoint.every=2",
                             cache_dir=tmp_path / "xla")
    first = train_cli(["--config", config], env_extra={"SFT_JAX_FAULT": "step:2:after_save"}, background=True)
    try:
        holder = wait_for_holder(out / LOCK_NAME, first)
        first.send_signal(signal.SIGSTOP)  # hold it at any point of its run while the second one starts
        traces = dict(TRACE_COUNTS)
        code = train.main(["--config", str(config), "train.compilation_cache=null"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert f"{out} is in use" in err[0] and f"host {holder['host']}, pid {first.pid}" in err[0]
        # at once: before any step was traced or compiled (a wall-clock bound flakes on a loaded machine)
        assert TRACE_COUNTS == traces, (TRACE_COUNTS, traces)
    finally:
        first.send_signal(signal.SIGCONT)
    first.wait(timeout=600)
    assert first.returncode == -signal.SIGKILL  # killed itself right after the step-2 checkpoint
    rerun = train_cli(["--config", config])
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming from step 2" in rerun.stderr
    assert sorted(losses(out)) == [1, 2, 3, 4]  # one run's records: each step once
