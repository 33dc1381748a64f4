"""Preference pairs: formats, masks by construction, length policy, pair batch layout, bad rows, report."""

import json

import numpy as np
import pytest

from data_fixtures import small_tokenizer, write_jsonl
from sft_jax.data.config import DataConfig, DataError
from sft_jax.data.formats import decode
from sft_jax.data.preference import (
    PreferenceBatchIterator,
    build_preference_datasets,
    hh_pair,
    preference_eval_batches,
    to_pair,
)
from sft_jax.models.layers.attention import attention_mask

EOS = "<|endoftext|>"
HH = ("\n\nHuman: What is 12 + 30?\n\nAssistant: Let me think.\n\nHuman: Just the number.\n\nAssistant:"
      " It is 42.", "It is 24.")


def pair_rows(n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        rows.append({"prompt": f"Say the number {i}." + " again" * (i % 4), "chosen": f"It is {i}." * (1 + i % 3),
                     "rejected": f"No {i + 1}."})
    return rows


def build(tmp_path, rows, **overrides):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    fields = dict(train=path, eval_fraction=0.0, max_length=128, prefetch=0)
    fields.update(overrides)
    cfg = DataConfig(**fields)
    return build_preference_datasets(cfg, small_tokenizer(), n_positions=256, vocab_size=512, seed=0)


# ------------------------------------------------------------------------------------------------ formats


def test_formats():
    user = [{"role": "user", "content": "Hi"}]
    assert to_pair({"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}, "preference") == {
        "prompt": user, "chosen": "Hello", "rejected": "Go"}
    conversational = {"prompt": user, "chosen": [{"role": "assistant", "content": "Hello"}],
                      "rejected": [{"role": "assistant", "content": "Go"}]}
    assert to_pair(conversational, "preference") == {"prompt": user, "chosen": "Hello", "rejected": "Go"}
    implicit = {"chosen": user + [{"role": "assistant", "content": "Hello"}],
                "rejected": user + [{"role": "assistant", "content": "Go"}]}
    assert to_pair(implicit, "preference") == {"prompt": user, "chosen": "Hello", "rejected": "Go"}
    chosen, rejected = HH[0], HH[0].replace(" It is 42.", " " + HH[1])
    pair = to_pair({"chosen": chosen, "rejected": rejected}, "hh")
    # split at the last marker inside the common prefix (" It is " is shared too), parsed into turns
    assert pair["prompt"] == [{"role": "user", "content": "What is 12 + 30?"},
                              {"role": "assistant", "content": "Let me think."},
                              {"role": "user", "content": "Just the number."}]
    assert (pair["chosen"].strip(), pair["rejected"].strip()) == ("It is 42.", "It is 24.")
    # a marker that the two texts share only partly is not inside the common prefix
    assert hh_pair("\n\nHuman: a\n\nAssistant: b\n\nAssistant: x", "\n\nHuman: a\n\nAssistant: b\n\nAssistanT")[
        "chosen"].strip() == "b\n\nAssistant: x"


def test_format_detection(tmp_path):
    hh_rows = [{"chosen": HH[0], "rejected": HH[0].replace("42", "24")}]
    train, _, report = build(tmp_path, hh_rows)
    assert report.train.kept == 1 and train.pairs[0]["prompt"][0]["content"] == "What is 12 + 30?"
    with pytest.raises(DataError, match="cannot detect a preference format"):
        build(tmp_path, [{"instruction": "x", "output": "y"}])


# ------------------------------------------------------------------------------------- masks and layout


def test_masks_and_pair_layout(tmp_path):
    rows = pair_rows(12)
    train, _, report = build(tmp_path, rows, shuffle=False, max_length=256)
    tokenizer = small_tokenizer()
    it = PreferenceBatchIterator(train, global_batch_size=2, seed=0, max_length=256, shuffle=False, prefetch=0,
                                 loop=False)
    assert it.pairs_per_row >= 2
    seen = []
    for step in range(it.steps_per_epoch):
        batch = it.batch_at(step)
        R, T = batch["tokens"].shape
        Kp = it.pairs_per_row
        assert batch["pair_mask"].shape == (R, Kp) and batch["reward_index"].shape == (R, 2 * Kp)
        for r in range(R):
            mask = attention_mask(batch["segment_ids"][r:r + 1], batch["segment_ids"][r:r + 1])[0, 0]
            for j in np.flatnonzero(batch["pair_mask"][r]):
                c, rj = batch["segment_ids"][r] == 2 * j + 1, batch["segment_ids"][r] == 2 * j + 2
                assert c.any() and rj.any()
                assert not np.asarray(mask)[np.ix_(rj, c)].any()  # the halves never attend to each other
                texts = []
                for half, seg in ((0, c), (1, rj)):
                    weights, targets = batch["weights"][r][seg], batch["targets"][r][seg]
                    tokens = batch["tokens"][r][seg]
                    k = 2 * j + half
                    last = batch["reward_index"][r, k]
                    assert batch["segment_ids"][r, last] == k + 1 and batch["tokens"][r, last + 1] == 0  # then eos
                    # targets: exactly the response and its closing eos, nothing of the prompt
                    n_target = int(weights.sum())
                    assert weights[-1] == 0 and np.all(weights[-1 - n_target:-1] == 1) and weights[:-1 - n_target].sum() == 0
                    response = decode(tokenizer, targets[-1 - n_target:-1])
                    assert response.endswith(EOS)
                    prompt = decode(tokenizer, tokens[: len(tokens) - n_target])
                    assert prompt.endswith("### Assistant:\n")
                    texts.append((prompt, response[: -len(EOS)]))
                assert texts[0][0] == texts[1][0]  # one prompt
                seen.append((texts[0][0], texts[0][1], texts[1][1]))
    assert len(seen) == len(rows)
    for row in rows:
        assert any(p.endswith(row["prompt"] + "\n\n### Assistant:\n") and c == row["chosen"] and r == row["rejected"]
                   for p, c, r in seen)


def test_iterator_is_deterministic_and_splits_by_process(tmp_path):
    train, _, _ = build(tmp_path, pair_rows(20), max_length=256)
    kwargs = dict(global_batch_size=4, seed=3, max_length=256, prefetch=0)
    a = PreferenceBatchIterator(train, **kwargs)
    whole = a.batch_at(5)
    parts = [PreferenceBatchIterator(train, process_index=p, process_count=2, **kwargs).batch_at(5) for p in (0, 1)]
    for key in whole:
        np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    b = PreferenceBatchIterator(train, **kwargs)
    b.restore({"step": 5, "epoch": a.epoch_of(5), "global_batch_size": 4, "rows": a.first_row(5)})
    for key, value in next(b).items():
        np.testing.assert_array_equal(value, whole[key])
    # buckets: one pair per row; eval: every pair exactly once
    buckets = PreferenceBatchIterator(train, mode="buckets", buckets=(128,), **kwargs)
    assert buckets.pairs_per_row == 1 and buckets.batch_at(0)["pair_mask"].sum() == 4
    total = sum(b["pair_mask"].sum() for b in preference_eval_batches(train, batch_size=4, max_length=256))
    assert total == len(train)


# ------------------------------------------------------------------------------------------ length policy


def test_length_policy(tmp_path):
    long_prompt = {"prompt": "Give three tips for staying healthy. " * 6, "chosen": "Eat well.", "rejected": "No."}
    long_answer = {"prompt": "Hi", "chosen": "Eat well, sleep, and exercise. " * 8, "rejected": "No."}
    rows = [long_prompt, long_answer] + pair_rows(3)
    train, _, report = build(tmp_path, rows, max_length=64)
    assert report.train.dropped == {"response_too_long": 1}
    assert report.train.truncated >= 1 and report.train.kept == 4
    assert train.lengths.max() <= 64
    i = [p["chosen"] for p in train.pairs].index("Eat well.")
    chosen, rejected = train.docs.doc(2 * i)[0], train.docs.doc(2 * i + 1)[0]
    p = int(train.prompt_tokens[i])
    np.testing.assert_array_equal(chosen[:p], rejected[:p])  # the same prompt tail on both halves
    assert decode(small_tokenizer(), chosen[:p]).endswith("healthy.\n\n### Assistant:\n")
    truncated = report.train.truncated
    _, _, report = build(tmp_path, rows, max_length=64, truncation="drop")
    assert report.train.dropped == {"too_long": truncated + 1} and report.train.truncated == 0


# --------------------------------------------------------------------------------------------- bad rows


BAD = [
    ({"prompt": "Hi", "chosen": "Hello"}, "field 'rejected': missing"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "  "}, "field 'rejected': empty response"),
    ({"prompt": "Hi", "chosen": 3, "rejected": "No"}, "field 'chosen': expected a string or a list"),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": 5}], "rejected": "No"},
     r"field 'chosen\[0\].content': expected a string"),
]


@pytest.mark.parametrize("row,message", BAD)
def test_bad_rows_named(tmp_path, row, message):
    with pytest.raises(DataError, match=r"pairs.jsonl line 3: " + message):
        build(tmp_path, pair_rows(2) + [row])


def test_hh_without_marker_and_skip_mode(tmp_path):
    hh_rows = [{"chosen": HH[0], "rejected": HH[0].replace("42", "24")},
               {"chosen": "Human: hi Assistant: yes", "rejected": "Human: hi Assistant: no"}]
    with pytest.raises(DataError, match=r"pairs.jsonl line 2: field 'chosen': no '\\n\\nAssistant:'"):
        build(tmp_path, hh_rows, format="hh")
    rows = pair_rows(3) + [row for row, _ in BAD] + ["not json"]
    train, _, report = build(tmp_path, rows, on_bad_example="skip")
    assert report.train.dropped == {"empty_response": 1, "malformed_json": 1, "missing_field": 1, "wrong_type": 2}
    assert report.train.read == 8 and report.train.kept == 3 == len(train)
    md = report.to_markdown()
    assert "| pairs read | 8 |" in md and "| dropped | 5 (" in md and "| chosen |" in md and "| rejected |" in md
    json.loads(report.to_json())


def test_demo_corruptions_are_always_wrong():
    """Every task's fixed corruption differs from the answer, palindromes included ("w w w" once
    stopped the DPO demo), over the demo's own training and held-out prompts."""
    from sft_jax.demos.pairs import corrupt, demo_pair_examples, make_pairs

    train, held_out = demo_pair_examples(4000, 500)
    for ex in train + held_out:
        assert corrupt(ex).strip() != ex["output"].strip(), ex
    palindrome = {"task": "reverse", "instruction": "Reverse the letters.", "input": "w w w", "output": "w w w"}
    assert corrupt(palindrome) == "w w w w"
    assert corrupt(dict(palindrome, input="a b a", output="a b a")) == "b a a"
    (row,) = make_pairs([palindrome])
    assert row["rejected_source"] == "corrupted" and row["rejected"] != row["chosen"]
