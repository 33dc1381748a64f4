"""Generation during evaluation with real rows: eval prompts longer than the model, an eval
example the data path drops, and the host-side length checks of ``sampling.generate``; and
the optional Weights & Biases logging (through a stub ``wandb`` module)."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from sft_jax.config import ConfigError, load_config
from sft_jax.data import encode_prompt
from sft_jax.demos.tasks import demo_tokenizer
from sft_jax.models.gpt2 import GPT2Config
from sft_jax.inference.sampling import cut_prompt, generate
from sft_jax.objectives.sft import generation_examples
from data_fixtures import write_jsonl
from sft_jax.core.metrics import MetricsLogger
from sft_jax.core.loop import run
from sft_jax.objectives.sft import SFTObjective
from train_fixtures import REPO, metrics, tiny_config

LONG_PROMPT = " ".join(f"word{i}" for i in range(120))  # far more than 64 tokens


def chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def eval_rows() -> list[dict]:
    return [
        chat(f"{LONG_PROMPT} What is 2+2?", "4"),  # kept: the data path cuts its prompt from the left
        chat("Say it.", " ".join(["long answer"] * 60)),  # dropped: its response alone exceeds max_length
        chat("What is 3+3?", "6"),
        chat("What is 1+1?", "2"),
    ]


def test_long_eval_prompts_and_dropped_examples_in_a_real_run(tmp_path, monkeypatch):
    """Also W&B through the trainer: a stub ``wandb`` receives what metrics.jsonl holds."""
    wandb = StubWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    train_rows = [chat(f"What is {i}+{i}?", str(2 * i)) for i in range(40)]
    config = tiny_config(
        tmp_path / "run", "train.steps=2", "data.format=chat",
        f"data.train={write_jsonl(tmp_path / 'train.jsonl', train_rows)}",
        f"data.eval={write_jsonl(tmp_path / 'eval.jsonl', eval_rows())}",
        "train.eval_samples=2", "train.exact_match_examples=10", "train.max_new_tokens=8",
        "run.wandb_project=proj", "run.wandb_name=tiny")
    assert run(config, SFTObjective, devices=jax.devices()[:1]).status == "done"
    (final,) = metrics(tmp_path / "run", "eval")
    assert final["step"] == 2 and np.isfinite(final["eval_loss"])
    assert final["exact_match_n"] == 3  # the three examples the data path kept
    assert final["exact_match_skipped"] == 1  # the one it dropped
    samples = metrics(tmp_path / "run", "text")
    assert [s["tag"] for s in samples] == ["sample_0", "sample_1"]
    assert samples[0]["text"].count("word") < 120 and "What is 2+2?" in samples[0]["text"]  # cut from the left
    assert "| exact_match_n | 3 |" in (tmp_path / "run" / "report.md").read_text()
    (init,) = wandb.inits
    assert init["project"] == "proj" and init["name"] == "tiny" and init["config"]["train"]["steps"] == 2
    assert [(step, d["train/last_loss"]) for step, d in wandb.logged if "train/last_loss" in d] == \
        [(r["step"], r["last_loss"]) for r in metrics(tmp_path / "run")]
    assert (2, {k: v for k, v in final.items() if k not in ("step", "split", "time")}) in \
        [(step, {k[len("eval/"):]: v for k, v in d.items()}) for step, d in wandb.logged if "eval/eval_loss" in d]
    assert wandb.finished == 1


class StubWandb(types.ModuleType):
    """Records ``wandb.init(...)``, ``run.log(...)`` and ``run.finish()``."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished += 1


def test_wandb_is_process_0_only_and_never_imported_by_default(tmp_path, monkeypatch):
    wandb = StubWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    MetricsLogger(tmp_path / "other", enabled=False, total_steps=1, wandb_project="proj").close()
    MetricsLogger(tmp_path / "off", total_steps=1).close()
    assert wandb.inits == [] and not (tmp_path / "other").exists()
    code = "import sys, sft_jax.core.loop, sft_jax.objectives.sft; sys.exit('wandb' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_prompts_are_the_kept_examples_cut_from_the_left():
    tokenizer = demo_tokenizer(seed=0)
    cfg = tiny_config("unused", "data.format=chat").data
    examples = eval_rows()
    full = [encode_prompt(tokenizer, cfg, ex) for ex in examples]
    assert len(full[0]) > 64
    prompts, references, skipped = generation_examples(tokenizer, cfg, examples, 3, n_positions=64, max_new_tokens=8)
    assert skipped == 0 and references == ["4", " ".join(["long answer"] * 60), "6"]
    assert prompts[0] == full[0][-56:] and prompts[1:] == full[1:3]
    assert cut_prompt(list(range(10)), 8, 3) == [5, 6, 7, 8, 9]


def test_generation_lengths_are_checked_on_the_host():
    cfg = GPT2Config.preset("tiny", vocab_size=64, n_positions=32)
    params = None  # never reached: the checks come before any jitted call
    for prompt_len, new in ((30, 8), (4, 0), (4, -3)):
        with pytest.raises(ValueError, match=rf"prompt of {prompt_len} tokens \+ max_new_tokens={new} .*n_positions=32"):
            generate(params, cfg, [[1] * prompt_len], max_new_tokens=new, eos_id=0)
    with pytest.raises(ValueError, match="max_new_tokens=32 leaves no room"):
        cut_prompt([1, 2], 32, 32)


def test_max_new_tokens_must_leave_room_for_a_prompt():
    with pytest.raises(ConfigError, match="train.max_new_tokens=64 .*model.n_positions=64"):
        load_config(None, ["model.n_positions=64", "data.max_length=64", "train.max_new_tokens=64"])
    with pytest.raises(ConfigError, match="train.max_new_tokens=0"):
        load_config(None, ["train.max_new_tokens=0"])
