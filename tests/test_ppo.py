"""PPO and GRPO through the training core on a tiny model (python -m sft_jax.ppo's ``run``).

References: the rollout's old log-probs recomputed independently from the model's own
NLL (``model.token_nll``) on the same sequences; the policy ratio on the first epoch's
first mini-batch, which must be 1 (the parameters have not moved since the rollout); the
KL to the frozen reference, 0 before the first update (the reference is the start); the
masks against the sampled responses' own EOS positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax import ppo
from sft_jax.core.setup import model_and_tokenizer
from sft_jax.data.formats import decode
from sft_jax.model import GPT2, token_nll
from sft_jax.objectives import sft
from train_fixtures import metrics, tiny_config


def length_reward(prompts, responses, examples):
    """A reward that differs within a group: the response's length in characters."""
    return [float(len(r)) for r in responses]


def ppo_run(out, advantage, group_size, rows, *extra, devices=None, feed=None):
    """Two updates on one rollout; (config, result, each step's batch as trained on). ``feed``: the
    batches to train on instead of the rollout's own (a test hook after the rollout)."""
    seen = {}

    def keep(step, batch):
        if feed is not None:
            batch = {k: np.array(v) for k, v in feed[step].items()}
        seen.setdefault(step, {k: np.array(v) for k, v in batch.items()})
        return batch

    cfg = tiny_config(out, "train.steps=2", f"ppo.advantage={advantage}", f"ppo.rollout_prompts={rows // group_size}",
                      f"ppo.group_size={group_size}", "ppo.prompt_length=40", "ppo.max_new_tokens=8", "ppo.epochs=2",
                      f"train.global_batch_size={rows}", "ppo.reward_fn=test_ppo:length_reward",
                      "ppo.eval_kl_prompts=0", "train.resume=never", "optim.warmup_steps=0", *extra)
    result = ppo.run(cfg, devices=jax.devices()[:1] if devices is None else devices, batch_transform=keep)
    return cfg, result, seen


def timing(key: str) -> bool:
    """A metrics field that measures time or host memory (differs between identical runs)."""
    return key == "time" or key.endswith(("_s", "_per_s")) or key == "host_peak_rss_bytes"


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """``get(advantage, group_size)``: (output dir, config, result, batches) of ppo_run on one device
    with 8 rows, run once per module and shared by the tests below."""
    runs = {}

    def get(advantage, group_size):
        if (advantage, group_size) not in runs:
            out = tmp_path_factory.mktemp(f"one_device_{advantage}")
            runs[advantage, group_size] = (out, *ppo_run(out, advantage, group_size, 8))
        return runs[advantage, group_size]

    return get


@pytest.mark.parametrize("advantage,group_size", [("gae", 1), ("grpo", 4)])
def test_first_update_ratio_is_one_and_rollout_logps_match_the_model(one_device, advantage, group_size):
    out, cfg, result, seen = one_device(advantage, group_size)
    assert result.status == "done" and result.step == 2
    first, second = metrics(out)[:2]
    # step 1 = the first epoch's first mini-batch: the policy is the one that sampled it
    assert abs(first["ratio"] - 1.0) < 1e-5 and first["ratio_dev"] < 1e-5
    assert first["clipfrac"] == 0.0 and abs(first["kl"]) < 1e-5  # the reference is the start
    (rollout,) = metrics(out, "rollout")
    batch = seen[0]
    mask = batch["mask"].astype(bool)
    # masks: from the last prompt slot up to and including the response's EOS (or the limit)
    P, eos = cfg.ppo.prompt_length, batch["tokens"][0, 0]
    for row, m in zip(batch["tokens"], mask):
        response = list(row[P:])
        n = response.index(eos) + 1 if eos in response else len(response)
        assert np.flatnonzero(m).tolist() == list(range(P - 1, P - 1 + n))
    assert rollout["response_length"] == pytest.approx(mask.sum() / len(mask))
    # old log-probs = -NLL of the initial model on the same rows, computed independently
    model_cfg, _, _ = model_and_tokenizer(cfg)
    params0 = sft.init_params(model_cfg, jax.random.key(cfg.train.seed))
    model = GPT2(model_cfg)
    hidden = model.apply(params0, batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True)
    nll = np.asarray(token_nll(params0["params"]["wte"], hidden, jnp.asarray(batch["targets"]), model_cfg))
    np.testing.assert_allclose(batch["old_logp"][mask], -nll[mask], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["ref_logp"][mask], batch["old_logp"][mask], rtol=1e-6, atol=1e-6)
    assert np.all(batch["advantages"][~mask] == 0)
    if advantage == "grpo":
        # GRPO's advantages recomputed in NumPy from the responses: a group = the rows with
        # one prompt; reward = length_reward (+ the EOS penalty when the answer has none)
        _, tokenizer, _ = model_and_tokenizer(cfg)
        groups: dict = {}
        for i, row in enumerate(batch["tokens"]):
            response = [t for t in row[P:][:int(mask[i].sum())] if t != eos]
            score = len(decode(tokenizer, response)) + (0.0 if eos in row[P:] else cfg.ppo.eos_penalty)
            groups.setdefault(row[:P].tobytes(), []).append((i, score))
        assert sorted(map(len, groups.values())) == [group_size] * (len(mask) // group_size)
        zero = 0
        for members in groups.values():
            scores = np.array([s for _, s in members])
            flat = scores.std() < 1e-6
            zero += flat
            expected = np.zeros_like(scores) if flat else (scores - scores.mean()) / (scores.std() + 1e-6)
            for (i, _), adv in zip(members, expected):
                np.testing.assert_allclose(batch["advantages"][i][mask[i]], adv, rtol=1e-4, atol=1e-5)
        assert rollout["zero_adv_groups"] == zero
    else:
        assert abs(batch["advantages"][mask].mean()) < 1e-5  # whitened over the rollout (one mini-batch)
    assert second["ratio_dev"] > 0  # the second epoch sees the moved policy


@pytest.mark.parametrize("advantage,group_size", [("gae", 1), ("grpo", 4)])
def test_updates_on_a_mesh_match_one_device(one_device, tmp_path, advantage, group_size):
    """The same fed-in rollout trained on by one device and by a (data 2, fsdp 2, tensor 2) mesh of
    8: every logged number of both updates (loss, ratio, KL, clip fractions, value loss, gradient
    norm, ...) agrees to 1e-5 relative; the second update's depend on the first's result."""
    one_dir, one_cfg, one, rollout = one_device(advantage, group_size)
    assert tuple(one_cfg.mesh.shape) == (-1, 1, 1)  # on one device: (1, 1, 1)
    _, mesh, seen = ppo_run(tmp_path / "mesh", advantage, group_size, 8, "mesh.shape=[2,2,2]",
                            devices=jax.devices(), feed=rollout)
    assert one.status == mesh.status == "done" and len(jax.devices()) == 8
    for step in (0, 1):
        assert sorted(seen[step]) == sorted(rollout[step])
        for key in rollout[step]:
            np.testing.assert_array_equal(seen[step][key], rollout[step][key])
    a, b = metrics(one_dir), metrics(tmp_path / "mesh")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    keys = sorted(k for k, v in a[0].items() if isinstance(v, (int, float)) and not timing(k) and k != "step")
    assert {"loss", "ratio", "kl", "grad_norm"} <= set(keys) and (advantage == "grpo" or "value_loss" in keys), keys
    for ra, rb in zip(a, b):
        for key in keys:
            # atol: GRPO's first loss is a sum of O(1) terms that cancel to ~1e-7 (ratio 1, zero-mean advantages)
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-6, err_msg=f"step {ra['step']} {key}")
    assert a[1]["grad_norm"] != a[0]["grad_norm"]  # the second update saw the first's parameters


@pytest.mark.parametrize("advantage,group_size", [("gae", 1), ("grpo", 4)])
def test_kill_9_and_rerun_ends_bit_equal(tmp_path, advantage, group_size):
    """``python -m sft_jax.ppo`` killed (SIGKILL) right after its step-2 checkpoint, then rerun: the
    resumed run ends bit-equal to an uninterrupted one (actor, critic, Adam state, every logged loss
    and rollout, and the adaptive KL controller's beta), on the plain single CPU device. Checkpoints
    fall at rollout ends (2 updates per rollout), where the rerun samples the next rollout from the
    restored parameters with that rollout's own seed."""
    from sft_jax import checkpoint as ckpt
    from train_fixtures import train_cli, write_tiny_yaml

    def config(name):
        return write_tiny_yaml(
            tmp_path / f"{name}.yaml", tmp_path / name, "train.steps=6", f"ppo.advantage={advantage}",
            f"ppo.rollout_prompts={4 // group_size}", f"ppo.group_size={group_size}", "ppo.epochs=2",
            "train.global_batch_size=4", "ppo.prompt_length=40", "ppo.max_new_tokens=8", "ppo.eval_kl_prompts=0",
            "ppo.kl_target=0.05", "ppo.kl_horizon=100", "checkpoint.every=2", "checkpoint.keep=10",
            "optim.warmup_steps=0", cache_dir=tmp_path / "xla_cache")

    def final(run):
        out = ckpt.restore(run / "checkpoints", step=6, with_opt_state=True)
        return jax.device_get(out["params"]), jax.device_get(out["opt_state"])

    done = train_cli(["--config", config("straight")], devices=None, module="sft_jax.ppo")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    killed = config("killed")
    first = train_cli(["--config", killed], devices=None, module="sft_jax.ppo",
                      env_extra={"SFT_JAX_TEST_KILL": "2:after_save"})
    assert first.returncode == -9 and ckpt.latest_step(tmp_path / "killed" / "checkpoints") == 2
    logged = metrics(tmp_path / "killed")
    assert [r["step"] for r in logged] == [1, 2]
    second = train_cli(["--config", killed], devices=None, module="sft_jax.ppo")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # a resume, not a restart: the two records before the kill are the first run's
    assert metrics(tmp_path / "killed")[:2] == logged
    strip = lambda records: [{k: v for k, v in r.items() if not timing(k)} for r in records]  # noqa: E731
    for split in ("train", "rollout"):
        assert strip(metrics(tmp_path / "killed", split)) == strip(metrics(tmp_path / "straight", split)), split
    for a, b in zip(jax.tree.leaves(final(tmp_path / "killed")), jax.tree.leaves(final(tmp_path / "straight"))):
        np.testing.assert_array_equal(a, b)
