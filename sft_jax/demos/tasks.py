"""Built-in demo data: short instruction tasks a tiny from-scratch model can learn in minutes on a CPU.

Each task's answer is computed from its input (nothing to recall), answers are 1-8 tokens, and letters and
digits are space-separated so each is its own token and the model can attend to them one by one:

    reverse    "Reverse the letters."  / "c a t"                     -> "t a c"
    sort       "Sort the digits."      / "5 2 8 1"                   -> "1 2 5 8"
    larger     "Which number is larger?" / "47 or 82"                -> "82"
    upper      "Write in capitals."    / "red fox"                   -> "RED FOX"
    repeat     "Repeat the word 3 times." / "cup"                    -> "cup cup cup"
    context    "What color is the hat?" / "Ann has a red cup. Bob has a blue hat." -> "blue"
               "Who has the cup?"       / (same context)              -> "Ann"

The held-out split is disjoint from training by construction: an example belongs to the split picked by a
hash of its prompt, so no held-out prompt ever appears in training, whatever the seeds and sizes.

``demo:noisy`` (the RL demo's SFT data) has the same prompts and a writers' habit in two tasks: 60% of
the "reverse" and "sort" demonstrations end with a sign-off, " Done." ("c a t" -> "t a c Done."), the
rest are bare. The answers are right; the habit is one decision at the end of the answer, so a model
trained on them signs off on most prompts of those tasks under greedy decoding, yet still stops at the
answer 35 to 40% of the time when sampling: a reward that wants the bare answer (exact match against
the task's correct one) has something to select. Its held-out split is the demo's, bare answers.
"""

from __future__ import annotations

import string
import zlib

import numpy as np

HELDOUT_PERCENT = 10  # share of the prompt space reserved for the held-out split
# demo:noisy: the tasks whose writers sign off (large prompt spaces, so their held-out prompts are mostly
# distinct), the share of their answers signed off (a majority, so greedy decoding shows it), and the sign-off
NOISY_TASKS = ("reverse", "sort")
NOISY_PERCENT = 60
SIGN_OFF = " Done."
WORDS = ("red", "fox", "cat", "dog", "sun", "map", "cup", "hat", "box", "pen", "bird", "fish",
         "tree", "moon", "star", "lamp", "road", "ship", "cake", "rain", "wind", "gold", "blue", "milk")  # fmt: skip
NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal")
COLORS = ("red", "blue", "green", "black", "white", "pink", "gray", "brown")
OBJECTS = ("cup", "hat", "box", "pen", "bag", "key", "book", "ball")


def _reverse(rng):
    letters = list(rng.choice(list(string.ascii_lowercase), size=rng.integers(3, 6)))
    return "Reverse the letters.", " ".join(letters), " ".join(reversed(letters))


def _sort(rng):
    digits = [str(d) for d in rng.integers(0, 10, size=rng.integers(3, 5))]
    return "Sort the digits.", " ".join(digits), " ".join(sorted(digits))


def _larger(rng):
    a, b = rng.choice(100, size=2, replace=False)
    return "Which number is larger?", f"{a} or {b}", str(max(a, b))


def _upper(rng):
    words = [str(w) for w in rng.choice(WORDS, size=rng.integers(1, 3))]
    return "Write in capitals.", " ".join(words), " ".join(words).upper()


def _repeat(rng):
    word, times = str(rng.choice(WORDS)), int(rng.integers(2, 5))
    return f"Repeat the word {times} times.", word, " ".join([word] * times)


def _context(rng):
    names = rng.choice(NAMES, size=2, replace=False)
    colors = rng.choice(COLORS, size=2, replace=False)
    objects = rng.choice(OBJECTS, size=2, replace=False)
    facts = " ".join(f"{n} has a {c} {o}." for n, c, o in zip(names, colors, objects))
    k = int(rng.integers(2))
    if rng.integers(2):
        return f"What color is the {objects[k]}?", facts, str(colors[k])
    return f"Who has the {objects[k]}?", facts, str(names[k])


TASKS = {"reverse": _reverse, "sort": _sort, "larger": _larger, "upper": _upper, "repeat": _repeat, "context": _context}


def is_heldout(instruction: str, input_text: str) -> bool:
    """Which split a prompt belongs to, by a stable hash (crc32) of the prompt."""
    return zlib.crc32(f"{instruction}\n{input_text}".encode()) % 100 < HELDOUT_PERCENT


def make_demo_examples(n: int, seed: int, split: str = "train", noisy: bool = False) -> list[dict]:
    """n alpaca-style examples {task, instruction, input, output} from `split` ("train" or "heldout");
    ``noisy``: demo:noisy's flawed training answers (the held-out split keeps the correct ones)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    # the habit has its own stream, so the prompts and every other answer stay the demo's; drawn per
    # example, not per prompt, so a prompt that comes up more than once gets both answers
    writers = np.random.default_rng([seed, 2])
    names = list(TASKS)
    out = []
    while len(out) < n:
        task = names[int(rng.integers(len(names)))]
        instruction, input_text, output = TASKS[task](rng)
        if is_heldout(instruction, input_text) == (split == "heldout"):
            if noisy and split == "train" and task in NOISY_TASKS and writers.random() < NOISY_PERCENT / 100:
                output += SIGN_OFF
            out.append({"task": task, "instruction": instruction, "input": input_text, "output": output})
    return out


def task_of(text: str) -> str:
    """The demo task of an instruction, or of any text holding one (a rendered prompt); "context" for both
    of its question forms."""
    for task, phrase in (("reverse", "Reverse the letters."), ("sort", "Sort the digits."),
                         ("larger", "Which number is larger?"), ("upper", "Write in capitals."),
                         ("repeat", "Repeat the word ")):
        if phrase in text:
            return task
    return "context"


def demo_tokenizer(seed: int = 0, vocab_size: int = 768):
    """A deterministic byte-level BPE (768 tokens: every demo answer is 1-5 tokens) with the built-in template."""
    from sft_jax.data.formats import BUILTIN_TEMPLATE, Renderer, to_messages
    from sft_jax.models.tokenizer import EOS, set_chat_template, train_bytelevel_bpe

    class _Eos:  # the renderer needs only the eos text to build training strings
        eos_token = EOS

    renderer = Renderer(_Eos(), None)
    texts = [
        "".join(text for text, _ in renderer.pieces(to_messages(example, "demo")))
        for example in make_demo_examples(4000, seed)
    ]
    tokenizer = train_bytelevel_bpe(texts, vocab_size)
    set_chat_template(tokenizer, BUILTIN_TEMPLATE)
    return tokenizer
