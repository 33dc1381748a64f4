#!/usr/bin/env bash
# One pass of the GPU-only checks on a CUDA machine, from a checkout:
#   bash benchmarks/gpu_check.sh
# 1. the GPU tests (fused cuDNN attention vs the XLA reference, host-offload remat) and
#    the HF parity tests; 2. the demo in bfloat16, timed. Writes logs to $OUT (or /tmp).
set -uo pipefail
out="${OUT:-/tmp}"
nvidia-smi -L
python3 -c "import jax, flax, optax, orbax.checkpoint as o, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'transformers', transformers.__version__)"
SFT_JAX_TEST_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -25
/usr/bin/time -v python3 -m sft_jax.train model.dtype=bfloat16 run.output_dir=/tmp/demo_gpu \
  train.compilation_cache=/tmp/xla_cache 2>&1 | tee "$out/demo_gpu.log" | grep -vE "^\s+[A-Z].*:\s" | tail -22
grep -E "Elapsed \(wall|Maximum resident" "$out/demo_gpu.log"
