"""GPU checks of the fused attention paths for packed rows (cudnn_packed, pallas, and the
auto rule's choice): bfloat16 outputs and gradients against the XLA reference, and the cuDNN
custom call present in the compiled HLO. Skipped off GPU (the CPU interpret-mode checks are in
tests/test_attention_fused.py); run with SFT_JAX_TEST_PLATFORMS=cuda (benchmarks/perf_check.sh).

Reference: the XLA path in float32 on the same inputs. Tolerance 2e-2 max abs on outputs
(unit-variance inputs: bf16's 8 mantissa bits), and gradients no worse than 2e-2 either.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.models.layers.attention import attention_mask, dot_product_attention, resolve_attention

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a CUDA GPU (run with SFT_JAX_TEST_PLATFORMS=cuda)")

B, T, H, K = 4, 256, 4, 64


def _rows():
    seg = np.zeros((B, T), np.int32)
    seg[0, :] = 1  # one segment
    at = 0
    for i, n in enumerate([5, 17, 1, 30, 9, 40, 20, 64]):  # many, then padding
        seg[1, at:at + n] = i + 1
        at += n
    seg[2, :150], seg[2, 150:200] = 1, 2  # two and padding; row 3 fully padded
    return seg


def _run(impl, dtype, q, k, v, seg, w):
    mask = attention_mask(seg, seg)

    def loss(q, k, v):
        out = dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, impl, seg)
        return jnp.sum(out.astype(jnp.float32) * w), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = fn(q, k, v)
    return fn, np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]


@pytest.mark.parametrize("impl", ["cudnn_packed", "pallas", "auto"])
def test_fused_packed_attention_matches_xla_in_bf16(impl):
    if impl == "cudnn_packed":
        from sft_jax.models.layers.attention import cudnn_packed_unavailable
        if why := cudnn_packed_unavailable():
            pytest.skip(why)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32) for _ in range(3))
    seg_np = _rows()
    seg = jnp.asarray(seg_np)
    w = jnp.asarray(rng.standard_normal((B, T, H, K)).astype(np.float32) * (seg_np > 0)[:, :, None, None])
    _, ref_out, ref_grads = _run("xla", jnp.float32, q, k, v, seg, w)
    fn, out, grads = _run(impl, jnp.bfloat16, q, k, v, seg, w)
    real = seg_np > 0
    assert np.isfinite(out).all()
    assert np.abs(out[real] - ref_out[real]).max() <= 2e-2
    for g, ref in zip(grads, ref_grads):
        assert np.isfinite(g).all() and (g[3] == 0).all()
        assert np.abs(g - ref).max() <= 2e-2 * max(1.0, np.abs(ref).max())
    path = resolve_attention(impl, "bfloat16", "gpu")[0]
    if path == "cudnn_packed":
        hlo = fn.lower(q, k, v).compile().as_text()
        assert "__cudnn$fmha" in hlo, "no cuDNN fused attention custom call in the compiled step"
