"""Scores of generated answers: exact match as an evaluation, and rewards for PPO/GRPO
(``ppo.reward_fn`` names one as "module:function"; each takes (prompts, responses, examples)
and returns one float per response)."""

from __future__ import annotations


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after stripping surrounding whitespace."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def exact_match_reward(prompts: list[str], responses: list[str], examples: list) -> list[float]:
    """The demo's RL reward (``ppo.reward_fn``): 1.0 where the response equals the example's
    answer after stripping whitespace, else 0.0. ``examples`` are rows with an "output"
    field or chat messages (the answer is the last assistant turn)."""
    def answer(example) -> str:
        if isinstance(example, dict) and "output" in example:
            return str(example["output"])
        messages = example if isinstance(example, list) else example.get("messages", [])
        replies = [m["content"] for m in messages if m.get("role") == "assistant"]
        return replies[-1] if replies else ""

    return [float(r.strip() == answer(ex).strip()) for r, ex in zip(responses, examples, strict=True)]


def length_reward(prompts: list[str], responses: list[str], examples: list) -> list[float]:
    """len(response) / 10: a reward any policy can climb by answering longer. Not a goal, a
    check that an RL setup learns at all (``ppo.reward_fn=sft_jax.objectives.rewards:length_reward``:
    the rollouts' reward_mean and response_length should rise within a few dozen steps)."""
    return [len(r) / 10.0 for r in responses]


def constant_reward(prompts: list[str], responses: list[str], examples: list) -> list[float]:
    """1.0 for every response: a control. Nothing is to be learned from it, so a rise measured
    with another reward that does not vanish with this one came from that reward (the RL demo's
    test goes red with ``ppo.reward_fn=sft_jax.objectives.rewards:constant_reward``)."""
    return [1.0] * len(responses)
