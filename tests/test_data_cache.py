"""The tokenized cache against the in-memory path: same arrays, report and batches; rebuilt on any change;
never used half-written; built once when two processes share it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from data_fixtures import alpaca_rows, small_tokenizer, write_jsonl

from sft_jax.data import BatchIterator, DataConfig, DataError, build_datasets
from sft_jax.data import sources
from sft_jax.data.formats import BUILTIN_TEMPLATE
from sft_jax.data.report import report_to_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(cfg, tokenizer):
    return build_datasets(cfg, tokenizer, n_positions=1024, vocab_size=len(tokenizer), seed=0, global_batch_size=8)


def batches(train, cfg, steps=6):
    it = BatchIterator(train, global_batch_size=8, seed=0, mode=cfg.batching, max_length=cfg.max_length,
                       buckets=cfg.buckets, prefetch=0)
    return [it.batch_at(step) for step in range(steps)]


def assert_same(cached, reference, cfg):
    """Same documents, examples, report and batches as the in-memory build of the same config."""
    (train, eval_, report), (train0, eval0, report0) = cached, reference
    assert report_to_dict(report) == report_to_dict(report0)
    for ds, ds0 in ((train, train0), (eval_, eval0)):
        assert (ds is None) == (ds0 is None)
        if ds is None:
            continue
        for name in ("tokens", "supervised", "offsets", "response_tokens"):
            np.testing.assert_array_equal(getattr(ds, name), getattr(ds0, name))
        assert list(ds.examples) == list(ds0.examples)
    for b, b0 in zip(batches(train, cfg), batches(train0, cfg), strict=True):
        for key in b0:
            np.testing.assert_array_equal(b[key], b0[key])


def folders(root) -> list[str]:
    """The complete cache folders under root (not the locks, not tmp leftovers)."""
    return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) and "." not in n)


@pytest.mark.parametrize("batching", ["packing", "buckets"])
def test_cache_round_trips_exactly(tmp_path, monkeypatch, batching):
    """A two-source weighted mixture with skipped bad rows and a carved eval split, built in worker processes
    in small chunks: the cache (first run: just built; second run: memory-mapped) equals the in-memory path."""
    rows = alpaca_rows(120) + ["{not json", {"instruction": "no output"}]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(40, start=500))
    kw = dict(train=(a, f"{b}@1.5"), eval_fraction=0.1, on_bad_example="skip", max_length=24, batching=batching,
              buckets=(8, 16), truncation="prompt_left", cache_dir=str(tmp_path / "cache"))
    tokenizer = small_tokenizer()
    reference = build(DataConfig(**kw, cache="off"), tokenizer)
    assert reference[2].train.dropped and reference[2].train.truncated  # the counts are exercised
    if batching == "packing":  # tokenize in 2 spawned workers, 16 conversations per chunk
        monkeypatch.setattr(sources, "CHUNK", 16)
        monkeypatch.setattr(sources, "PARALLEL_MIN", 0)
        kw["num_proc"] = 2
    cfg = DataConfig(**kw)
    first = build(cfg, tokenizer)
    assert_same(first, reference, cfg)
    second = build(dataclasses.replace(cfg, num_proc=1, prefetch=0), tokenizer)  # neither changes the arrays
    assert isinstance(second[0].tokens, np.memmap) and second[0].tokens.dtype == np.uint16
    assert_same(second, reference, cfg)
    assert len(folders(tmp_path / "cache")) == 1


def test_bad_rows_named_and_ordered_as_when_read_whole(tmp_path, monkeypatch):
    """The build streams a file in chunks, yet its bad rows come as when it was read whole: the malformed JSON
    lines first (error mode raises the first one even when a field error comes earlier), then the field errors."""
    monkeypatch.setattr(sources, "CHUNK", 2)
    rows = alpaca_rows(6)
    rows[1] = {"instruction": "no output"}  # line 2, first chunk: a field error
    rows[4] = "{not json"  # line 5, third chunk
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = DataConfig(train=path, eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    tokenizer = small_tokenizer()
    with pytest.raises(DataError, match=r"bad.jsonl line 5: malformed JSON"):
        build(cfg, tokenizer)
    _, _, report = build(dataclasses.replace(cfg, on_bad_example="skip"), tokenizer)
    assert [e.split(": ")[0] for e in report.train.errors] == [f"{path} line 5", f"{path} line 2"]
    assert "field 'output': missing" in report.train.errors[1]
    assert report.train.dropped == {"malformed_json": 1, "missing_field": 1} and report.train.kept == 4


def test_changed_inputs_rebuild(tmp_path):
    """A changed source file, tokenizer, template text (same .jinja path) or max_length gets a new cache equal to
    the in-memory build of the changed inputs; data.cache=rebuild replaces a cache in place."""
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30))
    template = tmp_path / "chat.jinja"
    template.write_text(BUILTIN_TEMPLATE)
    root = tmp_path / "cache"
    cfg = DataConfig(train=path, template=str(template), eval_fraction=0.0, max_length=32, cache_dir=str(root))
    tokenizer = small_tokenizer()

    def check(cfg, tokenizer, n_folders):
        assert_same(build(cfg, tokenizer), build(dataclasses.replace(cfg, cache="off"), tokenizer), cfg)
        assert len(folders(root)) == n_folders

    check(cfg, tokenizer, 1)
    write_jsonl(path, alpaca_rows(30, start=1))  # same path, same size class, new content
    check(cfg, tokenizer, 2)
    template.write_text(BUILTIN_TEMPLATE.replace("### User:", "### Human:"))
    check(cfg, tokenizer, 3)
    check(dataclasses.replace(cfg, max_length=20), tokenizer, 4)
    other = small_tokenizer()
    other.add_tokens(["Say the number"])  # changes how every instruction tokenizes
    check(cfg, other, 5)
    before = {f: os.path.getmtime(root / f / "meta.json") for f in folders(root)}
    check(dataclasses.replace(cfg, cache="rebuild"), tokenizer, 5)
    after = {f: os.path.getmtime(root / f / "meta.json") for f in folders(root)}
    assert sum(before[f] != after[f] for f in before) == 1  # only the matching folder was rebuilt


CHILD = textwrap.dedent(
    """
    import hashlib, json, sys
    from transformers import PreTrainedTokenizerFast
    from sft_jax.data import BatchIterator, DataConfig, DataError, build_datasets
    cfg = DataConfig(**json.loads(sys.argv[1]))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(sys.argv[2])
    train, _, _ = build_datasets(cfg, tokenizer, n_positions=1024, vocab_size=len(tokenizer), seed=0,
                                 global_batch_size=8)
    it = BatchIterator(train, global_batch_size=8, seed=0, max_length=cfg.max_length, prefetch=0)
    h = hashlib.sha256()
    for step in range(5):
        for key, value in sorted(it.batch_at(step).items()):
            h.update(key.encode() + value.tobytes())
    print(h.hexdigest())
    """
)


def child(cfg_kw: dict, tokenizer_dir, hook: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if hook:
        env["SFT_JAX_FAULT"] = f"cache:{hook}"
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg_kw), str(tokenizer_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def reference_digest(cfg_kw: dict, tokenizer) -> str:
    cfg = DataConfig(**dict(cfg_kw, cache="off"))
    train, _, _ = build(cfg, tokenizer)
    it = BatchIterator(train, global_batch_size=8, seed=0, max_length=cfg.max_length, prefetch=0)
    h = hashlib.sha256()
    for step in range(5):
        for key, value in sorted(it.batch_at(step).items()):
            h.update(key.encode() + value.tobytes())
    return h.hexdigest()


@pytest.fixture
def shared(tmp_path):
    """A source file, a saved tokenizer (as the children load it) and a config with a cache folder."""
    from transformers import PreTrainedTokenizerFast

    small_tokenizer().save_pretrained(tmp_path / "tok")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    cfg_kw = dict(train=write_jsonl(tmp_path / "a.jsonl", alpaca_rows(200)), eval_fraction=0.05, max_length=32,
                  cache_dir=str(tmp_path / "cache"))
    return cfg_kw, tokenizer, tmp_path / "tok", tmp_path / "cache"


def test_killed_build_leaves_no_usable_cache(shared, capfd):
    cfg_kw, tokenizer, tokenizer_dir, root = shared
    proc = child(cfg_kw, tokenizer_dir, hook="kill")  # SIGKILLed after writing the train arrays
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -9, err
    assert folders(root) == [] and any(".tmp." in n for n in os.listdir(root))  # only a half-written tmp folder
    cfg = DataConfig(**cfg_kw)
    capfd.readouterr()
    rebuilt = build(cfg, tokenizer)  # the rerun builds anew and removes the leftover
    assert "built the data cache" in capfd.readouterr().err
    assert_same(rebuilt, build(dataclasses.replace(cfg, cache="off"), tokenizer), cfg)
    assert len(folders(root)) == 1 and not any(".tmp." in n for n in os.listdir(root))


def test_two_processes_build_once(shared):
    cfg_kw, tokenizer, tokenizer_dir, root = shared
    procs = [child(cfg_kw, tokenizer_dir, hook="sleep:3") for _ in range(2)]  # the builder sleeps holding the lock
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    errs = [err for _, err in results]
    assert sum("built the data cache" in e for e in errs) == 1, errs
    assert sum("waiting for another process" in e for e in errs) == 1, errs
    assert results[0][0] == results[1][0] == reference_digest(cfg_kw, tokenizer) + "\n"
    assert len(folders(root)) == 1
