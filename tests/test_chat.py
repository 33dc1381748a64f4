"""``python -m sft_jax.chat``: multi-turn replies equal HF transformers' greedy generate on the
same rendered conversation; old turns are dropped to fit (system kept); /reset, /exit, and the
non-TTY protocol (no banner, one reply per line, exit 0 at EOF). Checkpoints: tests/test_cli.py."""

from __future__ import annotations

import io
import sys

import pytest

from hf_fixtures import CHAT_TEMPLATE, EOS_ID, make_hf_model, save_hf_model, train_tokenizer
from sft_jax import chat
from sft_jax.generate import load

torch = pytest.importorskip("torch")
SEED = 1  # the weights test_generate checks for near-ties on the greedy path
NEW = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf_model = make_hf_model(seed=SEED)
    directory = save_hf_model(hf_model, tmp_path_factory.mktemp("chat") / "hf")
    tokenizer = train_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return hf_model, directory, load(str(directory))


def hf_reply(hf_model, tokenizer, messages) -> str:
    """HF's greedy reply to ``messages`` rendered with the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = hf_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=NEW, do_sample=False, pad_token_id=EOS_ID, eos_token_id=EOS_ID)
    return tokenizer.decode([t for t in out[0, len(ids):].tolist() if t != EOS_ID], skip_special_tokens=True)


def test_turns_match_hf_greedy_and_old_turns_are_dropped(model):
    hf_model, _, (cfg, params, tokenizer, eos_id) = model
    notices = []
    c = chat.Chat(cfg, params, tokenizer, eos_id, system="Be brief.", max_new_tokens=NEW, notice=notices.append)
    for turn, text in enumerate(["Hello world", "How are you today?", "The quick brown fox", "Add two numbers."]):
        got = "".join(c.reply(text))
        history = c.messages[:-1]  # what the reply was conditioned on, after any drops
        assert got == hf_reply(hf_model, tokenizer, history) and c.messages[-1] == {"role": "assistant", "content": got}
        assert history[0] == {"role": "system", "content": "Be brief."} and history[-1]["content"] == text
        assert len(c.encode(history)) <= cfg.n_positions - NEW
    # 64 positions hold about two turns: the oldest were dropped, whole, with a one-line notice each time
    assert notices and all("dropped" in n and "\n" not in n for n in notices)
    assert [m["role"] for m in c.messages[1:]] == ["user", "assistant"] * ((len(c.messages) - 1) // 2)
    assert c.messages[1]["content"] != "Hello world"


def test_sampling_flags_and_reset(model):
    _, _, (cfg, params, tokenizer, eos_id) = model
    greedy = chat.Chat(cfg, params, tokenizer, eos_id, max_new_tokens=NEW)
    first = "".join(greedy.reply("Hello world"))
    top1 = chat.Chat(cfg, params, tokenizer, eos_id, max_new_tokens=NEW, temperature=1.0, top_k=1, seed=3)
    assert "".join(top1.reply("Hello world")) == first  # top-k 1 samples the greedy token
    hot = chat.Chat(cfg, params, tokenizer, eos_id, max_new_tokens=NEW, temperature=50.0, seed=3)
    assert "".join(hot.reply("Hello world")) != first  # really sampling
    "".join(greedy.reply("again"))
    greedy.reset()
    assert greedy.messages == [] and "".join(greedy.reply("Hello world")) == first


def test_non_tty_protocol(model, monkeypatch, capsys):
    """No banner; one line per message; /reset starts over; /exit stops reading; exit 0."""
    _, directory, (cfg, params, tokenizer, eos_id) = model
    first = "".join(chat.Chat(cfg, params, tokenizer, eos_id, max_new_tokens=NEW).reply("Hello world"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello world\nHow are you?\n/reset\nHello world\n\n/exit\nnot read\n"))
    assert chat.main(["--model", str(directory), "--max-new-tokens", str(NEW)]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[-1] == "", lines  # three replies, each ending its line
    assert lines[0] == lines[2] == first.replace("\n", " ")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello world"))  # EOF without a newline
    assert chat.main(["--model", str(directory), "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == first.replace("\n", " ") + "\n"


def test_model_without_a_template_or_room_is_a_user_error(model, tmp_path, capsys):
    hf_model, directory, _ = model
    assert chat.main(["--model", str(directory), "--max-new-tokens", "64"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--max-new-tokens=64" in err[0], err
    plain = save_hf_model(hf_model, tmp_path / "plain")
    train_tokenizer().save_pretrained(str(plain))  # no chat template, like stock GPT-2
    capsys.readouterr()
    assert chat.main(["--model", str(plain)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no chat template" in err[0], err
