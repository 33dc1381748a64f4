"""Where the scalar head of a reward model (and PPO's reward) reads a sequence, for every family.

transformers' ``*ForSequenceClassification`` reads the score at the rightmost token that is not
``pad_token_id``; an export sets pad = eos, so for a sequence closed by EOS that is its last token
before the EOS. The data pipeline's pair batches, PPO's rollout, the scorer and the export's
verification all take that position from ``reward_read_position``. Numpy only: the data package
imports it without jax. The head itself is ``layers.common.scores_at``.
"""

from __future__ import annotations

import numpy as np


def reward_read_position(start, length, ends_with_eos=True):
    """Index in its row of the last token of a sequence that occupies ``length`` slots from
    ``start`` and is not its closing EOS (the token before it; its last token when
    ``ends_with_eos`` is false), at least 0. Numbers or numpy arrays (broadcast)."""
    return np.maximum(np.asarray(start) + length - 1 - np.asarray(ends_with_eos, np.int64), 0)


def last_non_eos_index(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """(B, T) -> (B,): rightmost position whose token is not eos (0 if none): transformers' rule
    with pad = eos, which ``reward_read_position`` equals on rows right-padded with eos."""
    tokens = np.asarray(tokens)
    return np.argmax(np.arange(tokens.shape[-1]) * (tokens != eos_id), axis=-1)
