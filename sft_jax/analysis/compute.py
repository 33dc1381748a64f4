"""Claim 3: attention costs O(L T^2 D), so T = 512 -> 1024 costs about 4x in attention.

The run's architecture with random weights (position table extended as needed), B fixed at
the run's micro-batch rows, forward + backward timed at T = 64, 128, ... Measured ratios
t(2T)/t(T) are set beside the FLOP model's (the config's ``flops_per_token``), split into the
quadratic attention part and the rest."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models.family import ModelConfig, family_of
from sft_jax.objectives.sft import summed_nll

WARMUP = 2  # untimed steps per length (the first compiles)
REPEATS = 5  # timed steps per length; the median is reported
MAX_SPREAD = 0.10  # (max - min) / median of the repeats above this: inconclusive
CLAIM_RATIO = 4.0  # the claim: t(1024) / t(512)
RATIO_TOLERANCE = 0.5  # a measured whole-step ratio within CLAIM_RATIO +- this would bear the claim out
MIN_LENGTH = 64


def lengths(n_positions: int, top: int | None = None) -> list[int]:
    """64, 128, ... up to max(n_positions, 1024), or up to ``top``."""
    top, out, t = top or max(n_positions, 1024), [], MIN_LENGTH
    while t <= top:
        out.append(t)
        t *= 2
    return out


def flops(cfg: ModelConfig, batch: int, length: int) -> dict:
    """Training FLOPs of one step of (batch, length): the attention part (12 L D T per token) and the rest (6N)."""
    total = batch * length * cfg.flops_per_token(length)
    attention = batch * length * cfg.attention_flops_per_token(length)
    return {"total": total, "attention": attention, "rest": total - attention}


def fit_cost_curve(ts, seconds) -> dict:
    """Least squares t(T) = c0 + c1 T + c2 T^2 (fixed overhead, linear and quadratic parts)."""
    t = np.asarray(ts, np.float64)
    A = np.stack([np.ones_like(t), t, t * t], axis=1)
    coef, *_ = np.linalg.lstsq(A, np.asarray(seconds, np.float64), rcond=None)
    return {"c0": float(coef[0]), "c1": float(coef[1]), "c2": float(coef[2])}


def random_params(cfg: ModelConfig, seed: int = 0):
    """Float32 weights of the architecture drawn N(0, 0.02) by numpy: a step's time does not depend
    on the values, and the model's own init would cost a compile per position-table size."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: family_of(cfg).init_params(cfg, key), jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02), shapes)


def random_batch(cfg: ModelConfig, batch: int, length: int, rng) -> dict:
    return {"tokens": rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32),
            "targets": rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32),
            "weights": np.ones((batch, length), np.float32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
            "segment_ids": np.ones((batch, length), np.int32)}


def time_steps(cfg: ModelConfig, batch: int, ts: list[int], *, seed: int = 0, warmup: int = WARMUP,
               repeats: int = REPEATS) -> dict[int, list[float]]:
    """Seconds of forward + backward per length (``repeats`` timings after ``warmup`` untimed).
    Every length is compiled before any is timed: no warm-up includes a compile."""
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, max(ts)))
    model = family_of(cfg).module(cfg)
    params = random_params(cfg, seed)
    grad = jax.jit(jax.value_and_grad(lambda p, b: summed_nll(model, p, b, 0)))
    rng = np.random.default_rng(seed)
    batches = {T: {k: jnp.asarray(v) for k, v in random_batch(cfg, batch, T, rng).items()} for T in ts}
    steps = {T: grad.lower(params, batches[T]).compile() for T in ts}
    out = {}
    for T in ts:
        times = []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(steps[T](params, batches[T]))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        out[T] = times
    return out


def spread(times: list[float]) -> float:
    return (max(times) - min(times)) / float(np.median(times))


def ratios(cfg: ModelConfig, batch: int, timings: dict[int, list[float]]) -> list[dict]:
    """Per doubling: measured t(2T)/t(T) beside the FLOP model's total and attention-only ratio."""
    ts = sorted(timings)
    rows = []
    for a, b in zip(ts, ts[1:]):
        fa, fb = flops(cfg, batch, a), flops(cfg, batch, b)
        rows.append({"T": a, "2T": b, "measured": float(np.median(timings[b]) / np.median(timings[a])),
                     "flops": fb["total"] / fa["total"], "attention_flops": fb["attention"] / fa["attention"],
                     "attention_share_at_2T": fb["attention"] / fb["total"],
                     "spread": max(spread(timings[a]), spread(timings[b]))})
    return rows


def verdict(rows: list[dict]) -> str:
    row = next((r for r in rows if r["T"] == 512 and r["2T"] == 1024), None)
    if row is None or row["spread"] > MAX_SPREAD:
        return "inconclusive"
    return "holds" if abs(row["measured"] - CLAIM_RATIO) <= RATIO_TOLERANCE else "does not hold"
