"""Preference objectives as pure JAX functions: summed response log-probs, DPO, the reward head and its loss.

Batch layout (built by ``sft_jax.data.preference``): R rows of T tokens, each row holding up to Kp whole pairs.
Both halves of a pair always share a row, so a pair never straddles a micro-batch, a process or a data shard:

    tokens, targets, weights, positions, segment_ids   (R, T)   as for SFT; weights = 1 where the target is a
                                                                response token (or its closing eos)
    pair_mask                                          (R, Kp)  1.0 for a real pair, 0.0 for an empty slot
    reward_index                                       (R, 2Kp) position in the row of each sequence's last
                                                                response token that is not eos (0 if empty)

Sequence k of a row (k = 2j chosen, 2j + 1 rejected of the row's j-th pair) is the segment k + 1, so the two
halves of a pair have distinct segment ids and never attend to each other. Per-sequence values come out as
(R, 2Kp) and per-pair values as (R, Kp, 2), [..., 0] chosen and [..., 1] rejected.

Losses return ``(loss, metrics)``: ``loss`` is the sum of per-pair losses over real pairs divided by
``normalizer`` (default: the real pairs in this call). Pass the global batch's pair count when accumulating
micro-batches, so the accumulated loss is the mean over the global batch. Metrics are means over the real
pairs of this call plus ``pairs``, their count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sft_jax.config import DPO_LOSS_TYPES
from sft_jax.models.family import ModelConfig, family_of, unwrap
from sft_jax.models.layers.common import scores_at

Array = jax.Array


# ------------------------------------------------------------------------------------------ log-probs


def segment_sums(values: Array, segment_ids: Array, num_sequences: int) -> Array:
    """Per-row sums of ``values`` (R, T) over each segment 1..num_sequences -> (R, num_sequences).

    Row-local, so it shards with the batch axis; padding (segment 0) is dropped."""
    sums = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=num_sequences + 1))(values, segment_ids)
    return sums[:, 1:]


def sequence_logps(params, batch: dict, cfg: ModelConfig, *, loss_chunk: int = 0) -> Array:
    """Summed response log-probs per sequence, (R, 2Kp) float32 (0 for empty slots)."""
    family = family_of(cfg)
    inner = unwrap(params)
    hidden = family.module(cfg).apply({"params": inner}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                      return_hidden=True)  # (R,T,D)
    nll = family.token_nll(inner, hidden, batch["targets"], cfg, chunk=loss_chunk)  # (R,T)
    num_sequences = batch["reward_index"].shape[1]
    return segment_sums(-nll * batch["weights"], batch["segment_ids"], num_sequences)


def sequence_tokens(batch: dict) -> Array:
    """Response (target) tokens per sequence, (R, 2Kp) float32, in the layout of sequence_logps."""
    return segment_sums(batch["weights"].astype(jnp.float32), batch["segment_ids"], batch["reward_index"].shape[1])


def as_pairs(per_sequence: Array) -> Array:
    """(R, 2Kp) -> (R, Kp, 2): [..., 0] chosen, [..., 1] rejected."""
    R, S = per_sequence.shape
    return per_sequence.reshape(R, S // 2, 2)


def _masked_mean(x: Array, mask: Array) -> Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _finish(per_pair_loss: Array, mask: Array, normalizer, metrics: dict) -> tuple[Array, dict]:
    normalizer = jnp.maximum(jnp.sum(mask), 1.0) if normalizer is None else normalizer
    loss = jnp.sum(per_pair_loss * mask) / normalizer
    out = {"loss": _masked_mean(per_pair_loss, mask), "pairs": jnp.sum(mask)}
    out.update({name: _masked_mean(value, mask) for name, value in metrics.items()})
    return loss, out


# ------------------------------------------------------------------------------------------------- DPO


def dpo_loss(policy_logps: Array, reference_logps: Array, pair_mask: Array, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, normalizer=None,
             rpo_alpha: float = 0.0, chosen_tokens: Array | None = None) -> tuple[Array, dict]:
    """DPO on summed response log-probs, each (..., 2) [chosen, rejected]; pair_mask (...).

    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
      sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)   (eps = label_smoothing)
      ipo:     (h - 1 / (2 beta))^2
    plus, with rpo_alpha > 0, rpo_alpha * (-log pi(y_c) / chosen_tokens): the chosen response's mean token NLL
    (its "nll" metric).
    Metrics: rewards beta * log-ratio of each half, their margin, reward accuracy (chosen reward > rejected),
    and chosen_logratio, the mean of log pi(y_c) - log ref(y_c) (nats, not scaled by beta).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: choose one of {DPO_LOSS_TYPES}")
    policy_logps = policy_logps.astype(jnp.float32)
    reference_logps = jax.lax.stop_gradient(reference_logps.astype(jnp.float32))
    logratio = policy_logps - reference_logps  # (..., 2)
    h = logratio[..., 0] - logratio[..., 1]
    if loss_type == "sigmoid":
        per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    else:
        per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    extra = {}
    if rpo_alpha:
        nll = -policy_logps[..., 0] / jnp.maximum(chosen_tokens.astype(jnp.float32), 1.0)
        per_pair = per_pair + rpo_alpha * nll
        extra["nll"] = jax.lax.stop_gradient(nll)
    rewards = jax.lax.stop_gradient(beta * logratio)
    mask = pair_mask.astype(jnp.float32)
    return _finish(per_pair, mask, normalizer, {**extra,
        "reward_accuracy": (rewards[..., 0] > rewards[..., 1]).astype(jnp.float32),
        "chosen_reward": rewards[..., 0],
        "rejected_reward": rewards[..., 1],
        "margin": rewards[..., 0] - rewards[..., 1],
        "chosen_logratio": jax.lax.stop_gradient(logratio[..., 0]),
    })


# ----------------------------------------------------------------------------------------- reward model


def init_reward_head(cfg: ModelConfig, rng: Array) -> dict:
    """Bias-free scalar head, HF's ``score`` Linear(D, 1, bias=False) with the model's init std."""
    kernel = jax.random.normal(rng, (cfg.hidden_size, 1), jnp.float32) * cfg.initializer_range
    return {"score": {"kernel": kernel}}


def reward_scores(params, head: dict, batch: dict, cfg: ModelConfig) -> Array:
    """Reward per sequence, (R, 2Kp): the head read at each sequence's last response token that is not eos
    (``reward_index``, see sft_jax.models.heads), where transformers' *ForSequenceClassification reads it
    with pad_token_id = eos_token_id."""
    hidden = family_of(cfg).module(cfg).apply({"params": unwrap(params)}, batch["tokens"], batch["positions"],
                                              batch["segment_ids"], return_hidden=True)
    return scores_at(head, hidden, batch["reward_index"])


def reward_loss(chosen_scores: Array, rejected_scores: Array, pair_mask: Array, *, margin=0.0,
                normalizer=None) -> tuple[Array, dict]:
    """Pairwise (Bradley-Terry) loss -log sigma(r_c - r_r - margin); margin a scalar or per pair.

    Metrics: accuracy (r_c > r_r), margin (mean r_c - r_r), chosen_score, rejected_score."""
    chosen_scores = chosen_scores.astype(jnp.float32)
    rejected_scores = rejected_scores.astype(jnp.float32)
    diff = chosen_scores - rejected_scores
    per_pair = -jax.nn.log_sigmoid(diff - margin)
    mask = pair_mask.astype(jnp.float32)
    return _finish(per_pair, mask, normalizer, {
        "accuracy": (diff > 0).astype(jnp.float32),
        "margin": jax.lax.stop_gradient(diff),
        "chosen_score": jax.lax.stop_gradient(chosen_scores),
        "rejected_score": jax.lax.stop_gradient(rejected_scores),
    })
