"""The JAX model against HF torch on the same random weights, plus its own invariances
(packing, scan vs unrolled, remat) and the full presets' parameter counts by shape only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import make_hf_model, save_hf_model, torch_logits
from sft_jax import hf
from sft_jax.model import GPT2, GPT2Config, param_shapes, token_nll

torch = pytest.importorskip("torch")

B, T = 3, 24
LENGTHS = [24, 17, 9]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model = make_hf_model(seed=0)
    directory = save_hf_model(model, tmp_path_factory.mktemp("hf"))
    cfg, params = hf.load_hf(directory)
    return model, cfg, params


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(0).randint(0, 300, (B, T)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(lambda p, t, pos, s: GPT2(cfg).apply(p, t, pos, s))


def jax_logits(cfg, params, tokens, positions, segment_ids):
    return np.asarray(_forward(cfg)(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids)))


def padded_batch(tokens, side):
    """Tokens with rows of LENGTHS real tokens, padded right or left; positions from 0 at each
    row's first real token; segment 1 real, 0 padding (HF: attention_mask)."""
    mask = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for b, n in enumerate(LENGTHS):
        real = slice(0, n) if side == "right" else slice(T - n, T)
        mask[b, real] = 1
        positions[b, real] = np.arange(n)
    return np.where(mask == 1, tokens, 0), positions, mask


@pytest.mark.parametrize("side", ["none", "right", "left"])
def test_logits_match_hf(pair, tokens, side):
    model, cfg, params = pair
    if side == "none":
        toks, positions, mask = tokens, np.broadcast_to(np.arange(T), (B, T)), np.ones((B, T), np.int32)
    else:
        toks, positions, mask = padded_batch(tokens, side)
    want = torch_logits(model, toks, attention_mask=mask, position_ids=positions)
    got = jax_logits(cfg, params, toks, positions, mask)
    assert got.shape == (B, T, cfg.padded_vocab_size)
    assert np.all(np.isneginf(got[..., cfg.vocab_size:]))
    valid = mask.astype(bool)
    diff = np.abs(got[..., :cfg.vocab_size] - want)[valid].max()
    assert diff < 1e-4, diff


def test_masked_loss_matches_hf(pair, tokens):
    model, cfg, params = pair
    toks, positions, mask = padded_batch(tokens, "right")
    labels = np.where(mask == 1, toks, -100)
    with torch.no_grad():
        want = model(input_ids=torch.as_tensor(toks, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                     position_ids=torch.as_tensor(positions, dtype=torch.long),
                     labels=torch.as_tensor(labels, dtype=torch.long)).loss.item()
    hidden = GPT2(cfg).apply(params, toks, positions, mask, return_hidden=True)
    nll = token_nll(params["params"]["wte"], hidden[:, :-1], jnp.asarray(toks[:, 1:]), cfg)
    target_mask = mask[:, 1:]
    got = float((nll * target_mask).sum() / target_mask.sum())
    assert abs(got - want) < 1e-5, (got, want)


@pytest.mark.parametrize("name, hf_count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                            ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_preset_param_counts(name, hf_count):
    cfg = GPT2Config.preset(name)
    shapes = param_shapes(cfg)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    padding_rows = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd
    assert total - padding_rows == hf_count
    assert cfg.num_params() == hf_count
    assert cfg.num_params(include_vocab_padding=True) == total


def test_packed_documents_match_separate_runs(pair):
    _, cfg, params = pair
    rng = np.random.RandomState(1)
    lengths = [7, 12, 5]
    docs = [rng.randint(0, cfg.vocab_size, n).astype(np.int32) for n in lengths]
    pad = 4
    tokens = np.concatenate(docs + [np.zeros(pad, np.int32)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad, np.int32)])[None]
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad, np.int32)])[None]
    packed = jax_logits(cfg, params, tokens, positions, segments)[0]
    start = 0
    for doc in docs:
        n = len(doc)
        alone = jax_logits(cfg, params, doc[None], np.arange(n)[None], np.ones((1, n), np.int32))[0]
        V = cfg.vocab_size
        assert np.abs(packed[start:start + n, :V] - alone[:, :V]).max() < 1e-5
        start += n


def _loss_and_grads(cfg, params, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def loss(p):
        hidden = GPT2(cfg).apply(p, tokens, positions, jnp.ones_like(tokens), return_hidden=True)
        return token_nll(p["params"]["wte"], hidden[:, :-1], tokens[:, 1:], cfg).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


def test_scan_unrolled_and_remat_agree(pair, tokens):
    _, cfg, params = pair
    toks = jnp.asarray(tokens)
    ref_loss, ref_grads = _loss_and_grads(cfg, params, toks)
    variants = [cfg.replace(scan_layers=False), cfg.replace(remat="full"), cfg.replace(remat="save_dots"),
                cfg.replace(remat="full", scan_layers=False)]
    for variant in variants:
        loss, grads = _loss_and_grads(variant, params, toks)
        assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss)), variant
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            # 1e-6 of the tensor's scale (on CPU they agree exactly; other backends may reorder sums)
            scale = float(jnp.abs(r).max()) + 1e-12
            assert float(jnp.abs(g - r).max()) <= 1e-6 * scale, variant
