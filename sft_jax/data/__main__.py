"""Data report: python -m sft_jax.data --config configs/x.yaml [key=value ...] [--json]

Reads the config's `data:` section (bare `key=value` overrides go there; `model.key=value` and
`train.key=value` reach the other sections) plus what it needs from `model:` (tokenizer, n_positions,
vocab_size) and `train:` (seed, global_batch_size), builds the datasets and prints the report.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from sft_jax.data import DataConfig, build_datasets, demo_tokenizer, report_to_markdown
from sft_jax.data.report import report_to_json


def load_config(path: str, overrides: list[str]) -> dict:
    """The YAML config with `section.key=value` overrides applied (values parsed as YAML)."""
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r}: expected key=value")
        section, _, name = key.rpartition(".")
        config.setdefault(section or "data", {})[name] = yaml.safe_load(value)
    return config


def model_info(model: dict) -> tuple[object, int, int]:
    """(tokenizer, n_positions, vocab_size) from the `model:` section."""
    name = model.get("tokenizer") or model.get("init_from")
    if name in (None, "demo", "scratch"):
        tokenizer = demo_tokenizer()
        hf_config = None
    else:
        from transformers import AutoConfig

        from sft_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(name)
        hf_config = AutoConfig.from_pretrained(model.get("init_from") or name)
    n_positions = model.get("n_positions") or getattr(hf_config, "n_positions", None) or 1024
    vocab_size = model.get("vocab_size") or getattr(hf_config, "vocab_size", None) or len(tokenizer)
    return tokenizer, int(n_positions), int(vocab_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_jax.data", description="Print the data report.")
    parser.add_argument("--config", required=True, help="training YAML (sections model, data, train, ...)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("overrides", nargs="*", help="key=value for data, or section.key=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    cfg = DataConfig.from_dict(config.get("data") or {})
    tokenizer, n_positions, vocab_size = model_info(config.get("model") or {})
    train = config.get("train") or {}
    _, _, report = build_datasets(
        cfg,
        tokenizer,
        n_positions=n_positions,
        vocab_size=vocab_size,
        seed=int(train.get("seed", config.get("seed", 0))),
        global_batch_size=train.get("global_batch_size") or train.get("batch_size"),
    )
    print(report_to_json(report) if args.json else report_to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
