"""``python -m sft_jax.reward [--config FILE] [key=value ...]``: train a reward model on
preference pairs (see sft_jax.objectives.reward), on the shared training core.

``python -m sft_jax.reward score --model PATH --data FILE [--out FILE]`` scores a JSONL
file of pairs (prompt/chosen/rejected, as training reads them) or of prompt/response rows
with an exported reward model, one JSON line per row. With no arguments it runs the demo
(sft_jax.demos.preference); ``--config rl_reward_demo`` trains one on pairs from the RL demo's SFT
start, making them first. User mistakes print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys


def score_main(argv: list[str]) -> int:
    from sft_jax import cli

    parser = argparse.ArgumentParser(prog="python -m sft_jax.reward score", description="score pairs or responses")
    parser.add_argument("--model", required=True, help="reward model directory (GPT2ForSequenceClassification)")
    parser.add_argument("--data", required=True, help="JSONL of prompt/chosen/rejected or prompt/response rows")
    parser.add_argument("--out", default=None, help="write the scores here (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = cli.parse(parser, argv)

    from sft_jax.inference.scoring import score_file

    try:
        lines, summary = score_file(cli.resolve_path(args.model), cli.resolve_path(args.data),
                                    batch_size=args.batch_size)
    except cli.user_errors() as e:
        return cli.user_error(e)
    text = "".join(line + "\n" for line in lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if summary:
        print(summary, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        from sft_jax.demos import preference as preference_demo

        preference_demo.reward_demo()
        return 0
    if argv[0] == "score":
        return score_main(argv[1:])
    from sft_jax import cli

    def prepare(config):  # imported here: --help reads no jax
        from sft_jax.demos.preference import make_rl_demo_pairs_if_absent

        make_rl_demo_pairs_if_absent(config)

    return cli.training_command(argv, prog="python -m sft_jax.reward", doc=__doc__.splitlines()[0],
                                objective="reward:RewardObjective", default_config="reward_demo",
                                example="reward.margin=0.5", prepare=prepare)


if __name__ == "__main__":
    sys.exit(main())
