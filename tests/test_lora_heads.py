"""LoRA on the objectives with heads: the reward model (adapters + score head, exported for peft
as a SEQ_CLS adapter) and PPO/GRPO (actor adapters, the reference = the base with adapters off,
the critic as adapters + value head on the same base). References: peft + transformers' scores
of the exported adapter, the base model's own log-probs, the base weights as loaded."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.adapters.objective import MergedView
from sft_jax.models import hf_io
from train_fixtures import metrics, tiny_config

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random GPT-2 with the demo tokenizer and chat template, as an HF directory."""
    from sft_jax.core.setup import model_and_tokenizer
    from sft_jax.objectives import sft

    root = tmp_path_factory.mktemp("heads")
    model_cfg, tokenizer, _ = model_and_tokenizer(tiny_config(root / "probe", "model.dtype=float32"))
    params = jax.jit(lambda key: sft.init_params(model_cfg, key))(jax.random.key(3))
    hf_io.export_hf(params, model_cfg, root / "base", tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                    verify=False)
    return root / "base"


def capturing(cls, seen: dict):
    """``cls`` recording the loop view it is handed (the LoRA wrapper's view: its loop holds the base)."""

    class Capturing(cls):
        def rollout(self, loop, step, batch):
            seen["view"] = loop
            return super().rollout(loop, step, batch)

        def export(self, loop, out):
            seen["view"] = loop
            return super().export(loop, out)

    return Capturing


def assert_base_untouched(view, base_dir):
    assert isinstance(view, MergedView)
    frozen = jax.device_get(view._loop.frozen[0]["params"])
    want = hf_io.load_hf(base_dir, dtype="float32")[1]["params"]
    leaves = jax.tree_util.tree_leaves_with_path(want)
    got = dict(jax.tree_util.tree_leaves_with_path(frozen))
    assert set(got) == {k for k, _ in leaves}
    for k, v in leaves:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], v, err_msg=jax.tree_util.keystr(k))


def trained_leaves(out, step):
    from sft_jax.core import checkpoint as ckpt

    restored = ckpt.restore(out / "checkpoints", step=step, with_opt_state=False)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored["params"])}


def test_reward_model_with_adapters_trains_head_and_exports_for_peft(base_dir, tmp_path, capsys):
    """Three steps of reward training on adapters with adapter dropout: only adapters and the
    float32 score head are trained and checkpointed, the base is bit-equal after, evaluation runs,
    and the exported SEQ_CLS adapter in peft on AutoModelForSequenceClassification(base) scores
    rows as the JAX merged export does (dropout is off at inference, in peft as here)."""
    from transformers import AutoModelForSequenceClassification

    from sft_jax.core.loop import run
    from sft_jax.demos.pairs import demo_pair_examples, make_pairs, write_jsonl
    from sft_jax.models.hf_reward import jax_scores, load_reward_hf, verify_rows
    from sft_jax.objectives.reward import RewardObjective

    train, held_out = demo_pair_examples(48, 8)
    train_file = write_jsonl(make_pairs(train), tmp_path / "p.jsonl")
    eval_file = write_jsonl(make_pairs(held_out), tmp_path / "pe.jsonl")
    out = tmp_path / "rm"
    cfg = tiny_config(out, f"model.init_from={base_dir}", f"data.train={train_file}", f"data.eval={eval_file}",
                      "data.format=preference", "train.steps=3", "mesh.shape=[1,1,1]", "run.export=true",
                      "checkpoint.every=3", "model.dtype=float32", "model.lora.rank=4", "model.lora.alpha=8",
                      "model.lora.dropout=0.1", "train.eval_every=3",
                      "optim.lr=3e-2", "optim.warmup_steps=0")
    seen: dict = {}
    result = run(cfg, capturing(RewardObjective, seen), devices=jax.devices()[:1])
    printed = capsys.readouterr().out
    assert result.status == "done" and "verified in peft: max |score diff|" in printed, printed
    assert_base_untouched(seen["view"], base_dir)

    leaves = trained_leaves(out, 3)
    assert all("lora_" in k or "head" in k for k in leaves), sorted(leaves)
    head = leaves["['head']['score']['kernel']"]
    assert head.dtype == np.float32
    losses = [r["last_loss"] for r in metrics(out)]
    assert losses[0] > losses[-1], losses

    adapter = out / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert (conf["task_type"], conf["modules_to_save"], conf["target_modules"], conf["lora_dropout"]) == (
        "SEQ_CLS", ["score"], ["c_attn"], 0.1)
    assert "eval_accuracy" in metrics(out, "eval")[-1]
    from safetensors.numpy import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    np.testing.assert_array_equal(saved["base_model.model.score.weight"], head.T)

    # peft's scores of base + adapter against JAX's scores of the merged export, on rows of
    # several lengths right-padded with EOS (transformers reads the last token before the pad)
    hf_cfg, trunk, rm_head = load_reward_hf(out / "hf", dtype="float32")
    np.testing.assert_array_equal(rm_head["score"]["kernel"], head)
    tokens, index = verify_rows(hf_cfg)
    want = jax_scores(trunk, rm_head, hf_cfg, tokens, index)
    base = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=1)
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        got = model(input_ids=torch.as_tensor(tokens)).logits[:, 0].numpy()
        with model.disable_adapter():
            untrained = model(input_ids=torch.as_tensor(tokens)).logits[:, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(untrained - got).max() > 1e-3  # the adapters (not just the head) moved the scores


def test_ppo_with_adapter_critic_reference_is_the_base(base_dir, tmp_path):
    """PPO with actor adapters and a critic of adapters + value head on the same base: the
    rollout's reference log-probs are the base model's own (computed independently) and equal
    the actor's at step 0 (KL 0); only adapters and the value head are trained; the base is
    bit-equal after."""
    from sft_jax.core.loop import run
    from sft_jax.core.setup import model_and_tokenizer
    from sft_jax.models.family import family_of
    from sft_jax.objectives.ppo import PPOObjective, actor_logps

    seen, batches = {}, {}

    def keep(step, batch):
        batches.setdefault(step, {k: np.array(v) for k, v in batch.items()})
        return batch

    out = tmp_path / "ppo"
    cfg = tiny_config(out, f"model.init_from={base_dir}", "train.steps=2", "ppo.advantage=gae",
                      "ppo.rollout_prompts=4", "ppo.group_size=1", "ppo.prompt_length=40", "ppo.max_new_tokens=4",
                      "ppo.epochs=2", "train.global_batch_size=4", "ppo.reward_fn=test_ppo:length_reward",
                      "ppo.critic_lr=3e-3",
                      "ppo.eval_kl_prompts=0", "optim.warmup_steps=0", "checkpoint.every=2", "model.dtype=float32",
                      "model.lora.rank=4", "optim.lr=1e-2", "mesh.shape=[1,1,1]")
    result = run(cfg, capturing(PPOObjective, seen), devices=jax.devices()[:1], batch_transform=keep)
    assert result.status == "done"
    first = metrics(out)[0]
    assert first["kl"] == 0.0 and first["ratio"] == pytest.approx(1.0, abs=1e-6)
    (rollout,) = metrics(out, "rollout")
    assert rollout["kl_per_response"] == 0.0
    assert_base_untouched(seen["view"], base_dir)

    batch = batches[0]
    mask = batch["mask"].astype(bool)
    model_cfg, _, _ = model_and_tokenizer(cfg)
    params = hf_io.load_hf(base_dir, dtype="float32")[1]["params"]
    logp, _ = jax.jit(lambda p, b: actor_logps(family_of(model_cfg).module(model_cfg), p, b))(
        params, {k: batch[k] for k in ("tokens", "positions", "segment_ids", "targets")})
    np.testing.assert_allclose(batch["ref_logp"][mask], np.asarray(logp)[mask], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(batch["ref_logp"][mask], batch["old_logp"][mask])

    leaves = trained_leaves(out, 2)
    assert all("lora_" in k or "['critic']['head']" in k for k in leaves), sorted(leaves)
    assert any(k.startswith("['critic']['trunk']") and "lora_b" in k for k in leaves)
    assert np.abs(leaves["['critic']['head']['kernel']"]).max() > 0  # the value head trained from zero


def test_grpo_with_adapters_through_the_cli_runs_and_exports(base_dir, tmp_path):
    """A few GRPO steps on adapters through ``python -m sft_jax.ppo``: KL 0 at the first update,
    the PEFT adapter exported and verified in peft; a critic start that cannot sit on the base
    is a config error."""
    from sft_jax.config import ConfigError
    from train_fixtures import REPO, train_cli, write_tiny_yaml

    out = tmp_path / "grpo"
    yaml_path = write_tiny_yaml(tmp_path / "grpo.yaml", out, f"model.init_from={base_dir}", "train.steps=3",
                                "ppo.advantage=grpo", "ppo.rollout_prompts=1", "ppo.group_size=4",
                                "ppo.prompt_length=40", "ppo.max_new_tokens=4", "ppo.epochs=1",
                                "train.global_batch_size=4", "ppo.reward_fn=test_ppo:length_reward",
                                "ppo.eval_kl_prompts=0", "run.export=true", "model.dtype=float32",
                                "model.lora.rank=4", "optim.lr=1e-2", "mesh.shape=[1,1,1]")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}  # length_reward
    done = train_cli(["--config", yaml_path], env, devices=None, module="sft_jax.ppo")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified in peft" in done.stdout, done.stdout
    first = metrics(out)[0]
    assert first["kl"] == 0.0
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["task_type"] == "CAUSAL_LM" and conf["modules_to_save"] is None
    assert all("lora_" in k for k in trained_leaves(out, 3))

    with pytest.raises(ConfigError, match="ppo.critic=full") as bad:
        tiny_config(tmp_path / "bad", "model.lora.rank=4", "ppo.advantage=gae", "ppo.critic_init=scratch")
    assert "\n" not in str(bad.value)


def test_wrap_leaves_full_fine_tuning_alone_and_refuses_what_adapters_cannot_do():
    from sft_jax.adapters.objective import wrap
    from sft_jax.config import ConfigError, load_config
    from sft_jax.objectives.base import Objective

    with pytest.raises(ConfigError, match="cannot train through adapters"):
        wrap(load_config(None, ["model.lora.rank=4"]), Objective.__new__(Objective))
    assert wrap(load_config(None, []), "unchanged") == "unchanged"  # rank 0: full fine-tuning as before
    with pytest.raises(ConfigError, match="0 <= dropout < 1") as dropout:
        load_config(None, ["model.lora.rank=4", "model.lora.dropout=1.0"])
    assert "\n" not in str(dropout.value)


def test_llama_reward_adapter_keys_load_in_peft_with_jax_scores(tmp_path):
    """The SEQ_CLS adapter layout on Llama (Linear projections, ``score`` head): random adapters
    and head written by ``save_peft``, loaded by peft on LlamaForSequenceClassification, score
    rows as the JAX merged model does (the export's own check, raising on a mismatch)."""
    from sft_jax.adapters import lora
    from sft_jax.adapters.objective import verify_peft
    from tests.test_lora import llama_base

    llama_base().save_pretrained(tmp_path / "base")
    cfg, params = hf_io.load_hf(tmp_path / "base", dtype="float32")
    spec = lora.resolve(cfg, 4, 8.0, False, "q_proj,v_proj,down_proj")
    adapters = lora.init_adapters(cfg, spec, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapters)  # B != 0
    head = {"score": {"kernel": 0.3 * jax.random.normal(jax.random.key(2), (cfg.hidden_size, 1))}}
    lora.save_peft(tmp_path / "adapter", cfg, spec, adapters, base=str(tmp_path / "base"), task_type="SEQ_CLS",
                   heads={"score.weight": np.asarray(head["score"]["kernel"]).T})
    merged = {"params": lora.merge(params, adapters, spec)["params"], "head": head}
    assert "verified in peft" in verify_peft(tmp_path / "adapter", tmp_path / "base", cfg, merged, "SEQ_CLS")
    wrong = {"params": merged["params"], "head": {"score": {"kernel": head["score"]["kernel"] * 1.01}}}
    with pytest.raises(RuntimeError, match="scores differ"):
        verify_peft(tmp_path / "adapter", tmp_path / "base", cfg, wrong, "SEQ_CLS")


# --- adapter dropout: unmerged adapters on dropped-out inputs in training only ------------------

def _dropout_objective(tmp_path, family_preset, dropout):
    from sft_jax.adapters import lora
    from sft_jax.adapters.objective import LoraObjective
    from sft_jax.core.setup import model_and_tokenizer
    from sft_jax.objectives.sft import SFTObjective

    cfg = tiny_config(tmp_path, f"model.preset={family_preset}", "model.dtype=float32", "model.lora.rank=4",
                      f"model.lora.dropout={dropout}", "model.lora.targets=all-linear")
    model_cfg, tokenizer, _ = model_and_tokenizer(cfg)
    spec = lora.resolve(model_cfg, 4, 8.0, False, "all-linear")
    objective = LoraObjective(SFTObjective(cfg, model_cfg, tokenizer), spec)
    base = jax.jit(objective.inner.init_params)(jax.random.key(0))
    adapters = objective.init_params(jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), adapters)  # B != 0
    return objective, adapters, (base, None), model_cfg


def test_adapter_dropout_is_peft_dropout_in_training_only(tmp_path):
    """On Llama (all seven projections adapted; GPT-2's dropout trains in the reward test above):
    unmerged adapters at keep probability 1 compute the merged model's loss (to float32
    rounding; dropout 0 trains through the merged path itself); with dropout 0.3 the loss is a
    function of the rows' seeds (the same seeds give the same loss, others another), its
    gradient reaches every adapter, and evaluation is the merged model's, seeds or not."""
    from sft_jax.adapters.objective import SEED
    from train_fixtures import fixed_batches

    objective, adapters, frozen, model_cfg = _dropout_objective(tmp_path, "llama_tiny", 0.3)
    assert SEED in objective.batch_axes
    batch = {k: jnp.asarray(v) for k, v in fixed_batches(1, rows=4, length=16, vocab=model_cfg.vocab_size)[0].items()}

    @jax.jit  # one program for every figure
    def figures(params, first):
        seeded = {**batch, SEED: first + jnp.arange(4, dtype=jnp.uint32)}
        merged = objective.inner.loss(objective.expand(params, frozen[0]), None, batch)[0]
        unmerged = objective.inner.loss(objective.unmerged(params, frozen[0], seeded[SEED], dropout=0.0), None,
                                        batch)[0]
        dropped, grads = jax.value_and_grad(lambda p: objective.loss(p, frozen, seeded)[0])(params)
        smallest_grad = jnp.min(jnp.stack([jnp.abs(g).max() for g in jax.tree.leaves(grads)]))
        return merged, unmerged, dropped, smallest_grad, objective.eval_sums(params, frozen, seeded)[0]

    merged, unmerged, a, smallest_grad, evaluated = map(float, figures(adapters, jnp.uint32(0)))
    again, other = float(figures(adapters, jnp.uint32(0))[2]), float(figures(adapters, jnp.uint32(100))[2])
    np.testing.assert_allclose(unmerged, merged, rtol=1e-6)
    assert a == again and a != other and abs(a - merged) > 1e-4 * abs(a)
    assert smallest_grad > 0 and evaluated == merged
