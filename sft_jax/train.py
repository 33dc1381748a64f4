"""``python -m sft_jax.train [--config FILE] [key=value ...]``: supervised fine-tuning
(the SFT objective, ``sft_jax.objectives.sft``, on the shared training core).

With no arguments it runs the built-in demo (``sft_jax/configs/demo.yaml``); overrides without
``--config`` apply to the demo, except ``model.init_from``, ``data.train`` and ``data.eval``,
which need a ``--config`` (see sft_jax.cli). User mistakes (config, data, model files, mesh)
print one line on stderr and exit 2, before any run directory is written.
"""

from __future__ import annotations

import sys

from sft_jax import cli


def main(argv: list[str] | None = None) -> int:
    return cli.training_command(argv, prog="python -m sft_jax.train", doc=__doc__.splitlines()[0],
                                objective="sft:SFTObjective", default_config=None)


if __name__ == "__main__":
    sys.exit(main())
