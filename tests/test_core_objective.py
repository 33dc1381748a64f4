"""The training core with an objective other than SFT, and SFT's one trace per run.

The toy objective below stands in for reward/DPO: a loss that reads frozen parameters (a
reference model placed on the mesh, with no optimizer state), its own aux metric, its own
evaluation and its own export. References: the frozen parameters rebuilt independently
(bit-equal after training), the first step's loss and aux metric recomputed in one piece
outside the core (no micro-batches), and an uninterrupted run (a crash after a checkpoint,
then a rerun, ends bit-equal)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sft_jax.core import mesh as shd
from sft_jax.core import loop as core_loop
from sft_jax.core import step as core_step
from sft_jax.data import eval_batches
from sft_jax.models.gpt2 import GPT2, token_nll
from sft_jax.objectives import sft
from sft_jax.core.loop import run
from sft_jax.objectives.sft import SFTObjective
from sft_jax.core.setup import model_and_tokenizer
from train_fixtures import metrics, tiny_config

FROZEN_SEED = 7


class Crash(Exception):
    """A run dying mid-way (the loop has no handler for it)."""


def token_nlls(model, params, batch):
    hidden = model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True)
    return token_nll(params["params"]["wte"], hidden, batch["targets"], model.config)  # (B,T)


def toy_loss(model, params, frozen, batch):
    """(summed loss, summed frozen NLL): NLL plus the squared per-token gap to the frozen model."""
    w = batch["weights"].astype(jnp.float32)
    nll, ref = token_nlls(model, params, batch), token_nlls(model, frozen, batch)
    return jnp.sum(w * (nll + (nll - ref) ** 2)), jnp.sum(w * ref)


def frozen_reference(model_cfg):
    return sft.init_params(model_cfg, jax.random.key(FROZEN_SEED))


class ToyObjective(sft.SFTObjective):
    """SFT's data and parameters; its own loss against frozen parameters, eval and export."""

    metric_names = ("frozen_nll",)
    rollout_steps: list = []

    def loss(self, params, frozen, batch):
        total, ref = toy_loss(self.model, params, frozen, batch)
        return total, {"frozen_nll": ref}

    def eval_sums(self, params, frozen, batch):
        total, _ = toy_loss(self.model, params, frozen, batch)
        return total, jnp.sum(batch["weights"].astype(jnp.float32))

    def frozen_params(self, mesh):
        shardings = shd.logical_shardings(mesh, self.abstract_params())
        params = jax.jit(lambda k: sft.init_params(self.model_cfg, k), out_shardings=shardings)(
            jax.random.key(FROZEN_SEED))
        return params, shardings

    def rollout(self, loop, step, batch):
        if not ToyObjective.rollout_steps:  # the frozen parameters before the first update
            ToyObjective.frozen_at_start = jax.device_get(loop.frozen)
        ToyObjective.rollout_steps.append(step)
        return batch

    def evaluate(self, loop, step):
        batch = next(iter(eval_batches(loop.eval_data, batch_size=8, max_length=64)))
        total, count = jax.device_get(loop.eval_fn(loop.state.params,
                                                   core_step.global_batch(batch, loop.eval_fn.batch_shardings, 8),
                                                   loop.frozen))
        return {"eval_toy_loss": float(total / count)}

    def export(self, loop, out):
        flat = lambda tree, tag: {f"{tag}/{k}": np.asarray(v) for k, v in
                                  traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}
        np.savez(out / "toy_export.npz", **flat(loop.host_params(), "params"), **flat(loop.frozen, "frozen"))
        return [f"toy export: {out / 'toy_export.npz'}"]


def toy_run(out, *overrides, batch_transform=None):
    cfg = tiny_config(out, "train.steps=6", "train.micro_batch_size=4", "run.export=true", *overrides)
    return cfg, core_loop.run(cfg, ToyObjective, devices=jax.devices()[:1], batch_transform=batch_transform)


def test_objective_with_frozen_params_trains_evaluates_exports_and_resumes_exactly(tmp_path):
    seen = {}

    def keep_first(step, batch):
        seen.setdefault(step, {k: np.array(v) for k, v in batch.items()})
        return batch

    ToyObjective.rollout_steps = []
    cfg, result = toy_run(tmp_path / "straight", batch_transform=keep_first)
    assert result.status == "done" and ToyObjective.rollout_steps == list(range(6))  # the hook, once per step
    model_cfg, _, _ = model_and_tokenizer(cfg)
    export = np.load(tmp_path / "straight" / "toy_export.npz")
    # frozen parameters: bit-equal after 6 updates to what they were before the first (no
    # gradient, no optimizer state, not donated), and they are the model FROZEN_SEED makes
    # (1 ulp apart: eager and jitted initialisers round differently)
    start = traverse_util.flatten_dict(ToyObjective.frozen_at_start, sep="/")
    rebuilt = traverse_util.flatten_dict(jax.device_get(frozen_reference(model_cfg)), sep="/")
    assert sorted(start) == sorted(rebuilt) and len(start) > 5
    for key, value in start.items():
        np.testing.assert_array_equal(export[f"frozen/{key}"], value, err_msg=key)
        np.testing.assert_allclose(value, rebuilt[key], rtol=1e-6, atol=1e-8, err_msg=key)
    assert not np.array_equal(export["params/params/wte"], export["frozen/params/wte"])
    # step 1 = the toy loss of the initial parameters on the first batch, in one piece
    params0 = sft.init_params(model_cfg, jax.random.key(cfg.train.seed))
    batch0 = {k: jnp.asarray(v) for k, v in seen[0].items()}
    total, ref = jax.jit(lambda p, f, b: toy_loss(GPT2(model_cfg), p, f, b))(params0, frozen_reference(model_cfg),
                                                                             batch0)
    count = float(np.sum(seen[0]["weights"]))
    records = metrics(tmp_path / "straight")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[0]["last_loss"] == pytest.approx(float(total) / count, rel=1e-5)
    assert records[0]["frozen_nll"] == pytest.approx(float(ref) / count, rel=1e-5)
    assert records[-1]["last_loss"] < records[0]["last_loss"]
    (final_eval,) = metrics(tmp_path / "straight", "eval")
    assert np.isfinite(final_eval["eval_toy_loss"]) and result.eval == {"eval_toy_loss": final_eval["eval_toy_loss"]}

    # a crash after the step-3 checkpoint, then the same run again: bit-equal to the straight run
    def crash(step, batch):
        if step == 4:
            raise Crash(step)
        return batch

    ToyObjective.rollout_steps = []
    with pytest.raises(Crash):
        toy_run(tmp_path / "resumed", "checkpoint.every=3", batch_transform=crash)
    ToyObjective.rollout_steps = []
    _, again = toy_run(tmp_path / "resumed", "checkpoint.every=3")
    assert again.status == "done" and ToyObjective.rollout_steps == [3, 4, 5]
    resumed = np.load(tmp_path / "resumed" / "toy_export.npz")
    assert sorted(resumed.files) == sorted(export.files)
    for key in export.files:
        np.testing.assert_array_equal(resumed[key], export[key], err_msg=key)
    straight_losses = {r["step"]: r["last_loss"] for r in records}
    assert {r["step"]: r["last_loss"] for r in metrics(tmp_path / "resumed")} == straight_losses


def test_sft_step_traces_its_loss_once_per_run(tmp_path, monkeypatch):
    """Accumulation (2 micro-batches) and 4 steps: the SFT loss is traced once for the whole
    run, and the jitted step once (a retrace would show as a second loss trace)."""
    traces = []
    original = sft.SFTLoss.loss

    def counted(self, params, frozen, batch):
        traces.append(batch["tokens"].shape)
        return original(self, params, frozen, batch)

    monkeypatch.setattr(sft.SFTLoss, "loss", counted)
    cfg = tiny_config(tmp_path / "run", "train.steps=4", "train.micro_batch_size=4")
    before = core_step.TRACE_COUNTS["train"]
    result = run(cfg, SFTObjective, devices=jax.devices()[:1])
    assert result.status == "done" and result.step == 4
    assert traces == [(4, 64)]  # one trace, of one micro-batch (G=8 rows in 2 micro-batches of 4)
    assert core_step.TRACE_COUNTS["train"] - before == 1
