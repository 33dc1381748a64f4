"""Claim 4: linear warmup, cosine decay and Adam keep training stable. Read from the per-step
``step_loss``, ``step_grad_norm`` and ``step_clipped`` arrays of metrics.jsonl."""

from __future__ import annotations

import math

import numpy as np

SPIKE_K = 3.0  # a grad-norm spike: grad_norm > SPIKE_K x the median of the previous WINDOW steps
WINDOW = 50  # steps of history for the medians
MIN_HISTORY = 10  # steps of history before spikes are looked for
LOSS_MADS = 3.0  # a loss spike: loss above its WINDOW-step median by more than this many MADs
FOLLOW = 5  # steps after a grad-norm spike in which a loss spike counts as following it
LR_TOLERANCE = 1e-3  # the logged lr may differ from the formula by this fraction of the peak lr


def per_step(train_records: list[dict]) -> dict[str, np.ndarray] | None:
    """(step, loss, grad_norm, clipped) arrays over every logged step; None if the run predates them."""
    steps, loss, gnorm, clipped = [], [], [], []
    for r in train_records:
        if "step_loss" not in r:
            return None
        n = len(r["step_loss"])
        steps += range(r["step"] - n + 1, r["step"] + 1)
        loss += [np.nan if v is None else v for v in r["step_loss"]]
        gnorm += [np.nan if v is None else v for v in r["step_grad_norm"]]
        clipped += r["step_clipped"]
    if not steps:
        return None
    return {"step": np.array(steps), "loss": np.array(loss, float), "grad_norm": np.array(gnorm, float),
            "clipped": np.array(clipped, bool)}


def spikes(loss: np.ndarray, grad_norm: np.ndarray, k: float = SPIKE_K) -> list[dict]:
    """Grad-norm spikes (index, ratio to the trailing median) and whether a loss spike follows."""
    out = []
    for i in range(MIN_HISTORY, len(grad_norm)):
        past = grad_norm[max(0, i - WINDOW):i]
        med = np.nanmedian(past)
        if not (np.isfinite(grad_norm[i]) and grad_norm[i] > k * med):
            continue
        follows = False
        for j in range(i, min(i + FOLLOW + 1, len(loss))):
            window = loss[max(0, j - WINDOW):j]
            m = np.nanmedian(window)
            mad = np.nanmedian(np.abs(window - m))
            if np.isfinite(loss[j]) and loss[j] > m + LOSS_MADS * mad and mad > 0:
                follows = True
                break
        out.append({"index": i, "ratio": float(grad_norm[i] / med), "loss_spike_follows": follows})
    return out


def warmup_cosine(step: int, *, lr: float, warmup: int, total: int, final_fraction: float) -> float:
    """The schedule's formula, written out (not optax): lr at ``step`` applied updates."""
    warmup = min(warmup, max(total - 1, 0))
    if step < warmup:
        return lr * step / warmup
    decay = max(total, warmup + 1) - warmup
    t = min(step - warmup, decay) / decay
    end = lr * final_fraction
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * t))


def lr_deviation(train_records: list[dict], optim, total_steps: int) -> dict:
    """Largest |logged lr - formula| over the logged steps. A record at step s logs the lr of
    its last update, which had s - 1 updates applied before it (skipped steps aside)."""
    worst, at = 0.0, None
    for r in train_records:
        if r.get("lr") is None:
            continue
        expect = warmup_cosine(r["step"] - 1, lr=optim.lr, warmup=optim.warmup_steps, total=total_steps,
                               final_fraction=optim.final_lr_fraction)
        dev = abs(r["lr"] - expect)
        if dev >= worst:
            worst, at = dev, r["step"]
    return {"max_abs_deviation": worst, "relative_to_peak": worst / optim.lr, "at_step": at}
