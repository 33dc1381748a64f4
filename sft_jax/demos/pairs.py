"""Preference pairs on the demo tasks (sft_jax.demos.tasks): chosen = the correct answer;
rejected = the SFT model's own wrong greedy answer where it errs, else a fixed corruption:

    reverse  -> not reversed (the input)*         sort    -> one adjacent swap of the sorted digits
    larger   -> the smaller number                upper   -> lower case (the input)
    repeat   -> one repeat fewer                  context -> the other fact's answer

    * a palindrome: rotated by one letter, or, if that is itself too ("w w w"), one letter added.

Rows are TRL-style {"prompt": [messages], "chosen": str, "rejected": str} plus
"task" and "rejected_source" ("model" | "corrupted"), which the data path ignores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sft_jax.demos.tasks import make_demo_examples


def corrupt(example: dict) -> str:
    """The task's fixed wrong answer for ``example`` (never equal to the correct one)."""
    task, text, answer = example["task"], example["input"], example["output"]
    if task == "reverse":
        letters = text.split()
        wrong = text if text != answer else " ".join(letters[1:] + letters[:1])
        if wrong == answer:  # a palindrome whose rotation is itself ("w w w"): one letter too many
            wrong = answer + " " + letters[-1]
    elif task == "sort":
        digits = answer.split()
        i = next((k for k in range(len(digits) - 1) if digits[k] != digits[k + 1]), None)
        if i is None:  # all digits equal: one digit changed instead
            digits[0] = str((int(digits[0]) + 1) % 10)
        else:
            digits[i], digits[i + 1] = digits[i + 1], digits[i]
        wrong = " ".join(digits)
    elif task == "larger":
        wrong = str(min(int(x) for x in text.split(" or ")))
    elif task == "upper":
        wrong = answer.lower()
    elif task == "repeat":
        words = answer.split()
        wrong = " ".join(words[:-1]) if len(words) > 1 else answer + " " + answer
    elif task == "context":
        facts = re.findall(r"(\w+) has a (\w+) (\w+)\.", text)
        names, colors = [f[0] for f in facts], [f[1] for f in facts]
        pool = colors if answer in colors else names
        wrong = next(x for x in pool if x != answer)
    else:
        raise ValueError(f"unknown demo task {task!r}")
    assert wrong != answer, (example, wrong)
    return wrong


def prompt_messages(example: dict) -> list[dict]:
    """The demo example's prompt as chat messages (what the SFT model was trained on)."""
    from sft_jax.data.formats import messages_of

    messages = messages_of(example, "demo")
    return [m for m in messages if m["role"] != "assistant"]


def make_pairs(examples: list[dict], predictions: list[str] | None = None) -> list[dict]:
    """One pair per example; ``predictions`` (greedy answers of a model) supply the rejected
    answer where they are wrong (after stripping), else the task's corruption is used."""
    rows = []
    for i, ex in enumerate(examples):
        guess = None if predictions is None else predictions[i].strip()
        model_made = bool(guess) and guess != ex["output"].strip()
        rows.append({"prompt": prompt_messages(ex), "chosen": ex["output"],
                     "rejected": guess if model_made else corrupt(ex), "task": ex["task"],
                     "rejected_source": "model" if model_made else "corrupted"})
    return rows


def demo_pair_examples(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training prompts and held-out prompts (the demo's disjoint held-out split)."""
    return make_demo_examples(n_train, seed, "train"), make_demo_examples(n_eval, seed, "heldout")


def write_jsonl(rows: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path
