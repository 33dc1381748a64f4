"""The KV cache for decoding, shared by every family.

A cache is a dict: ``k`` and ``v`` (L,B,S,N,K) for L layers, S slots, N key/value heads of
dim K; ``segment_ids`` (B,S) of what each slot holds (0 = empty or padding, never attended);
``index``, the slot the next tokens are written at. A forward pass of T tokens writes them
at ``index`` in every layer, attends over all S slots under the block-diagonal causal mask,
and returns the cache advanced by T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sft_jax.models.layers.attention import attention_mask

Array = jax.Array


def empty_cache(layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> dict:
    """Empty cache: k/v (L,B,S,N,K) zeros, segment ids (B,S) all padding, write index 0."""
    shape = (layers, batch, max_len, kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.array(0, jnp.int32)}


def decode_inputs(cache: dict, segment_ids: Array) -> tuple[Array, Array, dict, Array]:
    """For T new tokens with ``segment_ids`` (B,T): (the (B,1,T,S) mask over the cache's slots,
    the slots' segment ids with the new ones written in, the per-layer k/v to scan over, the
    write index)."""
    index = cache["index"]
    kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, index, axis=1)
    mask = attention_mask(segment_ids, kv_segments, q_offset=index)
    return mask, kv_segments, {"k": cache["k"], "v": cache["v"]}, index


def write_layer(layer_cache: dict, k: Array, v: Array, index: Array) -> tuple[Array, Array, dict]:
    """One layer: write this chunk's k/v (B,T,N,K) at ``index``; returns all S slots' k and v
    (in the cache's dtype) and the layer's new cache."""
    k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype), index, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype), index, axis=1)
    return k, v, {"k": k, "v": v}


def advance(layer_caches: dict, kv_segments: Array, index: Array, length: int) -> dict:
    """The cache after a pass of ``length`` tokens."""
    return dict(layer_caches, segment_ids=kv_segments, index=index + length)
