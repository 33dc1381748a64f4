"""``python -m sft_jax.dpo [--config FILE] [key=value ...]``: DPO against a frozen reference
(see sft_jax.objectives.dpo), on the shared training core.

With no arguments it runs the demo (sft_jax.demos.preference): pairs from the SFT demo
model's own mistakes, then DPO from that model. User mistakes print one line on stderr
and exit 2, before any run directory is written (as ``python -m sft_jax.train``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        from sft_jax.demos import preference as preference_demo

        preference_demo.dpo_demo()
        return 0
    from sft_jax import cli

    return cli.training_command(argv, prog="python -m sft_jax.dpo", doc=__doc__.splitlines()[0],
                                objective="dpo:DPOObjective", default_config="dpo_demo", example="dpo.beta=0.2")


if __name__ == "__main__":
    sys.exit(main())
