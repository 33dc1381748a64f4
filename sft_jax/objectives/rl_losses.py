"""The RL pieces of PPO and GRPO, masked and batched: pure jnp on (B,T) arrays.

Conventions: ``mask`` (B,T) is 1.0 on response tokens (those the policy sampled) and 0
elsewhere (prompt, padding, after EOS); position t of every (B,T) array describes the
token at t (its log-prob under a policy, the critic's value before it is emitted, ...).
Each loss comes as a masked *sum* plus the token count, because the training core
divides summed losses by the whole batch's normaliser (``objectives.base.Loss``); a
``masked_mean`` of the same terms is the per-token average. Tested against a NumPy
reference in tests/test_rl_losses.py. No rlax/distrax: their losses are rank-1 and unmasked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
GRPO_EPS = 1e-6  # GRPO's std floor: a group whose rewards are all equal gets advantage 0


def masked_sum(x: Array, mask: Array) -> Array:
    return jnp.sum(x * mask)


def masked_mean(x: Array, mask: Array) -> Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_var(x: Array, mask: Array) -> Array:
    """Population variance of ``x`` over the masked entries."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """(x - mean) / std over the masked entries (0 elsewhere); ``shift_mean=False`` keeps the mean."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logp: Array, ref_logp: Array, kind: str = "k1") -> Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1 / k3).

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = r - 1 - log r with
    r = pi_ref / pi (unbiased, never negative, lower variance)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator {kind!r}: expected k1 or k3")


def last_token_mask(mask: Array) -> Array:
    """1.0 at each row's last response token (rows without one: all 0). (B,T)."""
    T = mask.shape[1]
    idx = jnp.arange(T)[None, :]
    last = jnp.max(jnp.where(mask > 0, idx, -1), axis=1, keepdims=True)  # (B,1)
    return ((idx == last) & (last >= 0)).astype(mask.dtype)


def token_rewards(score: Array, kl: Array, mask: Array, beta) -> Array:
    """InstructGPT's per-token reward: -beta * KL at every response token, plus the
    sequence's score (B,) at its last response token. (B,T)."""
    return (-beta * kl) * mask + score[:, None] * last_token_mask(mask)


def gae(rewards: Array, values: Array, mask: Array, gamma: float, lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimation over response tokens: (advantages, returns), (B,T).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1},
    where anything past the last response token (or outside the mask) counts as 0: the
    episode ends there. Runs as a reverse ``lax.scan`` over T, batched over B."""
    mask = mask.astype(jnp.float32)
    values = values * mask

    def back(carry, xs):
        next_value, next_adv = carry
        r, v, m = xs
        delta = r + gamma * next_value - v
        adv = (delta + gamma * lam * next_adv) * m
        # outside the mask, pass the later token's value and advantage through unchanged
        return (jnp.where(m > 0, v, next_value), jnp.where(m > 0, adv, next_adv)), adv

    B = rewards.shape[0]
    zeros = jnp.zeros((B,), jnp.float32)
    xs = (rewards.T, values.T, mask.T)  # time-major (T,B)
    _, adv = jax.lax.scan(back, (zeros, zeros), xs, reverse=True)
    adv = adv.T
    return adv, (adv + values) * mask


def policy_loss(logp: Array, old_logp: Array, advantages: Array, mask: Array, clip: float):
    """PPO's clipped surrogate: (summed loss, summed clipped-token indicator, summed ratio),
    each over the masked tokens. Per token: max(-A r, -A clip(r, 1-eps, 1+eps))."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = jnp.maximum(unclipped, clipped)
    clipped_frac = (clipped > unclipped).astype(jnp.float32)
    return masked_sum(loss, mask), masked_sum(clipped_frac, mask), masked_sum(ratio, mask)


def value_loss(values: Array, old_values: Array, returns: Array, mask: Array, clip: float):
    """PPO's clipped value loss: (summed loss, summed clipped-token indicator) over masked
    tokens. Per token: 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)."""
    clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * jnp.maximum(unclipped, clipped)
    return masked_sum(loss, mask), masked_sum((clipped > unclipped).astype(jnp.float32), mask)


def entropy_from_logits(logits: Array) -> Array:
    """Per-position entropy of softmax(logits) (.., V) -> (..); -inf logits (padded vocab) contribute 0."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def grpo_advantages(rewards: Array, group_size: int) -> tuple[Array, Array]:
    """GRPO's group-relative advantages for rewards (N,) laid out as N/K groups of K
    consecutive answers to the same prompt: (r - group mean) / (group std + 1e-6), and 0
    in groups whose std < 1e-6. Returns (advantages (N,), number of such zero groups)."""
    groups = rewards.reshape(-1, group_size).astype(jnp.float32)  # (N/K, K)
    mean = jnp.mean(groups, axis=1, keepdims=True)
    std = jnp.std(groups, axis=1, keepdims=True)  # population std, as the GRPO paper's code
    flat = std < GRPO_EPS
    adv = jnp.where(flat, 0.0, (groups - mean) / (std + GRPO_EPS))
    return adv.reshape(-1), jnp.sum(flat)


# --- KL controllers (host side: plain floats, checkpointed as numbers) -------------------

@dataclasses.dataclass
class FixedKLController:
    beta: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state(self) -> dict:
        return {"beta": self.beta}


@dataclasses.dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n / horizon),
    after each rollout batch of n samples whose mean per-response KL was ``current_kl``."""

    beta: float
    target: float
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon

    def state(self) -> dict:
        return {"beta": self.beta}


# --- the critic's own learning rate ------------------------------------------------------

def scale_subtree(key: str, factor: float) -> optax.GradientTransformation:
    """Multiply the updates of ``params[key]`` by ``factor``, after clipping and AdamW: that
    subtree's learning rate (and weight decay step) is ``factor`` times the rest's, on the
    same schedule; the gradient clip stays global. Adam's step does not scale with the
    gradient, so scaling the loss or the gradient would not do this."""

    def update(updates, state, params=None):
        return {**updates, key: jax.tree.map(lambda u: u * factor, updates[key])}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# --- reward normalisation (host side) ------------------------------------------------------

@dataclasses.dataclass
class RunningMoments:
    """Mean and standard deviation of every reward seen so far, merged one rollout at a time
    (Chan et al.'s parallel update, float64); ``normalize`` folds the rollout in first, then
    maps each reward to (r - mean) / (std + eps). Its three numbers are checkpointed."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    eps: float = 1e-6

    @property
    def std(self) -> float:
        return float(np.sqrt(self.m2 / self.count)) if self.count else 1.0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1)
        n = float(x.size)
        if not n:
            return
        mean, m2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def normalize(self, x: np.ndarray) -> np.ndarray:
        self.update(x)
        return ((np.asarray(x, np.float64) - self.mean) / (self.std + self.eps)).astype(np.float32)

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def restore(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])
