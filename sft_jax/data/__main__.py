"""Data report: ``python -m sft_jax.data [--config FILE] [key=value ...] [--json]``

Loads the same typed config as ``python -m sft_jax.train`` (``sft_jax.config.load_config``, the
same overrides, where a bare ``key=value`` means ``data.key=value``, and the same "no --config"
rule: without ``--config`` it reports on the demo),
builds the datasets exactly as training would and prints the report. Bad data or config is one
line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from sft_jax import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_jax.data", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file or packaged config name (default: demo)")
    parser.add_argument("--json", action="store_true", help="print JSON (full precision) instead of Markdown")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.max_length=512")
    args = cli.parse(parser, argv, config_help=True)

    from sft_jax.data import build_datasets, report_to_markdown
    from sft_jax.data.report import report_to_json
    from sft_jax.core.setup import model_and_tokenizer

    try:
        overrides = [o if "." in o.partition("=")[0] else f"data.{o}" for o in args.overrides]  # bare key: data
        config = cli.load_config(args.config, overrides)
        model_cfg, tokenizer, _ = model_and_tokenizer(config)
        _, _, report = build_datasets(config.data, tokenizer, n_positions=model_cfg.max_position_embeddings,
                                      vocab_size=model_cfg.vocab_size, seed=config.train.seed,
                                      global_batch_size=config.train.global_batch_size)
    except cli.user_errors() as e:
        return cli.user_error(e)
    print(report_to_json(report) if args.json else report_to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
