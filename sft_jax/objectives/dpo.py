"""DPO: the policy against a frozen reference, the starting model, on the same mesh.

The policy starts from ``model.init_from`` (an SFT run's ``hf/`` export, say) or, for
``scratch``, from the seed; the reference is the same model, rebuilt from the same source
on every start and resume, placed beside the policy with the policy's shardings, with no
gradient, no optimizer state and no checkpoint (so it stays bit-equal).

Loss per pair (``preference_losses.dpo_loss`` over summed response log-probs): sigmoid,
ipo, label smoothing, and the optional RPO term (``dpo.rpo_alpha``: the chosen response's mean
token NLL) as ``dpo.*`` says. The reference's log-probs are computed per batch,
or with ``dpo.precompute_reference`` once for every training pair before the first step
and stored in ``OUTPUT_DIR/reference_logps/`` keyed by each pair's token hash (a resume
reads them back, so it stays exact; the processes decide together whether to read or compute
them, and with a gs:// output they live in the run's local directory). Evaluation: held-out
pair loss and reward accuracy, and a sampled KL to the reference,
E_{y ~ pi(.|x)}[log pi(y|x) - log ref(y|x)] over ``dpo.kl_prompts`` held-out prompts at
temperature 1 (one sample each, summed over the sampled tokens incl. EOS). Export: the policy
as an HF causal LM (SFT's export).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.core import mesh as shd
from sft_jax.core.step import batch_shardings, global_batch
from sft_jax.data.preference import assemble_pairs
from sft_jax.models.family import family_of
from sft_jax.objectives import sft
from sft_jax.objectives.pairs import PAIR_AXES, PairData, summed
from sft_jax.objectives.preference_losses import as_pairs, dpo_loss, sequence_logps, sequence_tokens
from sft_jax.runtime import distributed, faults
from sft_jax.runtime.paths import run_dirs

REFERENCE_DIR = "reference_logps"
KL_SEED = 1234  # sampling seed of the KL estimate (fixed: evaluations are comparable and resumable)


class DPOObjective(PairData, sft.SFTObjective):
    """SFT's parameters, starting point and export; DPO's batch, loss and evaluation."""

    metric_names = ("reward_accuracy", "chosen_reward", "rejected_reward", "margin", "chosen_logratio")
    frozen_is_start = True  # the reference is the starting model

    def __init__(self, config, model_cfg, tokenizer, hf_dir=None):
        sft.SFTObjective.__init__(self, config, model_cfg, tokenizer, hf_dir)
        self.dpo = config.dpo
        self.batch_axes = dict(PAIR_AXES)
        if self.dpo.precompute_reference:
            self.batch_axes["reference_logps"] = ("batch", None)
        self._reference_table = None
        if self.dpo.rpo_alpha:  # the chosen responses' mean token NLL, logged beside the DPO metrics
            self.metric_names = self.metric_names + ("nll",)

    # --- the frozen reference -------------------------------------------------------------------
    def frozen_params(self, mesh):
        shardings = shd.logical_shardings(mesh, self.abstract_params())
        params = self.initial_params(shardings)
        if params is None:  # scratch: the policy's own initialisation (core.step.init_state's key)
            params = jax.jit(self.init_params, out_shardings=shardings)(jax.random.key(self.config.train.seed))
        return params, shardings

    # --- the step -----------------------------------------------------------------------------
    def pair_loss(self, params, frozen, batch):
        policy = sequence_logps(params, batch, self.model_cfg, loss_chunk=self.loss_chunk)
        if "reference_logps" in batch:
            reference = batch["reference_logps"]
        else:
            reference = sequence_logps(frozen, batch, self.model_cfg, loss_chunk=self.loss_chunk)
        tokens = None
        if self.dpo.rpo_alpha:  # response tokens per sequence, for the chosen halves' mean NLL
            tokens = as_pairs(sequence_tokens(batch))[..., 0]
        return dpo_loss(as_pairs(policy), as_pairs(reference), batch["pair_mask"], beta=self.dpo.beta,
                        loss_type=self.dpo.loss_type, label_smoothing=self.dpo.label_smoothing, normalizer=1.0,
                        rpo_alpha=self.dpo.rpo_alpha, chosen_tokens=tokens)

    def loss(self, params, frozen, batch):
        total, metrics = self.pair_loss(params, frozen, batch)
        return total, summed(metrics, self.metric_names)

    def eval_batch(self, batch: dict) -> dict:
        if self.dpo.precompute_reference:  # the step's shape; eval_sums reads the reference per batch
            return {**batch, "reference_logps": np.zeros(batch["reward_index"].shape, np.float32)}
        return batch

    def eval_sums(self, params, frozen, batch):
        # held-out pairs always read the reference per batch (they have no precomputed values)
        batch = {k: v for k, v in batch.items() if k != "reference_logps"}
        total, metrics = self.pair_loss(params, frozen, batch)
        return total, metrics["reward_accuracy"] * metrics["pairs"], metrics["margin"] * metrics["pairs"], \
            metrics["pairs"]

    # --- precomputed reference log-probs (through the rollout hook: the run dir exists by then) ---
    def rollout(self, loop, step: int, batch: dict) -> dict:
        if not self.dpo.precompute_reference:
            return batch
        if self._reference_table is None:
            self._reference_table = self.reference_table(loop)
        ids = batch["pair_ids"]
        table = self._reference_table[np.maximum(ids, 0)] * (ids >= 0)[..., None]  # (R, Kp, 2)
        return {**batch, "reference_logps": table.reshape(ids.shape[0], -1).astype(np.float32)}

    def reference_file(self) -> Path:
        """Where the reference log-probs are stored: in the run's local directory (a gs:// run's
        staging directory, copied up with its logs at the end)."""
        return run_dirs(self.config)[0] / REFERENCE_DIR / f"{reference_key(self.config)}.npz"

    def reference_table(self, loop) -> np.ndarray:
        """(pairs, 2) reference log-probs of every training pair: read from the run directory if
        every process finds every pair's hash there, else computed in one pass on the mesh (by
        all processes together) and stored."""
        dataset = loop.iterator.dataset
        hashes = pair_hashes(dataset)
        path = self.reference_file()
        stored = None
        if path.is_file():
            with np.load(path) as file:
                where = {h: i for i, h in enumerate(file["hashes"].tolist())}
                if all(h in where for h in hashes.tolist()):
                    stored = file["logps"][[where[h] for h in hashes.tolist()]]
        # the pass below is a collective: a process that cannot read the table (another host's
        # disk, a table from other pairs) brings every process into it
        if distributed.on_every_process(stored is not None):
            return stored
        table = self.compute_reference(loop, dataset)
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
            np.savez(tmp, hashes=hashes, logps=table)
            os.replace(tmp, path)
        return table

    def compute_reference(self, loop, dataset) -> np.ndarray:
        E, T = self.config.micro_batch_size(), self.config.data.max_length
        axes = {k: PAIR_AXES[k] for k in ("tokens", "targets", "weights", "positions", "segment_ids", "reward_index")}
        shardings = batch_shardings(loop.mesh, axes)
        fn = jax.jit(lambda p, b: sequence_logps(p, b, self.model_cfg, loss_chunk=self.loss_chunk))
        per = E // jax.process_count()
        mine = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
        out = []
        for lo in range(0, len(dataset), E):
            rows = [[p] for p in range(lo, min(lo + E, len(dataset)))]
            rows += [[]] * (E - len(rows))
            batch = global_batch(assemble_pairs(dataset, rows[mine], T, 1), shardings, E)
            with shd.rules_context(loop.mesh):
                logps = fn(loop.frozen, batch)
            out.append(_gather(logps))
            faults.after_reference_batch(len(out))
        return np.concatenate(out)[:len(dataset)].astype(np.float32)

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self, loop, step: int) -> dict:
        results = {}
        sums = self.held_out_sums(loop)
        if sums is not None:
            loss, accuracy, margin, pairs = sums
            pairs = max(pairs, 1.0)
            results.update(eval_loss=loss / pairs, eval_reward_accuracy=accuracy / pairs, eval_margin=margin / pairs)
            if self.dpo.kl_prompts:
                results["eval_sampled_kl"] = self.sampled_kl(loop)
        return results

    def sampled_kl(self, loop) -> float:
        """Mean over held-out prompts of log pi(y|x) - log ref(y|x), y sampled from pi at temperature 1."""
        from sft_jax.inference.sampling import generate

        dataset = loop.eval_data
        n = min(self.dpo.kl_prompts, len(dataset))
        prompts = [dataset.docs.doc(2 * i)[0][:int(dataset.prompt_tokens[i])].tolist() for i in range(n)]
        policy, reference = loop.host_params(), loop.frozen
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            reference = multihost_utils.process_allgather(reference, tiled=True)
        context = self.model_cfg.max_position_embeddings
        max_new = min(self.config.train.max_new_tokens, context - max(map(len, prompts)))
        samples = generate(policy, self.model_cfg, prompts, max_new_tokens=max_new, temperature=1.0,
                           eos_id=self.tokenizer.eos_token_id, seed=KL_SEED)
        batch = _scoring_batch(prompts, samples, context)
        logp = jax.jit(lambda p, b: _summed_logp(self.model_cfg, p, b))
        return float(np.mean(np.asarray(logp(policy, batch)) - np.asarray(logp(reference, batch))))


def pair_hashes(dataset) -> np.ndarray:
    """sha1 of each pair's tokens and targets (chosen, then rejected), as fixed-width bytes."""
    out = []
    for i in range(len(dataset)):
        h = hashlib.sha1()
        for d in (2 * i, 2 * i + 1):
            tokens, supervised = dataset.docs.doc(d)
            h.update(np.asarray(tokens, np.int32).tobytes() + b"|" + np.asarray(supervised, np.int8).tobytes() + b"/")
        out.append(h.hexdigest().encode())
    return np.asarray(out, dtype="S40")


def reference_key(config) -> str:
    """What the reference's log-probs depend on besides the pair: the model source and its numerics."""
    m = config.model
    ident = [m.init_from, m.preset, m.n_positions, m.dtype, m.attention, config.train.seed, config.train.loss_chunk]
    if m.init_from != "scratch":
        ident = [os.path.abspath(m.init_from) if os.path.exists(m.init_from) else m.init_from, m.dtype, m.attention,
                 config.train.loss_chunk]
    return hashlib.sha1(repr(ident).encode()).hexdigest()[:16]


def _gather(x) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _scoring_batch(prompts, samples, n_positions) -> dict:
    """Rows prompt + sample (right-padded); weights on the sampled tokens' targets."""
    T = max(len(p) + len(s) for p, s in zip(prompts, samples))
    T = min(n_positions, -(-T // 8) * 8)
    B = len(prompts)
    tokens, targets = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    weights, segments = np.zeros((B, T), np.float32), np.zeros((B, T), np.int32)
    for r, (p, s) in enumerate(zip(prompts, samples)):
        seq = list(p) + list(s)
        tokens[r, :len(seq)] = seq
        targets[r, :len(seq) - 1] = seq[1:]
        weights[r, len(p) - 1:len(seq) - 1] = 1.0
        segments[r, :len(seq)] = 1
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    return {"tokens": tokens, "targets": targets, "weights": weights, "positions": positions, "segment_ids": segments}


def _summed_logp(cfg, params, batch):
    family = family_of(cfg)
    hidden = family.module(cfg).apply(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                                      return_hidden=True)
    nll = family.token_nll(params, hidden, batch["targets"], cfg)
    return -jnp.sum(nll * batch["weights"], axis=-1)
