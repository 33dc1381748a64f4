"""Attention for every family: the block-diagonal causal mask and one dispatch over the kernels.

``dot_product_attention`` takes q (B,T,H,K) and k/v (B,S,H,K) and runs one of
``ATTENTION_IMPLS``: ``xla`` (the masked reference), ``cudnn_bias`` (cuDNN with the mask as a
bias), or a flash kernel that reads the segment ids itself (``cudnn_packed``, ``pallas``,
``splash``). ``auto`` picks by the fixed rule of ``resolve_attention``. Packed rows hold several
documents: a query sees keys of its own segment only, and segment 0 is padding.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

Array = jax.Array

# xla: the masked reference. cudnn_bias: cuDNN with the (B,1,T,S) mask as a bias (fused, not
# flash for packed rows). cudnn_packed / pallas / splash: flash kernels that take the segment
# structure itself. auto: the documented rule in ``resolve_attention``. cudnn: the old name of
# cudnn_bias, kept for existing configs; unlike the other named paths it falls back to xla.
ATTENTION_IMPLS = ("auto", "xla", "cudnn_bias", "cudnn_packed", "pallas", "splash", "cudnn")


def attention_mask(q_segment_ids: Array, kv_segment_ids: Array, q_offset: Array | int = 0) -> Array:
    """Block-diagonal causal mask, (B, 1, T, S): a query sees keys of its own segment at or
    before it. Segment 0 marks padding; real tokens (segment >= 1) never see it."""
    T, S = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    q_index = jnp.arange(T)[:, None] + q_offset  # (T, 1) absolute slot of each query
    causal = jnp.arange(S)[None, :] <= q_index  # (T, S)
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # (B, T, S)
    return (same_segment & causal[None])[:, None]


def _fused_attention_available(dtype) -> bool:
    """cuDNN's fused attention: a CUDA GPU of compute capability >= 8.0 and a 16-bit dtype."""
    if jax.default_backend() != "gpu" or dtype not in (jnp.bfloat16, jnp.float16):
        return False
    capability = getattr(jax.devices()[0], "compute_capability", None)  # "9.0" on an H100; absent on ROCm
    try:
        return capability is not None and tuple(int(c) for c in str(capability).split(".")) >= (8, 0)
    except ValueError:
        return False


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    logging.getLogger(__name__).warning("attention=cudnn unavailable here (%s); using the XLA reference", reason)


# --- fused attention for packed rows -------------------------------------------

def _cudnn_module():
    """jax's private cuDNN attention module (its packed-sequence entry is not public).
    tests/test_attention_fused.py pins the signature used here, so a jax upgrade that
    changes it fails in CI instead of here."""
    from jax._src.cudnn import fused_attention_stablehlo
    return fused_attention_stablehlo


def cudnn_packed_unavailable() -> str | None:
    """Why cuDNN's packed-sequence attention cannot run on this machine, or None if it can.
    The checks are jax's own: cuDNN present, a CUDA device of compute capability >= 9.0
    (jax rejects the packed layout below Hopper)."""
    if jax.default_backend() != "gpu":
        return f"backend is {jax.default_backend()}, not gpu"
    try:
        fa = _cudnn_module()
        version = fa.check_cudnn_version()
        if not fa.check_compute_capability("9.0"):
            return "the packed layout needs a CUDA GPU of compute capability >= 9.0"
    except (ImportError, AttributeError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return None if version else "cuDNN version unknown"


def _pallas_gpu_unavailable() -> str | None:
    if jax.default_backend() != "gpu":
        return f"backend is {jax.default_backend()}, not gpu"
    try:
        from jax.experimental.pallas.ops.gpu import attention  # noqa: F401
    except ImportError as e:
        return f"ImportError: {e}"
    return None


@functools.lru_cache(maxsize=None)
def resolve_attention(impl: str, dtype_name: str, backend: str) -> tuple[str, str]:
    """The path ``impl`` runs as, and why. ``auto`` is a fixed rule (nothing here was measured):
    GPU with bfloat16/float16 -> cudnn_packed when jax's cuDNN checks pass, else pallas;
    TPU -> splash; anything else (CPU, float32 on GPU) -> xla. Never interpret mode."""
    if impl != "auto":
        return impl, "requested"
    if backend == "gpu" and dtype_name in ("bfloat16", "float16"):
        why_not = cudnn_packed_unavailable()
        if why_not is None:
            return "cudnn_packed", f"GPU, {dtype_name}, cuDNN packed-sequence checks pass"
        return "pallas", f"GPU, {dtype_name}, cuDNN packed unavailable ({why_not})"
    if backend == "tpu":
        return "splash", "TPU"
    return "xla", f"backend {backend}, dtype {dtype_name}: no fused path applies"


@functools.lru_cache(maxsize=None)
def _log_choice(impl: str, path: str, why: str) -> None:
    logging.getLogger(__name__).info("attention=%s runs %s (%s)", impl, path, why)


def packed_segments(segment_ids: Array, max_segments: int) -> tuple[Array, Array, Array]:
    """cuDNN's packed-sequence description of rows, derived on device from segment ids.

    A segment is a contiguous run of one nonzero id (the packer's layout); 0 is padding.
    Returns lengths (B, M) and start offsets (B, M+1), both padded with -1 as jax's cuDNN
    entry expects, and the number of runs per row (B,), which may exceed M.
    """
    B, T = segment_ids.shape
    real = segment_ids > 0
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    start = real & (segment_ids != prev)  # (B,T) first token of each run
    run = jnp.cumsum(start, axis=1) - 1  # (B,T) run index of each token
    n_runs = start.sum(axis=1)  # (B,)
    j = jnp.arange(max_segments)
    member = (run[:, :, None] == j) & real[:, :, None]  # (B,T,M)
    valid = j[None, :] < n_runs[:, None]  # (B,M)
    lengths = jnp.where(valid, member.sum(axis=1), -1).astype(jnp.int32)
    offsets = jnp.where(valid, jnp.argmax(member, axis=1), -1).astype(jnp.int32)
    offsets = jnp.pad(offsets, ((0, 0), (0, 1)), constant_values=-1)  # (B, M+1)
    return lengths, offsets, n_runs


def _cudnn_packed(q, k, v, segment_ids, max_segments: int):
    fa = _cudnn_module()
    T = q.shape[1]
    M = max_segments or max(1, T // 16)
    lengths, offsets, n_runs = packed_segments(segment_ids, M)
    # cuDNN leaves positions outside every segment (padding) unwritten, in the output and in
    # dq/dk/dv: select them away on the way in, so their gradients are exact zeros.
    real = (segment_ids > 0)[:, :, None, None]
    q, k, v = (jnp.where(real, x, jnp.zeros((), x.dtype)) for x in (q, k, v))
    out = fa.dot_product_attention(
        q, k, v, None, None, lengths, lengths, offsets, offsets,
        scale=1.0 / math.sqrt(q.shape[-1]), mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    # More segments in a row than M would be silently wrong: make it loud (NaN loss) instead.
    return jnp.where((n_runs > M)[:, None, None, None], jnp.nan, out)


def _pallas_mha(q, k, v, segment_ids, interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention
    T = q.shape[1]
    block = pallas_attention.BlockSizes(**{f.name: min(128, T) for f in dataclasses.fields(pallas_attention.BlockSizes)})
    return pallas_attention.mha(q, k, v, segment_ids, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=True,
                                block_sizes=block, interpret=interpret)


def splash_block_sizes(T: int):
    """Splash tiles for T <= 1024: one 512-wide tile (or the whole row when shorter),
    fused backward kernel."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    b = min(512, T)
    return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                             block_kv_dkv_compute=b, use_fused_bwd_kernel=True)


def _splash(q, k, v, segment_ids, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    B, T, H, K = q.shape
    mask = splash.MultiHeadMask([splash.CausalMask((T, T)) for _ in range(H)])
    kernel = splash.make_splash_mha(mask, block_sizes=splash_block_sizes(T), head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    to_hk = lambda x: x.transpose(0, 2, 1, 3)  # (B,T,H,K) -> (B,H,T,K), splash's per-example (H,T,K)
    qs = to_hk(q) * jnp.asarray(1.0 / math.sqrt(K), q.dtype)  # splash does not scale
    out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1)))(
        qs, to_hk(k), to_hk(v), segment_ids)
    return to_hk(out)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, impl: str,
                          segment_ids: Array | None = None, *, max_segments: int = 0,
                          interpret: bool = False) -> Array:
    """q (B,T,H,K), k/v (B,S,H,K), mask (B,1,T,S) -> (B,T,H,K).

    ``xla`` is the reference. ``cudnn_bias`` gives cuDNN the mask as a bias (correct for
    packed rows, but not flash). ``cudnn_packed``, ``pallas`` and ``splash`` take the
    self-attention ``segment_ids`` (B,T) directly (causal within each segment); their
    outputs at padding positions (segment 0) are zero. ``auto`` resolves by
    ``resolve_attention`` and logs once what it chose and why. A path requested by name
    that cannot run here raises; only the legacy name ``cudnn`` falls back to xla.
    Without ``segment_ids`` (decoding with a KV cache, S != T) the fused segment paths do
    not apply and the masked paths run. ``interpret`` runs the Pallas kernels in interpret
    mode (CPU tests only; auto never selects it).
    """
    if impl == "cudnn":  # legacy: fall back to the reference where cuDNN cannot run
        if _fused_attention_available(q.dtype):
            try:
                return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError) as e:
                _warn_fallback(f"{type(e).__name__}: {e}")
        else:
            _warn_fallback(f"backend {jax.default_backend()}, dtype {q.dtype}")
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

    path, why = resolve_attention(impl, jnp.dtype(q.dtype).name, jax.default_backend())
    if impl == "auto":
        _log_choice(impl, path, why)
    if path in ("cudnn_packed", "pallas", "splash") and segment_ids is None:
        path = "cudnn_bias" if path == "cudnn_packed" else "xla"
    if path == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if path == "cudnn_bias":
        if not _fused_attention_available(q.dtype):
            raise ValueError(f"model.attention={impl}: cuDNN attention needs a CUDA GPU (compute capability "
                             f">= 8.0) and bfloat16/float16; here: backend {jax.default_backend()}, dtype {q.dtype}")
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")

    if path == "cudnn_packed":
        why_not = cudnn_packed_unavailable()
        if why_not is not None or q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"model.attention={impl}: cuDNN packed attention cannot run here "
                             f"({why_not or f'dtype {q.dtype}; it needs bfloat16/float16'})")
        out = _cudnn_packed(q, k, v, segment_ids, max_segments)
    elif path == "pallas":
        if not interpret and (why_not := _pallas_gpu_unavailable()):
            raise ValueError(f"model.attention={impl}: the Pallas GPU kernel cannot run here ({why_not})")
        out = _pallas_mha(q, k, v, segment_ids, interpret)
    elif path == "splash":
        if not interpret and jax.default_backend() != "tpu":
            raise ValueError(f"model.attention={impl}: splash attention needs a TPU (backend is {jax.default_backend()})")
        out = _splash(q, k, v, segment_ids, interpret)
    else:
        raise AssertionError(path)
    return jnp.where((segment_ids > 0)[:, :, None, None], out, jnp.zeros((), out.dtype))

