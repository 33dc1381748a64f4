"""The device mesh and the one table that maps the model's logical axis names onto it.

Mesh axes: ``data`` (pure data parallel: parameters replicated), ``fsdp`` (data parallel
whose parameters, gradients and optimizer state are split across the axis) and ``tensor``
(Megatron-style split of heads, MLP width and vocab). The batch is split over data x fsdp.

ZeRO-3 analogue. Every parameter with an ``embed`` axis is split over ``fsdp`` and every
Adam moment follows its parameter's sharding, so parameters, gradients and optimizer state
are each stored once per fsdp group, the same partitioning DeepSpeed calls ZeRO stage 3.
XLA inserts the all-gather of a layer's weights before it is used and reduce-scatters its
gradient afterwards; scanning the layers keeps only about one layer gathered at a time.
Per device, with N parameters in float32 (4 bytes) and Adam's two float32 moments:

    bytes ~= (4 [params] + 4 [grads] + 8 [Adam m, v]) * N / (fsdp * tensor)
             + activations(micro_batch_size / (data * fsdp), T, remat policy)

so gpt2-xl (N = 1.56e9, 16 N = 25 GB of state) needs fsdp * tensor >= 2 on a 16 GB chip
before activations, and the ``data`` axis buys throughput, never memory. A dimension that
an axis does not divide (gpt2-xl's 25 heads on tensor=2) stays replicated on that axis.

Axis types: the mesh uses ``AxisType.Auto``. Sharding here is expressed the GSPMD way,
as NamedSharding on jit inputs/outputs plus flax Linen's ``with_logical_constraint`` on
activations, and the compiler propagates everything else. ``Explicit`` axes make the
sharding part of every array's type and need an output sharding on each contraction whose
operands disagree, which the Linen model does not spell out; Auto is the mode those
mechanisms are built for, on jax 0.10 and on 0.11 (where make_mesh defaults to Explicit,
so we pass the types).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from sft_jax.config import MESH_AXES, ConfigError, MeshSection

log = logging.getLogger(__name__)

# Logical axis -> mesh axes, in priority order: a mesh axis already taken by an earlier
# rule is not used twice in one array, so activations (batch, length, embed) put batch on
# data x fsdp and leave embed whole, while parameters (vocab, embed) put embed on fsdp.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # activations: rows over every data-parallel device
    ("vocab", "tensor"),  # embedding rows and the LM head's logits
    ("heads", "tensor"),  # attention heads (q, k, v, output projection)
    ("kv_heads", "tensor"),  # grouped-query K/V heads: split when the tensor size divides them, else replicated
    ("mlp", "tensor"),  # MLP width
    ("embed", "fsdp"),  # model width of every weight matrix: the ZeRO-3 split
    ("length", None),
    ("positions", None),
    ("qkv", None),
    ("head_dim", None),
    ("norm", None),  # RMSNorm scales
    ("layers", None),  # the scanned layer axis stays whole: each step slices one layer
)

BATCH_SPEC = P(("data", "fsdp"))


def make_mesh(shape: MeshSection | Sequence[int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Mesh over ``devices`` (default: all, every host) with axes (data, fsdp, tensor)."""
    devices = list(devices if devices is not None else jax.devices())
    section = shape if isinstance(shape, MeshSection) else MeshSection(tuple(shape))
    sizes = section.sizes(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if section.num_slices > 1:
        # Multi-slice: axes split within a slice ride the fast ICI links, the dcn_shape split
        # crosses slices over the data-center network (process_is_granule lets the same
        # layout run with processes standing in for slices off TPU).
        from jax.experimental import mesh_utils

        ici = section.ici_sizes(len(devices) // section.num_slices)
        on_tpu = devices[0].platform == "tpu"
        try:
            grid = mesh_utils.create_hybrid_device_mesh(ici, section.dcn_shape, devices,
                                                        process_is_granule=not on_tpu)
        except ValueError as e:  # e.g. 2 slices asked for, 1 present
            raise ConfigError(f"mesh.dcn_shape={list(section.dcn_shape)} does not fit the devices: {e}") from None
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)


def check_batch_fits(mesh: jax.sharding.Mesh, micro_batch_size: int) -> None:
    """Each micro-batch's rows must split evenly over the data-parallel devices."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro_batch_size % dp:
        raise ConfigError(f"train.micro_batch_size={micro_batch_size} rows do not split over the "
                          f"{dp} data-parallel devices (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); "
                          f"use a multiple of {dp}")


def check_heads_split(mesh: jax.sharding.Mesh, model_cfg) -> str | None:
    """The ``tensor`` axis splits the query heads, so it must divide them (ConfigError otherwise).
    Key/value heads it cannot divide (grouped-query attention with fewer KV heads than ``tensor``)
    stay whole on it: returns the sentence the run logs once about that, else None."""
    tensor = mesh.shape["tensor"]
    heads, kv_heads = model_cfg.num_attention_heads, model_cfg.num_key_value_heads
    if heads % tensor:
        raise ConfigError(f"the model's {heads} attention heads do not split over mesh tensor={tensor}; "
                          f"use a tensor size that divides {heads}")
    if kv_heads % tensor:
        return (f"{kv_heads} key/value heads do not split over mesh tensor={tensor}: they are replicated on "
                f"the tensor axis (the {heads} query heads are split)")
    return None


def logical_shardings(mesh: jax.sharding.Mesh, boxed_abstract) -> object:
    """NamedShardings for a tree of flax-boxed (logically named) abstract arrays.

    A mesh axis that does not divide its dimension is dropped for that array (replicated
    on that axis) rather than failing, so every preset runs on every mesh."""
    specs = nn.get_partition_spec(boxed_abstract)
    shapes = nn.unbox(boxed_abstract)

    def fit(spec: P, leaf) -> NamedSharding:
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), LOGICAL_RULES) if spec else P()
        axes = []
        for dim, entry in zip(leaf.shape, tuple(mesh_spec) + (None,) * (leaf.ndim - len(mesh_spec))):
            names = (entry,) if isinstance(entry, str) else tuple(entry or ())
            size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
            if dim % size:
                log.info("dimension %d does not split over %s: replicated on it", dim, names)
                entry = None
            axes.append(entry)
        return NamedSharding(mesh, P(*axes))

    return jax.tree.map(fit, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows over data x fsdp, the length axis whole."""
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, global_rows: int) -> dict[str, jax.Array]:
    """Global device arrays from this process's numpy slice of the batch (rows [rows, T])."""
    sharding = batch_sharding(mesh)

    def put(x: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(sharding, x, (global_rows,) + x.shape[1:])

    return {k: put(np.asarray(v)) for k, v in batch.items()}


@contextlib.contextmanager
def rules_context(mesh: jax.sharding.Mesh):
    """The context under which the model's logical activation constraints resolve: the
    rules table for flax and the mesh for raw PartitionSpecs (``jax.set_mesh``)."""
    with nn.logical_axis_rules(LOGICAL_RULES), jax.set_mesh(mesh):
        yield
