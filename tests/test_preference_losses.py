"""DPO and reward losses against a torch reference computed from HF GPT2LMHeadModel policy/reference models."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import EOS_ID, make_hf_model, save_hf_model, train_tokenizer
from sft_jax.models import hf_io as hf
from sft_jax.data.config import DataConfig
from sft_jax.data.preference import PreferenceBatchIterator, build_preference_datasets
from sft_jax.objectives import preference_losses as pl

torch = pytest.importorskip("torch")
logps_fn = jax.jit(pl.sequence_logps, static_argnums=2, static_argnames="loss_chunk")
dpo_fn = jax.jit(pl.dpo_loss, static_argnames=("loss_type", "rpo_alpha"))
scores_fn = jax.jit(pl.reward_scores, static_argnums=3)
reward_loss_fn = jax.jit(pl.reward_loss)

ROWS = [
    {"prompt": "add two numbers", "chosen": "the sum is four.", "rejected": "hello"},
    {"prompt": "How are you today?", "chosen": "I am fine, thank you.", "rejected": "The lazy dog."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello world"}],
     "chosen": [{"role": "assistant", "content": "Hello world!"}],
     "rejected": [{"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}]},
    {"prompt": "JAX and Flax?", "chosen": "train GPT-2 models", "rejected": "Hugging Face loads them back"},
    {"prompt": "Instruction: respond.", "chosen": "Response: fine", "rejected": "Response: the sum is four."},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Policy and reference HF models (also loaded into JAX) and a packed batch of the fixed pairs."""
    import json

    root = tmp_path_factory.mktemp("dpo")
    policy_hf, reference_hf = make_hf_model(seed=1, n_positions=256), make_hf_model(seed=2, n_positions=256)
    with torch.no_grad():  # sharper predictions: log-ratios of many nats, far from float32 cancellation
        policy_hf.transformer.wte.weight.mul_(20.0)
    policy = hf.load_hf(save_hf_model(policy_hf, root / "policy"))
    reference = hf.load_hf(save_hf_model(reference_hf, root / "reference"))
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = DataConfig(train=str(path), eval_fraction=0.0, max_length=256, prefetch=0, shuffle=False)
    train, _, _ = build_preference_datasets(data, train_tokenizer(), n_positions=256, vocab_size=300, seed=0)
    it = PreferenceBatchIterator(train, global_batch_size=4, seed=0, max_length=256, shuffle=False, prefetch=0, loop=False)
    batch = it.batch_at(0)
    assert it.pairs_per_row >= 2, "the fixed pairs should pack several to a row"
    assert batch["pair_mask"].sum() == len(ROWS)
    return policy, reference, (policy_hf, reference_hf), train, batch


def _torch_logps(model, dataset, i, counts=None):
    """Summed response log-probs of pair i's two halves, each run alone through the HF model
    (their response token counts appended to ``counts``)."""
    out = []
    for half in (0, 1):
        tokens, _ = dataset.docs.doc(2 * i + half)
        start = int(dataset.prompt_tokens[i])
        ids = torch.as_tensor(np.asarray(tokens, np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.float(), -1)[0]
        picked = logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
        out.append(float(picked[start - 1:].sum()))
        if counts is not None:
            counts.append(len(picked[start - 1:]))
    return out


def _pairs_in_batch(batch, dataset):
    """(row, slot) -> pair id, recovered from the tokens (rows hold pairs in plan order)."""
    found = {}
    for r in range(batch["tokens"].shape[0]):
        for j in range(batch["pair_mask"].shape[1]):
            if batch["pair_mask"][r, j]:
                seg = batch["segment_ids"][r] == 2 * j + 1
                tokens = batch["tokens"][r][seg]
                for i in range(len(dataset)):
                    if np.array_equal(dataset.docs.doc(2 * i)[0], tokens):
                        found[(r, j)] = i
    return found


def test_dpo_matches_torch_reference(setup):
    (pcfg, pparams), (rcfg, rparams), (policy_hf, reference_hf), dataset, batch = setup
    jb = jax.tree.map(jnp.asarray, batch)
    with jax.default_matmul_precision("highest"):
        pol = pl.as_pairs(logps_fn(pparams, jb, pcfg))
        ref = pl.as_pairs(logps_fn(rparams, jb, rcfg, loss_chunk=16))  # chunked path, same numbers
    where = _pairs_in_batch(batch, dataset)
    assert sorted(where.values()) == list(range(len(ROWS)))
    torch_pol = {i: _torch_logps(policy_hf, dataset, i) for i in where.values()}
    torch_ref = {i: _torch_logps(reference_hf, dataset, i) for i in where.values()}
    for (r, j), i in where.items():
        np.testing.assert_allclose(np.asarray(pol[r, j]), torch_pol[i], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(ref[r, j]), torch_ref[i], rtol=1e-5)

    beta, eps = 0.1, 0.2
    tp = torch.tensor([torch_pol[i] for i in sorted(where.values())], dtype=torch.float64)
    tr = torch.tensor([torch_ref[i] for i in sorted(where.values())], dtype=torch.float64)
    h = (tp[:, 0] - tr[:, 0]) - (tp[:, 1] - tr[:, 1])
    logsig = torch.nn.functional.logsigmoid
    want = {
        ("sigmoid", 0.0): float((-logsig(beta * h)).mean()),
        ("sigmoid", eps): float((-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)).mean()),
        ("ipo", 0.0): float(((h - 1 / (2 * beta)) ** 2).mean()),
    }
    rewards_c, rewards_r = beta * (tp[:, 0] - tr[:, 0]), beta * (tp[:, 1] - tr[:, 1])
    for (loss_type, smoothing), value in want.items():
        loss, m = dpo_fn(pol, ref, jb["pair_mask"], beta=beta, loss_type=loss_type, label_smoothing=smoothing)
        np.testing.assert_allclose(float(loss), value, rtol=1e-5)
        np.testing.assert_allclose(float(m["loss"]), value, rtol=1e-5)
        np.testing.assert_allclose(float(m["chosen_reward"]), float(rewards_c.mean()), rtol=1e-5)
        np.testing.assert_allclose(float(m["rejected_reward"]), float(rewards_r.mean()), rtol=1e-5)
        np.testing.assert_allclose(float(m["margin"]), float((rewards_c - rewards_r).mean()), rtol=1e-5)
        np.testing.assert_allclose(float(m["chosen_logratio"]), float((tp[:, 0] - tr[:, 0]).mean()), rtol=1e-5)
        assert float(m["reward_accuracy"]) == pytest.approx(float((rewards_c > rewards_r).double().mean()))
        assert float(m["pairs"]) == len(ROWS)
    # RPO: plus alpha * the chosen response's mean token NLL, its token count read off the batch's layout
    counts = {i: [] for i in where.values()}
    for i in counts:
        _torch_logps(policy_hf, dataset, i, counts[i])
    chosen_tokens = jnp.asarray(pl.as_pairs(pl.sequence_tokens(jb))[..., 0])
    for (r, j), i in where.items():
        assert float(chosen_tokens[r, j]) == counts[i][0]
    alpha = 0.5
    nll = -tp[:, 0] / torch.tensor([counts[i][0] for i in sorted(where.values())], dtype=torch.float64)
    loss, m = dpo_fn(pol, ref, jb["pair_mask"], beta=beta, rpo_alpha=alpha, chosen_tokens=chosen_tokens)
    np.testing.assert_allclose(float(loss), float((-logsig(beta * h) + alpha * nll).mean()), rtol=1e-5)
    np.testing.assert_allclose(float(m["nll"]), float(nll.mean()), rtol=1e-5)
    # accumulation: two halves of the pairs, each normalised by the global count, sum to the full loss
    full, _ = dpo_fn(pol, ref, jb["pair_mask"], beta=beta)
    mask_a = jb["pair_mask"] * (jnp.arange(jb["pair_mask"].shape[0])[:, None] % 2 == 0)
    parts = [dpo_fn(pol, ref, m, beta=beta, normalizer=jb["pair_mask"].sum())[0]
             for m in (mask_a, jb["pair_mask"] - mask_a)]
    np.testing.assert_allclose(float(parts[0] + parts[1]), float(full), rtol=1e-6)


def test_identical_policy_and_reference(setup):
    (cfg, params), _, _, _, batch = setup
    jb = jax.tree.map(jnp.asarray, batch)
    logps = pl.as_pairs(logps_fn(params, jb, cfg))
    for smoothing in (0.0, 0.1):
        loss, m = dpo_fn(logps, logps, jb["pair_mask"], beta=0.1, label_smoothing=smoothing)
        np.testing.assert_allclose(float(loss), math.log(2), rtol=1e-6)
        assert float(m["margin"]) == 0.0 and float(m["reward_accuracy"]) == 0.0
    for beta in (0.1, 0.5):
        loss, _ = dpo_fn(logps, logps, jb["pair_mask"], beta=beta, loss_type="ipo")
        np.testing.assert_allclose(float(loss), 1 / (4 * beta**2), rtol=1e-6)


def test_gradient_vanishes_with_beta(setup):
    (cfg, params), (_, ref_params), _, _, batch = setup
    jb = jax.tree.map(jnp.asarray, batch)
    reference = jax.lax.stop_gradient(pl.as_pairs(logps_fn(ref_params, jb, cfg)))

    policy = pl.as_pairs(logps_fn(params, jb, cfg))
    flip = (policy - reference)[..., 0] > (policy - reference)[..., 1]  # orient every pair so that h <= 0

    @jax.jit
    def grad_norm(beta, p, flip):
        def loss(q):
            swap = lambda x: jnp.where(flip[..., None], x[..., ::-1], x)  # noqa: E731
            return pl.dpo_loss(swap(pl.as_pairs(pl.sequence_logps(q, jb, cfg))), swap(reference), jb["pair_mask"],
                               beta=beta)[0]
        grads = jax.grad(loss)(p)
        return jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))

    # The gradient is beta * sigma(-beta h) * grad h per pair; sigma(-beta h) >= 1/2 at beta = 0.1 when h <= 0,
    # so the ratio is at most 1e-5 there: start from the reference itself (h = 0) and from the policy.
    for start, orient in ((ref_params, jnp.zeros_like(flip)), (params, flip)):
        small, large = float(grad_norm(1e-6, start, orient)), float(grad_norm(0.1, start, orient))
        assert large > 0 and small <= 1e-5 * large * (1 + 1e-4), (small, large)


def test_reward_loss_and_head(setup):
    (cfg, params), _, _, _, batch = setup
    jb = jax.tree.map(jnp.asarray, batch)
    head = pl.init_reward_head(cfg, jax.random.key(0))
    assert head["score"]["kernel"].shape == (cfg.n_embd, 1)
    scores = pl.as_pairs(scores_fn(params, head, jb, cfg))  # (R, Kp, 2)
    mask = jb["pair_mask"]
    rc, rr = np.asarray(scores[..., 0]), np.asarray(scores[..., 1])
    for margin in (0.0, 0.5):
        loss, m = reward_loss_fn(scores[..., 0], scores[..., 1], mask, margin=margin)
        d = torch.tensor((rc - rr)[np.asarray(mask) > 0], dtype=torch.float64)
        np.testing.assert_allclose(float(loss), float(-torch.nn.functional.logsigmoid(d - margin).mean()), rtol=1e-5)
        assert float(m["accuracy"]) == pytest.approx(float((d > 0).double().mean()))
        np.testing.assert_allclose(float(m["margin"]), float(d.mean()), rtol=1e-5, atol=1e-7)
    # each score is read at the token before the closing eos
    for r, j in zip(*np.nonzero(np.asarray(mask))):
        for k in (2 * j, 2 * j + 1):
            t = batch["reward_index"][r, k]
            assert batch["tokens"][r, t] != EOS_ID and batch["tokens"][r, t + 1] == EOS_ID
            assert batch["segment_ids"][r, t] == k + 1 and batch["segment_ids"][r, t + 1] == k + 1
