"""The HLO readers in tests/hlo_checks.py, on CPU: what they report for steps this
machine lowers and compiles, and for hand-written snippets in the forms XLA GPU emits
(the GPU tests in tests/test_gpu.py rest on these readers)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hlo_checks import cudnn_attention_calls, dot_operand_dtypes, host_offload_transfers
from sft_jax.models.gpt2 import GPT2, GPT2Config, init_params

CFG = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
BF16_CUDNN = CFG.replace(attention="cudnn", dtype="bfloat16")  # on CPU: the silent XLA fallback
F32_REMAT = CFG.replace(remat="full", dtype="float32")

# The forms the readers must recognise, as jax 0.11 / XLA GPU print them.
LOWERED_CUDNN = ('%5:2 = stablehlo.custom_call @__cudnn$fmhaSoftmax(%1, %2, %3) {api_version = 2 : i32, '
                 'backend_config = "{...}"} : (tensor<4x256x4x64xbf16>, tensor<4x256x4x64xbf16>, '
                 'tensor<4x256x4x64xbf16>) -> (tensor<4x4x256x64xbf16>, tensor<0xui8>)')
COMPILED_CUDNN = ('  %custom-call.3 = (bf16[4,4,256,64]{3,1,2,0}, f32[4,4,256]{2,1,0}, u8[0]{0}) custom-call('
                  'bf16[4,256,4,64]{3,2,1,0} %q, bf16[4,256,4,64]{3,2,1,0} %k, bf16[4,256,4,64]{3,2,1,0} %v), '
                  'custom_call_target="__cudnn$fmhaSoftmax", backend_config={...}\n'
                  '  %custom-call.7 = (bf16[4,256,4,64]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), '
                  'custom_call_target="__cudnn$fmhaSoftmaxBackward"')
LOWERED_OFFLOAD = ('%12 = stablehlo.custom_call @annotate_device_placement(%11) {has_side_effect = true, '
                   'mhlo.frontend_attributes = {_xla_buffer_placement = "pinned_host"}} : '
                   '(tensor<4x256x256xf32>) -> tensor<4x256x256xf32>')
COMPILED_OFFLOAD = ('  %copy-start = (f32[4,256,256]{2,1,0:S(5)}, f32[4,256,256]{2,1,0}, u32[]) '
                    'copy-start(f32[4,256,256]{2,1,0} %fusion.3)\n'
                    '  %copy-done = f32[4,256,256]{2,1,0:S(5)} copy-done(%copy-start)')


def _batch():
    tokens = jnp.asarray(np.arange(2 * 16).reshape(2, 16) % CFG.vocab_size, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    return tokens, positions, jnp.ones((2, 16), jnp.int32)


@functools.cache
def _lowered_loss_grad(cfg):
    """Lowered loss-and-gradient of the model on ``cfg``; cached: two configs serve all tests."""
    params = init_params(cfg, jax.random.key(0))
    batch = _batch()
    loss = lambda p: GPT2(cfg).apply(p, *batch).astype(jnp.float32).mean()
    return jax.jit(jax.value_and_grad(loss)).lower(params)


def test_cudnn_reader_finds_the_fused_call_and_none_in_the_cpu_fallback():
    assert cudnn_attention_calls(LOWERED_CUDNN) == {"__cudnn$fmhaSoftmax": 1}
    assert cudnn_attention_calls(COMPILED_CUDNN) == {"__cudnn$fmhaSoftmax": 1, "__cudnn$fmhaSoftmaxBackward": 1}
    # attention=cudnn on CPU silently falls back to XLA: the reader must say "no cuDNN call"
    lowered = _lowered_loss_grad(BF16_CUDNN)
    compiled = lowered.compile().as_text()
    assert not cudnn_attention_calls(lowered.as_text())
    assert not cudnn_attention_calls(compiled)
    assert not host_offload_transfers(compiled)  # and, compiled, no host buffer either (one compile serves both)


def test_offload_reader_counts_host_transfers_and_none_under_plain_remat():
    assert host_offload_transfers(LOWERED_OFFLOAD) == 1
    assert host_offload_transfers(COMPILED_OFFLOAD) == 2
    assert host_offload_transfers(LOWERED_OFFLOAD.replace("pinned_host", "device")) == 0
    assert not host_offload_transfers(_lowered_loss_grad(F32_REMAT).as_text())


def test_dot_reader_tells_bf16_from_float32_compute():
    bf16 = dot_operand_dtypes(_lowered_loss_grad(BF16_CUDNN).as_text())
    f32 = dot_operand_dtypes(_lowered_loss_grad(F32_REMAT).as_text())
    assert bf16[("bf16", "bf16")] >= 4 and f32[("f32", "f32")] >= 4, (bf16, f32)
    assert ("bf16", "bf16") not in f32
