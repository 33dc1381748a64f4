"""The built-in demo tasks, their held-out split, scorer and tokenizer."""

from __future__ import annotations

import re

import numpy as np

from sft_jax.data import DataConfig, build_datasets, encode_prompt
from sft_jax.demos.tasks import demo_tokenizer, make_demo_examples
from sft_jax.objectives.rewards import exact_match
from sft_jax.demos.tasks import TASKS


def test_examples_are_deterministic_correct_and_short():
    a, b = make_demo_examples(300, seed=4), make_demo_examples(300, seed=4)
    assert a == b and a != make_demo_examples(300, seed=5)
    assert {e["task"] for e in a} == set(TASKS)
    tokenizer = demo_tokenizer()
    for e in a:
        answer = len(tokenizer(e["output"])["input_ids"])
        assert 1 <= answer <= 8, e
        assert e["output"] == _answer(e), e


def _answer(e) -> str:
    """Each task's answer recomputed from its prompt, independently of sft_jax.demos.tasks."""
    task, instruction, given = e["task"], e["instruction"], e["input"]
    if task == "reverse":
        return " ".join(given.split()[::-1])
    if task == "sort":
        return " ".join(sorted(given.split()))
    if task == "larger":
        return str(max(int(x) for x in given.split(" or ")))
    if task == "upper":
        return given.upper()
    if task == "repeat":
        times = int(re.fullmatch(r"Repeat the word (\d+) times\.", instruction).group(1))
        return " ".join([given] * times)
    assert task == "context", task
    facts = re.findall(r"(\w+) has a (\w+) (\w+)\.", given)
    assert len(facts) == 2 and " ".join(f"{n} has a {c} {o}." for n, c, o in facts) == given, given
    if m := re.fullmatch(r"What color is the (\w+)\?", instruction):
        return next(c for _, c, o in facts if o == m.group(1))
    m = re.fullmatch(r"Who has the (\w+)\?", instruction)
    return next(n for n, _, o in facts if o == m.group(1))


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


def test_noisy_demo_signs_off_on_most_reverse_and_sort_answers_and_nothing_else():
    """demo:noisy (the RL demo's SFT data): the demo's prompts and answers, except that 60% of the
    "reverse" and "sort" answers end with the sign-off; its held-out split is the demo's."""
    from sft_jax.demos.tasks import NOISY_PERCENT, NOISY_TASKS, SIGN_OFF, task_of

    clean, noisy = make_demo_examples(6000, seed=0), make_demo_examples(6000, seed=0, noisy=True)
    for a, b in zip(clean, noisy):
        assert (a["task"], a["instruction"], a["input"]) == (b["task"], b["instruction"], b["input"])
        assert b["output"] in (a["output"], a["output"] + SIGN_OFF) and task_of(a["instruction"]) == a["task"]
    for task in TASKS:
        signed = [b["output"] != a["output"] for a, b in zip(clean, noisy) if a["task"] == task]
        share = sum(signed) / len(signed)
        assert abs(share - NOISY_PERCENT / 100) < 0.05 if task in NOISY_TASKS else share == 0, (task, share)
    assert make_demo_examples(500, seed=0, split="heldout", noisy=True) == make_demo_examples(500, 0, "heldout")
    # as a data source: the flawed answers in training, the demo's held-out split for evaluation
    tokenizer = demo_tokenizer()
    cfg = DataConfig(train="demo:noisy", demo_train_examples=300, demo_eval_examples=20, max_length=64)
    train, eval_, _ = build_datasets(cfg, tokenizer, n_positions=64, vocab_size=len(tokenizer), seed=0)
    answers = [messages[-1]["content"] for messages in train.examples]
    assert answers == [e["output"] for e in make_demo_examples(300, 0, noisy=True)]
    assert [m[-1]["content"] for m in eval_.examples] == [e["output"] for e in make_demo_examples(20, 0, "heldout")]
