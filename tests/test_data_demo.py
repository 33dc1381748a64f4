"""The built-in demo tasks, their held-out split, scorer and tokenizer."""

from __future__ import annotations

import numpy as np

from sft_jax.data import DataConfig, build_datasets, demo_tokenizer, encode_prompt, exact_match, make_demo_examples
from sft_jax.data.demo import TASKS


def test_examples_are_deterministic_correct_and_short():
    a, b = make_demo_examples(300, seed=4), make_demo_examples(300, seed=4)
    assert a == b and a != make_demo_examples(300, seed=5)
    assert {e["task"] for e in a} == set(TASKS)
    tokenizer = demo_tokenizer()
    for e in a:
        answer = len(tokenizer(e["output"])["input_ids"])
        assert 1 <= answer <= 8, e
        if e["task"] == "reverse":
            assert e["output"].split() == e["input"].split()[::-1]
        if e["task"] == "sort":
            assert e["output"].split() == sorted(e["input"].split())
        if e["task"] == "larger":
            assert int(e["output"]) == max(int(x) for x in e["input"].split(" or "))


def test_heldout_prompts_never_appear_in_training():
    train = {(e["instruction"], e["input"]) for e in make_demo_examples(5000, seed=0)}
    heldout = {(e["instruction"], e["input"]) for e in make_demo_examples(500, seed=0, split="heldout")}
    assert len(heldout) > 300 and not train & heldout


def test_exact_match():
    assert exact_match(["a", " b ", "c"], ["a", "b", "d"]) == 2 / 3


def test_demo_tokenizer_is_deterministic_and_fits_demo_config():
    t1, t2 = demo_tokenizer(), demo_tokenizer()
    assert t1.get_vocab() == t2.get_vocab() and len(t1) <= 1024
    cfg = DataConfig(demo_train_examples=500, demo_eval_examples=50, max_length=64)
    train, eval_, report = build_datasets(cfg, t1, n_positions=64, vocab_size=len(t1), seed=0)
    assert len(train) == 500 and len(eval_) == 50 and report.train.dropped == {}
    example = make_demo_examples(1, seed=0, split="heldout")[0]
    prompt = encode_prompt(t1, cfg, example)
    tokens, supervised = eval_.doc(0)
    assert tokens[: len(prompt)].tolist() == prompt and not supervised[: len(prompt)].any()
    assert np.all(supervised[len(prompt) :])
