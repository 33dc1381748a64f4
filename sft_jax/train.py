"""``python -m sft_jax.train [--config FILE] [key=value ...]``: fine-tune GPT-2 (see sft_jax.trainer).

With no arguments it runs the built-in demo (``sft_jax/configs/demo.yaml``); overrides without
``--config`` apply to the demo, except ``model.init_from``, ``data.train`` and ``data.eval``,
which need a ``--config`` (see sft_jax.cli). User mistakes (config, data, model files, mesh)
print one line on stderr and exit 2, before any run directory is written.
"""

from __future__ import annotations

import argparse
import sys

from sft_jax import cli

USER_ERROR_EXIT = cli.USER_ERROR_EXIT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file or packaged config name (default: demo)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    args = cli.parse(parser, argv, config_help=True)

    from sft_jax import trainer

    return cli.run_training(lambda: trainer.run(cli.load_config(args.config, args.overrides)))


if __name__ == "__main__":
    sys.exit(main())
