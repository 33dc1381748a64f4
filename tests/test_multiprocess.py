"""The multi-host path, proven with several processes on this machine (issue 5).

Every multi-process run goes through ``launch/local.sh``, the script users run, so the
script cannot rot. The reference for losses and parameters is a one-process run on the
same number of devices (8), with the same global batch.

Tolerances: the 2-process run reduces gradients across processes with gloo, the
1-process run inside one XLA CPU client, so summation order can differ; losses agree to
1e-5 relative and parameters to 1e-5 absolute (float32, 10 steps of AdamW at lr 1e-3).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launch" / "local.sh"
STEPS = 10
HEARTBEAT = 5  # seconds; the bound on how long a survivor waits for a dead peer

# A tiny model on the built-in demo tasks, float32, one loss logged per step.
COMMON = [
    "model.preset=tiny", "model.n_positions=64", "model.dtype=float32",
    "data.max_length=64", "train.global_batch_size=8", "train.log_every=1", "train.eval_every=0",
    "train.exact_match_examples=0", "train.eval_samples=0", "train.eval_max_batches=2",
    "optim.lr=1e-3", "optim.warmup_steps=2", "checkpoint.async_save=true",
    "mesh.shape=[-1,2,1]",
]


def _free_port() -> int:
    """A port free now; another process can still take it before ours binds (see _launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a coordinator prints when its port was taken between _free_port and its bind.
_BIND_FAILED = re.compile(r"address already in use|failed to bind|could not bind|failed to add port|"
                          r"no address added", re.IGNORECASE)
PORT_ATTEMPTS = 3


def _env(cache: Path, **extra) -> dict:
    env = dict(os.environ)
    # local.sh sets the device count per process; the suite's other XLA flags (conftest) stay
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHON=sys.executable, HEARTBEAT_TIMEOUT=str(HEARTBEAT))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train_args(out: Path, cache: Path, steps: int = STEPS, *extra: str) -> list[str]:
    every = [] if any(e.startswith("checkpoint.every=") for e in extra) else ["checkpoint.every=5"]
    return [*COMMON, *every, f"train.steps={steps}", f"run.output_dir={out}", f"train.compilation_cache={cache}",
            *extra]


def _launch(out: Path, cache: Path, *, processes: int, steps: int = STEPS, extra=(), logs: Path,
            env_extra=None, args=None) -> subprocess.Popen:
    """``launch/local.sh`` on a fresh coordinator port, retried on another port when the
    coordinator could not bind (the port was taken after _free_port found it free). ``args``:
    the command's arguments as given, instead of the tiny SFT run's."""
    for attempt in range(PORT_ATTEMPTS):
        env = _env(cache, NUM_PROCESSES=processes, DEVICES_PER_PROCESS=8 // processes,
                   COORDINATOR_PORT=_free_port(), LOG_DIR=logs, **(env_extra or {}))
        args_now = list(args) if args is not None else _train_args(out, cache, steps, *extra)
        proc = subprocess.Popen(["bash", str(LOCAL_SH), *args_now], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        if attempt == PORT_ATTEMPTS - 1 or not _lost_the_port(proc, out, logs):
            return proc
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def _lost_the_port(proc: subprocess.Popen, out: Path, logs: Path, timeout: float = 600) -> bool:
    """Whether the launch ended before logging a step because its coordinator could not bind.
    Reads the per-process logs, not the pipe, so a caller still gets the whole output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    if proc.poll() is None:
        return False
    text = "".join(p.read_text(errors="replace") for p in sorted(logs.glob("process_*.log")))
    if not _BIND_FAILED.search(text):
        return False
    proc.communicate()
    return True


def _single(out: Path, cache: Path, steps: int = STEPS, extra=()) -> subprocess.CompletedProcess:
    env = _env(cache)
    env["XLA_FLAGS"] = (env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8").strip()
    return subprocess.run([sys.executable, "-m", "sft_jax.train", *_train_args(out, cache, steps, *extra)],
                          env=env, capture_output=True, text=True, timeout=600)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["last_loss"] for r in rows if r.get("split", "train") == "train"}


def _final_params(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(out / "hf" / "model.safetensors"))


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        text, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process reference and the 2-process run of the same 10 steps."""
    base = tmp_path_factory.mktemp("mp")
    cache = base / "xla_cache"
    one = _single(base / "one", cache)
    assert one.returncode == 0, one.stderr[-3000:]
    # The two processes stand in for two slices: data crosses them (DCN), fsdp stays inside
    # (ICI); the global mesh is the reference's (data=4, fsdp=2, tensor=1).
    proc = _launch(base / "two", cache, processes=2, logs=base / "two_logs", extra=("mesh.dcn_shape=[2,1,1]",))
    rc, text = _finish(proc, 600)
    assert rc == 0, text[-3000:]
    return base, cache


def test_two_processes_match_one(runs):
    base, _ = runs
    ref, two = _losses(base / "one"), _losses(base / "two")
    assert sorted(two) == list(range(1, STEPS + 1)) == sorted(ref)
    np.testing.assert_allclose([two[s] for s in sorted(two)], [ref[s] for s in sorted(ref)], rtol=1e-5)
    p_ref, p_two = _final_params(base / "one"), _final_params(base / "two")
    assert p_ref.keys() == p_two.keys()
    for k in p_ref:
        np.testing.assert_allclose(p_two[k], p_ref[k], atol=1e-5, err_msg=k)


def test_only_process_zero_writes(runs):
    base, _ = runs
    out = base / "two"
    # Two writers would duplicate lines: exactly one record per step, one TensorBoard file.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("split", "train") == "train"]
    assert steps == list(range(1, STEPS + 1))
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    assert (out / "report.md").is_file() and (out / "hf" / "config.json").is_file()
    # Process 1 printed no progress, report or export lines.
    log1 = (base / "two_logs" / "process_1.log").read_text()
    assert "report" not in log1.lower() and "export" not in log1.lower(), log1[-2000:]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.config.n_layer == 2


def test_two_process_checkpoint_resumes_in_one_process(runs):
    base, cache = runs
    out = base / "resume1"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(base / "two" / "checkpoints" / "5", out / "checkpoints" / "5")
    res = _single(out, cache)
    assert res.returncode == 0, res.stderr[-3000:]
    ref, resumed = _losses(base / "one"), _losses(out)
    assert sorted(resumed) == list(range(6, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in range(6, STEPS + 1)], [ref[s] for s in range(6, STEPS + 1)],
                               rtol=1e-5)


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        f = out / "metrics.jsonl"
        if f.is_file() and len(f.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"run did not reach {n} logged steps in {timeout}s")


def _process_pids(proc: subprocess.Popen) -> list[int]:
    """The python processes local.sh started (children of the launcher)."""
    out = subprocess.run(["pgrep", "-g", str(os.getpgid(proc.pid)), "-f", "sft_jax.train"],
                         capture_output=True, text=True).stdout.split()
    pids = [int(p) for p in out if int(p) != proc.pid]
    return [p for p in pids if "python" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]


def _pid_of_process(pids: list[int], index: int) -> int:
    """The pid among ``pids`` running JAX process ``index`` (its SFT_JAX_PROCESS_ID), not a guess
    from pid order, which wraps and follows no start order."""
    def process_id(pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return next((int(v.split(b"=", 1)[1]) for v in env if v.startswith(b"SFT_JAX_PROCESS_ID=")), None)

    (pid,) = [p for p in pids if process_id(p) == index]
    return pid


def _group_empty(pgid: int, within: float) -> bool:
    """No process of the launcher's group is alive (a log tee may take a moment to drain)."""
    deadline = time.time() + within
    while time.time() < deadline:
        alive = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
        if not alive:
            return True
        time.sleep(0.2)
    print(subprocess.run(["ps", "-o", "pid,stat,cmd", "-g", str(pgid)], capture_output=True, text=True).stdout)
    return False


def test_killed_peer_stops_the_survivor(runs, tmp_path):
    _, cache = runs
    out = tmp_path / "kill"
    proc = _launch(out, cache, processes=2, steps=100000, logs=tmp_path / "logs")
    _wait_for_steps(out, 2, proc)
    pids = _process_pids(proc)
    assert len(pids) == 2, pids
    victim = _pid_of_process(pids, 1)  # a peer, not the coordinator's process 0
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    rc, text = _finish(proc, 600)  # a survivor that never notices is killed here, at 600 s
    waited = time.monotonic() - t0
    assert rc != 0
    # It stops because of the heartbeat, long before the 600 s kill; the slack over the
    # heartbeat is generous since a loaded 2-core machine can stall the survivor for minutes.
    assert waited < HEARTBEAT + 240, waited
    assert _group_empty(proc.pid, within=10), "processes of the job were left running"


def test_sigterm_to_one_process_saves_everywhere_and_resumes(runs, tmp_path):
    _, cache = runs
    out = tmp_path / "term"
    logs = tmp_path / "logs"
    proc = _launch(out, cache, processes=2, steps=100000, logs=logs, extra=("checkpoint.every=100000",))
    _wait_for_steps(out, 3, proc)
    pids = _process_pids(proc)
    os.kill(_pid_of_process(pids, 1), signal.SIGTERM)  # one host is preempted
    rc, text = _finish(proc, 300)
    assert rc == 0, text[-3000:]
    saved = [int(line.split("saved step ")[1].split()[0])
             for i in range(2) for line in (logs / f"process_{i}.log").read_text().splitlines()
             if "saved step " in line]
    assert len(saved) == 2 and saved[0] == saved[1], saved
    step = saved[0]
    assert (out / "checkpoints" / str(step)).is_dir()
    # Rerunning the same job (to a nearby end) resumes from that step.
    proc = _launch(out, cache, processes=2, steps=step + 2, logs=tmp_path / "logs2",
                   extra=("checkpoint.every=100000",))
    rc, text = _finish(proc, 600)
    assert rc == 0, text[-3000:]
    assert max(_losses(out)) == step + 2
    assert "resum" in (tmp_path / "logs2" / "process_0.log").read_text().lower()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "launch").iterdir()))
def test_launch_scripts_lint(script):
    path = ROOT / "launch" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        assert os.environ.get("CI") != "true", "CI installs shellcheck (.ci/run); it must be present there"
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    res = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_multislice_mesh_config():
    """mesh.dcn_shape multiplies the per-slice (ICI) sizes; one slice cannot fake two."""
    import jax
    from sft_jax.core import mesh as sharding
    from sft_jax.config import ConfigError, load_config

    cfg = load_config(None, ["mesh.dcn_shape={data: 2}", "mesh.shape={fsdp: -1}"])
    assert cfg.mesh.ici_sizes(4) == (1, 4, 1) and cfg.mesh.sizes(8) == (2, 4, 1)
    assert cfg.to_dict()["mesh"]["dcn_shape"] == {"data": 2, "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="expected a positive int"):
        load_config(None, ["mesh.dcn_shape=[-1,1,1]"])
    with pytest.raises(ConfigError, match="dcn_shape"):  # this process is one slice
        sharding.make_mesh(cfg.mesh, jax.devices())


def test_remote_output_dir_layout(tmp_path):
    """gs:// output: checkpoints go to the bucket, the rest is staged locally and copied up.
    (No bucket is reachable here; the copy is exercised between two local directories.)"""
    from sft_jax.config import load_config
    from sft_jax.runtime.paths import download_outputs, run_dirs, upload_outputs

    cfg = load_config(None, ["run.output_dir=gs://bucket/runs/xl", f"run.staging_dir={tmp_path / 'stage'}"])
    local, checkpoints = run_dirs(cfg)
    assert local == tmp_path / "stage" / "bucket__runs__xl"
    assert str(checkpoints) == "gs://bucket/runs/xl/checkpoints"
    from sft_jax.runtime.paths import as_path
    assert str(as_path("gs://bucket/runs/xl") / "checkpoints" / "5") == "gs://bucket/runs/xl/checkpoints/5"
    local_cfg = load_config(None, [f"run.output_dir={tmp_path / 'run'}"])
    assert run_dirs(local_cfg) == (tmp_path / "run", tmp_path / "run" / "checkpoints")

    (local / "hf").mkdir(parents=True)
    (local / "metrics.jsonl").write_text('{"step": 1}\n')
    (local / "hf" / "config.json").write_text("{}")
    remote = tmp_path / "bucket"
    upload_outputs(local, str(remote))
    assert (remote / "metrics.jsonl").read_text() == '{"step": 1}\n' and (remote / "hf" / "config.json").is_file()
    fresh = tmp_path / "fresh_vm"
    download_outputs(str(remote), fresh)
    assert (fresh / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_remote_output_keeps_dpo_and_ppo_resume_files_in_the_local_run_directory(tmp_path):
    """With a gs:// output_dir, DPO's stored reference log-probs and PPO's current rollout go to
    the run's local directory (the staging directory, copied up at the end), as the logs do; a
    plain path would fold "gs://" into a local folder named "gs:"."""
    from sft_jax.config import load_config
    from sft_jax.core.setup import model_and_tokenizer
    from sft_jax.objectives.dpo import REFERENCE_DIR, DPOObjective
    from sft_jax.objectives.ppo import ROLLOUT_DIR, PPOObjective
    from sft_jax.runtime.paths import run_dirs

    cfg = load_config(None, ["run.output_dir=gs://bucket/runs/rl", f"run.staging_dir={tmp_path / 'stage'}",
                             "model.preset=tiny", "model.n_positions=64", "ppo.prompt_length=32",
                             "ppo.max_new_tokens=8"])
    local = run_dirs(cfg)[0]
    assert local == tmp_path / "stage" / "bucket__runs__rl"
    model_cfg, tokenizer, _ = model_and_tokenizer(cfg)
    assert DPOObjective(cfg, model_cfg, tokenizer).reference_file().parent == local / REFERENCE_DIR
    assert PPOObjective(cfg, model_cfg, tokenizer).rollout_file() == local / ROLLOUT_DIR / "process_0.npz"


def test_missing_peer_is_a_clear_non_zero_exit(tmp_path):
    """Process 0 of 2 alone: it gives up after the initialization timeout, non-zero, and
    stderr names the coordinator address and the expected process count."""
    for _ in range(PORT_ATTEMPTS):  # a fresh port when this one was taken before process 0 bound it
        port = _free_port()
        env = _env(tmp_path / "cache", SFT_JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", SFT_JAX_NUM_PROCESSES=2,
                   SFT_JAX_PROCESS_ID=0, SFT_JAX_INITIALIZATION_TIMEOUT=5, SFT_JAX_NUM_CPU_DEVICES=4)
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "sft_jax.train",
                              *_train_args(tmp_path / "run", tmp_path / "cache")],
                             env=env, capture_output=True, text=True, timeout=600)
        if not _BIND_FAILED.search(res.stderr):
            break
    assert res.returncode != 0
    # it gave up at the timeout rather than hanging: generous for a loaded machine (startup
    # is most of it), the point being that it ends at all before subprocess's 600 s
    assert time.monotonic() - t0 < 300
    assert f"coordinator 127.0.0.1:{port}, expecting 2 processes" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing written before the job formed
