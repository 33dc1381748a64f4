"""PPO and GRPO from the SFT demo model: a large fixed KL coefficient holds the policy at the SFT
model, and GRPO climbs a reward it can climb. Then the RL demo, shortened: PPO and GRPO raise held-out
exact match over its own SFT start, whose demonstrations carried a habit the reward penalises.

``python -m sft_jax.ppo --config ppo_demo model.init_from=runs/demo/hf`` (the demo's exact-match
reward on the demo tasks, from the SFT demo model) with beta = 100, fixed, for 20 iterations (8
prompts per rollout, one answer each, one optimizer step each) at lr 1e-4. Asserted after the last
iteration: the mean per-response KL to the reference (sum of k1 over the response tokens, 64
held-out prompts sampled at temperature 1) <= 0.05 nat, and greedy exact match on the demo's 500
held-out prompts within 0.02 of the SFT model's (not 0.01: measured, 2-core CPU, same command):

    lr 1e-4: beta 100: KL 0.004 nat, exact match 0.884 -> 0.868;  beta 0: KL 0.053, 0.884 -> 0.882
    lr 3e-4: beta 100: KL 0.161 nat, exact match 0.884 -> 0.854;  beta 0: KL 0.349, 0.884 -> 0.816

The penalty holds the KL (14x lower than beta 0 at 1e-4), but Adam moves every weight by about
the learning rate per step whatever the size of the (whitened) advantages, and 8 of the 500
greedy answers sit close enough to a tie to flip.
"""

from __future__ import annotations

import os

import pytest

from train_fixtures import metrics, train_cli


def test_beta_100_keeps_the_policy_at_the_sft_model(sft_demo, tmp_path):
    assert sft_demo.done.returncode == 0, sft_demo.done.stderr[-3000:]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(sft_demo.out)
    args = ["--config", "ppo_demo", "model.init_from=runs/demo/hf", "ppo.kl_coef=100", "optim.lr=1e-4",
            "train.steps=20", "ppo.rollout_prompts=8", "ppo.group_size=1", "ppo.epochs=1", "train.global_batch_size=8",
            "ppo.eval_kl_prompts=64", "train.log_every=5"]
    # as the command runs: one plain CPU device, XLA's default optimisation (not the suite's -O0)
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "optimization_level" not in f)
    done = train_cli(args, devices=None, module="sft_jax.ppo", cwd=tmp_path, env_extra={"XLA_FLAGS": flags})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    evals = metrics(tmp_path / "runs" / "ppo_demo", "eval")
    start, end = evals[0], evals[-1]
    print(f"\nbeta 100: exact match {start['exact_match']:.3f} -> {end['exact_match']:.3f}, "
          f"KL per response {start['eval_kl_per_response']:.4f} -> {end['eval_kl_per_response']:.4f} nat")
    assert start["step"] == 0 and end["step"] == 20
    assert start["exact_match_n"] == end["exact_match_n"] == 500
    assert abs(end["eval_kl_per_response"]) <= 0.05, end
    assert abs(end["exact_match"] - start["exact_match"]) <= 0.02, (start, end)
    # the actor's export, which verified itself against transformers before it was moved into place
    from transformers import AutoConfig

    hf_dir = tmp_path / "runs" / "ppo_demo" / "hf"
    assert AutoConfig.from_pretrained(str(hf_dir)).architectures == ["GPT2LMHeadModel"]
    assert f"HF export:   {hf_dir.relative_to(tmp_path)}" in done.stdout
    # every closing line in the form run.output_dir is given (here relative to the working directory)
    assert f"checkpoints: {hf_dir.parent.relative_to(tmp_path) / 'checkpoints'}" in done.stdout
    assert f"report:      {hf_dir.parent.relative_to(tmp_path) / 'report.md'}" in done.stdout


def test_grpo_climbs_a_reward_from_the_sft_model(sft_demo, tmp_path):
    """The machinery learns, end to end (sampling, group advantages, the clipped loss, the
    update's sign): GRPO from the SFT demo model with ``sft_jax.objectives.rewards:length_reward``
    (len(answer) / 10), 6 rollouts of 16 prompts x 8 answers, one optimizer step per 32 rows,
    lr 3e-3. Measured (2-core CPU VM, 2026-12-06): the rollouts' mean reward 0.667, 0.706, 1.875,
    2.866, 3.903, 4.241; answer length 3.8 -> 11.5 tokens; with the advantage's sign flipped the
    reward falls (0.667 -> 0.191). At lr 1e-3 the climb depends on the host's XLA:CPU numerics
    (2.01 on one host, 0.75 on another), so the test uses the rate that climbs on both. Asserted:
    the last rollout's reward >= 2x the first's and the answers longer. (From this model the
    exact-match reward does not rise within 5 minutes: docs/rl.md.)"""
    assert sft_demo.done.returncode == 0, sft_demo.done.stderr[-3000:]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(sft_demo.out)
    args = ["--config", "ppo_demo", "model.init_from=runs/demo/hf", "ppo.advantage=grpo",
            "ppo.reward_fn=sft_jax.objectives.rewards:length_reward",
            "ppo.rollout_prompts=16", "ppo.group_size=8", "ppo.epochs=1", "optim.lr=3e-3", "train.steps=24",
            "train.eval_at_start=false", "train.exact_match_examples=0", "ppo.eval_kl_prompts=0", "run.export=false"]
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "optimization_level" not in f)
    done = train_cli(args, devices=None, module="sft_jax.ppo", cwd=tmp_path, env_extra={"XLA_FLAGS": flags})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rollouts = metrics(tmp_path / "runs" / "grpo_demo", "rollout")  # the demo's GRPO runs get their own directory
    rewards = [r["reward_mean"] for r in rollouts]
    print("\nGRPO, length reward: rollout reward", [round(x, 3) for x in rewards])
    assert len(rollouts) == 6
    assert rewards[-1] >= 2 * rewards[0], rewards
    assert rollouts[-1]["response_length"] > rollouts[0]["response_length"] + 1, rollouts


# The RL demo (``python -m sft_jax.ppo`` and ``python -m sft_jax.ppo ppo.advantage=grpo``), shortened to
# RL_SHORT: 16 steps (4 rollouts of 16 prompts x 8 answers) instead of 120, exact match on 100 held-out
# prompts instead of 500, the KL on 32. It starts from ``rl_sft_start``, the SFT demo model fine-tuned on
# the demonstrations with the sign-off habit, which signs off on most held-out "reverse" and "sort"
# prompts. Asserted: exact match rises by at least RISE (the full demo's bar is 0.05 on 500 prompts; it
# measures about +0.39), the KL to the start stays under 1 nat, and the command prints its figures.
# Measured (2-core CPU VM, load about 1.5, 2026-12-06): PPO 0.530 -> 0.850, GRPO 0.530 -> 0.860, KL 0.21
# and 0.22 nat; 34 s for rl_sft_start, 24 s and 17 s for the tests. With a constant reward in place of the demo's,
# SFT_JAX_TEST_RL_REWARD=sft_jax.objectives.rewards:constant_reward python -m pytest -k rl_demo, both fail:
# PPO 0.530 -> 0.480, GRPO 0.530 -> 0.530 (docs/rl.md: the control, and what it caught).
RISE = 0.10
RL_SHORT = ["train.steps=16", "train.exact_match_examples=100", "ppo.eval_kl_prompts=32", "train.eval_samples=0",
            "data.demo_train_examples=2000", "run.export=false"]
RL_REWARD = os.environ.get("SFT_JAX_TEST_RL_REWARD")  # the control: another ppo.reward_fn in place of the demo's


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_rl_demo_raises_exact_match_over_its_sft_start(rl_sft_start, tmp_path, advantage):
    assert rl_sft_start.done.returncode == 0, rl_sft_start.done.stdout[-3000:] + rl_sft_start.done.stderr[-3000:]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "rl_sft_demo").symlink_to(rl_sft_start.out)
    args = [f"ppo.advantage={advantage}", *RL_SHORT, *([f"ppo.reward_fn={RL_REWARD}"] if RL_REWARD else [])]
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "optimization_level" not in f)
    done = train_cli(args, devices=None, module="sft_jax.ppo", cwd=tmp_path, env_extra={"XLA_FLAGS": flags})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print("\n" + done.stdout[done.stdout.find("held-out exact match"):])
    run_dir = tmp_path / "runs" / {"gae": "ppo_demo", "grpo": "grpo_demo"}[advantage]
    evals = metrics(run_dir, "eval")
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] == 16 and start["exact_match_n"] == end["exact_match_n"] == 100
    # the start imitates the habit: it signs off on most "reverse" and "sort" prompts
    assert start["exact_match_reverse"] <= 0.5 and start["exact_match_sort"] <= 0.5, start
    assert end["exact_match"] >= start["exact_match"] + RISE, (start, end)
    assert end["eval_kl_per_response"] <= 1.0, end
    assert "SFT start -> " in done.stdout and "KL to the SFT start" in done.stdout, done.stdout[-2000:]
