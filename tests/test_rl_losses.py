"""The RL losses (sft_jax.objectives.rl_losses) against plain NumPy loops on fixed, masked inputs.

The reference is written the textbook way, one row and one token at a time over the
response span only (prompt and padding tokens never enter it), so agreement shows the
batched, masked jnp versions read nothing outside the mask."""

from __future__ import annotations

import numpy as np
import pytest

from sft_jax.objectives import rl_losses as rl

B, T = 4, 9
# response spans (start, end): prompt before, padding after; one row with a 1-token response
SPANS = [(2, 9), (3, 6), (1, 4), (5, 6)]


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), np.float32)
    for b, (s, e) in enumerate(SPANS):
        mask[b, s:e] = 1
    f = lambda scale=1.0: (rng.normal(size=(B, T)) * scale).astype(np.float32)
    logp, old, ref = -np.abs(f()) - 0.1, -np.abs(f()) - 0.1, -np.abs(f()) - 0.1
    return dict(mask=mask, logp=logp, old_logp=old, ref_logp=ref, values=f(), old_values=f(), rewards=f(),
                returns=f(), adv=f(), score=rng.normal(size=B).astype(np.float32))


def np_gae(rewards, values, gamma, lam):
    """One response (1-D arrays over its tokens), the episode ending after the last."""
    n = len(rewards)
    adv = np.zeros(n)
    last = 0.0
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, adv + values


def spans(x):
    return [x[b, s:e].astype(np.float64) for b, (s, e) in enumerate(SPANS)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_numpy_per_response(gamma, lam):
    x = inputs()
    adv, ret = map(np.asarray, rl.gae(x["rewards"], x["values"], x["mask"], gamma, lam))
    for b, (r, v) in enumerate(zip(spans(x["rewards"]), spans(x["values"]))):
        ref_adv, ref_ret = np_gae(r, v, gamma, lam)
        s, e = SPANS[b]
        np.testing.assert_allclose(adv[b, s:e], ref_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret[b, s:e], ref_ret, rtol=1e-5, atol=1e-5)
    assert np.all(adv[x["mask"] == 0] == 0) and np.all(ret[x["mask"] == 0] == 0)


def test_kl_estimators_and_token_rewards():
    x = inputs()
    k1 = np.asarray(rl.kl_estimate(x["logp"], x["ref_logp"], "k1"))
    k3 = np.asarray(rl.kl_estimate(x["logp"], x["ref_logp"], "k3"))
    lp, lr = x["logp"].astype(np.float64), x["ref_logp"].astype(np.float64)
    np.testing.assert_allclose(k1, lp - lr, rtol=1e-6, atol=1e-6)
    ratio = np.exp(lr - lp)
    np.testing.assert_allclose(k3, ratio - 1 - np.log(ratio), rtol=1e-5, atol=1e-6)
    assert np.all(k3 >= 0)
    with pytest.raises(ValueError, match="k2"):
        rl.kl_estimate(x["logp"], x["ref_logp"], "k2")
    beta = 0.3
    rewards = np.asarray(rl.token_rewards(x["score"], k1, x["mask"], beta))
    for b, (s, e) in enumerate(SPANS):
        expected = np.zeros(T)
        expected[s:e] = -beta * (lp[b, s:e] - lr[b, s:e])
        expected[e - 1] += x["score"][b]
        np.testing.assert_allclose(rewards[b], expected, rtol=1e-5, atol=1e-6)


def test_whiten_masked():
    x = inputs()
    w = np.asarray(rl.whiten(x["adv"], x["mask"]))
    vals = np.concatenate(spans(x["adv"]))
    expected = (vals - vals.mean()) / np.sqrt(vals.var() + 1e-8)
    np.testing.assert_allclose(np.concatenate(spans(w)), expected, rtol=1e-5, atol=1e-5)
    assert np.all(w[x["mask"] == 0] == 0)
    kept = np.concatenate(spans(np.asarray(rl.whiten(x["adv"], x["mask"], shift_mean=False))))
    np.testing.assert_allclose(kept, expected + vals.mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [0.2, 0.05])
def test_clipped_policy_and_value_losses_average_over_response_tokens(clip):
    x = inputs()
    n = x["mask"].sum()
    total, clipped, _ = rl.policy_loss(x["logp"], x["old_logp"], x["adv"], x["mask"], clip)
    lp, old, adv = (np.concatenate(spans(x[k])) for k in ("logp", "old_logp", "adv"))
    ratio = np.exp(lp - old)
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip))
    np.testing.assert_allclose(float(total) / n, per_token.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(clipped) / n, np.mean(-adv * np.clip(ratio, 1 - clip, 1 + clip) > -adv * ratio),
                               rtol=1e-6)
    assert 0 < float(clipped) < n  # the inputs exercise both branches

    vtotal, vclipped = rl.value_loss(x["values"], x["old_values"], x["returns"], x["mask"], clip)
    v, vo, R = (np.concatenate(spans(x[k])) for k in ("values", "old_values", "returns"))
    vc = vo + np.clip(v - vo, -clip, clip)
    expected = 0.5 * np.maximum((v - R) ** 2, (vc - R) ** 2)
    np.testing.assert_allclose(float(vtotal) / n, expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(vclipped) / n, np.mean((vc - R) ** 2 > (v - R) ** 2), rtol=1e-6)


def test_grpo_group_advantages_and_zero_groups():
    rewards = np.array([1, 0, 0, 1,  0.5, 0.5, 0.5, 0.5,  3, 1, 2, 2], np.float32)  # fmt: skip
    adv, zero = rl.grpo_advantages(rewards, 4)
    expected = []
    for g in rewards.reshape(3, 4).astype(np.float64):
        std = g.std()
        expected.extend([0.0] * 4 if std < 1e-6 else list((g - g.mean()) / (std + 1e-6)))
    np.testing.assert_allclose(np.asarray(adv), expected, rtol=1e-5, atol=1e-6)
    assert int(zero) == 1


def test_kl_controllers():
    fixed = rl.FixedKLController(0.1)
    fixed.update(5.0, 64)
    assert fixed.beta == 0.1
    c = rl.AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    c.update(9.0, 100)  # error 0.5 clipped to 0.2
    assert c.beta == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    c2 = rl.AdaptiveKLController(beta=0.1, target=6.0, horizon=1000)
    c2.update(5.4, 100)  # error -0.1
    assert c2.beta == pytest.approx(0.1 * (1 - 0.1 * 100 / 1000))


def test_entropy_ignores_padded_vocab():
    logits = np.array([[0.0, 0.0, -np.inf], [1.0, 2.0, 3.0]], np.float32)
    ent = np.asarray(rl.entropy_from_logits(logits))
    p = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    np.testing.assert_allclose(ent, [np.log(2), -(p * np.log(p)).sum()], rtol=1e-6)


def test_running_reward_moments_equal_numpy_over_everything_seen():
    """Each rollout's rewards are normalised by the mean and std of every reward so far,
    this rollout's included; the state round-trips (it is what a checkpoint keeps)."""
    rng = np.random.default_rng(3)
    batches = [rng.normal(5.0, 3.0, size=n) for n in (16, 7, 1, 32)]
    moments, seen = rl.RunningMoments(), []
    for x in batches:
        seen.extend(x)
        got = moments.normalize(x.astype(np.float32))
        np.testing.assert_allclose(got, (x - np.mean(seen)) / (np.std(seen) + 1e-6), rtol=1e-5, atol=1e-6)
        assert moments.count == len(seen)
    again = rl.RunningMoments()
    again.restore(moments.state())
    assert again == moments  # bit-equal: a resumed run normalises the next rollout the same way


def test_critic_learning_rate_scales_only_the_critic_updates():
    """optim's chain (global clip + AdamW + schedule) then scale_subtree: the critic moves as
    AdamW at ppo.critic_lr would move it, the actor as at optim.lr, for several steps, with the
    gradient clip still over both."""
    import dataclasses

    import jax
    import optax

    from sft_jax.config import OptimSection
    from sft_jax.core.optimizer import make_optimizer

    rng = np.random.default_rng(0)
    tree = lambda: {"params": {"h_kernel": rng.normal(size=(3, 4)).astype(np.float32)},  # noqa: E731
                    "critic": {"trunk": {"h_kernel": rng.normal(size=(3, 4)).astype(np.float32)},
                               "head": {"kernel": rng.normal(size=(4,)).astype(np.float32)}}}
    params, grads = tree(), [jax.tree.map(lambda g: 10 * g, tree()) for _ in range(3)]  # clipped: norm > 1
    optim = OptimSection(lr=1e-3, warmup_steps=1, weight_decay=0.1, clip_norm=1.0)

    def train(tx):
        p, state = params, tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    base, _ = make_optimizer(optim, total_steps=10)
    got = train(optax.chain(base, rl.scale_subtree("critic", 3.0)))
    actor_ref = train(base)
    critic_ref = train(make_optimizer(dataclasses.replace(optim, lr=3e-3), total_steps=10)[0])
    np.testing.assert_allclose(got["params"]["h_kernel"], actor_ref["params"]["h_kernel"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got["critic"]), jax.tree.leaves(critic_ref["critic"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(got["critic"]["head"]["kernel"], actor_ref["critic"]["head"]["kernel"], rtol=1e-3)
