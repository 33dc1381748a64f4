"""``python -m sft_jax.ppo [--config FILE] [key=value ...]``: PPO or GRPO on an SFT model.

With no arguments it runs the demo (``sft_jax/configs/ppo_demo.yaml``): PPO with the demo's
exact-match reward, starting from the SFT demo's export (``runs/demo/hf``), which it trains
first with ``python -m sft_jax.train``'s demo if that directory is absent.
``ppo.advantage=grpo`` switches to GRPO. User mistakes print one line on stderr and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sft_jax import cli

DEMO_SFT_DIR = "runs/demo/hf"


def train_demo_sft_if_absent(config) -> None:
    """The RL demo starts from the SFT demo's export: train it first when it is absent."""
    if config.model.init_from == DEMO_SFT_DIR and not Path(DEMO_SFT_DIR).is_dir():
        from sft_jax.core import loop
        from sft_jax.config import load_config
        from sft_jax.objectives.sft import SFTObjective

        print(f"sft_jax.ppo: {DEMO_SFT_DIR} is absent: training the SFT demo first", file=sys.stderr, flush=True)
        loop.run(load_config(None, []), SFTObjective)


def main(argv: list[str] | None = None) -> int:
    return cli.training_command(argv, prog="python -m sft_jax.ppo", doc=__doc__.splitlines()[0],
                                objective="ppo:PPOObjective", default_config="ppo_demo",
                                example="ppo.advantage=grpo", prepare=train_demo_sft_if_absent)


if __name__ == "__main__":
    sys.exit(main())
