"""Reading sources, bad-input errors and counts, truncation, mixtures, eval carving, the report and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_fixtures import alpaca_rows, small_tokenizer, write_jsonl

from sft_jax.data import BatchIterator, DataConfig, DataError, build_datasets, report_to_markdown
from sft_jax.data.formats import Renderer, to_messages


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def build(tok, **kw):
    kw.setdefault("eval_fraction", 0.0)
    return build_datasets(DataConfig(**kw), tok, n_positions=1024, vocab_size=len(tok), seed=0)


BAD_CASES = [
    # (lines of the file, 1-based bad line, field named in the message, drop reason)
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": }'], 2, None, "malformed_json"),
    (['{"instruction": "a", "output": "b"}'] * 2 + ['{"instruction": "a"}'], 3, "output", "missing_field"),
    (['{"instruction": 5, "output": "b"}'], 1, "instruction", "wrong_type"),
    (['{"instruction": "a", "output": "  "}'], 1, "output", "empty_response"),
    (
        ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
         '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}'],
        2, "messages[1].role", "unknown_role",
    ),
    (['{"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}'], 1,
     "messages[0].content", "wrong_type"),
]


@pytest.mark.parametrize("lines,line_no,field,reason", BAD_CASES)
def test_bad_input_names_file_line_and_field(tmp_path, tok, lines, line_no, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as error:
        build(tok, train=path)
    message = str(error.value)
    assert f"bad.jsonl line {line_no}" in message
    if field:
        assert f"'{field}'" in message
    # skip mode: the bad row is dropped and counted, the rest kept
    good = ['{"instruction": "fine", "output": "ok"}']  # same format as the file (detected from its keys)
    if "messages" in lines[0]:
        good = ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}']
    path = write_jsonl(tmp_path / "skip.jsonl", lines + good)
    _, _, report = build(tok, train=path, on_bad_example="skip")
    assert report.train.dropped == {reason: 1}
    assert report.train.read == len(lines) + 1
    assert report.train.kept == len(lines)  # every line but the bad one, plus the good one
    assert report.train.errors and "skip.jsonl" in report.train.errors[0]


def test_empty_file(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: empty file"):
        build(tok, train=str(empty))
    good = write_jsonl(tmp_path / "good.jsonl", alpaca_rows(3))
    _, _, report = build(tok, train=(str(empty), good), on_bad_example="skip")
    assert report.train.dropped == {"empty_file": 1} and report.train.kept == 3


def test_csv_parquet_and_json_array(tmp_path, tok):
    import datasets

    rows = alpaca_rows(6)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    csv = "instruction,input,output\n" + "".join(f'"{r["instruction"]}",{r["input"]},"{r["output"]}"\n' for r in rows)
    (tmp_path / "a.csv").write_text(csv)
    expected, _, _ = build(tok, train=write_jsonl(tmp_path / "a.jsonl", rows))
    for name in ("a.parquet", "a.json", "a.csv"):
        ds, _, _ = build(tok, train=str(tmp_path / name))
        np.testing.assert_array_equal(ds.tokens, expected.tokens)
        np.testing.assert_array_equal(ds.supervised, expected.supervised)
    (tmp_path / "b.csv").write_text("instruction,input,output\nfine,,ok\nx,y,\n")
    with pytest.raises(DataError, match=r"b\.csv row 2: field 'output': empty response"):
        build(tok, train=str(tmp_path / "b.csv"))


def test_mixture_weights_and_format_per_source(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    chat = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    b = write_jsonl(tmp_path / "b.jsonl", chat)
    ds, _, report = build(tok, train=(f"{a}@2", {"path": b, "weight": 0.5}))
    assert report.train.kept == 18 and report.train.documents == 2 * 10 + 4 == len(ds)


def test_eval_carving_is_deterministic_and_disjoint(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(400))
    train, eval_, report = build(tok, train=path, eval_fraction=0.1)
    train2, eval2, _ = build_datasets(DataConfig(train=path, eval_fraction=0.1), tok, n_positions=1024,
                                      vocab_size=len(tok), seed=5)
    key = lambda ds: {json.dumps(m) for m in ds.examples}  # noqa: E731
    assert key(eval_) == key(eval2) and key(train) == key(train2)  # content hash, not the seed
    assert not key(train) & key(eval_) and len(key(train) | key(eval_)) == 400
    assert 20 <= len(eval_) <= 60 and report.train.read == 400  # what was read, before the carve
    assert report.train.to_eval == report.eval.read == len(eval_) == 400 - report.train.kept
    assert f"| moved to eval (data.eval_fraction) | {len(eval_)} |" in report_to_markdown(report)


def test_truncation_policy(tmp_path, tok):
    long_prompt = {"instruction": "word " * 300, "output": "short answer"}
    long_answer = {"instruction": "hi", "output": "word " * 300}
    path = write_jsonl(tmp_path / "a.jsonl", [long_prompt, long_answer] + alpaca_rows(3))
    ds, _, report = build(tok, train=path, max_length=64)
    assert report.train.truncated == 1 and report.train.dropped == {"response_too_long": 1}
    tokens, supervised = ds.doc(0)
    assert len(tokens) == 64
    answer = tok("short answer<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert tokens[supervised].tolist() == answer  # the whole response survives; the prompt lost its left
    _, _, report = build(tok, train=path, max_length=64, truncation="drop")
    assert report.train.truncated == 0 and report.train.dropped == {"too_long": 2}


def test_model_mismatches_are_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(3))
    with pytest.raises(DataError, match="n_positions"):
        build_datasets(DataConfig(train=path, max_length=2048), tok, n_positions=1024, vocab_size=len(tok), seed=0)
    with pytest.raises(DataError, match="vocab_size"):
        build_datasets(DataConfig(train=path), tok, n_positions=1024, vocab_size=len(tok) - 1, seed=0)


def test_config_from_dict():
    cfg = DataConfig.from_dict({"train": ["a.jsonl@2", "b.csv"], "max_length": 256, "buckets": [64, 128]})
    assert cfg.train == ("a.jsonl@2", "b.csv") and cfg.buckets == (64, 128)
    with pytest.raises(DataError, match="valid keys"):
        DataConfig.from_dict({"max_len": 3})
    with pytest.raises(DataError, match="max_length"):
        DataConfig.from_dict({"max_length": "long"})
    with pytest.raises(DataError, match="batching"):
        DataConfig.from_dict({"batching": "sorted"})


def test_report_matches_an_independent_count(tmp_path, tok):
    rows = alpaca_rows(30) + [{"instruction": "x", "output": ""}, {"instruction": "y " * 200, "output": "z"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    _, _, report = build(tok, train=path, max_length=96, on_bad_example="skip", truncation="drop")
    # independent count: render and tokenize whole strings, no pieces
    renderer = Renderer(tok, None)
    prompts, answers = [], []
    for row in rows[:30]:
        messages = to_messages(row, "alpaca")
        prompts.append(len(tok(renderer.generation_prompt(messages[:1]))["input_ids"]))
        answers.append(len(tok(row["output"] + tok.eos_token)["input_ids"]))
    prompts, answers = np.array(prompts), np.array(answers)
    r = report.train
    assert (r.read, r.kept, r.documents, r.truncated) == (32, 30, 30, 0)
    assert r.dropped == {"empty_response": 1, "too_long": 1}
    for stats, lengths in ((r.prompt_lengths, prompts), (r.response_lengths, answers)):
        assert stats == {"mean": round(lengths.mean(), 2), "p50": np.percentile(lengths, 50),
                         "p95": np.percentile(lengths, 95), "max": lengths.max()}
    assert prompts.mean() > 0 and answers.mean() > 0 and not np.array_equal(prompts, answers)
    assert r.tokens == (prompts + answers).sum() and r.supervised_tokens == answers.sum()
    assert r.supervised_fraction == round(answers.sum() / (prompts + answers).sum(), 4)
    ds, _, _ = build(tok, train=path, max_length=96, on_bad_example="skip", truncation="drop")
    it = BatchIterator(ds, global_batch_size=1, seed=0, mode="packing", max_length=96, prefetch=0)
    rows_seen = [it.batch_at(s)["segment_ids"] for s in range(it.rows_per_epoch)]
    assert r.efficiency == round(sum(int((s > 0).sum()) for s in rows_seen) / (96 * len(rows_seen)), 4)
    assert r.efficiency < 1.0  # a real count: some rows have padding
    # one epoch of batches in bucket mode, counted the same way
    _, _, bucketed = build(tok, train=path, max_length=96, on_bad_example="skip", truncation="drop",
                           batching="buckets", buckets=(32, 64))
    it = BatchIterator(ds, global_batch_size=8, seed=0, mode="buckets", max_length=96, buckets=(32, 64), prefetch=0)
    batches = [it.batch_at(s)["segment_ids"] for s in range(it.steps_per_epoch)]
    assert bucketed.train.efficiency == round(sum(int((s > 0).sum()) for s in batches) / sum(s.size for s in batches), 4)
    # the first document, decoded, with the supervised span (response + eos) marked
    assert r.example == "### User:\nSay the number 0.\n\nNumber 0\n\n### Assistant:\n⟦It is 0.<|endoftext|>⟧"
    markdown = report_to_markdown(report)
    assert "| examples read | 32 |" in markdown and "empty_response: 1" in markdown
    # prompt_left truncation: the long-prompt example is kept, cut to max_length, and counted
    _, _, cut = build(tok, train=path, max_length=96, on_bad_example="skip")
    long_prompt = len(tok(renderer.generation_prompt(to_messages(rows[31], "alpaca")[:1]))["input_ids"])
    assert long_prompt > 96 and (cut.train.kept, cut.train.truncated, cut.train.dropped) == (31, 1, {"empty_response": 1})
    assert cut.train.tokens == r.tokens + 96


def test_eos_closing_a_response_is_a_target_in_real_batches(tmp_path, tok):
    """The filler written at padding is the eos id here (0), yet every eos that closes a response
    is a weighted target, and nothing at padding (segment 0) is."""
    eos = tok.eos_token_id
    assert eos == 0  # == FILLER: a pipeline masking by token id would lose every eos below
    ds, _, _ = build(tok, train=write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40)), max_length=128)
    for mode, rows in (("packing", 1), ("buckets", 4)):  # one epoch exactly: a packed batch of 1 row never spills
        it = BatchIterator(ds, global_batch_size=rows, seed=0, mode=mode, max_length=128, buckets=(64,), prefetch=0)
        closing = 0
        for step in range(it.steps_per_epoch):
            b = it.batch_at(step)
            real = b["segment_ids"] > 0
            assert not b["weights"][~real].any() and (b["tokens"][~real] == eos).all()
            # targets inside a document (the next slot holds the same document; a document's last
            # slot predicts nothing and holds filler)
            inside = np.zeros_like(real)
            inside[:, :-1] = real[:, :-1] & (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1])
            eos_targets = (b["targets"] == eos) & inside
            assert (b["weights"][eos_targets] == 1).all()
            closing += int(eos_targets.sum())
        assert closing == 40  # one per response, each a weighted target


def test_cli_reads_the_training_yaml(tmp_path, capsys):
    from sft_jax.data.__main__ import main

    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20))
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  n_positions: 256\ndata:\n  train: {path}\n  max_length: 128\ntrain:\n  steps: 10\n  seed: 1\n")
    assert main(["--config", str(config), "--json", "eval_fraction=0.2", "batching=buckets"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["kept"] + report["eval"]["kept"] == 20
    assert report["train"]["batching"].startswith("buckets")
    assert main(["--config", str(config)]) == 0
    assert "# Data report" in capsys.readouterr().out


def test_markdown_rounds_lengths_json_keeps_them(tmp_path, tok):
    """Markdown: lengths with at most 1 decimal, shares as percentages with 1 decimal; --json: full precision.
    With several sources the rows read from each are listed."""
    import dataclasses

    from sft_jax.data.report import report_to_json

    a, b = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(7)), write_jsonl(tmp_path / "b.jsonl", alpaca_rows(5, 7))
    _, _, report = build(tok, train=(a, b))
    stats = {"mean": 30.599999999999998, "p50": 12.0, "p95": 30.25, "max": 41.0}
    report = dataclasses.replace(report, train=dataclasses.replace(report.train, prompt_lengths=stats,
                                                                    supervised_fraction=0.123456))
    markdown = report_to_markdown(report)
    assert "| prompt (L_Q) | 30.6 | 12 | 30.2 | 41 |" in markdown and "(12.3%)" in markdown
    assert f"| examples read | 12 ({a}: 7, {b}: 5) |" in markdown
    assert "30.599999999999998" not in markdown and "30.599999999999998" in report_to_json(report)
