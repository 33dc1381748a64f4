"""Data report: ``python -m sft_jax.data [--config FILE] [--objective NAME] [key=value ...] [--json]``

Loads the same typed config as ``python -m sft_jax.train`` (``sft_jax.config.load_config``, the
same overrides, where a bare ``key=value`` means ``data.key=value``, and the same "no --config"
rule: without ``--config`` it reports on the demo),
builds the datasets exactly as the training command would (``sft_jax.data.run.run_datasets``, the call
the objectives make) and prints the report that command writes to data_report.md: the examples (train,
ppo) or the preference pairs (dpo, reward). ``--objective auto`` picks pairs when the data are pairs (a
preference format, or ``chosen`` and ``rejected`` columns). Bad data or config is one line on stderr and
exit 2.
"""

from __future__ import annotations

import argparse
import sys

from sft_jax import cli
from sft_jax.data.run import OBJECTIVES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_jax.data", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file or packaged config name (default: demo)")
    parser.add_argument("--json", action="store_true", help="print JSON (full precision) instead of Markdown")
    parser.add_argument("--objective", default="auto", choices=("auto", *OBJECTIVES),
                        help="the training command the data are for (auto: pairs when the data are pairs)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.max_length=512")
    args = cli.parse(parser, argv, config_help=True)

    from sft_jax.core.setup import model_and_tokenizer
    from sft_jax.data.run import PAIR_OBJECTIVES, reads_pairs, run_datasets

    try:
        overrides = [o if "." in o.partition("=")[0] else f"data.{o}" for o in args.overrides]  # bare key: data
        config = cli.load_config(args.config, overrides)
        model_cfg, tokenizer, _ = model_and_tokenizer(config)
        pairs = args.objective in PAIR_OBJECTIVES or (args.objective == "auto" and reads_pairs(config.data))
        _, _, report = run_datasets(config, tokenizer, model_cfg, pairs=pairs)
    except cli.user_errors() as e:
        return cli.user_error(e)
    print(report.to_json() if args.json else report.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
