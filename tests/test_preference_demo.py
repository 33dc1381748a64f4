"""The DPO and reward-model demos (``python -m sft_jax.dpo`` / ``sft_jax.reward`` with no
arguments), on a shortened schedule, from the session's SFT demo model.

The demo code runs as shipped (sft_jax.demos.preference: pairs from the SFT model's own greedy
mistakes, training on the core, then its figures); only the sizes are smaller: 800 training
prompts instead of 4,000, 200 held-out pairs instead of 500, exact match on 100 prompts instead
of 200, 40 optimizer steps instead of 100 (DPO) or 150 (reward). The bars are the full demos',
lowered for the shorter schedule (the full demos' figures are in docs/preference.md, timed by hand):

    DPO:    exact match >= SFT - 0.03 (the full demo's pass line: the same); held-out preference
            accuracy >= 0.8 (the full demo's pass line: 0.85)
    reward: held-out pairwise accuracy >= 0.6 (full demo: reported, 0.76 measured)
"""

from __future__ import annotations

import json
import os

import pytest

from train_fixtures import train_cli

SHORT = ["train.eval_every=0", "checkpoint.every=0", "train.steps=40"]
SIZES = (800, 200, 100)  # training prompts, held-out pairs, exact-match prompts


@pytest.fixture(scope="module")
def demo_dir(sft_demo, tmp_path_factory):
    """A working directory whose runs/demo is the session's SFT demo run; the pairs (runs/demo_pairs)
    are made by the first demo that runs and reused by the second."""
    assert sft_demo.done.returncode == 0, sft_demo.done.stderr[-3000:]
    root = tmp_path_factory.mktemp("preference_demo")
    (root / "runs").mkdir()
    (root / "runs" / "demo").symlink_to(sft_demo.out)
    return root


def run_demo(root, name: str, overrides: list[str]) -> dict:
    """preference_demo.NAME(overrides, sizes=SIZES) in a subprocess in ``root``, as the commands run it:
    one plain CPU device, XLA's default optimisation (the suite's -O0 makes 40 steps 3x slower)."""
    code = (f"import json; from sft_jax.demos import preference as d; "
            f"print('FIGURES', json.dumps(d.{name}({tuple(overrides)!r}, sizes={SIZES!r})))")
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "optimization_level" not in f)
    done = train_cli(["-c", code], devices=None, env_extra={"XLA_FLAGS": flags}, module=None, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout[-600:])
    return {**json.loads(done.stdout.split("FIGURES ")[-1]), "stdout": done.stdout}


def test_dpo_demo_keeps_exact_match_and_learns_the_preferences(demo_dir):
    figures = run_demo(demo_dir, "dpo_demo", SHORT + ["dpo.kl_prompts=0"])
    assert figures["exact_match_sft"] >= 0.8  # the SFT demo model it starts from
    assert figures["exact_match_dpo"] >= figures["exact_match_sft"] - 0.03, figures
    assert figures["accuracy"]["all"] >= 0.8, figures
    # both kinds of rejection are present and reported separately
    assert {k.split()[0] for k in figures["accuracy"]} == {"all", "model", "corrupted"}
    # the demo's own pass lines state their bars, and their verdicts follow the figures
    from sft_jax.demos.preference import ACCURACY_BAR, EXACT_MATCH_MARGIN

    em_ok = figures["exact_match_dpo"] >= figures["exact_match_sft"] - EXACT_MATCH_MARGIN
    accuracy_ok = figures["accuracy"]["all"] >= ACCURACY_BAR
    lines = [l for l in figures["stdout"].splitlines() if l.startswith(("exact match on", "preference accuracy on"))]
    assert len(lines) == 2 and all("(bar: " in line for line in lines), lines
    assert [": ok (bar" in line for line in lines] == [em_ok, accuracy_ok], lines


def test_reward_demo_ranks_held_out_pairs(demo_dir):
    figures = run_demo(demo_dir, "reward_demo", SHORT)
    assert figures["accuracy"]["all"] >= 0.6, figures
