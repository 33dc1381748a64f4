"""``python -m sft_jax.dpo [--config FILE] [key=value ...]``: DPO against a frozen reference
(see sft_jax.objectives.dpo), on the shared training core.

With no arguments it runs the demo (sft_jax.preference_demo): pairs from the SFT demo
model's own mistakes, then DPO from that model. User mistakes print one line on stderr
and exit 2, before any run directory is written (as ``python -m sft_jax.train``).
"""

from __future__ import annotations

import argparse
import sys


def run_command(argv, *, prog: str, doc: str, objective: str, default_config: str) -> int:
    """Parse ``[--config FILE] [key=value ...]``, load the config and run the core with
    ``objective`` ("module:Class" under sft_jax.objectives); the shared body of the
    preference commands."""
    import importlib

    from sft_jax import cli

    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("--config", default=default_config, help=f"YAML file or packaged config name "
                                                                 f"(default: {default_config})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. dpo.beta=0.2")
    args = cli.parse(parser, argv, config_help=True)

    from sft_jax.core import loop as core_loop

    module, name = objective.split(":")
    objective_cls = getattr(importlib.import_module(f"sft_jax.objectives.{module}"), name)
    return cli.run_training(lambda: core_loop.run(cli.load_config(args.config, args.overrides), objective_cls))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        from sft_jax import preference_demo

        preference_demo.dpo_demo()
        return 0
    return run_command(argv, prog="python -m sft_jax.dpo", doc=__doc__.splitlines()[0], objective="dpo:DPOObjective",
                       default_config="dpo_demo")


if __name__ == "__main__":
    sys.exit(main())
