"""Shared by the launcher and cluster-detection tests: a clean cluster environment with a
recording ``jax.distributed.initialize``, JAX's own auto-detection as the reference, and the
stand-in executables (tests/standins: gcloud, uv, sudo, sbatch, srun, scontrol)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import pytest
from jax._src import clusters

STANDINS = Path(__file__).resolve().parent / "standins"


def standin_path(tmp: Path) -> str:
    """PATH with the stand-ins first, and `python3` (their interpreter) this very Python
    (not a version-manager shim, whose start-up would dominate these tests' time)."""
    bin_dir = tmp / "_bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python3").exists():
        (bin_dir / "python3").symlink_to(sys.executable)
    return f"{bin_dir}:{STANDINS}:{os.environ['PATH']}"

ENV_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "PRTE_", "TPU_", "MEGASCALE_", "SFT_JAX_")
ENV_NAMES = ("KUBERNETES_SERVICE_HOST", "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES", "JAX_COORDINATOR_PORT")


@pytest.fixture
def calls(monkeypatch):
    """A clean cluster environment and a recording jax.distributed.initialize."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES) or name in ENV_NAMES:
            monkeypatch.delenv(name)
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: recorded.append((a, kw)))
    # The CPU backend is already up in this process; the collectives flag is irrelevant here.
    real_update = jax.config.update
    monkeypatch.setattr(jax.config, "update", lambda name, value: None if "collectives" in name else real_update(name, value))
    return recorded


def jax_autodetect():
    """What jax.distributed.initialize() would fill in by itself here."""
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 10)


def joined(calls):
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args == ()  # no coordinator / count / rank: jax detects them
    assert kwargs.pop("initialization_timeout") == 300 and kwargs.pop("heartbeat_timeout_seconds") == 100
    return kwargs
