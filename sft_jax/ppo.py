"""``python -m sft_jax.ppo [--config FILE] [key=value ...]``: PPO or GRPO on an SFT model.

With no arguments it runs the demo (``sft_jax/configs/ppo_demo.yaml``): PPO with the demo's
exact-match reward, starting from the SFT demo's export (``runs/demo/hf``), which it trains
first with ``python -m sft_jax.train``'s demo if that directory is absent.
``ppo.advantage=grpo`` switches to GRPO. User mistakes print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sft_jax import cli

DEMO_SFT_DIR = "runs/demo/hf"


def run(config, devices=None, batch_transform=None):
    from sft_jax.core import loop
    from sft_jax.objectives.ppo import PPOObjective

    return loop.run(config, PPOObjective, devices=devices, batch_transform=batch_transform)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_jax.ppo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ppo_demo", help="YAML file or packaged config name (default: ppo_demo)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. ppo.advantage=grpo")
    args = cli.parse(parser, argv, config_help=True)

    from sft_jax import trainer
    from sft_jax.config import load_config

    def start():
        config = cli.load_config(args.config, args.overrides)
        if config.model.init_from == DEMO_SFT_DIR and not Path(DEMO_SFT_DIR).is_dir():
            print(f"sft_jax.ppo: {DEMO_SFT_DIR} is absent: training the SFT demo first", file=sys.stderr, flush=True)
            trainer.run(load_config(None, []))
        return run(config)

    return cli.run_training(start)


if __name__ == "__main__":
    sys.exit(main())
