"""PPO and GRPO through the training core on a tiny model (the core's ``run`` with the PPO objective).

References: the rollout's old log-probs recomputed independently from the model's own
NLL (``model.token_nll``) on the same sequences; the policy ratio on the first epoch's
first mini-batch, which must be 1 (the parameters have not moved since the rollout); the
KL to the frozen reference, 0 before the first update (the reference is the start); the
masks against the sampled responses' own EOS positions."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import yaml

from sft_jax.core import loop as core_loop
from sft_jax.objectives.ppo import PPOObjective
from sft_jax.core.setup import model_and_tokenizer
from sft_jax.data.formats import decode
from sft_jax.models.gpt2 import GPT2, token_nll
from sft_jax.objectives import sft
from train_fixtures import REPO, metrics, tiny_config


def length_reward(prompts, responses, examples):
    """A reward that differs within a group: the response's length in characters."""
    return [float(len(r)) for r in responses]


def ppo_run(out, advantage, group_size, rows, *extra, devices=None, feed=None):
    """Two updates on one rollout; (config, result, each step's batch as trained on). ``feed``: the
    batches to train on instead of the rollout's own (a test hook after the rollout)."""
    seen = {}

    def keep(step, batch):
        if feed is not None:
            seen["sampled", step] = {k: np.array(v) for k, v in batch.items()}  # the run's own rollout
            batch = {k: np.array(v) for k, v in feed[step].items()}
        seen.setdefault(step, {k: np.array(v) for k, v in batch.items()})
        return batch

    cfg = tiny_config(out, "train.steps=2", f"ppo.advantage={advantage}", f"ppo.rollout_prompts={rows // group_size}",
                      f"ppo.group_size={group_size}", "ppo.prompt_length=40", "ppo.max_new_tokens=8", "ppo.epochs=2",
                      f"train.global_batch_size={rows}", "ppo.reward_fn=test_ppo:length_reward",
                      "ppo.eval_kl_prompts=0", "train.resume=never", "optim.warmup_steps=0", *extra)
    result = core_loop.run(cfg, PPOObjective, devices=jax.devices()[:1] if devices is None else devices, batch_transform=keep)
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

    @jax.jit  # one program, not an XLA compilation per eager op
    def initial_nll(key, tokens, positions, segment_ids, targets):
        params0 = sft.init_params(model_cfg, key)
        hidden = GPT2(model_cfg).apply(params0, tokens, positions, segment_ids, return_hidden=True)
        return token_nll(params0["params"]["wte"], hidden, targets, model_cfg)

    nll = np.asarray(initial_nll(jax.random.key(cfg.train.seed), *(batch[k] for k in
                                                                    ("tokens", "positions", "segment_ids", "targets"))))
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
    # report.md shows the rollout statistics and the updates (the critic's only for PPO)
    report = (out / "report.md").read_text()
    figures = ["rl_reward", "rl_kl", "rl_policy", "rl_responses", "rl_time"] + ["rl_critic"] * (advantage == "gae")
    for name in figures:
        assert f"](plots/{name}.png)" in report and (out / "plots" / f"{name}.png").stat().st_size > 0
    assert advantage == "gae" or "rl_critic" not in report


@pytest.mark.parametrize("advantage,group_size", [("gae", 1), ("grpo", 4)])
def test_updates_on_a_mesh_match_one_device(one_device, tmp_path, monkeypatch, advantage, group_size):
    """The same fed-in rollout trained on by one device and by a (data 2, fsdp 2, tensor 2) mesh of
    8: every logged number of both updates (loss, ratio, KL, clip fractions, value loss, gradient
    norm, ...) agrees to 1e-5 relative; the second update's depend on the first's result. The
    mesh's own rollout was sampled and scored with its rows split over the 4 data-parallel
    devices, and is the one device's rollout."""
    from sft_jax.objectives import ppo as ppo_objective

    placed = []  # (global shape, one device's shard shape, spec) of every array the rollout brought back
    to_host = ppo_objective.to_host
    monkeypatch.setattr(ppo_objective, "to_host", lambda x: (
        placed.append((x.shape, x.addressable_shards[0].data.shape, x.sharding.spec)), to_host(x))[1])
    one_dir, one_cfg, one, rollout = one_device(advantage, group_size)
    assert tuple(one_cfg.mesh.shape) == (-1, 1, 1)  # on one device: (1, 1, 1)
    placed.clear()
    _, mesh, seen = ppo_run(tmp_path / "mesh", advantage, group_size, 8, "mesh.shape=[2,2,2]",
                            devices=jax.devices(), feed=rollout)
    assert one.status == mesh.status == "done" and len(jax.devices()) == 8
    # sampled tokens, then log-probs, reference log-probs, values, entropy, reward scores: 8 rows, 2 per device
    assert len(placed) == 6 and all(shape[0] == 8 and shard[0] == 2 and spec[0] == ("data", "fsdp")
                                    for shape, shard, spec in placed), placed
    own = seen["sampled", 0]
    np.testing.assert_array_equal(own["tokens"], rollout[0]["tokens"])
    np.testing.assert_allclose(own["old_logp"], rollout[0]["old_logp"], rtol=1e-5, atol=1e-5)
    for step in (0, 1):
        assert sorted(seen[step]) == sorted(rollout[step]) == sorted(own)
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


def test_two_processes_match_one_device(one_device, tmp_path):
    """``MODULE=sft_jax.ppo launch/local.sh`` with 2 processes x 4 CPU devices (data 4 x fsdp 2):
    the rollout is sampled and scored with its rows split over both processes' devices, every
    process then holds all of it, and both updates train on each process's rows of the
    mini-batch. The reference is the one-device run of the same config: the same answers
    (rollout statistics equal) and the same update numbers, to 1e-5."""
    from test_multiprocess import _finish, _launch

    one_dir, one_cfg, one, _ = one_device("gae", 1)
    two_dir = tmp_path / "two"
    raw = one_cfg.to_dict()
    raw["run"]["output_dir"], raw["mesh"]["shape"] = str(two_dir), {"data": -1, "fsdp": 2, "tensor": 1}
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    reward = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])  # length_reward
    proc = _launch(two_dir, tmp_path / "xla_cache", processes=2, args=("--config", str(config)),
                   logs=tmp_path / "logs", env_extra={"PYTHONPATH": reward, "MODULE": "sft_jax.ppo"})
    rc, text = _finish(proc, 600)
    assert rc == 0, text[-3000:]
    (a,), (b,) = metrics(one_dir, "rollout"), metrics(two_dir, "rollout")
    for key in ("reward_mean", "reward_std", "response_length", "eos_penalty_rate", "kl_per_response", "entropy",
                "explained_variance"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert a["reward_std"] > 0  # answers of different lengths: the comparison sees the sampled text
    ta, tb = metrics(one_dir), metrics(two_dir)
    assert [r["step"] for r in ta] == [r["step"] for r in tb] == [1, 2]
    for ra, rb in zip(ta, tb):
        for key in ("loss", "pg_loss", "value_loss", "ratio", "kl", "entropy", "grad_norm"):
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-6, err_msg=f"step {ra['step']} {key}")


@pytest.mark.parametrize("advantage,group_size,stop,at", [("gae", 1, "after_save", 2), ("grpo", 4, "sigterm", 1)])
def test_kill_9_and_rerun_ends_bit_equal(tmp_path, advantage, group_size, stop, at):
    """``python -m sft_jax.ppo`` stopped, then rerun: the resumed run ends bit-equal to an
    uninterrupted one (actor, critic, Adam state, every logged loss and rollout, the adaptive KL
    controller's beta and the reward normaliser's running moments), on the plain single CPU
    device. 2 updates per rollout, a checkpoint every 2 steps.

    PPO: SIGKILL right after the step-2 checkpoint, at a rollout's end; the rerun samples the
    next rollout from the restored parameters with that rollout's own seed. GRPO: SIGTERM (a
    preemption notice) after step 1, between the first rollout's two updates: the run saves
    step 1, says so and exits 0; the rerun trains the second update on the first rollout as it
    was sampled (kept in the run directory), without updating beta and the moments again."""
    from sft_jax.core import checkpoint as ckpt
    from train_fixtures import REPO, train_cli, write_tiny_yaml

    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}  # length_reward

    def config(name):  # the uninterrupted run compiles into its own cache: it runs beside the other two
        return write_tiny_yaml(
            tmp_path / f"{name}.yaml", tmp_path / name, "train.steps=6", f"ppo.advantage={advantage}",
            f"ppo.rollout_prompts={4 // group_size}", f"ppo.group_size={group_size}", "ppo.epochs=2",
            "train.global_batch_size=4", "ppo.prompt_length=40", "ppo.max_new_tokens=8", "ppo.eval_kl_prompts=0",
            "ppo.kl_target=0.05", "ppo.kl_horizon=100", "ppo.reward_fn=test_ppo:length_reward", "ppo.reward_norm=true",
            "checkpoint.every=2", "checkpoint.keep=10", "optim.warmup_steps=0", cache_dir=tmp_path / f"xla_cache_{name}")

    def final(run):
        out = ckpt.restore(run / "checkpoints", step=6, with_opt_state=True)
        return jax.device_get(out["params"]), jax.device_get(out["opt_state"])

    straight = train_cli(["--config", config("straight")], env, devices=None, module="sft_jax.ppo", background=True)
    killed = config("killed")
    first = train_cli(["--config", killed], devices=None, module="sft_jax.ppo",
                      env_extra={**env, "SFT_JAX_FAULT": f"step:{at}:{stop}"})
    assert first.returncode == (0 if stop == "sigterm" else -9), first.stdout[-3000:] + first.stderr[-3000:]
    assert stop != "sigterm" or f"SIGTERM: saved step {at}" in first.stderr, first.stderr[-3000:]
    assert ckpt.latest_step(tmp_path / "killed" / "checkpoints") == at
    logged = metrics(tmp_path / "killed")
    assert [r["step"] for r in logged] == list(range(1, at + 1))
    rollouts = metrics(tmp_path / "killed", "rollout")
    second = train_cli(["--config", killed], env, devices=None, module="sft_jax.ppo")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    output, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, output[-3000:]
    # a resume, not a restart: the records before the kill are the first run's; the rollout the
    # first run was in when it stopped is logged once (sampled again, it would be logged twice)
    assert metrics(tmp_path / "killed")[:at] == logged
    assert metrics(tmp_path / "killed", "rollout")[:len(rollouts)] == rollouts and len(rollouts) == 1
    strip = lambda records: [{k: v for k, v in r.items() if not timing(k)} for r in records]  # noqa: E731
    for split in ("train", "rollout"):
        assert strip(metrics(tmp_path / "killed", split)) == strip(metrics(tmp_path / "straight", split)), split
    for a, b in zip(jax.tree.leaves(final(tmp_path / "killed")), jax.tree.leaves(final(tmp_path / "straight"))):
        np.testing.assert_array_equal(a, b)


def check_returns_follow_lam_gamma_and_beta(cfg, seen: dict, logged: dict) -> None:
    """Every rollout's returns and advantages (``seen``: each step's batch of a PPO run with one
    update per rollout) are GAE over the per-token rewards (score at the last token, -beta * KL at
    every one) computed by ``rl_losses`` with the config's ppo.lam, ppo.gamma and ppo.kl_coef, and
    the value loss ``logged`` at each update is ``rl_losses.value_loss`` of them (the critic is the
    one that scored the rollout). The second rollout is sampled by the moved policy, so its KL to
    the reference is not 0 and the sign of beta shows."""
    from sft_jax.objectives import rl_losses as rl

    p = cfg.ppo

    def gae(batch, beta):
        kl = rl.kl_estimate(batch["old_logp"], batch["ref_logp"], p.kl_estimator)
        rewards = rl.token_rewards(batch["score"], kl, batch["mask"], beta)
        advantages, returns = rl.gae(rewards, batch["old_values"], batch["mask"], p.gamma, p.lam)
        return np.asarray(rl.whiten(advantages, batch["mask"])), np.asarray(returns)

    for step in (0, 1):
        batch = seen[step]
        np.testing.assert_array_equal(batch["beta"], p.kl_coef)
        advantages, returns = gae(batch, p.kl_coef)
        np.testing.assert_allclose(batch["returns"], returns, rtol=1e-5, atol=1e-5, err_msg=f"rollout {step}")
        np.testing.assert_allclose(batch["advantages"], advantages, rtol=1e-4, atol=1e-4, err_msg=f"rollout {step}")
        summed, _ = rl.value_loss(batch["old_values"], batch["old_values"], returns, batch["mask"], p.value_clip)
        assert logged[step + 1]["value_loss"] == pytest.approx(float(summed) / batch["mask"].sum(), rel=1e-4), step
    # the checks can tell: the second rollout's KL moves its returns by far more than the tolerance
    kl = np.abs((seen[1]["old_logp"] - seen[1]["ref_logp"]) * seen[1]["mask"]).sum()
    flipped = gae(seen[1], -p.kl_coef)[1]
    assert kl > 1e-3 and np.max(np.abs(flipped - seen[1]["returns"])) > 100 * 1e-5 * np.max(np.abs(flipped)), kl


def test_reward_model_as_reward_and_as_the_critics_start(tmp_path):
    """PPO with ``ppo.reward_model`` (an HF GPT2ForSequenceClassification export), the critic
    started from it (``ppo.critic_init=reward``) and frozen (``ppo.critic_lr=0``), and reward
    normalisation. References: transformers' scores of each prompt + answer + EOS (pad = EOS,
    so it reads the last token that is not EOS); NumPy's mean and std of the rollout's rewards;
    the reward model's own weights. Two rollouts of one update each, with ppo.lam, ppo.gamma and
    ppo.kl_coef away from their defaults: ``check_returns_follow_lam_gamma_and_beta``."""
    import torch
    from transformers import GPT2ForSequenceClassification

    from sft_jax.core import checkpoint as ckpt
    from sft_jax.models.hf_reward import export_reward_hf, load_reward_hf
    from sft_jax.objectives.preference_losses import init_reward_head

    probe = tiny_config(tmp_path / "probe")
    model_cfg, tokenizer, _ = model_and_tokenizer(probe)
    init = jax.jit(lambda key: sft.init_params(model_cfg, key))  # one program, not one per eager op
    trunk = init(jax.random.key(7))
    head = jax.jit(lambda key: init_reward_head(model_cfg, key))(jax.random.key(8))
    head = jax.tree.map(lambda k: 50.0 * k, head)  # scores of order 1
    export_reward_hf(trunk, head, model_cfg, tmp_path / "rm", tokenizer=tokenizer, chat_template=tokenizer.chat_template)

    cfg, result, seen = ppo_run(tmp_path / "run", "gae", 1, 8, f"ppo.reward_model={tmp_path / 'rm'}",
                                "ppo.critic_init=reward", "ppo.critic_lr=0", "ppo.reward_norm=true", "ppo.reward_fn=null",
                                "ppo.epochs=1", "ppo.lam=0.5", "ppo.gamma=0.9", "ppo.kl_coef=2.0")
    assert result.status == "done" and len(metrics(tmp_path / "run", "rollout")) == 2
    check_returns_follow_lam_gamma_and_beta(cfg, seen, {r["step"]: r for r in metrics(tmp_path / "run")})
    batch, P, eos = seen[0], cfg.ppo.prompt_length, tokenizer.eos_token_id
    hf_model = GPT2ForSequenceClassification.from_pretrained(str(tmp_path / "rm"), dtype=torch.float32).eval()
    want = []
    for i, (row, segments) in enumerate(zip(batch["tokens"], batch["segment_ids"])):
        real = [int(t) for t, s in zip(row, segments) if s]  # prompt + answer (+ its EOS)
        n_prompt = int(segments[:P].sum())
        body = real[:n_prompt] + [t for t in real[n_prompt:] if t != eos]
        with torch.no_grad():
            want.append(float(hf_model(torch.tensor([body + [eos]])).logits[0, 0]))
            # the critic starts as the reward model: its value at each answer position is the
            # reward model's score of the text up to there (the head read at every position)
            per_position = hf_model.score(hf_model.transformer(torch.tensor([body])).last_hidden_state)[0, :, 0]
        answer = np.flatnonzero(batch["mask"][i])
        np.testing.assert_allclose(batch["old_values"][i, answer], per_position.numpy()[answer - (P - n_prompt)],
                                   rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(batch["reward"], want, rtol=1e-4, atol=1e-4)
    assert np.std(want) > 0.1  # the answers' scores differ: a wrong read position would show
    # the first rollout is normalised by its own mean and std; answers without EOS get the penalty
    no_eos = ~np.any(batch["tokens"][:, P:] == eos, axis=1)
    np.testing.assert_allclose(batch["score"], (batch["reward"] - np.mean(want)) / (np.std(want) + 1e-6)
                               + cfg.ppo.eos_penalty * no_eos, rtol=1e-4, atol=1e-4)
    rollout = metrics(tmp_path / "run", "rollout")[0]
    assert rollout["reward_mean"] == pytest.approx(np.mean(want), abs=1e-4)
    # critic_lr=0: after both updates the critic is still the reward model, bit for bit; the actor moved
    final = jax.device_get(ckpt.restore(tmp_path / "run" / "checkpoints", step=2)["params"])
    _, rm_trunk, rm_head = load_reward_hf(tmp_path / "rm")
    for a, b in zip(jax.tree.leaves(final["critic"]["trunk"]), jax.tree.leaves(rm_trunk["params"])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(final["critic"]["head"]["kernel"], np.asarray(rm_head["score"]["kernel"])[:, 0])
    start = jax.device_get(init(jax.random.key(cfg.train.seed))["params"])
    assert not np.array_equal(final["params"]["wte"], start["wte"])

    # answers that end in EOS early, late, at once, or never (sampling from the tiny model
    # rarely ends one): the reward model reads each at its last token that is not EOS
    from types import SimpleNamespace

    from sft_jax.core import mesh as shd
    from sft_jax.objectives.ppo import PPOObjective

    objective = PPOObjective(cfg, model_cfg, tokenizer)
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    frozen, _ = objective.frozen_params(mesh)
    loop = SimpleNamespace(mesh=mesh, frozen=frozen, state=SimpleNamespace(params=final))
    prompt_tokens, lengths, prompt_ids = objective.prompt_rows(objective.build_data().eval_data.examples[:4], 1)
    N = cfg.ppo.max_new_tokens
    answers = np.array([[5 + i for i in range(N)]] * 4, np.int32)
    for row, end in zip(answers, (2, N - 1, 0)):
        row[end:] = eos
    rows, has_eos, n_resp = objective.sequences(prompt_tokens, lengths, answers)
    scores = objective.score(loop, rows, n_resp, has_eos)[-1]
    for ids, answer, got in zip(prompt_ids, answers, scores):
        body = list(ids) + [int(t) for t in answer if t != eos]
        with torch.no_grad():
            assert got == pytest.approx(float(hf_model(torch.tensor([body + [eos]])).logits[0, 0]), abs=1e-4)

    # mistakes stop before the run starts, with the field named
    import copy

    from sft_jax.config import ConfigError
    from sft_jax.objectives.ppo import reward_model_dir

    with pytest.raises(ConfigError, match="ppo.reward_fn=.* and ppo.reward_model=.* are both set"):
        tiny_config(tmp_path / "x", f"ppo.reward_model={tmp_path / 'rm'}", "ppo.reward_fn=a:b")
    with pytest.raises(ConfigError, match="ppo.critic_init=reward needs ppo.reward_model"):
        tiny_config(tmp_path / "x", "ppo.critic_init=reward")
    with pytest.raises(ConfigError, match="not a reward model directory"):
        reward_model_dir(str(tmp_path / "run"), model_cfg, tokenizer, 48, False)
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ConfigError, match="another chat template"):
        reward_model_dir(str(tmp_path / "rm"), model_cfg, other, 48, False)
    with pytest.raises(ConfigError, match="positions"):
        reward_model_dir(str(tmp_path / "rm"), model_cfg, tokenizer, model_cfg.n_positions + 1, False)

