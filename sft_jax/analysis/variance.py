"""Claim 2: gradient variance grows with sequence length (Var ∝ T); and the gradient noise scale.

Var in a length bin = the mean over its examples of |g_i - ḡ|^2, g_i the gradient of
example i's summed response NLL. log Var is fitted against log T (T = response tokens) by
OLS, with a bootstrap 95% interval for the exponent (examples resampled within bins, ḡ
held at the bin's mean). B_simple = tr(Σ) / |G|^2 (McCandlish et al., 2018, appendix A) from
the two batch sizes 1 and n of the same examples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models.family import ModelConfig, family_of
from sft_jax.objectives.sft import summed_nll

MIN_BINS = 4  # fewer usable length bins: inconclusive
MIN_PER_BIN = 16  # examples a bin needs to count
PER_BIN = 32  # examples drawn per bin
N_BINS = 6  # bins tried (quantiles of the response length)
CLAIM_EXPONENT = 1.0  # claim 2 holds if the summed-loss exponent's 95% interval contains this
MAX_INTERVAL_WIDTH = 1.5  # a wider 95% interval says nothing either way: inconclusive
BOOTSTRAP = 2000  # bootstrap resamples
CHUNK = 16  # examples per vmapped gradient call


# --- the statistics (numpy only; tested on synthetic gradients) -----------------------

def deviations(grads: np.ndarray) -> np.ndarray:
    """|g_i - ḡ|^2 per example, grads (n, P)."""
    return np.sum((grads - grads.mean(axis=0)) ** 2, axis=1)


def ols_slope(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc = x - x.mean()
    return float(np.sum(xc * (y - y.mean())) / np.sum(xc * xc))


def fit_exponent(bins: list[tuple[np.ndarray, np.ndarray]], *, per_token: bool = False, n_boot: int = BOOTSTRAP,
                 seed: int = 0) -> dict:
    """bins: (T_i, d_i) per bin, T_i response tokens and d_i = |g_i - ḡ|^2 of its examples.
    Fits log Var = a + b log T; returns b, its bootstrap 95% interval and the per-bin points.
    ``per_token`` fits Var / T (the gradient of the mean instead of the summed NLL)."""
    def points(sample):
        t = np.array([np.mean(T) for T, _ in sample])
        v = np.array([np.mean(d) for _, d in sample])
        return t, (v / t if per_token else v)

    t, v = points(bins)
    slope = ols_slope(np.log(t), np.log(v))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        sample = []
        for T, d in bins:
            idx = rng.integers(0, len(d), len(d))
            sample.append((T[idx], d[idx]))
        bt, bv = points(sample)
        if np.all(bv > 0):
            boots.append(ols_slope(np.log(bt), np.log(bv)))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"exponent": slope, "ci95": [float(lo), float(hi)], "T": t.tolist(), "var": v.tolist(),
            "n": [len(d) for _, d in bins]}


def noise_scale(sq_norms: np.ndarray, mean_grad_sq: float) -> dict:
    """B_simple from batch sizes 1 and n: |G_1|^2 = mean |g_i|^2, |G_n|^2 = |ḡ|^2;
    |G|^2 = (n |G_n|^2 - |G_1|^2) / (n - 1), tr(Σ) = (|G_1|^2 - |G_n|^2) / (1 - 1/n)."""
    n = len(sq_norms)
    g1, gn = float(np.mean(sq_norms)), float(mean_grad_sq)
    true_sq = (n * gn - g1) / (n - 1)
    trace = (g1 - gn) / (1 - 1 / n)
    return {"trace_sigma": trace, "grad_sq": true_sq,
            "B_simple": trace / true_sq if true_sq > 0 else float("inf"), "n": n}


def verdict(fit: dict | None) -> str:
    if fit is None:
        return "inconclusive"
    lo, hi = fit["ci95"]
    if hi - lo > MAX_INTERVAL_WIDTH:
        return "inconclusive"
    return "holds" if lo <= CLAIM_EXPONENT <= hi else "does not hold"


# --- per-example gradients of a model ---------------------------------------------------

@functools.lru_cache(maxsize=8)
def gradient_stats_fn(cfg: ModelConfig):
    """One jitted program for the token and the variance study (one compile serves both).
    For a (C, T) batch of one document per row, g_i = the gradient of row i's summed NLL
    under ``batch["weights"]``; returns (total + sum_i g_i, |g_i|^2, |g_i - scale * center|^2)."""
    model = family_of(cfg).module(cfg)

    @jax.jit
    def stats(params, batch, total, center, scale):
        def one(row):
            return jax.grad(lambda p: summed_nll(model, p, {k: v[None] for k, v in row.items()}, 0))(params)

        g = jax.vmap(one)(batch)
        per_ex = lambda f: sum(jnp.sum(f(x, c).reshape(x.shape[0], -1) ** 2, axis=1)
                               for x, c in zip(jax.tree.leaves(g), jax.tree.leaves(center)))
        return (jax.tree.map(lambda t, x: t + jnp.sum(x, axis=0), total, g), per_ex(lambda x, c: x),
                per_ex(lambda x, c: x - scale * c[None]))

    return stats


def zeros_like(params):
    """Zeros placed as the parameters, committed like the totals the program returns (so every
    call hits one compile); from the host: jnp.zeros_like would compile a program per shape."""
    return jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding), params)


def chunks(batch: dict) -> list[tuple[dict, int]]:
    """(chunk, real rows) in CHUNK-row pieces, the last padded with zero-weight rows: every call has
    one shape, and a padded row's gradient is exactly zero."""
    out = []
    n = batch["tokens"].shape[0]
    for lo in range(0, n, CHUNK):
        rows = min(CHUNK, n - lo)
        take = np.minimum(np.arange(lo, lo + CHUNK), n - 1)
        c = {k: np.array(v[take]) for k, v in batch.items()}
        c["weights"][rows:] = 0.0
        out.append(({k: jnp.asarray(v) for k, v in c.items()}, rows))
    return out


def per_example_stats(cfg: ModelConfig, params, batch: dict) -> tuple:
    """(sum of g_i, |g_i|^2, |g_i - ḡ|^2) over the rows of ``batch`` (one document each), in
    chunks of CHUNK rows: a first pass for ḡ, a second for the deviations."""
    fn = gradient_stats_fn(cfg)
    pieces = chunks(batch)
    total, sq = zeros_like(params), []
    for c, rows in pieces:
        total, q, _ = fn(params, c, total, total, np.float32(0))
        sq.append(np.asarray(q)[:rows])
    scale = np.float32(1 / batch["tokens"].shape[0])
    dev = [np.asarray(fn(params, c, total, total, scale)[2])[:rows] for c, rows in pieces]
    return total, np.concatenate(sq), np.concatenate(dev)


def length_bins(response_lengths: np.ndarray, *, n_bins: int = N_BINS, per_bin: int = PER_BIN, seed: int = 0):
    """Indices of up to ``per_bin`` documents in each of ``n_bins`` response-length bins
    (quantile edges; equal lengths never split across bins)."""
    rng = np.random.default_rng(seed)
    edges = np.unique(np.quantile(response_lengths, np.linspace(0, 1, n_bins + 1)))
    out = []
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        last = i == len(edges) - 2
        members = np.flatnonzero((response_lengths >= lo) & ((response_lengths <= hi) if last else (response_lengths < hi)))
        if len(members):
            out.append(np.sort(rng.choice(members, min(per_bin, len(members)), replace=False)))
    return out
