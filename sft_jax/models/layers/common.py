"""Pieces every family builds with: the checks of a config's compute settings, parameters with
logical axis names, activation layout, embedding lookup, LayerNorm, the remat policies, the
scanned layer stack, the loss head's vocabulary padding and chunked NLL, and a reward model's
scalar score head.

Parameters live in float32 and carry logical axis names (``vocab``, ``embed``, ``heads``, ...);
the trainer maps them to mesh axes with one rules table (``sft_jax.core.mesh.LOGICAL_RULES``).
"""

from __future__ import annotations

from typing import Callable

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn

from sft_jax.models.layers.attention import ATTENTION_IMPLS

Array = jax.Array

VOCAB_MULTIPLE = 128  # pad the embedding rows so the vocab axis shards and hits tensor cores
REMAT_POLICIES = ("none", "full", "save_dots", "offload")


def check_compute_settings(cfg) -> None:
    """ValueError for a config's compute settings (dtype, remat, attention, max_segments_per_row)
    that no family runs."""
    if cfg.remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={cfg.remat!r}: choose one of {REMAT_POLICIES}")
    if cfg.attention not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention={cfg.attention!r}: choose one of {ATTENTION_IMPLS}")
    if cfg.max_segments_per_row < 0:
        raise ValueError(f"model.max_segments_per_row={cfg.max_segments_per_row}: expected >= 0")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.dtype={cfg.dtype!r}: choose float32, bfloat16 or float16")


def config_from_fields(cls, d: dict):
    """``cls(**d)`` for a config dataclass, refusing keys it does not have (a checkpoint's stored config)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(known)}")
    return cls(**d)


def padded_vocab(vocab_size: int) -> int:
    """Rows of the embedding (and LM head): ``vocab_size`` rounded up to VOCAB_MULTIPLE."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def param(module: nn.Module, name: str, init, shape, axes):
    """A float32 parameter annotated with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


LORA = "_lora"  # suffix of the entry beside a kernel that holds its LoRA adapters while they train


def project(module: nn.Module, name: str, spec: str, x: Array, kernel: Array, dt) -> Array:
    """``einsum(spec, x, kernel)`` in ``dt``: the projection by the kernel called ``name``.

    While LoRA adapters train (sft_jax.adapters), the parameters hold beside the kernel an entry
    ``name + LORA``: the adapters A (r, in) and B (out, r) of this layer, their scale s, and under
    adapter dropout the keep probability and one dropout key per row. The projection then adds
    PEFT's low-rank term ``s drop(x) A^T B^T`` as two thin matmuls, so neither the (in, out)
    update nor its gradient is ever formed. ``spec``'s kernel letters are its input letters
    (those ``x`` shares) followed by its output letters, as the kernels are laid out. Without
    the entry (inference, export, merged adapters) it is the plain einsum."""
    y = jnp.einsum(spec, x, kernel.astype(dt))
    if not module.has_variable("params", name + LORA):
        return y
    entry = module.get_variable("params", name + LORA)
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    ins = "".join(c for c in rhs if c in lhs)
    outs, rows = rhs[len(ins):], "".join(c for c in lhs if c not in rhs)
    assert rhs == ins + outs, spec
    a = entry["a"].reshape(-1, *kernel.shape[:len(ins)]).astype(dt)  # (r, in...)
    b = entry["b"].reshape(*kernel.shape[len(ins):], -1).astype(dt)  # (out..., r)
    if "keys" in entry:  # adapter dropout: PEFT's drop(x), in training only
        keep = entry["keep"]
        keys = jax.random.wrap_key_data(entry["keys"])  # one per row of x
        kept = jax.vmap(lambda key: jax.random.bernoulli(key, keep, x.shape[1:]))(keys)
        x = jnp.where(kept, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))
    low = jnp.einsum(f"{lhs},z{ins}->{rows}z", x, a) * entry["scale"].astype(dt)
    return y + jnp.einsum(f"{rows}z,{outs}z->{out}", low, b)


def constrain(x: Array, axes: tuple) -> Array:
    """Pin an activation's layout by logical names (no-op outside a mesh/rules context)."""
    return nn.with_logical_constraint(x, axes)


def embed_lookup(table: Array, ids: Array, rows_axis: str) -> Array:
    """Row lookup, (R,D)[(B,T)] -> (B,T,D), sharding-friendly.

    The table's embed axis is split over fsdp, the ids' batch axis over data x fsdp: a plain
    gather would come out split on D and XLA could reach the activations' batch split only
    by replicating the whole (B,T,D) result ("involuntary full rematerialization"). So the
    table is first gathered whole on its embed axis (rows keep their split, a vocab-parallel
    lookup); the output then follows the ids' batch split. ZeRO-3 gathers every weight
    before use anyway; the gradient is reduce-scattered back onto the table's own split.
    """
    table = constrain(table, (rows_axis, None))
    return jnp.take(table, ids, axis=0)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis computed in float32, output in ``dtype``."""

    features: int
    epsilon: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = param(self, "scale", nn.initializers.ones, (self.features,), ("embed",))
        bias = param(self, "bias", nn.initializers.zeros, (self.features,), ("embed",))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


def remat_policy(name: str):
    """The checkpoint policy of ``model.remat``. ``offload`` moves the tensors named
    ``attention_out`` and ``mlp_hidden`` (``checkpoint_name`` in a family's block) to host."""
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


def layer_stack(block, cfg, *, name: str, in_axes: tuple) -> nn.Module:
    """``cfg.num_hidden_layers`` copies of ``block`` as one scanned module (parameters stacked
    on a leading ``layers`` axis), rematerialised by ``cfg.remat``; ``scan_layers=False``
    unrolls the loop over the same parameters. ``block(cfg)`` is called as
    ``(carry, per-layer input, *broadcast inputs) -> (carry, per-layer output)``; ``in_axes``
    says which inputs are per layer (0) and which are shared (``nn.broadcast``). Call it from
    a module's ``setup``."""
    if cfg.remat != "none":
        block = nn.remat(block, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        length=cfg.num_hidden_layers,
        unroll=1 if cfg.scan_layers else cfg.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, name=name)


def mask_padded_vocab(logits: Array, vocab_size: int) -> Array:
    """Logits over the padded vocab (..., V) with the padding rows set to -inf (never sampled,
    no mass in the softmax)."""
    valid = jnp.arange(logits.shape[-1]) < vocab_size
    return jnp.where(valid, logits, -jnp.inf)


def chunked_nll(logits_fn: Callable[[Array], Array], hidden: Array, targets: Array, chunk: int = 0) -> Array:
    """Per-token negative log-likelihood, (B,T) float32, from final hidden states (B,T,D) and
    ``logits_fn``: (B,C,D) -> (B,C,V) float32.

    Log-softmax runs in float32. With ``chunk > 0`` the sequence is cut into chunks of that
    many positions and each chunk's logits are recomputed in the backward pass, so float32
    logits for the whole batch ((B,T,V) * 4 bytes) never exist at once.
    """
    def nll(h, t):  # (B,C,D), (B,C) -> (B,C)
        logits = logits_fn(h)
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


def scores_at(head: dict, hidden: Array, index: Array) -> Array:
    """A reward model's bias-free scalar head ``{"score": {"kernel": (D, 1)}}`` read from final
    hidden states (R, T, D) at positions ``index`` (R, S) -> (R, S) float32 (the positions:
    ``sft_jax.models.heads.reward_read_position``)."""
    picked = jnp.take_along_axis(hidden, index[..., None], axis=1)  # (R,S,D)
    kernel = head["score"]["kernel"].astype(jnp.float32)
    return jnp.einsum("RSD,DO->RSO", picked.astype(jnp.float32), kernel)[..., 0]
