"""Batched KV-cache decoding: left-padded prefill in one call, then a while_loop of one-token steps.

Layout of a batch of prompts of different lengths (B rows, T0 = longest prompt):
  tokens      pad pad a b c          pad slots hold eos and segment 0, so no real token sees them
  segment_ids 0   0   1 1 1
  positions   0   0   0 1 2          positions count from each prompt's first real token
Each decode step writes one token per row at cache slot T0 + i with position len_b + i.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models.family import ModelConfig, family_of

Array = jax.Array


def filter_logits(logits: Array, top_k: int, top_p: Array | float) -> Array:
    """Mask to -inf everything outside the top-k, then outside the top-p nucleus. (B,V) float32.

    Padded-vocab logits arrive as -inf and stay there, so they are never sampled.
    """
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # (B,1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = before < top_p  # always keeps the top token
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def _next_token(logits: Array, rng: Array, temperature: Array, top_p: Array, *, greedy: bool, top_k: int) -> Array:
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "top_k"))
def _decode(params, tokens, lengths, rng, temperature, top_p, eos_id, *, cfg: ModelConfig,
            max_new_tokens: int, greedy: bool, top_k: int, stop_ids=None) -> Array:
    """tokens (B,T0) left-padded, lengths (B,) -> new tokens (B, max_new_tokens), eos after a row stops.
    A row stops at ``eos_id`` or at any id of ``stop_ids`` (S,) (a model may end turns with
    several ids, e.g. Llama 3's <|eot_id|> beside <|end_of_text|>); the slots after it hold eos."""
    family = family_of(cfg)
    model = family.module(cfg)
    B, T0 = tokens.shape
    slot = jnp.arange(T0)[None, :]
    first_real = T0 - lengths[:, None]  # (B,1)
    segment_ids = (slot >= first_real).astype(jnp.int32)
    positions = jnp.maximum(slot - first_real, 0)
    cache = family.init_cache(cfg, B, T0 + max_new_tokens)
    logits, cache = model.apply(params, tokens, positions, segment_ids, cache=cache)
    state = dict(cache=cache, logits=logits[:, -1], rng=rng, i=jnp.array(0, jnp.int32),
                 done=jnp.zeros((B,), bool), out=jnp.full((B, max_new_tokens), eos_id, jnp.int32))

    def cond(s):
        return (s["i"] < max_new_tokens) & ~jnp.all(s["done"])

    def body(s):
        rng, step_rng = jax.random.split(s["rng"])
        token = _next_token(s["logits"], step_rng, temperature, top_p, greedy=greedy, top_k=top_k)
        token = jnp.where(s["done"], eos_id, token)
        out = jax.lax.dynamic_update_slice_in_dim(s["out"], token[:, None], s["i"], axis=1)
        stops = token == eos_id
        if stop_ids is not None:
            stops = stops | jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        done = s["done"] | stops
        positions = (lengths + s["i"])[:, None]
        logits, cache = model.apply(params, token[:, None], positions, jnp.ones((B, 1), jnp.int32), cache=s["cache"])
        return dict(cache=cache, logits=logits[:, 0], rng=rng, i=s["i"] + 1, done=done, out=out)

    return jax.lax.while_loop(cond, body, state)["out"]


def prompt_budget(n_positions: int, max_new_tokens: int) -> int:
    """The longest prompt that leaves room for ``max_new_tokens`` new tokens."""
    if not 1 <= max_new_tokens < n_positions:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in n_positions={n_positions}")
    return n_positions - max_new_tokens


def cut_prompt(prompt: list[int], n_positions: int, max_new_tokens: int) -> list[int]:
    """``prompt`` cut from the left to ``prompt_budget`` tokens (the end of a prompt, where the
    question and the turn marker sit, matters most; the data path cuts training prompts alike)."""
    budget = prompt_budget(n_positions, max_new_tokens)
    return list(prompt[-budget:]) if len(prompt) > budget else list(prompt)


def generate(params, cfg: ModelConfig, prompt_token_lists, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int, stop_ids: Sequence[int] = (),
             seed: int = 0) -> list[list[int]]:
    """New tokens for each prompt, up to and including the first ``eos_id`` or id of ``stop_ids``
    (as HF returns them when ``generation_config.eos_token_id`` lists several).

    ``temperature=0`` is greedy; otherwise sample from softmax(logits / temperature) restricted to
    the top-k (0 = all) and the top-p nucleus.
    """
    prompts = [list(map(int, p)) for p in prompt_token_lists]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    # checked here, on the host: past this point a bad length is a shape error deep inside jit
    context = cfg.max_position_embeddings
    if max_new_tokens < 1 or longest + max_new_tokens > context:
        raise ValueError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} does not fit the "
                         f"model's n_positions={context} (need max_new_tokens >= 1 and their sum <= "
                         f"n_positions; prompt_budget() says how long a prompt may be)")
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    T0 = min(-(-longest // 8) * 8, context - max_new_tokens)  # round up: fewer recompiles
    tokens = np.full((len(prompts), T0), eos_id, np.int32)
    for row, p in zip(tokens, prompts):
        row[T0 - len(p):] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    out = _decode(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
                  jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.int32(eos_id),
                  cfg=cfg, max_new_tokens=max_new_tokens, greedy=temperature == 0.0, top_k=top_k,
                  stop_ids=jnp.asarray(sorted(set(stop_ids)), jnp.int32) if stop_ids else None)
    stops = {eos_id, *stop_ids}
    results = []
    for row in np.asarray(out).tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        results.append(row if end is None else row[:end + 1])
    return results
