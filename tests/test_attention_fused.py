"""The fused attention paths for packed rows against the XLA masked reference.

Pallas GPU flash attention and TPU splash attention run here in Pallas interpret mode
(float32, CPU): outputs at real positions (segment id > 0) and gradients of a loss
weighted by segment id > 0 must match the reference to 1e-5. cuDNN's packed mode cannot
run on CPU: its on-device description of the rows (lengths, offsets) is checked against a
plain-Python one, and the private jax entry it calls is pinned with ``inspect`` so a jax
upgrade that changes it fails here. The bf16 GPU runs are in tests/test_gpu_attention.py.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sft_jax.models.layers import attention as model_lib
from sft_jax.models.layers.attention import attention_mask, dot_product_attention, packed_segments, resolve_attention

B, T, H, K = 4, 128, 2, 64


def _rows() -> np.ndarray:
    """Row 0 one segment, row 1 many segments (one of length 1) then padding, row 2 two
    segments and padding, row 3 fully padded."""
    seg = np.zeros((B, T), np.int32)
    seg[0, :] = 1
    at = 0
    for i, n in enumerate([5, 17, 1, 30, 9, 40, 20]):
        seg[1, at:at + n] = i + 1
        at += n
    seg[2, :70], seg[2, 70:100] = 1, 2
    return seg


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32) for _ in range(3))
    seg = _rows()
    w = jnp.asarray(rng.standard_normal((B, T, H, K)).astype(np.float32) * (seg > 0)[:, :, None, None])
    seg = jnp.asarray(seg)
    mask = attention_mask(seg, seg)

    def run(impl):
        def loss(q, k, v):
            out = dot_product_attention(q, k, v, mask, impl, seg, interpret=impl != "xla")
            return jnp.sum(out * w), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return np.asarray(out), [np.asarray(g) for g in grads]

    return seg, run("xla"), run


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_fused_path_matches_the_xla_reference_in_interpret_mode(case, impl):
    seg, (ref_out, ref_grads), run = case
    out, grads = run(impl)
    real = np.asarray(seg) > 0
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[real], ref_out[real], atol=1e-5, rtol=0)
    assert (out[~real] == 0).all()  # padding positions are zero on the fused paths
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=0)
        assert (g[3] == 0).all()  # the fully padded row gets no gradient


def _packed_reference(seg: np.ndarray, m: int):
    """Runs of equal nonzero ids, in plain Python."""
    lengths = -np.ones((len(seg), m), np.int32)
    offsets = -np.ones((len(seg), m + 1), np.int32)
    counts = []
    for r, row in enumerate(seg):
        runs, t = [], 0
        while t < len(row):
            if row[t] == 0:
                t += 1
                continue
            s = t
            while t < len(row) and row[t] == row[s]:
                t += 1
            runs.append((s, t - s))
        counts.append(len(runs))
        for j, (s, n) in enumerate(runs[:m]):
            offsets[r, j], lengths[r, j] = s, n
    return lengths, offsets, np.array(counts)


def test_cudnn_packed_lengths_and_offsets_follow_the_segment_ids():
    seg = _rows()
    seg[3, 10:14] = 3  # a row that starts with padding (left-padded prompts look like this)
    for m in (8, 3):  # 3 < the 7 runs of row 1: offsets stop at M, the count still says 7
        lengths, offsets, counts = (np.asarray(a) for a in jax.jit(packed_segments, static_argnums=1)(jnp.asarray(seg), m))
        want = _packed_reference(seg, m)
        np.testing.assert_array_equal(lengths, want[0])
        np.testing.assert_array_equal(offsets, want[1])
        np.testing.assert_array_equal(counts, want[2])


def test_private_cudnn_entry_keeps_the_signature_we_call():
    """model._cudnn_packed calls this private function positionally; pin it."""
    fa = model_lib._cudnn_module()
    params = list(inspect.signature(fa.dot_product_attention).parameters.values())
    names = [p.name for p in params]
    assert names[:9] == ["query", "key", "value", "bias", "mask", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets"]
    kw = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert {"scale", "mask_type", "qkv_layout"} <= kw
    assert fa.MaskType.PADDING_CAUSAL.name == "PADDING_CAUSAL"
    for check in ("check_cudnn_version", "check_compute_capability"):
        assert callable(getattr(fa, check))


def test_auto_rule_and_loud_failures_off_accelerator():
    assert resolve_attention("auto", "bfloat16", "cpu")[0] == "xla"
    assert resolve_attention("auto", "float32", "gpu")[0] == "xla"
    assert resolve_attention("auto", "bfloat16", "tpu")[0] == "splash"
    assert resolve_attention("pallas", "float32", "cpu") == ("pallas", "requested")
    q = jnp.zeros((1, 16, 1, 8), jnp.bfloat16)
    seg = jnp.ones((1, 16), jnp.int32)
    mask = attention_mask(seg, seg)
    for impl in ("cudnn_bias", "cudnn_packed", "pallas", "splash"):  # requested by name: never a silent fallback
        with pytest.raises(ValueError, match=f"model.attention={impl}"):
            dot_product_attention(q, q, q, mask, impl, seg)
