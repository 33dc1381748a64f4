"""What the reward model and DPO share: preference pairs as the batch, normalised by pairs.

The batch is the layout of ``sft_jax.objectives.preference_losses`` (both halves of a pair in
one row, so a pair never straddles a micro-batch or a data shard); the loss of a global
batch is a mean over its real pairs (``normalizer``: ``pair_mask.sum()``). Held-out pairs
are read in one ordered pass at each evaluation and summed on the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.data.preference import PreferenceBatchIterator, preference_eval_batches
from sft_jax.data.run import run_datasets
from sft_jax.objectives.base import Data

PAIR_AXES = {
    **{k: ("batch", "length") for k in ("tokens", "targets", "weights", "positions", "segment_ids")},
    "pair_mask": ("batch", None),
    "reward_index": ("batch", None),
}


class PairIterator(PreferenceBatchIterator):
    """Also yields ``pair_ids`` (R, Kp): the dataset index of each slot's pair, -1 if empty
    (host-side only: the step reads the arrays ``batch_axes`` names)."""

    def _assemble(self, rows: list, width: int) -> dict[str, np.ndarray]:
        batch = super()._assemble(rows, width)
        ids = np.full((len(rows), self.pairs_per_row), -1, np.int32)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = row
        batch["pair_ids"] = ids
        return batch


class PairData:
    """Mixin: the data, the pair normaliser, the step's counts and the held-out pass."""

    batch_axes = PAIR_AXES

    def build_data(self) -> Data:
        c, d = self.config, self.config.data
        train_ds, eval_ds, report = run_datasets(c, self.tokenizer, self.model_cfg, pairs=True)
        iterator = PairIterator(train_ds, global_batch_size=c.train.global_batch_size, seed=c.train.seed,
                                mode=d.batching, max_length=d.max_length, buckets=d.buckets,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                shuffle=d.shuffle, prefetch=d.prefetch, max_segments=d.max_segments_per_row)
        return Data(iterator, eval_ds, report.to_markdown())

    def normalizer(self, batch):
        return jnp.maximum(jnp.sum(batch["pair_mask"].astype(jnp.float32)), 1.0)

    def batch_metrics(self, batch):
        return {"supervised_tokens": jnp.sum(batch["weights"].astype(jnp.float32)),
                "tokens": jnp.sum(batch["segment_ids"] > 0)}

    def eval_batch(self, batch: dict) -> dict:
        """A held-out batch as the eval step reads it (DPO adds its placeholder arrays)."""
        return batch

    def held_out_sums(self, loop) -> list | None:
        """``loop.eval_fn`` summed over the held-out pairs (one ordered pass), or None."""
        c, d = self.config, self.config.data
        eval_ds = loop.eval_data
        if eval_ds is None or not len(eval_ds):
            return None
        batches = preference_eval_batches(eval_ds, batch_size=c.micro_batch_size(), max_length=d.max_length,
                                          mode=d.batching, buckets=d.buckets, process_index=jax.process_index(),
                                          process_count=jax.process_count(), max_segments=d.max_segments_per_row)
        return loop.held_out_sums(self.eval_batch(batch) for batch in batches)


def summed(metrics: dict, names) -> dict:
    """Per-pair means of ``preference_losses`` metrics back to sums (the core divides by the pairs)."""
    return {name: metrics[name] * metrics["pairs"] for name in names}
