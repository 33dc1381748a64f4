#!/usr/bin/env bash
# Fine-tune on a Cloud TPU VM slice (single- or multi-host): create or reuse the slice,
# install sft_jax on every worker, run the same train command on all workers, stream
# worker 0's log, and delete the slice on request.
#
#   TPU_NAME=sft-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   OUTPUT_DIR=gs://my-bucket/runs/gpt2-xl \
#   launch/tpu_vm.sh run --config configs/gpt2_xl_alpaca.yaml
#
#   launch/tpu_vm.sh delete          # delete the slice
#
# Commands: create | install | run [train args...] | delete | all [train args...]
#   (`all` = create + install + run; `run` assumes the slice exists and sft_jax is installed)
# Settings (environment):
#   TPU_NAME          slice name (required)
#   ZONE              GCP zone (required)
#   PROJECT           GCP project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  e.g. v4-8, v4-32, v5litepod-16 (default v4-8)
#   RUNTIME_VERSION   TPU VM image (default tpu-ubuntu2204-base)
#   SPOT              1 to create a spot (preemptible) slice (default 0)
#   PACKAGE           what pip installs on the workers (default: this checkout, copied over)
#   OUTPUT_DIR        run.output_dir; on a multi-host slice it must be storage every worker
#                     sees, e.g. gs://bucket/path (orbax writes checkpoints from all hosts)
#   DELETE_AFTER      1 to delete the slice after `run`/`all` finishes (default 0)
# Every worker runs `python -m sft_jax.train`; on a TPU VM, jax.distributed.initialize()
# needs no arguments (sft_jax detects the slice), so no coordinator setting is needed.
# A spot preemption sends SIGTERM to the workers: all of them save the same step and exit
# 0; rerunning `run` resumes from that checkpoint (train.resume=auto).
set -euo pipefail

cmd="${1:-}"; shift || true
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
DELETE_AFTER="${DELETE_AFTER:-0}"
OUTPUT_DIR="${OUTPUT_DIR:-}"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project "$PROJECT")
repo_root="$(cd "$(dirname "$0")/.." && pwd)"

ssh_all() {  # run a shell command on every worker of the slice
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" --worker=all --command "$1"
}

create() {
  if gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" >/dev/null 2>&1; then
    echo "reusing TPU slice $TPU_NAME" >&2
    return
  fi
  spot_flag=()
  [[ "$SPOT" == 1 ]] && spot_flag=(--spot)
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" \
    --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${spot_flag[@]}"
}

install() {
  if [[ -n "${PACKAGE:-}" ]]; then
    ssh_all "python3 -m pip install -U '${PACKAGE}[tpu]'"
  else
    # Ship this checkout (without runs/ and caches) to every worker and install it there.
    tarball="$(mktemp -t sft_jax.XXXXXX.tar.gz)"
    tar -C "$repo_root" --exclude=runs --exclude=.git --exclude='__pycache__' -czf "$tarball" .
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/sft_jax.tar.gz" --zone "$ZONE" "${project_flag[@]}" --worker=all
    rm -f "$tarball"
    ssh_all "mkdir -p ~/sft_jax && tar -xzf ~/sft_jax.tar.gz -C ~/sft_jax && python3 -m pip install -U -e '~/sft_jax[tpu]'"
  fi
}

run() {
  args=("$@")
  [[ -n "$OUTPUT_DIR" ]] && args+=("run.output_dir=$OUTPUT_DIR")
  quoted="$(printf ' %q' "${args[@]}")"
  # Every worker runs the same command; worker 0's output is what this terminal shows
  # (gcloud prefixes each line with the worker's number; the others are logged on the VMs).
  set +e
  ssh_all "cd ~/sft_jax 2>/dev/null || cd ~; python3 -m sft_jax.train${quoted} 2>&1 | tee ~/sft_jax_train.log" \
    | grep --line-buffered -E '^(\[0\]|[^[])'
  status="${PIPESTATUS[0]}"
  set -e
  if [[ "$DELETE_AFTER" == 1 ]]; then delete; fi
  return "$status"
}

delete() {
  gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" --quiet
}

case "$cmd" in
  create) create ;;
  install) install ;;
  run) run "$@" ;;
  delete) delete ;;
  all) create; install; run "$@" ;;
  *) echo "usage: $0 create|install|run|delete|all [train args...]" >&2; exit 2 ;;
esac
