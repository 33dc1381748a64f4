"""Supervised fine-tuning: next-token NLL on the response tokens of packed or bucketed rows.

The batch is five (rows, length) arrays; the loss of a global batch is its summed,
weighted NLL over its supervised-token count. Evaluation: held-out loss and perplexity, a
few greedy samples into the log, exact match on held-out prompts. Export: a transformers
causal-LM directory of the model's family that verifies itself.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from sft_jax.core import step as core
from sft_jax.core.step import TrainState
from sft_jax.data import BatchIterator, chat_template, encode_prompt, eval_batches
from sft_jax.data.run import run_datasets
from sft_jax.objectives.rewards import exact_match
from sft_jax.data.formats import decode
from sft_jax.models.family import ModelConfig, family_of, stop_token_ids
from sft_jax.objectives.base import Data, Loss, Objective

BATCH_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")
GENERATE_BATCH = 64  # prompts per generate call (a fixed shape, so it compiles once per prompt length)


def summed_nll(model, params, batch: dict, loss_chunk: int) -> jax.Array:
    """sum over positions of weight * NLL, in float32; ``model`` is a family's module."""
    hidden = model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True)
    nll = family_of(model.config).token_nll(params, hidden, batch["targets"], model.config, chunk=loss_chunk)  # (B,T)
    return jnp.sum(nll * batch["weights"].astype(jnp.float32))


def init_params(model_cfg: ModelConfig, key):
    """The family's (HF's) initialisation from ``key`` (unboxed)."""
    return family_of(model_cfg).init_params(model_cfg, key)


class SFTLoss(Loss):
    """The SFT step: weighted NLL over supervised tokens; no frozen parameters."""

    batch_axes = {k: ("batch", "length") for k in BATCH_KEYS}

    def __init__(self, model_cfg: ModelConfig, loss_chunk: int = 0):
        self.model, self.loss_chunk = family_of(model_cfg).module(model_cfg), loss_chunk

    def loss(self, params, frozen, batch):
        return summed_nll(self.model, params, batch, self.loss_chunk), {}

    def normalizer(self, batch):
        return jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

    def batch_metrics(self, batch):
        return {"supervised_tokens": jnp.sum(batch["weights"].astype(jnp.float32)),
                "tokens": jnp.sum(batch["segment_ids"] > 0)}

    def eval_sums(self, params, frozen, batch):
        """(summed NLL, supervised tokens)."""
        return summed_nll(self.model, params, batch, self.loss_chunk), jnp.sum(batch["weights"].astype(jnp.float32))


class SFTObjective(Objective, SFTLoss):
    supports_lora = True

    def __init__(self, config, model_cfg: ModelConfig, tokenizer, hf_dir=None):
        Objective.__init__(self, config, model_cfg, tokenizer, hf_dir)
        SFTLoss.__init__(self, model_cfg, config.train.loss_chunk)

    # --- parameters -------------------------------------------------------------------------
    def abstract_params(self):
        return family_of(self.model_cfg).param_shapes(self.model_cfg)

    def init_params(self, key):
        return init_params(self.model_cfg, key)

    def initial_params(self, shardings):
        if self.hf_dir is None:
            return None
        from sft_jax.models import hf_io

        return hf_io.load_hf(self.hf_dir, shardings=shardings, dtype=self.model_cfg.dtype)[1]

    # --- data ---------------------------------------------------------------------------------
    def build_data(self) -> Data:
        c, d = self.config, self.config.data
        train_ds, eval_ds, report = run_datasets(c, self.tokenizer, self.model_cfg, pairs=False)
        iterator = BatchIterator(train_ds, global_batch_size=c.train.global_batch_size, seed=c.train.seed,
                                 mode=d.batching, max_length=d.max_length, buckets=d.buckets,
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 shuffle=d.shuffle, prefetch=d.prefetch, max_segments=d.max_segments_per_row)
        # eval examples the data path dropped: no sample or exact match for them, but counted
        self.eval_dropped = sum(report.eval.dropped.values()) if report.eval else 0
        return Data(iterator, eval_ds, report.to_markdown())

    def decoding_params(self, loop):
        """The causal LM's parameters, readable whole by every process (generation, export);
        objectives that train more than the LM (PPO's critic) return just the LM."""
        return loop.host_params()

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, loop, step: int) -> dict:
        c, d = self.config, self.config.data
        eval_ds = loop.eval_data
        results: dict = {}
        if eval_ds is not None and len(eval_ds):
            batches = eval_batches(eval_ds, batch_size=c.micro_batch_size(), max_length=d.max_length,
                                   mode=d.batching, buckets=d.buckets, process_index=jax.process_index(),
                                   process_count=jax.process_count(), max_segments=d.max_segments_per_row)
            nll, count = loop.held_out_sums(batches)
            results["eval_loss"] = nll / max(count, 1.0)
            results["eval_ppl"] = math.exp(min(results["eval_loss"], 50.0))
            results.update(self.generation_eval(loop, step))
        return results

    def generation_eval(self, loop, step: int) -> dict:
        """A few samples into the log, and greedy exact match on held-out prompts."""
        t = self.config.train
        prompts, references, skipped = generation_examples(
            self.tokenizer, self.config.data, loop.eval_data.examples or [],
            max(t.eval_samples, t.exact_match_examples), n_positions=self.model_cfg.max_position_embeddings,
            max_new_tokens=t.max_new_tokens)
        n = len(prompts)
        if n == 0:
            return {}
        predictions = self.generate(loop, prompts)
        for i in range(min(t.eval_samples, n)):
            prompt_text = decode(self.tokenizer, prompts[i])
            loop.logger.log_text(step, f"sample_{i}", f"{prompt_text}{predictions[i]}\n[reference] {references[i]}")
        if t.exact_match_examples:
            k = min(t.exact_match_examples, n)
            return {"exact_match": exact_match(predictions[:k], references[:k]), "exact_match_n": k,
                    "exact_match_skipped": getattr(self, "eval_dropped", 0) + skipped,
                    **self.exact_match_parts(prompts[:k], predictions[:k], references[:k])}
        return {}

    def exact_match_parts(self, prompts: list[list[int]], predictions: list[str], references: list[str]) -> dict:
        """Exact match on parts of the held-out prompts, beside the whole (none here; the RL demo's per task)."""
        return {}

    def generate(self, loop, prompts: list[list[int]]) -> list[str]:
        from sft_jax.inference.sampling import generate

        params = self.decoding_params(loop)
        if jax.process_index() != 0:  # samples and exact match are logged by process 0 alone
            return [""] * len(prompts)
        if jax.process_count() > 1:  # generate on process 0's first device, outside the global mesh
            params = jax.device_put(params, jax.local_devices()[0])
        eos = self.tokenizer.eos_token_id
        max_new = self.config.train.max_new_tokens  # prompts are cut to fit (generation_examples)
        texts = []
        for lo in range(0, len(prompts), GENERATE_BATCH):
            chunk = prompts[lo:lo + GENERATE_BATCH]
            padded = chunk + [chunk[-1]] * (GENERATE_BATCH - len(chunk)) if len(prompts) > GENERATE_BATCH else chunk
            stops = stop_token_ids(self.model_cfg)  # a reply ends at any of the model's end-of-turn ids
            outs = generate(params, self.model_cfg, padded, max_new_tokens=max_new, eos_id=eos, stop_ids=stops)
            for ids in outs[:len(chunk)]:
                ids = ids[:-1] if ids and ids[-1] in (eos, *stops) else ids
                texts.append(decode(self.tokenizer, ids))
        return texts

    # --- export -------------------------------------------------------------------------------
    def export(self, loop, out: Path) -> list[str]:
        """A self-verifying HF causal-LM directory at ``out/hf``."""
        export_dir = out / "hf"
        params = self.decoding_params(loop)
        if jax.process_index() == 0:
            from sft_jax.models.hf_io import export_hf

            export_hf(params, self.model_cfg.replace(dtype="float32", remat="none"), export_dir,
                      tokenizer=self.tokenizer, chat_template=chat_template(self.config.data), verify=True,
                      overwrite=True)
        return [f"HF export:   {export_dir}", f"chat with it: python -m sft_jax.chat --model {export_dir}"]


def generation_examples(tokenizer, data_cfg, examples: list, n: int, *, n_positions: int, max_new_tokens: int):
    """(prompts, references, skipped) for samples and exact match: the first ``n`` of ``examples``
    (the eval examples the data path kept), each prompt cut from the left to leave room for
    ``max_new_tokens``; an example whose prompt renders to no token is skipped and counted."""
    from sft_jax.inference.sampling import cut_prompt

    prompts, references, skipped = [], [], 0
    for example in examples:
        if len(prompts) == n:
            break
        ids = encode_prompt(tokenizer, data_cfg, example)
        if not ids:
            skipped += 1
            continue
        prompts.append(cut_prompt(ids, n_positions, max_new_tokens))
        references.append(_last_response(example))
    return prompts, references, skipped


def _last_response(example) -> str:
    messages = example if isinstance(example, list) else example.get("messages", [])
    replies = [m["content"] for m in messages if m.get("role") == "assistant"]
    return replies[-1] if replies else ""


# --- the SFT step without a run (sft_jax.bench, analysis, tests) ---------------------------
# The shared step of ``sft_jax.core.step`` with the SFT loss; see there for accumulation and
# the non-finite guard.

def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings, shardings) for ``model_cfg`` on ``mesh``; allocates nothing."""
    return core.state_shardings(family_of(model_cfg).param_shapes(model_cfg), tx, mesh)


def init_state(model_cfg: ModelConfig, tx, mesh, shardings: TrainState, *, seed: int = 0, params=None) -> TrainState:
    """A train state created directly in its shards: parameters from ``seed`` (HF's init)
    unless ``params`` (already sharded, e.g. from ``load_hf``) are given."""
    return core.init_state(lambda key: init_params(model_cfg, key), tx, shardings, seed=seed, params=params)


def accumulated_grads(model, params, batch: dict, n_micro: int, loss_chunk: int = 0, micro_sharding=None):
    """(loss, grads) of the global batch: scan over ``n_micro`` micro-batches, each one's
    summed NLL divided by the supervised-token count of the *whole* batch, summed."""
    micro = None if micro_sharding is None else {k: micro_sharding for k in BATCH_KEYS}
    loss, grads, _ = core.accumulated_grads(SFTLoss(model.config, loss_chunk), params, None, batch, n_micro, micro)
    return loss, grads


def make_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    mesh, shardings: TrainState, n_micro: int = 1, loss_chunk: int = 0,
                    max_nonfinite_steps: int = 10, clip_norm: float = 0.0) -> Callable:
    """``step(state, batch) -> (state, metrics)``, jitted with the state donated.

    ``batch``: dict of global (G, T) arrays sharded over data x fsdp. ``metrics`` are
    device scalars; nothing in here waits on the host."""
    return core.make_train_step(SFTLoss(model_cfg, loss_chunk), tx, schedule, mesh=mesh, shardings=shardings,
                                n_micro=n_micro, max_nonfinite_steps=max_nonfinite_steps, clip_norm=clip_norm)


def make_eval_step(model_cfg: ModelConfig, *, mesh, shardings: TrainState, loss_chunk: int = 0) -> Callable:
    """``eval_step(params, batch) -> (summed NLL, supervised tokens)`` as device scalars."""
    return core.make_eval_step(SFTLoss(model_cfg, loss_chunk), mesh=mesh, param_shardings=shardings.params)
