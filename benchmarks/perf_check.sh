#!/usr/bin/env bash
# The speed table of docs/benchmarks.md in one prepared run (at most ~8 minutes on one H100/H200):
#   bash benchmarks/perf_check.sh            # results under $OUT (the device tool) or ./perf_out
# 1. the GPU attention tests (fused packed paths vs XLA in bf16, cuDNN custom call in the HLO);
# 2. gpt2-large at B = 8 and 16, dense and packed rows, JAX {xla, cudnn_bias, auto (the new
#    fused path)} against torch eager and torch.compile;
# 3. one profiled step (cudnn_bias "before" and auto "after", packed rows, B = 8);
# 4. gpt2 and gpt2-xl at one batch each.
# Each part has its own time limit; what a part did not reach stays "not measured" in the
# table (benchmarks/perf_table.py), which is written last, whatever happened before.
# Time limits add up to 470 s. LARGE=tiny SMALL=tiny XL=tiny SEQ=128 STEPS=1 SKIP_TESTS=1
# NO_TORCH_COMPILE=1 runs the same
# pipeline on CPU as a smoke test.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-perf_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LARGE="${LARGE:-gpt2-large}" SMALL="${SMALL:-gpt2}" XL="${XL:-gpt2-xl}"
SEQ="${SEQ:-1024}" STEPS="${STEPS:-5}" WARMUP="${WARMUP:-2}"
tc=(--torch-compile); [ "${NO_TORCH_COMPILE:-0}" = 1 ] && tc=()
bench=(python3 -m sft_jax.bench --seq "$SEQ" --steps "$STEPS" --warmup "$WARMUP")

(nvidia-smi -L || true) 2>&1 | tee "$out/env.log"
python3 -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$out/env.log"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  SFT_JAX_TEST_PLATFORMS=cuda timeout "${T_TESTS:-60}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu_attention.py \
    2>&1 | tail -15 | tee "$out/gpu_attention_tests.log"
fi
timeout "${T_LARGE8:-150}" "${bench[@]}" --preset "$LARGE" --batch 8 --rows dense,packed --attention xla,cudnn_bias,auto \
  "${tc[@]}" --json "$out/large_b8.json" 2>&1 | tee "$out/large_b8.log" | grep -E "tokens/s|not measured"
timeout "${T_LARGE16:-100}" "${bench[@]}" --preset "$LARGE" --batch 16 --rows dense,packed --attention cudnn_bias,auto \
  "${tc[@]}" --json "$out/large_b16.json" 2>&1 | tee "$out/large_b16.log" | grep -E "tokens/s|not measured"
timeout "${T_PROFILE:-50}" python3 benchmarks/profile_step.py --preset "$LARGE" --batch 8 --seq "$SEQ" --rows packed \
  --attention cudnn_bias,auto --steps 2 --out /tmp/profile_step --json "$out/profile.json" 2>&1 | tee "$out/profile.md" | head -70
timeout "${T_SMALL:-40}" "${bench[@]}" --preset "$SMALL" --batch 16 --rows dense,packed --attention auto "${tc[@]}" \
  --json "$out/small.json" 2>&1 | tee "$out/small.log" | grep -E "tokens/s|not measured"
timeout "${T_XL:-70}" "${bench[@]}" --preset "$XL" --batch 8 --rows dense,packed --attention auto --remat save_dots \
  "${tc[@]}" --json "$out/xl.json" 2>&1 | tee "$out/xl.log" | grep -E "tokens/s|not measured"

shopt -s nullglob
python3 benchmarks/perf_table.py "$out"/*.json | tee "$out/table.md"
