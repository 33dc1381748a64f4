"""Checks that need a CUDA GPU: the fused cuDNN attention path and host-offload remat.

They run where a GPU is present (the lent H100/H200 in development; users' machines) and
are skipped elsewhere, since there is nothing to check: off GPU, ``attention=cudnn`` falls
back to the XLA reference (tests/test_model_parity.py proves that fallback) and
``remat=offload`` is a clear error.

Reference: the XLA attention path in float32 on the same weights. bfloat16 cuDNN logits
agree with it to 5e-2 max abs (bf16 has 8 mantissa bits; logits are O(1) on these
weights); the float32 path agrees to 1e-4.

Numbers alone cannot tell the features from their absence (the model catches cuDNN errors
and falls back to XLA; a remat that offloads nothing gives the same gradients), so each
test also asserts, with the CPU-tested readers in tests/hlo_checks.py, the cuDNN
fused-attention custom calls and the host-offload transfers in the lowered and compiled step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlo_checks import cudnn_attention_calls, host_offload_transfers
from sft_jax.models.gpt2 import GPT2, GPT2Config, init_params, token_nll

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a CUDA GPU (run with SFT_JAX_TEST_PLATFORMS=cuda)")

CFG = GPT2Config(vocab_size=1000, n_positions=256, n_embd=256, n_layer=2, n_head=4)
B, T = 4, 256


def _batch(packed: bool):
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, CFG.vocab_size, (B, T)).astype(np.int32)
    segments = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = [0, 60, 150, 230] if packed else [0, 200 + 10 * b]  # packed: 3 documents, then padding
        for s, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:]), start=1):
            segments[b, lo:hi] = s
            positions[b, lo:hi] = np.arange(hi - lo)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _logits(cfg, params, batch):
    return np.asarray(jax.jit(lambda p, *b: GPT2(cfg).apply(p, *b))(params, *batch)).astype(np.float32)


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_attention_matches_the_xla_reference(params, packed):
    batch = _batch(packed)
    valid = np.asarray(batch[2]) > 0
    ref = _logits(CFG.replace(attention="xla", dtype="float32"), params, batch)
    fused = _logits(CFG.replace(attention="cudnn", dtype="bfloat16"), params, batch)
    xla_bf16 = _logits(CFG.replace(attention="xla", dtype="bfloat16"), params, batch)
    v = slice(None, CFG.vocab_size)
    err_fused = np.abs(fused[..., v] - ref[..., v])[valid].max()
    err_xla = np.abs(xla_bf16[..., v] - ref[..., v])[valid].max()
    assert err_fused < 5e-2, err_fused
    assert err_fused < 2 * err_xla + 1e-3, (err_fused, err_xla)  # no worse than bf16 itself
    # float32 requests fall back to the reference, exactly
    f32 = _logits(CFG.replace(attention="cudnn", dtype="float32"), params, batch)
    np.testing.assert_allclose(f32[..., v][valid], ref[..., v][valid], atol=1e-4)


def test_cudnn_attention_is_the_fused_kernel_forward_and_backward(params):
    """The fused cuDNN kernel, not the silent XLA fallback, runs in the training step."""
    cfg = CFG.replace(attention="cudnn", dtype="bfloat16")
    batch = _batch(packed=True)
    loss = lambda p: GPT2(cfg).apply(p, *batch).astype(jnp.float32).mean()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
    for text in (lowered.as_text(), lowered.compile().as_text()):
        calls = cudnn_attention_calls(text)
        forward = sum(n for t, n in calls.items() if "Backward" not in t)
        backward = sum(n for t, n in calls.items() if "Backward" in t)
        assert forward >= CFG.n_layer and backward >= CFG.n_layer, calls
    # the float32 request is the XLA reference: no cuDNN call
    assert not cudnn_attention_calls(jax.jit(lambda p: GPT2(CFG.replace(attention="cudnn", dtype="float32"))
                                             .apply(p, *batch)).lower(params).as_text())


def test_remat_offload_gives_the_same_gradients(params):
    batch = _batch(packed=True)
    targets = jnp.roll(batch[0], -1, axis=1)
    weights = (batch[2] > 0).astype(jnp.float32)

    def loss(cfg):
        def f(p):
            hidden = GPT2(cfg).apply(p, *batch, return_hidden=True)
            nll = token_nll(p["params"]["wte"], hidden, targets, cfg, chunk=64)
            return (nll * weights).sum() / weights.sum()
        return jax.jit(jax.value_and_grad(f))

    with jax.default_matmul_precision("highest"):  # float32 for real, not TF32: differences are remat's alone
        # the offloaded activations really leave the device (and nothing does without offload)
        lowered = loss(CFG.replace(dtype="float32", remat="offload")).lower(params)
        offload = lowered.compile()
        assert host_offload_transfers(lowered.as_text()) > 0
        assert host_offload_transfers(offload.as_text()) > 0
        assert not host_offload_transfers(loss(CFG.replace(dtype="float32", remat="full")).lower(params).as_text())
        l0, g0 = loss(CFG.replace(dtype="float32", remat="none"))(params)
        l1, g1 = offload(params)
    assert abs(float(l0) - float(l1)) < 1e-5
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
