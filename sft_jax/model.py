"""GPT-2 in Flax (Linen), read top to bottom: config, layers, block, model, loss head.

Axis letters used in shapes and einsums:
  B batch, T query length, S key length, D embed, H heads, K head dim,
  F mlp, V (padded) vocab, L layers, P positions.

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``,
``head_dim``, ``mlp``, ``layers``, ...). The model never names devices: the
trainer maps logical names to mesh axes with one rules table
(``sft_jax.core.mesh.LOGICAL_RULES``). Parameters live in float32; compute runs
in ``config.dtype``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

VOCAB_MULTIPLE = 128  # pad the embedding rows so the vocab axis shards and hits tensor cores

PRESETS = {
    # name: (n_layer, n_head, n_embd)
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
    # tiny sizes for tests and the CPU demo
    "tiny": (2, 4, 64),
    "demo": (4, 4, 128),
}

REMAT_POLICIES = ("none", "full", "save_dots", "offload")
# xla: the masked reference. cudnn_bias: cuDNN with the (B,1,T,S) mask as a bias (fused, not
# flash for packed rows). cudnn_packed / pallas / splash: flash kernels that take the segment
# structure itself. auto: the documented rule in ``resolve_attention``. cudnn: the old name of
# cudnn_bias, kept for existing configs; unlike the other named paths it falls back to xla.
ATTENTION_IMPLS = ("auto", "xla", "cudnn_bias", "cudnn_packed", "pallas", "splash", "cudnn")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture plus how to run it; the single source of truth for the model."""

    vocab_size: int = 50257  # real tokens; the embedding has padded_vocab_size rows
    n_positions: int = 1024  # learned positions, so also the max sequence length
    n_embd: int = 768  # D
    n_layer: int = 12  # L
    n_head: int = 12  # H; head dim K = D / H
    layer_norm_epsilon: float = 1e-5  # HF's default
    initializer_range: float = 0.02  # HF's init std
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # How to compute (not part of the checkpoint's identity):
    dtype: str = "float32"  # compute dtype: float32 for parity, bfloat16 for training
    remat: str = "none"  # none | full | save_dots | offload
    scan_layers: bool = True  # False unrolls the layer loop (same parameters, same numbers)
    attention: str = "auto"  # one of ATTENTION_IMPLS; auto: see resolve_attention
    max_segments_per_row: int = 0  # static M for cudnn_packed; 0 = sequence length // 16 (data's default)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}: choose one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r}: choose one of {ATTENTION_IMPLS}")
        if self.max_segments_per_row < 0:
            raise ValueError(f"model.max_segments_per_row={self.max_segments_per_row}: expected >= 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={self.dtype!r}: choose float32, bfloat16 or float16")

    # --- derived numbers ---------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def num_params(self, include_vocab_padding: bool = False) -> int:
        """Parameter count; without padding rows it equals HF's ``num_parameters()``."""
        D, L, P = self.n_embd, self.n_layer, self.n_positions
        V = self.padded_vocab_size if include_vocab_padding else self.vocab_size
        per_layer = (2 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (2 * D) + (D * 4 * D + 4 * D) + (4 * D * D + D)
        return V * D + P * D + L * per_layer + 2 * D

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token: 6N (fwd+bwd matmuls, N without position embeddings)
        plus attention 12 * L * D * T (QK^T and AV, fwd+bwd, causal mask not discounted),
        PaLM appendix B convention. Forward only is a third of it."""
        n = self.num_params() - self.n_positions * self.n_embd
        flops = 6 * n + 12 * self.n_layer * self.n_embd * seq_len
        return flops if training else flops / 3

    # --- presets and HF conversion -----------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        n_layer, n_head, n_embd = PRESETS[name]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: Any, **overrides) -> "GPT2Config":
        """From a transformers ``GPT2Config`` or its ``config.json`` dict."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = d.get("model_type")
        if model_type != "gpt2":
            raise ValueError(f"config model_type is {model_type!r}, expected 'gpt2'")
        if d.get("n_inner") not in (None, 4 * d["n_embd"]):
            raise ValueError(f"n_inner={d['n_inner']} is not supported (GPT-2 uses 4 * n_embd)")
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function={d['activation_function']!r} is not supported (tanh GELU only)")
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
        eos = d.get("eos_token_id", 50256)
        bos = d.get("bos_token_id", eos)
        fields = dict(
            vocab_size=d["vocab_size"],
            n_positions=d["n_positions"],
            n_embd=d["n_embd"],
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=bos if bos is not None else 50256,
            eos_token_id=eos if eos is not None else 50256,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict:
        """A ``config.json`` dict that transformers reads as ``GPT2Config``."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
            "scale_attn_weights": True,
            "use_cache": True,
            "torch_dtype": "float32",
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)


# --- layers -----------------------------------------------------------------

def _param(module: nn.Module, name: str, init, shape, axes):
    """A float32 parameter annotated with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _constrain(x: Array, axes: tuple) -> Array:
    """Pin an activation's layout by logical names (no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, axes)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32, output in the compute dtype."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = _param(self, "scale", nn.initializers.ones, (cfg.n_embd,), ("embed",))
        bias = _param(self, "bias", nn.initializers.zeros, (cfg.n_embd,), ("embed",))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + cfg.layer_norm_epsilon) * scale + bias
        return y.astype(cfg.compute_dtype)


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


class Attention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array, mask: tuple, kv_cache: Optional[dict], cache_index: Array | None):
        """``mask`` is (the (B,1,T,S) mask, the (B,T) segment ids or None when decoding)."""
        cfg = self.config
        mask, segment_ids = mask
        D, H, K = cfg.n_embd, cfg.n_head, cfg.head_dim
        std = cfg.initializer_range
        dt = cfg.compute_dtype
        # HF's c_attn is one (D, 3D) matrix with q|k|v side by side; we keep it whole but
        # name its heads so the tensor axis can split them.
        w_qkv = _param(self, "c_attn_kernel", nn.initializers.normal(std), (D, 3, H, K), ("embed", "qkv", "heads", "head_dim"))
        b_qkv = _param(self, "c_attn_bias", nn.initializers.zeros, (3, H, K), ("qkv", "heads", "head_dim"))
        # GPT-2 scales the residual projections' init by 1/sqrt(2L).
        w_out = _param(self, "c_proj_kernel", nn.initializers.normal(std / math.sqrt(2 * cfg.n_layer)), (H, K, D), ("heads", "head_dim", "embed"))
        b_out = _param(self, "c_proj_bias", nn.initializers.zeros, (D,), ("embed",))

        qkv = jnp.einsum("BTD,DCHK->CBTHK", x, w_qkv.astype(dt)) + b_qkv.astype(dt)[:, None, None]
        q, k, v = (_constrain(t, ("batch", "length", "heads", "head_dim")) for t in qkv)  # each (B,T,H,K)
        new_cache = None
        if kv_cache is not None:  # decoding: write this chunk into the cache, attend over all of it
            k = jax.lax.dynamic_update_slice_in_dim(kv_cache["k"], k.astype(kv_cache["k"].dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv_cache["v"], v.astype(kv_cache["v"].dtype), cache_index, axis=1)
            new_cache = {"k": k, "v": v}
            k, v = k.astype(dt), v.astype(dt)
        out = dot_product_attention(q, k, v, mask, cfg.attention, segment_ids,
                                    max_segments=cfg.max_segments_per_row)  # (B,T,H,K)
        out = checkpoint_name(out, "attention_out")
        y = jnp.einsum("BTHK,HKD->BTD", out, w_out.astype(dt)) + b_out.astype(dt)
        return y, new_cache


class MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        D, F = cfg.n_embd, 4 * cfg.n_embd
        std = cfg.initializer_range
        dt = cfg.compute_dtype
        w_fc = _param(self, "c_fc_kernel", nn.initializers.normal(std), (D, F), ("embed", "mlp"))
        b_fc = _param(self, "c_fc_bias", nn.initializers.zeros, (F,), ("mlp",))
        w_proj = _param(self, "c_proj_kernel", nn.initializers.normal(std / math.sqrt(2 * cfg.n_layer)), (F, D), ("mlp", "embed"))
        b_proj = _param(self, "c_proj_bias", nn.initializers.zeros, (D,), ("embed",))
        h = jnp.einsum("BTD,DF->BTF", x, w_fc.astype(dt)) + b_fc.astype(dt)
        h = _constrain(h, ("batch", "length", "mlp"))
        h = checkpoint_name(h, "mlp_hidden")
        h = jax.nn.gelu(h, approximate=True)  # GPT-2's tanh GELU ("gelu_new")
        return jnp.einsum("BTF,FD->BTD", h, w_proj.astype(dt)) + b_proj.astype(dt)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; scan-shaped: (carry, per-layer input) -> (carry, out)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array, kv_cache: Optional[dict], mask: tuple, cache_index: Array | None):
        cfg = self.config
        a, new_cache = Attention(cfg, name="attn")(LayerNorm(cfg, name="ln_1")(x), mask, kv_cache, cache_index)
        x = x + a
        x = x + MLP(cfg, name="mlp")(LayerNorm(cfg, name="ln_2")(x))
        x = _constrain(x, ("batch", "length", "embed"))
        return x, new_cache


def _embed(table: Array, ids: Array, rows_axis: str) -> Array:
    """Row lookup, (R,D)[(B,T)] -> (B,T,D), sharding-friendly.

    The table's embed axis is split over fsdp, the ids' batch axis over data x fsdp: a plain
    gather would come out split on D and XLA could reach the activations' batch split only
    by replicating the whole (B,T,D) result ("involuntary full rematerialization"). So the
    table is first gathered whole on its embed axis (rows keep their split, a vocab-parallel
    lookup); the output then follows the ids' batch split. ZeRO-3 gathers every weight
    before use anyway; the gradient is reduce-scattered back onto the table's own split.
    """
    table = _constrain(table, (rows_axis, None))
    return jnp.take(table, ids, axis=0)


def _remat_policy(name: str):
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "save_dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        if jax.default_backend() == "cpu":
            raise ValueError("model.remat=offload needs a GPU or TPU backend (host offload); use 'full' on CPU")
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=["attention_out", "mlp_hidden"],
            offload_src="device", offload_dst="pinned_host")
    raise AssertionError(name)


class GPT2(nn.Module):
    """GPT-2 LM. Returns logits over the padded vocab (padding logits are -inf), or the
    final hidden states with ``return_hidden=True`` so the loss can chunk the vocab matmul."""

    config: GPT2Config

    def setup(self):
        cfg = self.config
        std = cfg.initializer_range
        self.wte = self.param("wte", nn.with_logical_partitioning(nn.initializers.normal(std), ("vocab", "embed")),
                              (cfg.padded_vocab_size, cfg.n_embd), jnp.float32)
        self.wpe = self.param("wpe", nn.with_logical_partitioning(nn.initializers.normal(std), ("positions", "embed")),
                              (cfg.n_positions, cfg.n_embd), jnp.float32)
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
        self.h = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=cfg.n_layer,
            unroll=1 if cfg.scan_layers else cfg.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="h")
        self.ln_f = LayerNorm(cfg, name="ln_f")

    def __call__(self, tokens: Array, positions: Array, segment_ids: Array, *,
                 cache: Optional[dict] = None, return_hidden: bool = False):
        """tokens/positions/segment_ids (B,T) int32; segment 0 = padding, documents 1, 2, ...

        With ``cache`` (from ``init_cache``) the T tokens are written at ``cache['index']`` and
        attend to everything cached in their segment; returns (logits, new_cache).
        """
        cfg = self.config
        dt = cfg.compute_dtype
        x = _embed(self.wte, tokens, "vocab") + _embed(self.wpe, positions, "positions")  # (B,T,D)
        x = _constrain(x.astype(dt), ("batch", "length", "embed"))
        if cache is None:
            mask = (attention_mask(segment_ids, segment_ids), segment_ids)  # fused paths read the ids
            layer_caches, index = None, None
        else:
            index = cache["index"]
            kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, index, axis=1)
            mask = (attention_mask(segment_ids, kv_segments, q_offset=index), None)
            layer_caches = {"k": cache["k"], "v": cache["v"]}
        x, new_layer_caches = self.h(x, layer_caches, mask, index)
        x = self.ln_f(x)
        out = x if return_hidden else self.logits(x)
        if cache is None:
            return out
        new_cache = dict(new_layer_caches, segment_ids=kv_segments, index=index + tokens.shape[1])
        return out, new_cache

    def logits(self, hidden: Array) -> Array:
        """Tied LM head: (B,T,D) -> (B,T,V) in float32, padded vocab rows masked to -inf."""
        return lm_logits(self.wte, hidden, self.config)


def lm_logits(wte: Array, hidden: Array, cfg: GPT2Config) -> Array:
    logits = jnp.einsum("BTD,VD->BTV", hidden, wte.astype(hidden.dtype), preferred_element_type=jnp.float32)
    valid = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
    return jnp.where(valid, logits, -jnp.inf)


def init_cache(cfg: GPT2Config, batch: int, max_len: int, dtype=None) -> dict:
    """Empty KV cache: k/v (L,B,S,H,K), segment ids (B,S) all padding, write index 0."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.n_layer, batch, max_len, cfg.n_head, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.array(0, jnp.int32)}


def token_nll(wte: Array, hidden: Array, targets: Array, cfg: GPT2Config, chunk: int = 0) -> Array:
    """Per-token negative log-likelihood, (B,T) float32, from final hidden states.

    Log-softmax runs in float32. With ``chunk > 0`` the sequence is cut into chunks of that
    many positions and each chunk's logits are recomputed in the backward pass, so float32
    logits for the whole batch ((B,T,V) * 4 bytes) never exist at once.
    """
    def nll(h, t):  # (B,C,D), (B,C) -> (B,C)
        logits = lm_logits(wte, h, cfg)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return logz - picked

    B, T, D = hidden.shape
    if chunk <= 0 or chunk >= T:
        return nll(hidden, targets)
    if T % chunk:
        raise ValueError(f"sequence length {T} is not a multiple of loss chunk {chunk}")
    n = T // chunk
    h = hidden.reshape(B, n, chunk, D).swapaxes(0, 1)  # (n,B,C,D)
    t = targets.reshape(B, n, chunk).swapaxes(0, 1)  # (n,B,C)
    _, out = jax.lax.scan(lambda c, xs: (c, jax.checkpoint(nll)(*xs)), None, (h, t))
    return out.swapaxes(0, 1).reshape(B, T)


def param_shapes(cfg: GPT2Config):
    """Abstract (shape-only) parameters with their logical-axis boxes; allocates nothing."""
    model = GPT2(cfg)
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy, dummy + 1))


def init_params(cfg: GPT2Config, rng: Array):
    """Unboxed float32 parameters with HF's initialisation."""
    model = GPT2(cfg)
    dummy = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(model.init(rng, dummy, dummy, dummy + 1))
