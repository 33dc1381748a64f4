#!/usr/bin/env bash
# Run N copies of `python -m sft_jax.train` (or $MODULE: sft_jax.ppo, sft_jax.dpo, ...) on this
# machine as one multi-process JAX job, to try the multi-host path without a cluster: CPU
# devices, gloo collectives, the coordinator on 127.0.0.1. Every argument is passed on unchanged.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local.sh --config configs/demo.yaml mesh.shape='{data: -1}'
#
# Settings (environment):
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  fake CPU devices in each process (default 4)
#   COORDINATOR_PORT     port of process 0's coordinator on 127.0.0.1 (default 12345)
#   HEARTBEAT_TIMEOUT    seconds before a dead peer brings the others down (default 100)
#   LOG_DIR              where process i writes its log, process_i.log (default: a temp dir)
#   PYTHON               interpreter (default python)
#   MODULE               the command's module (default sft_jax.train)
# Process 0's output streams to this terminal; the others go to LOG_DIR. The script exits
# with the first non-zero exit status, after stopping the processes still running.
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
COORDINATOR_PORT="${COORDINATOR_PORT:-12345}"
HEARTBEAT_TIMEOUT="${HEARTBEAT_TIMEOUT:-100}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t sft_jax_local.XXXXXX)}"
PYTHON="${PYTHON:-python}"
MODULE="${MODULE:-sft_jax.train}"
mkdir -p "$LOG_DIR"

export JAX_PLATFORMS=cpu
export SFT_JAX_COORDINATOR_ADDRESS="127.0.0.1:${COORDINATOR_PORT}"
export SFT_JAX_NUM_PROCESSES="$NUM_PROCESSES"
export SFT_JAX_NUM_CPU_DEVICES="$DEVICES_PER_PROCESS"
export SFT_JAX_HEARTBEAT_TIMEOUT="$HEARTBEAT_TIMEOUT"

pids=()
cleanup() {
  for pid in ${pids[@]+"${pids[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
}
# A Ctrl-C or a SIGTERM to this script is passed on to every process (they save and stop).
trap cleanup INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  if [[ $i -eq 0 ]]; then
    SFT_JAX_PROCESS_ID=$i "$PYTHON" -m "$MODULE" "$@" > >(tee "$LOG_DIR/process_$i.log") 2>&1 &
  else
    SFT_JAX_PROCESS_ID=$i "$PYTHON" -m "$MODULE" "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done
echo "sft_jax local: $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices, logs in $LOG_DIR" >&2

status=0
for pid in ${pids[@]+"${pids[@]}"}; do
  rc=0
  wait "$pid" || rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    cleanup
  fi
done
exit "$status"
