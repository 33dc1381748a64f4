"""Opt-in studies that train (masking, data-size): short schedules through the real trainer
(``sft_jax.core.loop.run`` with the SFT objective) from the run's starting point and data,
written under RUN_DIR/analysis_runs/; the losses and the prompt-copy rate they are judged by."""

from __future__ import annotations

import dataclasses
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.core import checkpoint as ckpt
from sft_jax.analysis.run import AnalysisError, one_doc_rows, row_width
from sft_jax.models.family import ModelConfig, family_of
from sft_jax.objectives.sft import SFTObjective
from sft_jax.objectives.sft import summed_nll

STUDY_STEPS = 200  # optimizer steps per study run (at most the run's own)
LOSS_DOCS = 64  # documents per loss measurement (train subset, eval split)
LOSS_BATCH = 16  # documents per loss batch: one compile per width
COPY_PROMPTS = 32  # held-out prompts generated from for the prompt-copy rate
MAX_NGRAM = 4  # n = min(MAX_NGRAM, response length)
MIN_RESPONSE = 2  # responses shorter than this (in tokens) are excluded and counted


class _SubsetSFT(SFTObjective):
    """SFT trained on ``subset`` of the kept training documents (in the data path's order)."""

    def __init__(self, config, model_cfg, tokenizer, hf_dir=None, *, subset=None):
        super().__init__(config, model_cfg, tokenizer, hf_dir)
        self.subset = subset

    def build_data(self):
        data = super().build_data()
        if self.subset is None:
            return data
        from sft_jax.data import BatchIterator

        c, d, old = self.config, self.config.data, data.iterator
        if hasattr(old, "close"):
            old.close()
        iterator = BatchIterator(old.dataset.select(self.subset), global_batch_size=c.train.global_batch_size,
                                 seed=c.train.seed, mode=d.batching, max_length=d.max_length, buckets=d.buckets,
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 shuffle=d.shuffle, prefetch=d.prefetch)
        return data._replace(iterator=iterator)


def study_steps(run, requested: int = 0) -> int:
    total = run.config.train.steps or max((r["step"] for r in run.train_records()), default=STUDY_STEPS)
    return requested or max(1, min(STUDY_STEPS, total))


def short_run(run, name: str, steps: int, *, train_on_prompt=None, subset=None):
    """Train ``steps`` optimizer steps from the run's starting point into RUN_DIR/analysis_runs/NAME
    (replaced if present); the final parameters. Warmup is scaled by steps / the run's steps."""
    from sft_jax.core.loop import run as core_run

    c = run.config
    out = run.directory / "analysis_runs" / name
    if out.exists():
        shutil.rmtree(out)
    total = c.train.steps or steps
    warmup = min(c.optim.warmup_steps, max(0, round(c.optim.warmup_steps * steps / max(total, 1))))
    config = dataclasses.replace(
        c,
        run=dataclasses.replace(c.run, output_dir=str(out), export=False, wandb_project=None),
        train=dataclasses.replace(c.train, steps=steps, epochs=0, eval_every=0, eval_at_start=False,
                                  eval_samples=0, exact_match_examples=0, eval_max_batches=1, resume="never"),
        checkpoint=dataclasses.replace(c.checkpoint, every=0, keep=1),
        optim=dataclasses.replace(c.optim, warmup_steps=warmup),
        data=c.data if train_on_prompt is None else dataclasses.replace(c.data, train_on_prompt=train_on_prompt))
    result = core_run(config, functools.partial(_SubsetSFT, subset=subset))
    if result.status != "done":
        raise AnalysisError(f"{out}: the {name} study run stopped at step {result.step} ({result.status}); "
                            "run the study again")
    restored = ckpt.restore(out / "checkpoints", with_tokenizer=False)
    return result, restored["params"]


@functools.lru_cache(maxsize=8)
def _nll_fn(cfg: ModelConfig):
    model = family_of(cfg).module(cfg)
    return jax.jit(lambda p, b: (summed_nll(model, p, b, 0), jnp.sum(b["weights"])))


def mean_nll(cfg: ModelConfig, params, dataset, indices) -> float:
    """Mean NLL per supervised target of documents ``indices`` (one document per row, the
    dataset's own loss mask), in batches of LOSS_BATCH rows of one width: one compile."""
    indices = np.asarray(indices)
    width = row_width(dataset, indices)
    fn, nll, count = _nll_fn(cfg), 0.0, 0.0
    for lo in range(0, len(indices), LOSS_BATCH):
        idx = indices[lo:lo + LOSS_BATCH]
        pad = LOSS_BATCH - len(idx)
        batch = one_doc_rows(dataset, np.concatenate([idx, np.repeat(idx[-1:], pad)]), width)
        batch["weights"][len(idx):] = 0.0  # padding rows: no target
        s, n = fn(params, {k: jnp.asarray(v) for k, v in batch.items()})
        nll, count = nll + float(s), count + float(n)
    return nll / max(count, 1.0)


def prompt_copy_rate(prompts, responses, max_n: int = MAX_NGRAM, min_len: int = MIN_RESPONSE) -> dict:
    """Share of response n-grams (n = min(max_n, response length)) that occur in their prompt,
    pooled over responses; responses under ``min_len`` tokens are excluded and counted."""
    found = total = used = 0
    excluded = 0
    for prompt, resp in zip(prompts, responses):
        prompt, resp = list(prompt), list(resp)
        if len(resp) < min_len:
            excluded += 1
            continue
        n = min(max_n, len(resp))
        have = {tuple(prompt[i:i + n]) for i in range(len(prompt) - n + 1)}
        grams = [tuple(resp[i:i + n]) for i in range(len(resp) - n + 1)]
        found += sum(g in have for g in grams)
        total += len(grams)
        used += 1
    return {"rate": found / total if total else float("nan"), "ngrams": total, "responses": used,
            "excluded_short": excluded}


def copy_examples(run, n: int = COPY_PROMPTS):
    """(prompt ids, reference response ids) of the first ``n`` held-out examples, prompts cut to
    leave room for train.max_new_tokens."""
    from sft_jax.data.formats import encode_prompt
    from sft_jax.objectives.sft import _last_response
    from sft_jax.inference.sampling import cut_prompt

    c, prompts, refs = run.config, [], []
    for example in (run.eval_ds.examples or [])[:n] if run.eval_ds is not None else []:
        ids = encode_prompt(run.tokenizer, c.data, example)
        if ids:
            prompts.append(cut_prompt(ids, run.model_cfg.max_position_embeddings, c.train.max_new_tokens))
            refs.append(run.tokenizer(_last_response(example), add_special_tokens=False)["input_ids"])
    return prompts, refs


def greedy_responses(run, params, prompts) -> list[list[int]]:
    """Greedy generations (eos dropped), in fixed-size batches: one compile per prompt width."""
    from sft_jax.objectives.sft import GENERATE_BATCH
    from sft_jax.inference.sampling import generate

    eos, out = run.tokenizer.eos_token_id, []
    for lo in range(0, len(prompts), GENERATE_BATCH):
        chunk = prompts[lo:lo + GENERATE_BATCH]
        padded = chunk + [chunk[-1]] * (GENERATE_BATCH - len(chunk)) if len(prompts) > GENERATE_BATCH else chunk
        for ids in generate(params, run.model_cfg, padded, max_new_tokens=run.config.train.max_new_tokens,
                            eos_id=eos)[:len(chunk)]:
            out.append(ids[:-1] if ids and ids[-1] == eos else ids)
    return out
