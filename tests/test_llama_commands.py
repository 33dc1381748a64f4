"""The reward model, DPO and GRPO on the Llama architecture (``model.preset=llama_tiny``) through
the real command lines, one CPU device: each runs a few steps and exports models transformers
loads; the reward export scores as LlamaForSequenceClassification does (1e-4) and is the GRPO
run's reward model; the reward run killed with -9 after a save and rerun ends bit-equal to an
uninterrupted one."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from sft_jax.core import checkpoint as ckpt
from sft_jax.demos.pairs import demo_pair_examples, make_pairs, write_jsonl
from train_fixtures import losses, train_cli, write_tiny_yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STEPS, EVERY = 4, 2
LLAMA = ("model.preset=llama_tiny", "model.n_positions=64", "model.dtype=float32")
cli = functools.partial(train_cli, devices=None)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    train, held_out = demo_pair_examples(120, 16)
    return write_jsonl(make_pairs(train), root / "train.jsonl"), write_jsonl(make_pairs(held_out), root / "eval.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pairs):
    """The reward model run straight (exported) and killed at step EVERY then rerun, side by side."""
    root = tmp_path_factory.mktemp("llama_reward")
    cache = root / "xla_cache"

    def config(name, *extra):
        return write_tiny_yaml(root / f"{name}.yaml", root / name, *LLAMA, f"data.train={pairs[0]}",
                               f"data.eval={pairs[1]}", "data.format=preference", f"train.steps={STEPS}",
                               f"checkpoint.every={EVERY}", "checkpoint.keep=10", "train.eval_max_batches=1",
                               *extra, cache_dir=cache)

    straight = cli(["--config", config("straight", "run.export=true")], module="sft_jax.reward", background=True)
    killed = config("killed")
    first = cli(["--config", killed], module="sft_jax.reward", env_extra={"SFT_JAX_FAULT": f"step:{EVERY}:after_save"})
    second = cli(["--config", killed], module="sft_jax.reward")
    output, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, output[-3000:]
    return root, first, second


def test_reward_resumes_after_kill_9_bit_equal(runs):
    root, first, second = runs
    assert first.returncode == -9
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resuming from step 2" in second.stderr
    a = ckpt.restore(root / "straight" / "checkpoints", step=STEPS, with_opt_state=True)
    b = ckpt.restore(root / "killed" / "checkpoints", step=STEPS, with_opt_state=True)
    assert losses(root / "straight") == losses(root / "killed") and sorted(losses(root / "killed")) == [1, 2, 3, 4]
    for x, y in zip(jax.tree.leaves(jax.device_get((a["params"], a["opt_state"]))),
                    jax.tree.leaves(jax.device_get((b["params"], b["opt_state"])))):
        np.testing.assert_array_equal(x, y)


def test_reward_export_scores_as_transformers(runs):
    from sft_jax.models import hf_reward

    out = runs[0] / "straight" / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    eos = tokenizer.eos_token_id
    assert config["pad_token_id"] == eos
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
           for t in ("Add 3 and 4.", "Sort the digits 3 1 2 please", "7")]
    T = max(map(len, ids)) + 3
    tokens = np.array([row + [eos] * (T - len(row)) for row in ids])
    with torch.no_grad():
        want = model(torch.from_numpy(tokens)).logits[:, 0].numpy()
    cfg, params, head = hf_reward.load_reward_hf(out)
    got = hf_reward.jax_scores(params, head, cfg, tokens, np.array([len(row) - 2 for row in ids]))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.ptp(want) > 0


@pytest.mark.parametrize("module, extra", [
    ("sft_jax.dpo", ("data.format=preference", "dpo.kl_prompts=0")),
    ("sft_jax.ppo", ("ppo.advantage=grpo", "ppo.group_size=4", "ppo.rollout_prompts=2", "ppo.prompt_length=32",
                     "ppo.max_new_tokens=8", "ppo.epochs=1", "ppo.eval_kl_prompts=0", "train.global_batch_size=8")),
], ids=["dpo", "grpo"])
def test_policy_commands_export_causal_lms(module, extra, runs, pairs, tmp_path):
    if module == "sft_jax.ppo":  # the reward model trained above scores the rollouts
        extra = (*extra, f"ppo.reward_model={runs[0] / 'straight'}")
    else:
        extra = (*extra, f"data.train={pairs[0]}", f"data.eval={pairs[1]}")
    yaml = write_tiny_yaml(tmp_path / "run.yaml", tmp_path / "run", *LLAMA, "train.steps=2", "run.export=true",
                           "train.eval_max_batches=1", *extra, cache_dir=runs[0] / "xla_cache")
    done = cli(["--config", yaml], module=module)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "hf"), dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sorted(losses(tmp_path / "run")) == [1, 2]
