"""Data as other tools write it: ShareGPT, TRL's conversational rows, LLaMA-Factory's pairs and renamed columns.

Reference: the same conversation written in alpaca (or today's preference format) gives the token ids and
loss masks (the pair rows) every other shape must give; bad rows in the new shapes stop with one error naming
the file, the line and the field, or are skipped and counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_fixtures import small_tokenizer, write_jsonl

from sft_jax.data import DataConfig, DataError, build_datasets
from sft_jax.data.preference import build_preference_datasets

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"

# (instruction, input, output): single-turn, so that alpaca can hold them too
CONVERSATIONS = [("Give three tips for staying healthy.", "", "Eat well, sleep enough, and exercise."),
                 ("Translate to French.", "Good morning", "Bonjour"),
                 ("Sort the digits.", "3 1 2", "1 2 3")]
MAPPED = {"messages": "dialog", "role": "speaker", "content": "text", "user": "customer", "assistant": "agent"}


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def build(tok, train, **kw):
    cfg = DataConfig(train=train, eval_fraction=0.0, cache="off", **kw)
    return build_datasets(cfg, tok, n_positions=1024, vocab_size=len(tok), seed=0)


def build_pairs(tok, train, **kw):
    cfg = DataConfig(train=train, eval_fraction=0.0, max_length=256, **kw)
    return build_preference_datasets(cfg, tok, n_positions=1024, vocab_size=len(tok), seed=0)


def assert_same_documents(ds, reference):
    for name in ("tokens", "supervised", "offsets", "response_tokens"):
        np.testing.assert_array_equal(getattr(ds, name), getattr(reference, name), err_msg=name)
    assert (ds.examples is None and reference.examples is None) or list(ds.examples) == list(reference.examples)


def user_text(instruction, extra):
    return instruction + ("\n\n" + extra if extra else "")


def shapes():
    """Each conversation in every shape: {name: (rows, extra DataConfig fields)}."""
    turns = [(user_text(i, x), o) for i, x, o in CONVERSATIONS]
    return {
        "chat": ([{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
                  for u, a in turns], {}),
        "sharegpt": ([{"conversations": [{"from": "human", "value": u}, {"from": "gpt", "value": a}]}
                      for u, a in turns], {}),
        "sharegpt_messages_user_assistant": ([{"messages": [{"from": "user", "value": u},
                                                            {"from": "assistant", "value": a}]} for u, a in turns], {}),
        "trl_conversational": ([{"prompt": [{"role": "user", "content": u}],
                                 "completion": [{"role": "assistant", "content": a}]} for u, a in turns], {}),
        "prompt_completion": ([{"prompt": u, "completion": a} for u, a in turns], {}),
        "mapped_chat": ([{"dialog": [{"speaker": "customer", "text": u}, {"speaker": "agent", "text": a}]}
                         for u, a in turns], {"columns": MAPPED}),
        "mapped_alpaca": ([{"question": i, "context": x, "answer": o} for i, x, o in CONVERSATIONS],
                          {"columns": {"instruction": "question", "input": "context", "output": "answer"}}),
    }


def test_one_conversation_in_every_format_gives_the_same_tokens_and_masks(tmp_path, tok):
    reference, _, _ = build(tok, write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": i, "input": x, "output": o} for i, x, o in CONVERSATIONS]))
    for name, (rows, extra) in shapes().items():
        ds, _, report = build(tok, write_jsonl(tmp_path / f"{name}.jsonl", rows), **extra)
        assert_same_documents(ds, reference)
        (fmt, columns), = report.train.formats.values()
        assert fmt == {"chat": "chat", "mapped_chat": "chat", "mapped_alpaca": "alpaca", "trl_conversational":
                       "prompt_completion", "prompt_completion": "prompt_completion"}.get(name, "sharegpt"), name
        assert columns == extra.get("columns")
    # a mixture: each source detected and mapped on its own (the per-source columns)
    rows, extra = shapes()["mapped_chat"]
    mixed, _, report = build(tok, (str(tmp_path / "sharegpt.jsonl"),
                                   {"path": str(tmp_path / "mapped_chat.jsonl"), "columns": MAPPED}))
    assert len(mixed) == 2 * len(reference)
    np.testing.assert_array_equal(mixed.tokens[: len(reference.tokens)], reference.tokens)
    np.testing.assert_array_equal(mixed.tokens[len(reference.tokens):], reference.tokens)
    assert "| format | " in report.to_markdown() and "sharegpt.jsonl: sharegpt; " in report.to_markdown()
    assert "mapped_chat.jsonl: chat (data.columns messages=dialog, role=speaker" in report.to_markdown()


def test_the_shipped_examples_hold_one_conversation_each(tok):
    reference, _, _ = build(tok, str(EXAMPLES / "alpaca.jsonl"))
    for name in ("chat", "sharegpt", "trl_prompt_completion", "prompt_completion"):
        assert_same_documents(build(tok, str(EXAMPLES / f"{name}.jsonl"))[0], reference)
    assert_same_documents(build(tok, str(EXAMPLES / "mapped.jsonl"), columns=MAPPED)[0], reference)
    pairs = [build_pairs(tok, str(EXAMPLES / f"{name}.jsonl"))[0].pairs
             for name in ("preference", "preference_trl", "preference_sharegpt")]
    assert pairs[0] == pairs[1] == pairs[2] and len(pairs[0]) == 2


def test_multi_turn_sharegpt_and_trl_conversational(tmp_path, tok):
    """A system prompt and two turns: ShareGPT (system column or first system turn) is the chat; TRL's
    conversational prompt-completion is the chat with only its completion as a target (last_turn_only)."""
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4"}]
    reference, _, _ = build(tok, write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}]))
    last_only, _, _ = build(tok, str(tmp_path / "chat.jsonl"), last_turn_only=True)
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in chat]
    as_column = {"system": "Answer briefly.", "conversations": sharegpt[1:]}
    as_turn = {"conversations": sharegpt}
    trl = {"prompt": chat[:-1], "completion": chat[-1:]}
    for name, row, expected in (("column", as_column, reference), ("turn", as_turn, reference),
                                ("trl", trl, last_only)):
        ds, _, _ = build(tok, write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        assert_same_documents(ds, expected)
    assert reference.supervised.sum() > last_only.supervised.sum()  # the earlier answer is a target in chat only


def test_the_same_pair_in_three_formats_gives_the_same_pair_rows(tmp_path, tok):
    pairs = [("What is 12 + 30?", "42", "24"), ("Sort the digits 3 1 2.", "1 2 3", "3 2 1")]
    files = {
        "preference": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs],
        "llama_factory": [{"conversations": [{"from": "human", "value": p}], "chosen": {"from": "gpt", "value": c},
                           "rejected": {"from": "gpt", "value": r}} for p, c, r in pairs],
        "trl": [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs],
        "mapped": [{"question": p, "good": c, "bad": r} for p, c, r in pairs],
    }
    built = {}
    for name, rows in files.items():
        columns = {"prompt": "question", "chosen": "good", "rejected": "bad"} if name == "mapped" else None
        built[name] = build_pairs(tok, write_jsonl(tmp_path / f"{name}.jsonl", rows), columns=columns)
    reference = built["preference"][0]
    for name, (ds, _, report) in built.items():
        assert ds.pairs == reference.pairs, name
        assert_same_documents(ds.docs, reference.docs)
        np.testing.assert_array_equal(ds.prompt_tokens, reference.prompt_tokens)
        (fmt, _), = report.train.formats.values()
        assert fmt == ("sharegpt" if name == "llama_factory" else "preference")
    assert "| format | sharegpt |" in built["llama_factory"][2].to_markdown()
    # a multi-turn prompt with a system message: LLaMA-Factory's and TRL's shapes agree
    turns = [("human", "user", "Hi"), ("gpt", "assistant", "Hello"), ("human", "user", "2 + 2?")]
    factory = {"system": "Be brief.", "conversations": [{"from": f, "value": v} for f, _, v in turns],
               "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}
    trl = {"prompt": [{"role": "system", "content": "Be brief."}] + [{"role": r, "content": v} for _, r, v in turns],
           "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    a = build_pairs(tok, write_jsonl(tmp_path / "factory.jsonl", [factory]))[0]
    b = build_pairs(tok, write_jsonl(tmp_path / "trl_turns.jsonl", [trl]))[0]
    assert a.pairs == b.pairs and len(a.pairs[0]["prompt"]) == 4
    assert_same_documents(a.docs, b.docs)


GOOD_SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
GOOD_TRL = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}
GOOD_PAIR = {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
             "rejected": {"from": "gpt", "value": "Go"}}

BAD_ROWS = [
    # (a good row of the file's shape, the bad row, field named, drop reason, pairs?)
    (GOOD_SHAREGPT, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}]},
     "conversations[1].from", "unknown_role", False),
    (GOOD_SHAREGPT, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Yo"}]}, "conversations[1].from", "not_alternating",
     False),
    (GOOD_SHAREGPT, {"conversations": [{"from": "gpt", "value": "Yo"}]}, "conversations[0].from", "not_alternating",
     False),
    (GOOD_SHAREGPT, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]},
     "conversations[1].value", "empty_response", False),
    (GOOD_TRL, {"prompt": [{"role": "user", "content": "Hi"}], "completion": [
        {"role": "assistant", "content": "Yo"}, {"role": "assistant", "content": "Yo"}]}, "completion", "wrong_type",
     False),
    (GOOD_TRL, {"prompt": "Hi", "completion": [{"role": "assistant", "content": "Yo"}]}, "prompt", "wrong_type", False),
    (GOOD_PAIR, {**GOOD_PAIR, "chosen": {"from": "human", "value": "Hi"}}, "chosen.from", "wrong_type", True),
    (GOOD_PAIR, {**GOOD_PAIR, "conversations": GOOD_SHAREGPT["conversations"]}, "conversations", "not_alternating",
     True),
    (GOOD_PAIR, {**GOOD_PAIR, "rejected": {"from": "gpt", "value": ""}}, "rejected.value", "empty_response", True),
]


@pytest.mark.parametrize("good,bad,field,reason,pairs", BAD_ROWS)
def test_bad_rows_name_the_file_line_and_field_or_are_counted(tmp_path, tok, good, bad, field, reason, pairs):
    read = build_pairs if pairs else build
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as error:
        read(tok, path)
    assert str(error.value).startswith(f"{path} line 3: field '{field}': "), str(error.value)
    _, _, report = read(tok, path, on_bad_example="skip")
    assert report.train.dropped == {reason: 1} and report.train.kept == 3
    assert report.train.errors[0].startswith(f"{path} line 3: field '{field}'")


def test_names_of_another_tool_point_at_data_columns(tmp_path, tok):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Hi", "answer": "Hello"}])
    with pytest.raises(DataError, match=r"map them with data.columns, e.g. \{instruction: question, output: answer\}"):
        build(tok, qa)
    assert build(tok, qa, columns={"instruction": "question", "output": "answer"})[0].tokens.size
    dialog = write_jsonl(tmp_path / "dialog.jsonl", [{"dialog": [{"speaker": "customer", "text": "Hi"}]}])
    with pytest.raises(DataError, match=r"name it with data.columns: \{messages: dialog\}"):
        build(tok, dialog)
    with pytest.raises(DataError, match=r"dialog\[0\].role': missing; the message has keys \['speaker', 'text'\]"):
        build(tok, dialog, columns={"messages": "dialog"})
    with pytest.raises(DataError, match=r"unknown role 'customer'.*data.columns, e.g. \{user: customer\}"):
        build(tok, dialog, columns={"messages": "dialog", "role": "speaker", "content": "text"})
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="preference pairs, read by python -m sft_jax.dpo"):
        build(tok, pairs)
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"question": "Hi", "good": "a", "bad": "b"}])
    with pytest.raises(DataError, match=r"data.columns, e.g. \{prompt: question, chosen: good, rejected: bad\}"):
        build_pairs(tok, renamed)


def test_columns_config_is_checked():
    from sft_jax.config import ConfigError, load_config

    cfg = load_config(None, ["data.columns={instruction: question, output: answer}"])
    assert cfg.data.columns == {"instruction": "question", "output": "answer"}
    assert "columns" in cfg.to_dict()["data"]
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['question'\]; valid fields: \['instruction'"):
        load_config(None, ["data.columns={question: instruction}"])
    with pytest.raises(ConfigError, match="data.columns.output=3"):
        load_config(None, ["data.columns={output: 3}"])
    with pytest.raises(DataError, match="expected keys 'path' and optional 'weight', 'columns'"):
        build(small_tokenizer(), ({"path": "a.jsonl", "colums": {}},))
    with pytest.raises(DataError, match=r"columns: unknown field\(s\) \['speaker'\]"):
        build(small_tokenizer(), ({"path": "a.jsonl", "columns": {"speaker": "from"}},))


def test_the_data_page_shows_every_example_file():
    page = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    for path in sorted(EXAMPLES.glob("*.jsonl")):
        assert f"examples/data/{path.name}" in page, path.name
        for line in path.read_text().splitlines():
            assert line in page, (path.name, line)
