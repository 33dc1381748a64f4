"""Scoring with an exported reward model: pairs (prompt/chosen/rejected) or prompt/response rows.

Each response is rendered through the model's chat template (as training renders it),
closed with EOS, and scored at its last token that is not EOS; a prompt too long for the
model is cut from the left. Used by ``python -m sft_jax.reward score`` (and PPO's reward).
"""

from __future__ import annotations

import json

import numpy as np

from sft_jax.data import DataError
from sft_jax.data.formats import BUILTIN_TEMPLATE, FieldError, Renderer, encode_documents
from sft_jax.data.preference import to_pair
from sft_jax.models.heads import reward_read_position


class RewardScorer:
    """An exported reward model (``load_reward_hf``) with its tokenizer and template."""

    def __init__(self, model_dir):
        from sft_jax.models.hf_reward import load_reward_hf
        from sft_jax.models.tokenizer import load_tokenizer

        self.cfg, self.params, self.head = load_reward_hf(model_dir, dtype="float32")
        self.tokenizer = load_tokenizer(str(model_dir))
        template = getattr(self.tokenizer, "chat_template", None)
        self.renderer = Renderer(self.tokenizer, None if template in (None, BUILTIN_TEMPLATE) else template)

    def score(self, conversations: list[list[dict]], batch_size: int = 32) -> np.ndarray:
        """One float32 score per conversation (its last message is the assistant's response)."""
        from sft_jax.models.hf_reward import jax_scores

        docs = encode_documents(conversations, self.renderer, train_on_prompt=False, last_turn_only=True)
        eos, T = self.tokenizer.eos_token_id, self.cfg.max_position_embeddings
        seqs = []
        for tokens, supervised in zip(docs.tokens, docs.supervised):
            end = int(np.flatnonzero(supervised).max()) + 1  # through the closing eos
            seqs.append(tokens[:end][-T:])
        out = []
        for lo in range(0, len(seqs), batch_size):
            chunk = seqs[lo:lo + batch_size]
            width = min(T, -(-max(map(len, chunk)) // 8) * 8)
            rows = np.full((len(chunk), width), eos, np.int32)
            for r, s in enumerate(chunk):
                rows[r, :len(s)] = s
            index = np.array([reward_read_position(0, len(s)) for s in chunk], np.int32)
            out.append(jax_scores(self.params, self.head, self.cfg, rows, index))
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


def read_rows(path: str) -> list[tuple[str, list[dict], dict]]:
    """(kind, conversation(s), row) per JSONL line: kind "pair" (two conversations) or "response"."""
    items = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path} line {n}: not valid JSON ({e})") from None
        try:
            if isinstance(row, dict) and "response" in row:
                pair = to_pair({"prompt": row.get("prompt"), "chosen": row["response"], "rejected": row["response"]},
                               "preference")
                items.append(("response", [pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}]]))
            else:
                pair = to_pair(row, "preference")
                items.append(("pair", [pair["prompt"] + [{"role": "assistant", "content": pair[h]}]
                                       for h in ("chosen", "rejected")]))
        except FieldError as e:
            field = "response" if isinstance(row, dict) and "response" in row and e.field == "chosen" else e.field
            raise DataError(f"{path} line {n}: field '{field}': {e.detail}") from None
    if not items:
        raise DataError(f"{path}: no rows to score")
    return items


def score_file(model_dir, data_path: str, *, batch_size: int = 32) -> tuple[list[str], str]:
    """(one JSON line per row, a summary line): {"chosen_score", "rejected_score"} or {"score"}."""
    items = read_rows(data_path)
    scorer = RewardScorer(model_dir)
    conversations = [c for _, convs in items for c in convs]
    scores = scorer.score(conversations, batch_size).tolist()
    lines, at, right, pairs = [], 0, 0, 0
    for kind, convs in items:
        if kind == "pair":
            c, r = scores[at], scores[at + 1]
            lines.append(json.dumps({"chosen_score": c, "rejected_score": r}))
            right, pairs = right + (c > r), pairs + 1
        else:
            lines.append(json.dumps({"score": scores[at]}))
        at += len(convs)
    summary = f"pairs: {pairs}, accuracy (chosen scored higher): {right / pairs:.4f}" if pairs else ""
    return lines, summary
