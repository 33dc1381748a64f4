"""launch/tpu_vm.sh against a stand-in gcloud (tests/standins/gcloud).

No TPU or gcloud exists here. The stand-in records every gcloud call and plays the slice:
`ssh --worker=all --command C` runs C with bash once per worker, each in its own home
directory, so the script's whole control flow runs for real: install quoting, the detached
start, log following and collection, exit statuses, the preempted-slice path. The venv's
python on a worker is a fake trainer (tests/standins/fake_train) that records its argv,
cwd and environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from launch_fixtures import standin_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_vm.sh"


class Slice:
    def __init__(self, root: Path, workers: int):
        self.root, self.workers = root, workers

    def run(self, *args, timeout=120, **env):
        full = {k: v for k, v in os.environ.items() if not k.startswith(("STANDIN_", "HF_", "SFT_JAX_"))}
        full.update(PATH=standin_path(self.root), STANDIN_ROOT=str(self.root), STANDIN_WORKERS=str(self.workers),
                    TPU_NAME="sft", ZONE="us-central2-b", POLL_SECONDS="0.1", LOG_DIR=str(self.root / "logs"),
                    RUN_ID="r1", TMPDIR=str(self.root))
        full.update(env)
        return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=timeout)

    def calls(self):
        path = self.root / "calls.jsonl"
        return [json.loads(line)[1:] for line in path.read_text().splitlines()] if path.exists() else []

    def verbs(self):
        return [" ".join(c[2:4]) for c in self.calls()]

    def trainers(self):
        lines = (self.root / "trainer_calls.jsonl").read_text().splitlines()
        return sorted((json.loads(line) for line in lines), key=lambda t: t["worker"])

    def uv_calls(self, worker):
        return (self.root / f"uv_calls_worker_{worker}").read_bytes().decode().split("\0")[:-1]


@pytest.fixture
def tpu(tmp_path):
    return lambda workers: Slice(tmp_path, workers)


def test_v4_32_all_from_checkout(tpu):
    """create -> install this checkout -> run on 4 workers -> logs -> delete after success."""
    s = tpu(4)
    res = s.run("all", "--config", "configs/demo.yaml", "train.steps=3", "run.name=a b; echo x",
                ACCELERATOR_TYPE="v4-32", OUTPUT_DIR="gs://bucket/runs/xl", SPOT="1", DELETE_AFTER="1",
                HF_TOKEN="hf_secret", HF_HOME="/mnt/hf cache")
    assert res.returncode == 0, res.stderr
    create = next(c for c in s.calls() if c[3] == "create")
    assert create[create.index("--accelerator-type") + 1] == "v4-32"
    assert create[create.index("--version") + 1] == "tpu-ubuntu2204-base" and "--spot" in create
    assert s.verbs()[-1] == "tpu-vm delete"

    for w, t in enumerate(s.trainers()):
        home = s.root / f"worker_{w}"
        assert t["worker"] == w and t["cwd"] == str(home / "sft_jax")
        assert t["argv"] == ["-m", "sft_jax.train", "--config", str(home / "sft_jax_config_r1.yaml"), "train.steps=3",
                             "run.name=a b; echo x", "run.output_dir=gs://bucket/runs/xl"]
        assert (home / "sft_jax_config_r1.yaml").read_text() == (ROOT / "configs" / "demo.yaml").read_text()
        assert {k: v for k, v in t["env"].items() if not k.startswith("JAX_")} == {"SFT_JAX_DISTRIBUTED": "require", "HF_TOKEN": "hf_secret", "HF_HOME": "/mnt/hf cache"}
        # the checkout arrived as git archive (tracked files only) and is installed into the venv
        assert (home / "sft_jax" / "pyproject.toml").is_file() and not (home / "sft_jax" / ".git").exists()
        assert s.uv_calls(w)[:4] == ["uv", "venv", "--python", "3.12"]
        assert s.uv_calls(w)[-3:] == ["--python", f"{home}/sft_jax_venv/bin/python", "-e", f"{home}/sft_jax[tpu]"][-3:]
        # a stale trainer's TPU lock is cleared before the start
        assert "rm -f /tmp/libtpu_lockfile" in (s.root / f"sudo_calls_worker_{w}").read_text()
        log = (s.root / "logs" / f"worker_{w}.log").read_text()
        assert log == f"worker {w}: step 1 loss 3.0\nworker {w}: done\n"
    # this terminal shows worker 0's log only
    assert "worker 0: step 1" in res.stdout and "worker 1:" not in res.stdout
    assert not list(s.root.glob("sft_jax.*")), "the temporary tarball is removed"


def test_failed_worker_fails_the_run_and_keeps_the_slice(tpu):
    s = tpu(4)
    res = s.run("all", "train.steps=3", ACCELERATOR_TYPE="v4-32", OUTPUT_DIR="gs://b/r", DELETE_AFTER="1",
                PACKAGE="sft_jax==0.1.0", STANDIN_EXIT_2="3")
    assert res.returncode == 3, res.stderr
    assert "not deleting" in res.stderr and "tpu-vm delete" not in s.verbs()
    assert sorted(p.name for p in (s.root / "logs").iterdir()) == [f"worker_{i}.log" for i in range(4)]
    # PACKAGE mode: the extra goes on the name, the version spec stays one argument
    assert s.uv_calls(0)[-1] == "sft_jax[tpu]==0.1.0"
    assert all(t["cwd"] == str(s.root / f"worker_{t['worker']}") for t in s.trainers())


def test_preempted_slice_is_recreated_v5e_queued(tpu):
    """A preempted spot slice cannot restart: `run` deletes it, recreates it, reinstalls, runs."""
    s = tpu(4)
    (s.root / "state").write_text("PREEMPTED")
    res = s.run("run", ACCELERATOR_TYPE="v5litepod-16", OUTPUT_DIR="gs://b/r", QUEUED="1", SPOT="1",
                PACKAGE="git+https://example.com/sft_jax@v1")
    assert res.returncode == 0, res.stderr
    verbs = s.verbs()
    assert verbs.index("queued-resources delete") < verbs.index("queued-resources create") < verbs.index("tpu-vm ssh")
    create = next(c for c in s.calls() if c[2:4] == ["queued-resources", "create"])
    assert create[create.index("--runtime-version") + 1] == "v2-alpha-tpuv5-lite"
    assert create[create.index("--node-id") + 1] == "sft" and "--spot" in create
    assert s.uv_calls(3)[-1] == "sft_jax[tpu] @ git+https://example.com/sft_jax@v1"
    # no train arguments: nothing but the output directory reaches the trainer (no '')
    assert all(t["argv"] == ["-m", "sft_jax.train", "run.output_dir=gs://b/r"] for t in s.trainers())


def test_runtime_version_per_generation(tmp_path):
    for accelerator, runtime in [("v5p-16", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e"),
                                 ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-8", "custom-image")]:
        s = Slice(tmp_path / accelerator, 1)
        s.root.mkdir()
        extra = {"RUNTIME_VERSION": runtime} if runtime == "custom-image" else {}  # set: it wins
        assert s.run("create", ACCELERATOR_TYPE=accelerator, **extra).returncode == 0
        create = next(c for c in s.calls() if c[3] == "create")
        assert create[create.index("--version") + 1] == runtime


def test_multi_host_needs_a_bucket(tpu):
    s = tpu(4)
    (s.root / "state").write_text("READY")
    res = s.run("run", ACCELERATOR_TYPE="v4-32", OUTPUT_DIR="/home/me/runs")
    assert res.returncode == 2 and "OUTPUT_DIR=gs://" in res.stderr
    assert "tpu-vm ssh" not in s.verbs()


def test_detached_run_status_stop_and_ssh_retry(tpu):
    """DETACH=1 returns at once; a retried start does not start a second trainer; stop saves."""
    s = tpu(2)
    env = dict(ACCELERATOR_TYPE="v4-16", OUTPUT_DIR="gs://b/r", PACKAGE="sft_jax", INTERNAL_IP="1", STANDIN_SLEEP="60")
    assert s.run("all", DETACH="1", **env).returncode == 0
    assert all("--internal-ip" in c for c in s.calls() if c[3] in ("ssh", "scp"))
    res = s.run("run", DETACH="1", **env)  # what gcloud does after a dropped connection
    assert res.returncode == 0 and res.stdout.count("already started") == 2
    status = s.run("status", **env)
    assert status.stdout.splitlines() == ["worker 0: r1 running", "worker 1: r1 running"]
    assert s.run("stop", **env).returncode == 0
    for _ in range(100):
        status = s.run("status", **env).stdout.splitlines()
        if status == ["worker 0: r1 exit 0", "worker 1: r1 exit 0"]:
            break
    assert status == ["worker 0: r1 exit 0", "worker 1: r1 exit 0"]
    assert "saved on SIGTERM" in s.run("logs", "1", **env).stdout
    assert len(s.trainers()) == 2


def test_bash32_idioms():
    """What bash 3.2 (macOS) lacks or breaks on, checked by reading the scripts."""
    for path in (ROOT / "launch").iterdir():
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        for pattern in (r"declare -A", r"\bmapfile\b", r"\breadarray\b", r"\$\{\w+(,,|\^\^)", r"\|&", r"&>>",
                        r"\bcoproc\b", r"\[-1\]", r"declare -n", r"\bwait -n\b"):
            assert not re.search(pattern, text), f"{path.name}: {pattern} is not bash 3.2"
        # "${a[@]}" of a possibly empty array aborts under set -u on bash 3.2; use ${a[@]+"${a[@]}"}
        always_set = {"common"}
        for name in re.findall(r'(?<!\+)"\$\{(\w+)\[@\]\}"', text):
            assert name in always_set, f"{path.name}: \"${{{name}[@]}}\" may be empty under set -u"
