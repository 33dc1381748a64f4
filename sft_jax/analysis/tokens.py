"""Claim 1: response tokens dominate the update. Lengths in tokens, and the unmasked loss's
gradient split into its prompt-token and response-token parts."""

from __future__ import annotations

import jax
import numpy as np

from sft_jax.analysis import variance
from sft_jax.models.family import ModelConfig

MIN_LENGTH_RATIO = 2.0  # claim 1 holds if L_A / L_Q >= this


def length_stats(dataset) -> dict:
    """L_Q (every token outside a response: instruction, template, system) and L_A (response
    tokens) per document: mean, p50, p95; and the supervised share of all tokens."""
    answer = dataset.response_tokens.astype(np.float64)
    prompt = dataset.lengths.astype(np.float64) - answer
    stats = lambda x: {"mean": float(np.mean(x)), "p50": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95))}
    return {"L_Q": stats(prompt), "L_A": stats(answer),
            "supervised_share": float(np.sum(dataset.supervised) / max(len(dataset.supervised), 1)),
            "documents": len(dataset)}


def full_weights(batch: dict) -> np.ndarray:
    """Loss weights of the *unmasked* loss: every position whose target is the next token of
    the same document (what ``data.train_on_prompt`` trains on, closing tokens included)."""
    seg = batch["segment_ids"]
    same_next = np.zeros_like(seg, dtype=bool)
    same_next[:, :-1] = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1])
    return same_next.astype(np.float32)


def gradient_split(cfg: ModelConfig, params, batches: list[tuple[dict, np.ndarray]]) -> dict:
    """Norms and cosine of grad(L_Q) and grad(L_A), where L_Q (L_A) is the summed NLL over the
    prompt (response) positions among ``loss_weights``, summed over ``batches`` of
    (batch, loss_weights); and each part's share of the total, <g_part, g> / |g|^2 (they sum to 1).
    With the response-only mask as ``loss_weights`` the prompt part is exactly zero.

    The sums come from the variance study's per-example program, in its chunks of
    variance.CHUNK rows: one compile serves both studies; its running total is the gradient."""
    stats = variance.gradient_stats_fn(cfg)
    g_q = g_a = variance.zeros_like(params)
    scale = np.float32(0)  # no centring: only the totals are used
    for batch, loss_w in batches:
        response_w = batch["weights"] * loss_w
        for c, _ in variance.chunks(dict(batch, weights=loss_w - response_w)):
            g_q = stats(params, c, g_q, g_q, scale)[0]
        for c, _ in variance.chunks(dict(batch, weights=response_w)):
            g_a = stats(params, c, g_a, g_a, scale)[0]
    # on the host in float64: no per-shape programs, no float32 rounding in the sums
    leaves = lambda t: [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)]
    dot = lambda x, y: float(sum(np.dot(u, v) for u, v in zip(leaves(x), leaves(y))))
    nq, na, qa = float(np.sqrt(dot(g_q, g_q))), float(np.sqrt(dot(g_a, g_a))), dot(g_q, g_a)
    total_sq = nq ** 2 + na ** 2 + 2 * qa
    return {"grad_norm_prompt": nq, "grad_norm_response": na,
            "cosine": qa / (nq * na) if nq > 0 and na > 0 else 0.0,
            "prompt_share": (nq ** 2 + qa) / total_sq if total_sq > 0 else 0.0,
            "response_share": (na ** 2 + qa) / total_sq if total_sq > 0 else 0.0}


def verdict(stats: dict) -> str:
    ratio = stats["L_A"]["mean"] / max(stats["L_Q"]["mean"], 1e-9)
    return "holds" if ratio >= MIN_LENGTH_RATIO else "does not hold"
