"""Datasets as folders and shards: save_to_disk (a Dataset, a DatasetDict's splits), a local copy of a hub dataset
repository (parquet shards under data/), and globs.

Reference: the one-file source of the same rows. Every form must give its examples, documents, batches and
report through `python -m sft_jax.data`, the SFT objective's data (what `python -m sft_jax.train` builds) and
the DPO objective's (`python -m sft_jax.dpo`); the CLI's report is the one the run writes to data_report.md,
also for the shipped dpo_demo, reward_demo and ppo_demo configs. The cache is rebuilt when one shard changes
and reused when nothing (or only a file's time) does."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from data_fixtures import alpaca_rows, small_tokenizer, write_jsonl
from train_fixtures import write_tiny_yaml

from sft_jax.config import load_config
from sft_jax.core.setup import model_and_tokenizer
from sft_jax.data import DataConfig, DataError, build_datasets
from sft_jax.data.__main__ import main as data_main
from sft_jax.objectives.dpo import DPOObjective
from sft_jax.objectives.ppo import PPOObjective
from sft_jax.objectives.reward import RewardObjective
from sft_jax.objectives.sft import SFTObjective


def pair_rows(n: int) -> list[dict]:
    """TRL's conversational pairs: nested lists of messages, as Arrow stores them in struct columns."""
    return [{"prompt": [{"role": "user", "content": f"Say the number {i}."}],
             "chosen": [{"role": "assistant", "content": f"It is {i}."}],
             "rejected": [{"role": "assistant", "content": f"No {i + 1}."}]} for i in range(n)]


def write_forms(root, rows: list[dict]) -> dict[str, str]:
    """`rows` as one JSON-lines file and in every folder form: {form: source spec}."""
    import datasets

    root.mkdir()
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(4))}).save_to_disk(str(root / "dict"))
    cut = len(rows) // 3
    (root / "hub" / "data").mkdir(parents=True)
    dataset.select(range(cut)).to_parquet(str(root / "hub" / "data" / "train-00000-of-00002.parquet"))
    dataset.select(range(cut, len(rows))).to_parquet(str(root / "hub" / "data" / "train-00001-of-00002.parquet"))
    dataset.select(range(4)).to_parquet(str(root / "hub" / "data" / "test-00000-of-00001.parquet"))
    (root / "shards").mkdir()
    write_jsonl(root / "shards" / "b.jsonl", rows[cut:])  # sorted order: a before b
    write_jsonl(root / "shards" / "a.jsonl", rows[:cut])
    return {"file": write_jsonl(root / "one.jsonl", rows), "saved": str(root / "saved"), "dict": str(root / "dict"),
            "dict_split": f"{root / 'dict'}:train", "hub": str(root / "hub"),
            "hub_config_split": f"{root / 'hub'}:default:train", "glob": str(root / "shards" / "*.jsonl"),
            "glob_parquet": str(root / "hub" / "data" / "train-*.parquet")}


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    root = tmp_path_factory.mktemp("forms")
    return write_forms(root / "examples", alpaca_rows(30)), write_forms(root / "pairs", pair_rows(12))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A stand-in HF export: loading its tokenizer is quicker than training the demo's for every config."""
    path = tmp_path_factory.mktemp("model")
    tiny_hf_dir(path, small_tokenizer())
    return path


def objective_data(objective, yaml):
    """The Data a training run of `objective` builds from the config file `yaml` (what it trains on, and the
    report it writes to data_report.md)."""
    config = load_config(str(yaml))
    model_cfg, tokenizer, hf_dir = model_and_tokenizer(config)
    return objective(config, model_cfg, tokenizer, hf_dir).build_data()


def cli_report(capsys, *args) -> str:
    assert data_main([*map(str, args)]) == 0
    return capsys.readouterr().out


def test_every_folder_form_gives_the_examples_of_the_one_file_source(tmp_path, forms, model_dir, capsys):
    examples, pairs = forms
    reference = {}
    for kind, objective, specs in (("examples", SFTObjective, examples), ("pairs", DPOObjective, pairs)):
        for form, spec in specs.items():
            yaml = write_tiny_yaml(tmp_path / f"{kind}_{form}.yaml", tmp_path / "run", f"data.train={spec}",
                                   f"model.init_from={model_dir}", "data.format=auto", "data.eval_fraction=0",
                                   "train.steps=1")
            data = objective_data(objective, yaml)
            markdown = cli_report(capsys, "--config", yaml)
            assert markdown.strip() == data.report_md.strip()  # what the run writes to data_report.md
            as_json = json.loads(cli_report(capsys, "--config", yaml, "--json").replace(json.dumps(spec)[1:-1],
                                                                                         "SOURCE"))
            dataset = data.iterator.dataset
            docs = dataset.docs if kind == "pairs" else dataset
            got = (markdown, as_json, docs.tokens, docs.supervised, docs.offsets, list(dataset.pairs or [])
                   if kind == "pairs" else list(dataset.examples), data.iterator.batch_at(0))
            if form == "file":
                reference[kind] = got
                continue
            want = reference[kind]
            assert got[0] == want[0] and got[1] == want[1], form
            for a, b in zip(got[2:5], want[2:5]):
                np.testing.assert_array_equal(a, b, err_msg=form)
            assert got[5] == want[5], form
            for key in want[6]:
                np.testing.assert_array_equal(got[6][key], want[6][key], err_msg=f"{form} {key}")
    assert "| format | alpaca |" in reference["examples"][0] and "| format | preference |" in reference["pairs"][0]


def test_eval_from_another_split_of_the_same_folder(forms):
    examples, _ = forms
    tok = small_tokenizer()
    for folder in (examples["dict"], examples["hub"]):
        cfg = DataConfig(train=folder, eval=f"{folder}:test", cache="off")
        _, eval_ds, report = build_datasets(cfg, tok, n_positions=1024, vocab_size=len(tok), seed=0)
        assert report.eval.read == 4 and list(eval_ds.examples) == [
            [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
             {"role": "assistant", "content": r["output"]}] for r in alpaca_rows(4)]


def test_folder_and_glob_errors(forms, tmp_path):
    examples, _ = forms
    tok = small_tokenizer()
    cases = [(f"{examples['dict']}:validation", r"no split 'validation' in this save_to_disk DatasetDict; its splits: "
                                                r"\['train', 'test'\]"),
             (f"{examples['hub']}:validation", r"no split 'validation' in .*hub; its splits: \['test', 'train'\]"),
             (f"{examples['saved']}:train", "holds one save_to_disk Dataset, which has no splits"),
             (str(tmp_path / "nothing" / "*.parquet"), "no files match"),
             (str(tmp_path / "missing"), "no such file or folder")]
    for spec, message in cases:
        with pytest.raises(DataError, match=message):
            build_datasets(DataConfig(train=spec, cache="off"), tok, n_positions=1024, vocab_size=len(tok), seed=0)


def cache_folders(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) and "." not in n)


def test_a_changed_shard_rebuilds_the_cache_and_nothing_changed_reuses_it(tmp_path):
    import datasets

    forms = write_forms(tmp_path / "data", alpaca_rows(30))
    tok = small_tokenizer()
    for form in ("hub", "saved", "glob"):
        root = tmp_path / f"cache_{form}"
        cfg = DataConfig(train=forms[form], eval_fraction=0.0, cache_dir=str(root))
        build = lambda: build_datasets(cfg, tok, n_positions=1024, vocab_size=len(tok), seed=0)  # noqa: E731
        build()
        (first,) = cache_folders(root)
        built_at = os.path.getmtime(root / first / "meta.json")
        shard = {"hub": tmp_path / "data" / "hub" / "data" / "train-00001-of-00002.parquet",
                 "saved": next((tmp_path / "data" / "saved").glob("*.arrow")),
                 "glob": tmp_path / "data" / "shards" / "b.jsonl"}[form]
        os.utime(shard, (built_at + 10, built_at + 10))  # touched, not changed
        build()
        assert cache_folders(root) == [first] and os.path.getmtime(root / first / "meta.json") == built_at
        changed = alpaca_rows(30)
        changed[-1]["output"] = "Something else."
        if form == "hub":
            datasets.Dataset.from_list(changed[10:]).to_parquet(str(shard))
        elif form == "saved":
            datasets.Dataset.from_list(changed).save_to_disk(str(tmp_path / "data" / "saved_new"))
            for name in os.listdir(tmp_path / "data" / "saved_new"):
                os.replace(tmp_path / "data" / "saved_new" / name, tmp_path / "data" / "saved" / name)
        else:
            write_jsonl(shard, changed[10:])
        train, _, _ = build()
        assert len(cache_folders(root)) == 2, form
        assert list(train.examples)[-1][-1]["content"] == "Something else."


def tiny_hf_dir(path, tokenizer) -> None:
    """What model_and_tokenizer reads of an HF export (its config and tokenizer; no weights)."""
    from transformers import GPT2Config

    GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2,
               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("name,objective", [("dpo_demo", DPOObjective), ("reward_demo", RewardObjective),
                                            ("ppo_demo", PPOObjective)])
def test_the_data_command_prints_the_report_a_demo_run_writes(tmp_path, monkeypatch, capsys, name, objective):
    """`python -m sft_jax.data --config NAME` with the demo's model and data in place (a stand-in SFT export,
    and the demo pairs) prints the preference or prompt section that NAME's run writes to data_report.md."""
    from sft_jax.demos.tasks import demo_tokenizer
    from sft_jax.demos.pairs import demo_pair_examples, make_pairs
    from sft_jax.demos.pairs import write_jsonl as write_pairs

    monkeypatch.chdir(tmp_path)
    tiny_hf_dir(tmp_path / "runs" / "demo" / "hf", demo_tokenizer(seed=0))
    (tmp_path / "runs" / "rl_sft_demo").mkdir(parents=True)  # the RL demo's own SFT start (ppo_demo reads it)
    (tmp_path / "runs" / "rl_sft_demo" / "hf").symlink_to(tmp_path / "runs" / "demo" / "hf")
    train, held_out = demo_pair_examples(40, 8)
    write_pairs(make_pairs(train), tmp_path / "runs" / "demo_pairs" / "train.jsonl")
    write_pairs(make_pairs(held_out), tmp_path / "runs" / "demo_pairs" / "eval.jsonl")
    overrides = ["data.demo_train_examples=200", "data.demo_eval_examples=20"]
    printed = cli_report(capsys, "--config", name, *overrides)
    config = load_config(name, overrides)
    model_cfg, tokenizer, hf_dir = model_and_tokenizer(config)
    written = objective(config, model_cfg, tokenizer, hf_dir).build_data().report_md
    assert printed.strip() == written.strip()
    assert printed.startswith("# Preference pairs" if name != "ppo_demo" else "# Data report")
    assert "| pairs read | 40 |" in printed if name != "ppo_demo" else "| examples read | 200 |" in printed
    assert cli_report(capsys, "--config", name, "--objective", "sft" if name == "ppo_demo" else "dpo",
                      *overrides) == printed


def test_a_sequence_of_dicts_reads_as_the_list_it_stands_for(tmp_path):
    """`datasets` stores a Sequence of a dict (how many hub datasets declare `conversations`) as a struct of
    lists; from save_to_disk and from parquet it reads as the ShareGPT rows it was made from."""
    import datasets

    turns = [[("human", f"Say {i}."), ("gpt", f"It is {i}.")] for i in range(5)]
    rows = [{"conversations": [{"from": f, "value": v} for f, v in t]} for t in turns]
    features = datasets.Features({"conversations": datasets.Sequence({"from": datasets.Value("string"),
                                                                      "value": datasets.Value("string")})})
    columnar = datasets.Dataset.from_dict(
        {"conversations": [{"from": [f for f, _ in t], "value": [v for _, v in t]} for t in turns]}, features=features)
    assert isinstance(columnar[0]["conversations"], dict)  # as `datasets` itself gives it
    columnar.save_to_disk(str(tmp_path / "saved"))
    columnar.to_parquet(str(tmp_path / "shard.parquet"))
    tok = small_tokenizer()
    build = lambda spec: build_datasets(DataConfig(train=spec, eval_fraction=0.0, cache="off"), tok,  # noqa: E731
                                        n_positions=1024, vocab_size=len(tok), seed=0)[0]
    reference = build(write_jsonl(tmp_path / "sharegpt.jsonl", rows))
    for spec in (tmp_path / "saved", tmp_path / "shard.parquet"):
        ds = build(str(spec))
        np.testing.assert_array_equal(ds.tokens, reference.tokens)
        assert list(ds.examples) == list(reference.examples)


def test_a_bad_row_names_its_shard_and_row(tmp_path):
    rows = alpaca_rows(6)
    rows[4]["output"] = " "
    forms = write_forms(tmp_path / "data", rows)
    tok = small_tokenizer()
    shard = tmp_path / "data" / "hub" / "data" / "train-00001-of-00002.parquet"
    for form, where in (("hub", f"{shard} row 3"), ("saved", f"{forms['saved']} row 5"),
                        ("glob", f"{tmp_path / 'data' / 'shards' / 'b.jsonl'} line 3")):
        cfg = DataConfig(train=forms[form], eval_fraction=0.0, cache="off")
        with pytest.raises(DataError, match=f"^{where}: field 'output': empty response$"):
            build_datasets(cfg, tok, n_positions=1024, vocab_size=len(tok), seed=0)
