"""Multi-process start-up: one program on every host, joined by ``jax.distributed``.

A single process needs no setting. Several processes are joined when any of these holds:

* explicit settings, from the config's ``distributed`` section or the environment
  (``SFT_JAX_COORDINATOR_ADDRESS``, ``SFT_JAX_NUM_PROCESSES``, ``SFT_JAX_PROCESS_ID``);
* a cluster that JAX configures itself from, found the way JAX finds it (its cluster
  types' ``is_env_present()``, as Levanter does): a Cloud TPU VM slice (metadata server),
  GKE TPU, a SLURM step started by ``srun``, Open MPI 4 ``mpirun``; plus Open MPI 5
  ``mpirun``, which JAX 0.10 does not recognise and which goes through mpi4py.

``distributed.mode`` (env ``SFT_JAX_DISTRIBUTED``) is ``auto`` (join a detected cluster of
more than one process), ``require`` (launchers of multi-host jobs: finding no such cluster
is an error, not N independent runs) or ``never``.

``initialize`` must run before anything touches a jax backend.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
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
    mode: str = "auto"  # auto | require | never: join a detected cluster (env SFT_JAX_DISTRIBUTED)


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
        mode=os.environ.get(ENV_PREFIX + "DISTRIBUTED") or cfg.mode,
    )


MODES = ("auto", "require", "never")  # not "off": YAML reads it as false


def _jax_cluster_types():
    # jax keeps its cluster types private; jax.distributed.initialize() walks this same
    # list (jax/_src/clusters/cluster.py), so detection here cannot drift from jax's.
    # Kubernetes is left out: there every pod would ask the API server (or warn when the
    # kubernetes package is missing) on every run; use explicit settings on k8s.
    from jax._src import clusters
    return [c for c in clusters.ClusterEnv._cluster_types
            if not c.opt_in_only_method and c.__name__ != "K8sCluster"]


def _is_ompi5() -> bool:
    """Open MPI 5 mpirun (PRRTE): rank variables without the ORTE URI JAX's OmpiCluster needs."""
    env = os.environ
    return "OMPI_COMM_WORLD_SIZE" in env and "OMPI_MCA_orte_hnp_uri" not in env


def detect_cluster() -> Optional[str]:
    """Name of the cluster JAX would configure itself from ('gcetpu', 'gketpu', 'slurm',
    'ompi', ...; 'ompi5' for Open MPI 5), or None.

    SLURM needs a step started by ``srun`` (``SLURM_STEP_NODELIST``, ``SLURM_PROCID``,
    ``SLURM_LOCALID``): a bare ``python`` in an sbatch script is one process, not a cluster.
    """
    for cluster in _jax_cluster_types():
        if cluster.is_env_present():
            return cluster.name
    if _is_ompi5():
        return "ompi5"
    return None


def cluster_process_count(name: str) -> int:
    if name == "ompi5":
        return int(os.environ["OMPI_COMM_WORLD_SIZE"])
    cluster = next(c for c in _jax_cluster_types() if c.name == name)
    return int(cluster.get_process_count())


def _expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed per-node task counts: '8(x2),4' -> [8, 8, 4]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"cannot parse SLURM tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _tasks_on_this_node(name: str) -> Optional[int]:
    env = os.environ
    if name == "slurm":
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        if not spec:
            return None
        counts = _expand_tasks_per_node(spec)
        node = int(env.get("SLURM_NODEID", "0"))
        return counts[node] if node < len(counts) else None
    if name in ("ompi", "ompi5") and env.get("OMPI_COMM_WORLD_LOCAL_SIZE"):
        return int(env["OMPI_COMM_WORLD_LOCAL_SIZE"])
    return None


def _gpus_on_this_node() -> Optional[int]:
    env = os.environ
    if env.get("SLURM_GPUS_ON_NODE"):
        return int(env["SLURM_GPUS_ON_NODE"])
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    return None


def local_device_ids(name: str) -> Optional[list[int]]:
    """Devices this process drives, where JAX's own choice would be wrong.

    For SLURM and Open MPI, JAX gives each process the one device numbered by its local
    rank (one process per GPU). With one process on a node that would leave all but GPU 0
    idle, so that process gets every GPU of the node. None leaves the choice to JAX (and
    to ``JAX_LOCAL_DEVICE_IDS`` when set); TPU VMs are never restricted.
    """
    if name not in ("slurm", "ompi", "ompi5") or os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    if _tasks_on_this_node(name) != 1:
        return None
    gpus = _gpus_on_this_node()
    if gpus is None:
        print("sft_jax: one process on this node but its GPU count is unknown (no SLURM_GPUS_ON_NODE or "
              "CUDA_VISIBLE_DEVICES); JAX will use device 0 only; set JAX_LOCAL_DEVICE_IDS=0,1,...",
              file=sys.stderr, flush=True)
        return None
    return list(range(gpus))


def _cluster_kwargs(name: str) -> dict:
    """Arguments for jax.distributed.initialize() beyond the timeouts, for a detected cluster."""
    kwargs = {}
    if name == "ompi5":
        # What jax does from 0.11 on (jax-ml/jax#40512): mpi4py finds rank 0's host.
        if importlib.util.find_spec("mpi4py") is None:
            raise ValueError("distributed: Open MPI 5 mpirun detected (OMPI_COMM_WORLD_SIZE without "
                             "OMPI_MCA_orte_hnp_uri); install mpi4py, or set SFT_JAX_COORDINATOR_ADDRESS, "
                             "SFT_JAX_NUM_PROCESSES and SFT_JAX_PROCESS_ID")
        kwargs["cluster_detection_method"] = "mpi4py"
    ids = local_device_ids(name)
    if ids is not None:
        kwargs["local_device_ids"] = ids
    return kwargs


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
    if cfg.mode not in MODES:
        raise ValueError(f"distributed.mode={cfg.mode!r} (or {ENV_PREFIX}DISTRIBUTED) is not one of {MODES}")
    if cfg.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", cfg.num_cpu_devices)
    explicit = cfg.coordinator_address is not None or (cfg.num_processes or 1) > 1
    cluster = None
    if not explicit and cfg.mode != "never":
        cluster = detect_cluster()
        if cluster is not None and cluster_process_count(cluster) <= 1:
            cluster = None
        if cluster is None and cfg.mode == "require":
            raise ValueError("distributed.mode=require (SFT_JAX_DISTRIBUTED): no multi-process cluster found "
                             "(checked JAX's cluster types: Cloud TPU metadata, SLURM srun step, Open MPI); "
                             "set SFT_JAX_COORDINATOR_ADDRESS, SFT_JAX_NUM_PROCESSES and SFT_JAX_PROCESS_ID")
    if not explicit and cluster is None:
        return False
    if explicit:
        missing = [n for n in ("coordinator_address", "num_processes", "process_id") if getattr(cfg, n) is None]
        if missing:
            raise ValueError(f"distributed: {', '.join(missing)} not set (config distributed.* or {ENV_PREFIX}* env)")
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise ValueError(f"distributed.process_id={cfg.process_id} is outside [0, {cfg.num_processes})")
    kwargs = dict(initialization_timeout=cfg.initialization_timeout, heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    if not explicit:
        kwargs.update(_cluster_kwargs(cluster))
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    context = (f"coordinator {cfg.coordinator_address}, expecting {cfg.num_processes} processes, this is process {cfg.process_id}"
               if explicit else f"{cluster} cluster auto-detection")
    print(f"sft_jax: joining the job: {context}", file=sys.stderr, flush=True)
    joined = _watch_rendezvous(cfg.initialization_timeout + 10, context)
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


def on_every_process(flag: bool) -> bool:
    """Whether ``flag`` holds on every process: the same answer everywhere (a collective, so
    every process calls it at the same point). A decision to enter a collective, such as
    "recompute what some process cannot read", must be taken with this and not from each
    process's own view, or the processes that disagree wait for each other forever."""
    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(bool(flag)))))
