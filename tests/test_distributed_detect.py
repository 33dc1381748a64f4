"""Which clusters sft_jax joins, and what it asks ``jax.distributed.initialize`` for.

No TPU metadata server, SLURM or MPI exists here, so each test sets the environment the
real launcher gives one worker (and, for a TPU VM, patches the metadata server), patches
``jax.distributed.initialize``, and checks the call. The reference for "right" is JAX's
own auto-detection (``ClusterEnv.auto_detect_unset_distributed_params``) run in the same
environment: sft_jax must call initialize exactly when JAX would find a cluster, and what
JAX then fills in must be the intended coordinator, process count, rank and devices.
"""

from __future__ import annotations

import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster, cluster as cluster_mod

from launch_fixtures import calls, jax_autodetect as _jax_autodetect, joined as _joined  # noqa: F401 (fixture)
from sft_jax.runtime import distributed
from sft_jax.config import load_config

def test_tpu_vm_worker(monkeypatch, calls):
    """A gcloud-created v4-32 slice: no env variables, everything comes from the metadata server."""
    metadata = {"agent-worker-number": "2", "worker-network-endpoints": "10.0.0.5,10.0.0.6,10.0.0.7,10.0.0.8",
                "tpu-env": "ACCELERATOR_TYPE: 'v4-32'\nWORKER_ID: '2'\nZONE: 'us-central2-b'\n"}
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    monkeypatch.setattr(cluster_mod, "running_in_cloud_tpu_vm", True)
    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata[key], 200))
    assert distributed.detect_cluster() == "gcetpu"
    assert distributed.initialize() is True
    assert _joined(calls) == {}  # TPU devices are never restricted
    assert _jax_autodetect() == ("10.0.0.5:8482", 4, 2, None)

    # A single-host slice (v4-8) is one process: nothing to join.
    metadata["worker-network-endpoints"], metadata["agent-worker-number"] = "10.0.0.5", "0"
    calls.clear()
    assert distributed.initialize() is False and calls == []


def _slurm_env(monkeypatch, *, nodes, tasks_per_node, procid, gpus=8, srun=True):
    node = procid // tasks_per_node
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(nodes * tasks_per_node), "SLURM_JOB_NUM_NODES": str(nodes),
           "SLURM_NODELIST": f"gpu[001-{nodes:03d}]", "SLURM_GPUS_ON_NODE": str(gpus),
           "SLURM_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})"}
    if srun:  # what srun adds for each task of the step
        env.update(SLURM_STEP_NODELIST=f"gpu[001-{nodes:03d}]", SLURM_STEP_NUM_NODES=str(nodes),
                   SLURM_STEP_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})", SLURM_PROCID=str(procid),
                   SLURM_LOCALID=str(procid % tasks_per_node), SLURM_NODEID=str(node))
    else:  # the batch step itself: one process on the first node
        env.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_slurm_one_process_per_gpu(monkeypatch, calls):
    _slurm_env(monkeypatch, nodes=2, tasks_per_node=8, procid=11)
    assert distributed.initialize() is True
    assert _joined(calls) == {}  # jax picks GPU SLURM_LOCALID itself
    port = 4242 % 4096 + 65535 - 4095
    assert _jax_autodetect() == (f"gpu001:{port}", 16, 11, [3])


def test_slurm_one_process_per_node(monkeypatch, calls):
    """srun -n NODES --ntasks-per-node=1: each process drives all of its node's GPUs."""
    _slurm_env(monkeypatch, nodes=2, tasks_per_node=1, procid=1, gpus=8)
    assert distributed.initialize() is True
    kwargs = _joined(calls)
    assert kwargs == {"local_device_ids": list(range(8))}
    coordinator, count, rank, ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, kwargs["local_device_ids"], None, 10)
    assert (coordinator.split(":")[0], count, rank, ids) == ("gpu001", 2, 1, list(range(8)))
    # JAX_LOCAL_DEVICE_IDS from the user wins (jax reads it when local_device_ids is None).
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1")
    calls.clear()
    distributed.initialize()
    assert _joined(calls) == {}


def test_slurm_batch_script_without_srun(monkeypatch, calls):
    """python run directly in an sbatch script is one process, even in a 16-task allocation."""
    _slurm_env(monkeypatch, nodes=2, tasks_per_node=8, procid=0, srun=False)
    assert distributed.detect_cluster() is None
    assert _jax_autodetect() == (None, None, None, None)  # jax agrees
    assert distributed.initialize() is False and calls == []
    monkeypatch.setenv("SFT_JAX_DISTRIBUTED", "require")
    with pytest.raises(ValueError, match="no multi-process cluster found"):
        distributed.initialize()


def _ompi_env(monkeypatch, *, size, rank, local_size, version):
    env = {"OMPI_COMM_WORLD_SIZE": str(size), "OMPI_COMM_WORLD_RANK": str(rank),
           "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % local_size), "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size)}
    if version == 4:
        env["OMPI_MCA_orte_hnp_uri"] = "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"
    else:  # Open MPI 5 (PRRTE): no ORTE URI; the PMIx server is the node-local daemon
        env.update(PRTE_LAUNCHED="1", PMIX_RANK=str(rank), PMIX_SERVER_URI41="prterun-node1-99@0.0;tcp4://10.96.0.2:41000")
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_open_mpi_4(monkeypatch, calls):
    _ompi_env(monkeypatch, size=4, rank=3, local_size=2, version=4)
    assert distributed.detect_cluster() == "ompi"
    assert distributed.initialize() is True and _joined(calls) == {}
    coordinator, count, rank, ids = _jax_autodetect()
    assert (coordinator.split(":")[0], count, rank, ids) == ("10.96.0.1", 4, 3, [1])


def test_open_mpi_5(monkeypatch, calls):
    """JAX 0.10 does not recognise Open MPI 5; sft_jax routes it through mpi4py as JAX 0.11 does."""
    _ompi_env(monkeypatch, size=2, rank=1, local_size=1, version=5)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    if clusters.OmpiCluster.is_env_present():  # jax-ml/jax#40512: this jax routes Open MPI 5 itself
        assert distributed.detect_cluster() == "ompi"
        return
    assert _jax_autodetect() == (None, None, None, None)
    assert distributed.detect_cluster() == "ompi5"
    real_find_spec = distributed.importlib.util.find_spec
    monkeypatch.setattr(distributed.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mpi4py" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="install mpi4py"):
        distributed.initialize()
    assert calls == []
    monkeypatch.setattr(distributed.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "mpi4py" else real_find_spec(name, *a))
    assert distributed.initialize() is True
    assert _joined(calls) == {"cluster_detection_method": "mpi4py", "local_device_ids": [0, 1, 2, 3]}


def test_modes(monkeypatch, calls):
    _slurm_env(monkeypatch, nodes=2, tasks_per_node=8, procid=1)
    assert distributed.initialize(load_config(None, ["distributed.mode=never"]).distributed) is False
    assert calls == []
    with pytest.raises(ValueError, match="distributed.mode='sometimes'"):
        distributed.initialize(load_config(None, ["distributed.mode=sometimes"]).distributed)
    # Explicit settings win over detection and are passed through.
    monkeypatch.setenv("SFT_JAX_COORDINATOR_ADDRESS", "10.1.1.1:1234")
    monkeypatch.setenv("SFT_JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("SFT_JAX_PROCESS_ID", "1")
    assert distributed.initialize() is True
    assert calls[0][0] == ("10.1.1.1:1234", 2, 1)


def test_expand_tasks_per_node():
    assert distributed._expand_tasks_per_node("8(x2),4,2(x1)") == [8, 8, 4, 2]
    with pytest.raises(ValueError, match="cannot parse"):
        distributed._expand_tasks_per_node("8(2)")
