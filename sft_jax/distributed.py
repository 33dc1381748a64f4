"""Multi-process start-up: one program on every host, joined by ``jax.distributed``.

A single process needs no setting. Several processes are joined when any of these holds:

* explicit settings, from the config's ``distributed`` section or the environment
  (``SFT_JAX_COORDINATOR_ADDRESS``, ``SFT_JAX_NUM_PROCESSES``, ``SFT_JAX_PROCESS_ID``);
* a Cloud TPU VM (multi-host slices are detected by JAX from the TPU metadata);
* SLURM with more than one task, or Open MPI with more than one rank (JAX reads
  their variables).

``initialize`` must run before anything touches a jax backend.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Optional

import jax

ENV_PREFIX = "SFT_JAX_"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process finds its peers; all optional for one process."""

    coordinator_address: Optional[str] = None  # "host:port" of process 0 (env SFT_JAX_COORDINATOR_ADDRESS)
    num_processes: Optional[int] = None  # total processes (env SFT_JAX_NUM_PROCESSES)
    process_id: Optional[int] = None  # this process's rank (env SFT_JAX_PROCESS_ID)
    initialization_timeout: int = 300  # seconds to wait for every peer to join
    heartbeat_timeout: int = 100  # seconds without a peer's heartbeat before the job is torn down
    cpu_collectives: str = "gloo"  # collectives for CPU devices across processes (tests, launch/local.sh)
    num_cpu_devices: Optional[int] = None  # fake CPU devices per process (env SFT_JAX_NUM_CPU_DEVICES)


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(ENV_PREFIX + name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {ENV_PREFIX + name}={value!r} is not an integer") from None


def resolve(cfg: DistributedConfig) -> DistributedConfig:
    """Fill unset fields from SFT_JAX_* environment variables (config wins; for the two
    timeouts, which always have a value, the environment wins so launch scripts can set them)."""
    return dataclasses.replace(
        cfg,
        coordinator_address=cfg.coordinator_address or os.environ.get(ENV_PREFIX + "COORDINATOR_ADDRESS") or None,
        num_processes=cfg.num_processes if cfg.num_processes is not None else _env_int("NUM_PROCESSES"),
        process_id=cfg.process_id if cfg.process_id is not None else _env_int("PROCESS_ID"),
        num_cpu_devices=cfg.num_cpu_devices if cfg.num_cpu_devices is not None else _env_int("NUM_CPU_DEVICES"),
        heartbeat_timeout=_env_int("HEARTBEAT_TIMEOUT") or cfg.heartbeat_timeout,
        initialization_timeout=_env_int("INITIALIZATION_TIMEOUT") or cfg.initialization_timeout,
    )


def detect_cluster() -> Optional[str]:
    """Name of a multi-process environment JAX can configure itself from, or None."""
    env = os.environ
    if env.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    return None


def _watch_rendezvous(timeout: float, context: str) -> threading.Event:
    """Exit non-zero with the context if joining takes longer than ``timeout``.

    jax aborts the process itself when its own timeout fires, with a message that does
    not say which coordinator it waited for; this watchdog says it first.
    """
    joined = threading.Event()

    def watch():
        if not joined.wait(timeout):
            print(f"sft_jax: peers did not join within {timeout:.0f}s ({context}); giving up", file=sys.stderr, flush=True)
            os._exit(3)

    threading.Thread(target=watch, daemon=True, name="rendezvous-watchdog").start()
    return joined


def initialize(cfg: DistributedConfig = DistributedConfig()) -> bool:
    """Join the job's other processes if there are any. Returns True when distributed."""
    cfg = resolve(cfg)
    if cfg.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", cfg.num_cpu_devices)
    explicit = cfg.coordinator_address is not None or (cfg.num_processes or 1) > 1
    cluster = None if explicit else detect_cluster()
    if not explicit and cluster is None:
        return False
    if explicit:
        missing = [n for n in ("coordinator_address", "num_processes", "process_id") if getattr(cfg, n) is None]
        if missing:
            raise ValueError(f"distributed: {', '.join(missing)} not set (config distributed.* or {ENV_PREFIX}* env)")
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise ValueError(f"distributed.process_id={cfg.process_id} is outside [0, {cfg.num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    context = (f"coordinator {cfg.coordinator_address}, expecting {cfg.num_processes} processes, this is process {cfg.process_id}"
               if explicit else f"{cluster} cluster auto-detection")
    print(f"sft_jax: joining the job: {context}", file=sys.stderr, flush=True)
    joined = _watch_rendezvous(cfg.initialization_timeout + 10, context)
    kwargs = dict(initialization_timeout=cfg.initialization_timeout, heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    if explicit:
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)
    joined.set()
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


def preemption_requested(step: int, local_flag: bool) -> bool:
    """True when this step is where every process should save and stop.

    With several processes JAX propagates a SIGTERM on any host to all of them and picks
    one common step; a single process uses its own SIGTERM flag.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.reached_preemption_sync_point(step)
    return local_flag
