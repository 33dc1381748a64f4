"""launch/slurm_gpu.sbatch under stand-in sbatch / srun / scontrol (tests/standins).

The stand-in sbatch runs the script at once with a batch script's SLURM_* environment; the
stand-in srun starts every task here with the variables srun gives it. The tasks are a
fake trainer that records its environment; each recorded task environment is then handed
to ``sft_jax.runtime.distributed.initialize`` (with ``jax.distributed.initialize`` patched), and to
JAX's own auto-detection, to check what that task would join with: coordinator, process
count, rank and devices.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from launch_fixtures import STANDINS, calls, standin_path, jax_autodetect, joined  # noqa: F401 (fixture)
from sft_jax.runtime import distributed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "slurm_gpu.sbatch"


def sbatch(tmp_path: Path, *args, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "STANDIN_"))}
    full.update(PATH=standin_path(tmp_path), STANDIN_ROOT=str(tmp_path), PYTHON=str(STANDINS / "fake_train"))
    full.update(env)
    res = subprocess.run(["sbatch", *args], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=120)
    calls_ = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    srun = next((c[1:] for c in calls_ if c[0] == "srun"), None)
    path = tmp_path / "trainer_calls.jsonl"
    tasks = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda t: t["worker"]) if path.exists() else []
    return res, srun, tasks


def _as_task(monkeypatch, task):
    for k, v in task["env"].items():
        monkeypatch.setenv(k, v)


def test_one_process_per_gpu_2x8(tmp_path, monkeypatch, calls):
    res, srun, tasks = sbatch(tmp_path, "--nodes=2", "--gpus-per-node=8", str(SCRIPT), "--config", "x.yaml", "run.name=a b")
    assert res.returncode == 0, res.stderr
    assert srun[:6] == ["-N", "2", "-n", "16", "--ntasks-per-node=8", "--cpus-per-task=12"]
    assert not any(a.startswith("--gpus-per-task") for a in srun)
    assert [t["worker"] for t in tasks] == list(range(16))
    assert all(t["argv"] == ["-m", "sft_jax.train", "--config", "x.yaml", "run.name=a b"] for t in tasks)
    for t in range(16):  # one log per task
        assert (tmp_path / f"sft_jax-4242-{t}.out").read_text().startswith(f"worker {t}: step 1")
    for task in (tasks[0], tasks[11]):
        _as_task(monkeypatch, task)
        calls.clear()
        assert distributed.initialize() is True and joined(calls) == {}
        coordinator, count, rank, ids = jax_autodetect()
        assert (coordinator.split(":")[0], count, rank, ids) == ("node001", 16, task["worker"], [task["worker"] % 8])


def test_one_process_per_node(tmp_path, monkeypatch, calls):
    res, srun, tasks = sbatch(tmp_path, "--nodes=2", "--gpus-per-node=8", str(SCRIPT), PROCS="node")
    assert res.returncode == 0, res.stderr
    assert srun[:6] == ["-N", "2", "-n", "2", "--ntasks-per-node=1", "--cpus-per-task=96"]
    _as_task(monkeypatch, tasks[1])
    assert distributed.initialize() is True
    ids = joined(calls)["local_device_ids"]
    assert ids == list(range(8))
    coordinator, count, rank, _ = jax_autodetect()
    assert (coordinator.split(":")[0], count, rank) == ("node001", 2, 1)


def test_failed_task_fails_the_job(tmp_path):
    res, _, tasks = sbatch(tmp_path, "--nodes=1", "--gpus-per-node=2", str(SCRIPT), STANDIN_EXIT_1="7")
    assert res.returncode == 7 and len(tasks) == 2


def test_time_limit_saves_and_exits_75(tmp_path):
    """--signal=B:USR1@120 reaches the script; it stops the trainers (they save) and requeues."""
    res, _, tasks = sbatch(tmp_path, "--nodes=1", "--gpus-per-node=2", str(SCRIPT), REQUEUE="1",
                           STANDIN_SLEEP="60", STANDIN_TIME_LIMIT_AFTER="2")
    assert res.returncode == 75, res.stderr
    assert "saved on SIGTERM" in (tmp_path / "sft_jax-4242-1.out").read_text()
    assert (tmp_path / "scontrol_calls").read_text().split() == ["scontrol", "requeue", "4242"]


def test_needs_gpus(tmp_path):
    res, srun, _ = sbatch(tmp_path, "--nodes=1", "--gpus-per-node=", str(SCRIPT))
    assert res.returncode == 2 and "--gpus-per-node" in res.stderr and srun is None
