"""``python -m sft_jax.ppo [--config FILE] [key=value ...]``: PPO or GRPO on an SFT model.

With no arguments it runs the RL demo (``sft_jax/configs/ppo_demo.yaml``): PPO rewarded for exact
answers, starting from an SFT model whose demonstrations carry a writers' habit
(``runs/rl_sft_demo/hf``, ``configs/rl_sft_demo.yaml``: 60% of two tasks' answers end with a
sign-off), which it trains first if that directory is absent. It ends with held-out exact match of
the start and of the RL model, per task, the KL to the start and the wall time.
``ppo.advantage=grpo`` switches to GRPO. User mistakes print one line on stderr and exit 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sft_jax import cli

# the SFT starts the demos train when they are absent: export directory -> the config that makes it
DEMO_STARTS = {"runs/demo/hf": "demo", "runs/rl_sft_demo/hf": "rl_sft_demo"}


def train_demo_sft_if_absent(config) -> float:
    """A demo starts from an SFT demo's export (``DEMO_STARTS``): train it first when it is absent.
    Returns the seconds that took (0 when it was there)."""
    start = config.model.init_from
    if start not in DEMO_STARTS or Path(start).is_dir():
        return 0.0
    from sft_jax.core import loop
    from sft_jax.config import load_config
    from sft_jax.objectives.sft import SFTObjective

    name = DEMO_STARTS[start]
    print(f"sft_jax.ppo: {start} is absent: training it first (python -m sft_jax.train --config {name})",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    loop.run(load_config(name, []), SFTObjective)
    return time.perf_counter() - t0


def demo_run_dir(config):
    """The config with its own run directory for each variant of the demo: ``runs/ppo_demo`` is PPO
    against the exact-match reward, ``runs/grpo_demo`` GRPO, and ``runs/ppo_rm_demo`` or
    ``runs/grpo_rm_demo`` either against a reward model (``ppo.reward_model``). The variants train
    different trees (GRPO has no critic) or different models, so none may resume from another's
    checkpoint, and run one after another each keeps its own results. A ``run.output_dir`` the user
    sets is kept."""
    import dataclasses

    if config.run.output_dir != "runs/ppo_demo":
        return config
    name = ("grpo" if config.ppo.advantage == "grpo" else "ppo") + ("_rm" if config.ppo.reward_model else "")
    return dataclasses.replace(config, run=dataclasses.replace(config.run, output_dir=f"runs/{name}_demo"))


def print_figures(config, result, seconds: float, sft_seconds: float) -> None:
    """Held-out exact match of the start (the step-0 evaluation) and of the RL model, overall and per
    task, the KL to the start and the wall time: what a demo run is read for."""
    import jax

    from sft_jax.core.metrics import read_metrics

    end = result.eval
    if jax.process_index() != 0 or "exact_match" not in end:
        return
    evals = [r for r in read_metrics(Path(config.run.output_dir) / "metrics.jsonl") if r.get("split") == "eval"]
    start = next((r for r in evals if r["step"] == 0 and "exact_match" in r), None)
    name = "GRPO" if config.ppo.advantage == "grpo" else "PPO"

    def was(key: str) -> str:  # "0.482 -> " where the start's figure is known
        return f"{start[key]:.3f} -> " if start is not None and key in start else ""

    rise = f" ({end['exact_match'] - start['exact_match']:+.3f})" if start is not None else ""
    lines = [f"held-out exact match (greedy, {end['exact_match_n']} prompts): SFT start -> {name}: "
             f"{was('exact_match')}{end['exact_match']:.3f}{rise}"]
    tasks = sorted(k[len("exact_match_n_"):] for k in end if k.startswith("exact_match_n_"))
    if tasks:
        lines.append("  per task: " + ", ".join(f"{t} ({end['exact_match_n_' + t]}) {was('exact_match_' + t)}"
                                                f"{end['exact_match_' + t]:.3f}" for t in tasks))
    if "eval_kl_per_response" in end:
        lines.append(f"KL to the SFT start: {end['eval_kl_per_response']:.3f} nat per response "
                     f"({config.ppo.eval_kl_prompts} held-out prompts sampled at temperature 1)")
    sft = f" (and {sft_seconds:.0f} s before it training the SFT start)" if sft_seconds else ""
    lines.append(f"wall time: {seconds - sft_seconds:.0f} s{sft}")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    t0, sft_seconds = time.perf_counter(), [0.0]

    def prepare(config):
        sft_seconds[0] = train_demo_sft_if_absent(config)
        return demo_run_dir(config)

    def finish(config, result):
        print_figures(config, result, time.perf_counter() - t0, sft_seconds[0])

    return cli.training_command(argv, prog="python -m sft_jax.ppo", doc=__doc__.splitlines()[0],
                                objective="ppo:PPOObjective", default_config="ppo_demo",
                                example="ppo.advantage=grpo", prepare=prepare, finish=finish)


if __name__ == "__main__":
    sys.exit(main())
