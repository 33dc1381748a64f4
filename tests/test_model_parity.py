"""The JAX model against HF torch on the same random weights, plus its own invariances
(packing, scan vs unrolled, remat) and the full presets' parameter counts by shape only."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import EOS_ID, make_hf_model, save_hf_model, torch_logits
from sft_jax.models import hf_io as hf
from sft_jax.core import mesh as shd
from sft_jax.models.gpt2 import GPT2, GPT2Config, param_shapes, token_nll

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
    toks = np.random.RandomState(0).randint(0, 300, (B, T)).astype(np.int32)
    toks[:, [2, 5]] = EOS_ID  # real EOS tokens inside every row: they must be attended like any token
    return toks


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(lambda p, t, pos, s: GPT2(cfg).apply(p, t, pos, s))


def jax_logits(cfg, params, tokens, positions, segment_ids):
    return np.asarray(_forward(cfg)(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids)))


def padded_batch(tokens, side, filler=EOS_ID):
    """Tokens with rows of LENGTHS real tokens, padded right or left with ``filler``; positions
    from 0 at each row's first real token; segment 1 real, 0 padding (HF: attention_mask)."""
    mask = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for b, n in enumerate(LENGTHS):
        real = slice(0, n) if side == "right" else slice(T - n, T)
        mask[b, real] = 1
        positions[b, real] = np.arange(n)
    return np.where(mask == 1, tokens, filler), positions, mask


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


def _remat_policies(cfg, params, tokens) -> list:
    """The policy of every remat (jax.checkpoint) in the traced forward loss, nested jaxprs included."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    closed = jax.make_jaxpr(lambda p: GPT2(cfg).apply(p, tokens, positions, jnp.ones_like(tokens)))(params)
    found, stack = [], [closed.jaxpr]
    while stack:
        for eqn in stack.pop().eqns:
            if "remat" in eqn.primitive.name or eqn.primitive.name == "checkpoint":
                found.append(eqn.params["policy"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        stack.append(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        stack.append(sub)
    return found


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
    # equal numbers would also come from ignoring remat: the traced model must hold the policy asked for
    assert _remat_policies(cfg, params, toks) == []
    policies = {"full": jax.checkpoint_policies.nothing_saveable,
                "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    for variant in variants[1:]:
        found = _remat_policies(variant, params, toks)
        assert found and all(p is policies[variant.remat] for p in found), (variant, found)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_the_segment_id_never_the_token(pair, tokens, side):
    """Padding is segment 0: the filler id written there (EOS, another id, junk per slot) does
    not change one bit of the logits at real positions, and real EOS tokens stay real."""
    _, cfg, params = pair
    toks, positions, mask = padded_batch(tokens, side, filler=EOS_ID)
    ref = jax_logits(cfg, params, toks, positions, mask)
    junk = np.where(mask == 1, toks, np.random.RandomState(5).randint(1, 300, toks.shape)).astype(np.int32)
    for other in (padded_batch(tokens, side, filler=7)[0], junk):
        got = jax_logits(cfg, params, other, positions, mask)
        assert np.array_equal(got[mask == 1], ref[mask == 1])
    # ... whereas a real token changed inside the valid region does change later logits (the check can fail)
    changed = toks.copy()
    changed[mask == 1] = np.where(toks[mask == 1] == EOS_ID, 1, toks[mask == 1])
    assert not np.array_equal(jax_logits(cfg, params, changed, positions, mask)[mask == 1], ref[mask == 1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cudnn_request_falls_back_to_the_reference_off_gpu(pair, dtype):
    """attention=cudnn where cuDNN cannot run (CPU here; float32 anywhere) computes exactly the
    XLA reference, on a packed row with padding."""
    if jax.default_backend() == "gpu" and dtype == "bfloat16":
        pytest.skip("cuDNN really runs here: checked against the reference on the GPU")
    _, cfg, params = pair
    lengths = [7, 12, 5]
    toks = np.random.RandomState(2).randint(0, cfg.vocab_size, (1, 28)).astype(np.int32)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(4, int)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(4, int)])[None]
    xla = jax_logits(cfg.replace(dtype=dtype), params, toks, positions, segments)
    fused = jax_logits(cfg.replace(dtype=dtype, attention="cudnn"), params, toks, positions, segments)
    assert np.array_equal(fused, xla)


def test_remat_offload_on_cpu_is_a_clear_error():
    if jax.default_backend() != "cpu":
        pytest.skip("host offload exists on this backend")
    with pytest.raises(ValueError, match=r"model\.remat=offload needs a GPU or TPU"):
        param_shapes(GPT2Config.preset("tiny", remat="offload"))


def test_sharded_embedding_lookup_needs_no_full_rematerialization(pair, tokens, capfd):
    """wte split (vocab over tensor, embed over fsdp) and the batch over data x fsdp: the lookup
    and its gradient compile without XLA replicating the whole activation, and give the
    one-device loss and gradients (1e-6 of scale: only the summation order differs)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake CPU) devices")
    _, cfg, params = pair
    mesh = shd.make_mesh((2, 2, 2), jax.devices())
    param_sh = shd.logical_shardings(mesh, param_shapes(cfg))
    batch = np.concatenate([tokens, tokens[::-1], tokens[:2]])[:8, :16]  # 8 rows: one per device
    ref_loss, ref_grads = _loss_and_grads(cfg, params, jnp.asarray(batch))
    capfd.readouterr()
    with shd.rules_context(mesh):
        loss, grads = _loss_and_grads(cfg, jax.device_put(params, param_sh),
                                      jax.device_put(jnp.asarray(batch), shd.batch_sharding(mesh)))
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert float(jnp.abs(g - r).max()) <= 1e-6 * (float(jnp.abs(r).max()) + 1e-12)
