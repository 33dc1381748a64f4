#!/usr/bin/env bash
# Fine-tune on a Cloud TPU VM slice (single- or multi-host): create the slice (or recreate a
# preempted one), install sft_jax in a Python 3.12 venv on every worker, start the same train
# command on all workers detached from this terminal, follow worker 0's log, collect every
# worker's log and exit with the trainers' status.
#
#   TPU_NAME=sft-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   OUTPUT_DIR=gs://my-bucket/runs/gpt2-xl launch/tpu_vm.sh all --config configs/gpt2_xl_alpaca.yaml
#
# Commands:
#   create               create the slice; reuse it if READY, delete and recreate it if not
#                        (a preempted spot slice cannot be restarted)
#   install              ship this checkout (git archive of HEAD plus uncommitted changes to
#                        tracked files) or PACKAGE to every worker; venv ~/sft_jax_venv (uv)
#   run [train args...]  (re)create + install if the slice is not READY, start the run
#                        detached on every worker, follow worker 0's log until it ends,
#                        fetch all logs to LOG_DIR; exit status = first failing worker's
#   all [train args...]  create + install + run
#   logs [WORKER]        print a worker's log of the current run (default 0)
#   status               each worker's current run: running | exit N | died
#   stop                 SIGTERM the current run on every worker (all save the same step)
#   delete               delete the slice (and its queued resource)
# Settings (environment):
#   TPU_NAME, ZONE      slice name and GCP zone (required)
#   PROJECT             GCP project (default: gcloud's configured project)
#   ACCELERATOR_TYPE    e.g. v4-8, v4-32, v5litepod-16, v5p-16, v6e-16 (default v4-8)
#   RUNTIME_VERSION     TPU VM image (default by generation: v4 tpu-ubuntu2204-base,
#                       v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
#   SPOT=1              spot capacity (preemptible; about 30 s notice)
#   QUEUED=1            create through a queued resource (Google's recommended way to get
#                       capacity; waits until the slice is provisioned)
#   PACKAGE             pip requirement to install instead of this checkout, e.g.
#                       sft_jax==0.1.0 or git+https://github.com/ORG/sft_jax@TAG
#   PYTHON_VERSION      Python for the workers' venv (default 3.12; jax needs >= 3.11)
#   OUTPUT_DIR          run.output_dir; a multi-host slice requires gs://BUCKET/... (every
#                       host writes its part of each checkpoint; the VM's service account
#                       needs roles/storage.objectAdmin on the bucket)
#   INTERNAL_IP=1       ssh/scp over the VPC's internal IPs (no external IP on the VMs)
#   DETACH=1            `run` returns once the run has started (use logs/status later)
#   DELETE_AFTER=1      delete the slice after `run`/`all`, only when every worker exited 0
#   LOG_DIR             where `run` puts worker_N.log (default tpu_logs/TPU_NAME/RUN_ID)
#   RUN_ID              name of this run on the workers (default: UTC timestamp)
# HF_TOKEN and HF_HOME are passed to the trainers when set.
#
# Preemption: a SIGTERM makes every worker save the same step and exit 0 (sft_jax's
# preemption sync). That save is best effort: spot VMs get about 30 s, too little for a
# large model's checkpoint, so `checkpoint.every` is the real protection. Rerun `run`: the
# preempted slice is deleted and recreated, sft_jax reinstalled, and train.resume=auto
# continues from the last complete checkpoint in OUTPUT_DIR.
# Commands for the workers are written in single quotes on purpose: $HOME and friends
# expand there, not here.
# shellcheck disable=SC2016
set -euo pipefail

cmd="${1:-}"; shift || true
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
SPOT="${SPOT:-0}"
QUEUED="${QUEUED:-0}"
DELETE_AFTER="${DELETE_AFTER:-0}"
DETACH="${DETACH:-0}"
OUTPUT_DIR="${OUTPUT_DIR:-}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
POLL_SECONDS="${POLL_SECONDS:-30}"
repo_root="$(cd "$(dirname "$0")/.." && pwd)"

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

default_runtime_version() {
  case "$ACCELERATOR_TYPE" in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version)}"

num_workers() {  # hosts in the slice: v2-v4 and v5p count cores (8 per host), v5e/v6e chips (4 per host)
  local n="${ACCELERATOR_TYPE##*-}"
  case "$n" in ''|*[!0-9]*) die "cannot read the size of ACCELERATOR_TYPE=$ACCELERATOR_TYPE" ;; esac
  case "$ACCELERATOR_TYPE" in
    v5litepod-*|v5e-*|v6e-*) if [ "$n" -le 8 ]; then echo 1; else echo $((n / 4)); fi ;;
    *) if [ "$n" -le 8 ]; then echo 1; else echo $((n / 8)); fi ;;
  esac
}
WORKERS="$(num_workers)"

# Flags every gcloud call takes; ${a[@]+"${a[@]}"} keeps empty arrays safe under set -u on bash 3.2.
common=(--zone "$ZONE")
if [ -n "${PROJECT:-}" ]; then common+=(--project "$PROJECT"); fi
ssh_flags=()
if [ "${INTERNAL_IP:-0}" = 1 ]; then ssh_flags=(--internal-ip); fi

tpu() { gcloud compute tpus tpu-vm "$@"; }
ssh_worker() {  # ssh_worker WORKER|all COMMAND
  tpu ssh "$TPU_NAME" "${common[@]}" ${ssh_flags[@]+"${ssh_flags[@]}"} --worker="$1" --command "$2"
}
scp_to_all() {  # scp_to_all LOCAL REMOTE
  tpu scp "$1" "$TPU_NAME:$2" "${common[@]}" ${ssh_flags[@]+"${ssh_flags[@]}"} --worker=all
}

state() {  # READY, PREEMPTED, CREATING, ...; empty when the slice does not exist
  tpu describe "$TPU_NAME" "${common[@]}" --format='value(state)' 2>/dev/null || true
}

wait_ready() {
  local s
  while :; do
    s="$(state)"
    [ "$s" = READY ] && return 0
    case "$s" in PREEMPTED|TERMINATED|STOPPED|FAILED) die "slice $TPU_NAME is $s while waiting for it" ;; esac
    echo "waiting for $TPU_NAME (state: ${s:-not created yet})" >&2
    sleep "$POLL_SECONDS"
  done
}

create() {
  local s spot=()
  s="$(state)"
  if [ "$s" = READY ]; then echo "reusing TPU slice $TPU_NAME" >&2; return 0; fi
  if [ -n "$s" ]; then
    echo "slice $TPU_NAME is $s (a preempted spot slice cannot be restarted): deleting and recreating it" >&2
    delete
  fi
  if [ "$SPOT" = 1 ]; then spot=(--spot); fi
  if [ "$QUEUED" = 1 ]; then
    gcloud compute tpus queued-resources create "$TPU_NAME" "${common[@]}" --node-id "$TPU_NAME" \
      --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
  else
    tpu create "$TPU_NAME" "${common[@]}" --accelerator-type "$ACCELERATOR_TYPE" \
      --version "$RUNTIME_VERSION" ${spot[@]+"${spot[@]}"}
  fi
  wait_ready
}

pip_requirement() {  # PACKAGE with the tpu extra: sft_jax==1.0 -> sft_jax[tpu]==1.0
  case "$PACKAGE" in
    *://*) echo "sft_jax[tpu] @ $PACKAGE" ;;
    *) local name="${PACKAGE%%[=<>!~ ;@]*}"; echo "${name}[tpu]${PACKAGE#"$name"}" ;;
  esac
}

install() {
  local venv_setup
  # A venv with a Python jax supports (the TPU images ship 3.10), made by uv.
  venv_setup='set -e; export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
rm -rf "$HOME/sft_jax_venv"; uv venv --python '"$PYTHON_VERSION"' "$HOME/sft_jax_venv"'
  if [ -n "${PACKAGE:-}" ]; then
    ssh_worker all "$venv_setup
uv pip install --python \"\$HOME/sft_jax_venv/bin/python\" $(printf %q "$(pip_requirement)")"
  else
    tarball="$(mktemp "${TMPDIR:-/tmp}/sft_jax.XXXXXX")"
    trap 'rm -f "$tarball"' EXIT
    # git archive: tracked files only (no .venv, runs/ or caches); stash create adds
    # uncommitted changes to tracked files without touching the work tree.
    local tree
    tree="$(git -C "$repo_root" stash create)"
    git -C "$repo_root" archive --format=tar.gz -o "$tarball" "${tree:-HEAD}"
    scp_to_all "$tarball" sft_jax.tar.gz  # scp: relative to the remote home
    ssh_worker all "$venv_setup"'
rm -rf "$HOME/sft_jax"; mkdir -p "$HOME/sft_jax"
tar -xzf "$HOME/sft_jax.tar.gz" -C "$HOME/sft_jax"; rm -f "$HOME/sft_jax.tar.gz"
uv pip install --python "$HOME/sft_jax_venv/bin/python" -e "$HOME/sft_jax[tpu]"'
  fi
}

run() {
  local s args=() env_q="" arg config_next=0 run_id workdir quoted status=0 i line fetched
  s="$(state)"
  if [ "$s" != READY ]; then
    echo "slice $TPU_NAME is ${s:-absent}: (re)creating it and installing sft_jax" >&2
    create
    install
  fi
  if [ "$WORKERS" -gt 1 ]; then
    case "$OUTPUT_DIR" in
      gs://?*) ;;
      *) die "a $ACCELERATOR_TYPE slice has $WORKERS hosts: set OUTPUT_DIR=gs://BUCKET/path (every host writes checkpoints there)" ;;
    esac
  fi
  run_id="${RUN_ID:-$(date -u +%Y%m%d-%H%M%S)}"
  case "$run_id" in *[!A-Za-z0-9._-]*|'') die "RUN_ID=$run_id: use letters, digits, . _ -" ;; esac
  # A --config file from this machine is copied to the workers (in PACKAGE mode there is
  # no checkout there, and a relative path would not resolve).
  for arg in ${@+"$@"}; do
    if [ "$config_next" = 1 ] && [ -f "$arg" ]; then
      scp_to_all "$arg" "sft_jax_config_${run_id}.yaml"
      arg="__CONFIG__"
    fi
    config_next=0
    if [ "$arg" = --config ]; then config_next=1; fi
    case "$arg" in
      --config=*) if [ -f "${arg#--config=}" ]; then
                    scp_to_all "${arg#--config=}" "sft_jax_config_${run_id}.yaml"
                    args+=(--config); arg="__CONFIG__"
                  fi ;;
    esac
    args+=("$arg")
  done
  if [ -n "$OUTPUT_DIR" ]; then args+=("run.output_dir=$OUTPUT_DIR"); fi
  quoted=""
  for arg in ${args[@]+"${args[@]}"}; do
    if [ "$arg" = __CONFIG__ ]; then quoted+=" ~/sft_jax_config_${run_id}.yaml"
    else quoted+=" $(printf %q "$arg")"
    fi
  done
  if [ "$WORKERS" -gt 1 ]; then env_q="SFT_JAX_DISTRIBUTED=require"; fi  # no slice found = error, not N runs
  for arg in HF_TOKEN HF_HOME; do
    if [ -n "${!arg:-}" ]; then env_q+=" $arg=$(printf %q "${!arg}")"; fi
  done
  workdir='"$HOME"'
  if [ -z "${PACKAGE:-}" ]; then workdir='"$HOME"/sft_jax'; fi
  scp_to_all "$repo_root/launch/tpu_worker.sh" sft_jax_worker.sh
  ssh_worker all "env $env_q bash ~/sft_jax_worker.sh start $(printf %q "$run_id") $workdir$quoted"
  echo "run $run_id started on $WORKERS worker(s); launch/tpu_vm.sh logs|status|stop" >&2
  if [ "$DETACH" = 1 ]; then return 0; fi

  ssh_worker 0 "bash ~/sft_jax_worker.sh follow" || true  # ends with the trainer, or a dropped ssh
  # Every worker's exit status (the others may still be finishing or saving).
  while :; do
    status=0; fetched=1
    for ((i = 0; i < WORKERS; i++)); do
      line="$(ssh_worker "$i" "bash ~/sft_jax_worker.sh status" | tail -n 1)" || line=""
      case "$line" in
        "$run_id running") fetched=0 ;;
        "$run_id exit 0") ;;
        "$run_id exit "*) if [ "$status" = 0 ]; then status="${line##* }"; fi ;;
        *) echo "worker $i: ${line:-no answer}" >&2; if [ "$status" = 0 ]; then status=1; fi ;;
      esac
    done
    [ "$fetched" = 1 ] && break
    sleep "$POLL_SECONDS"
  done
  collect_logs "$run_id"
  echo "run $run_id finished with exit status $status" >&2
  if [ "$DELETE_AFTER" = 1 ]; then
    if [ "$status" = 0 ]; then delete; else echo "not deleting $TPU_NAME: the run failed" >&2; fi
  fi
  return "$status"
}

collect_logs() {  # one file per worker, before anything deletes the slice
  local dir="${LOG_DIR:-tpu_logs/$TPU_NAME/$1}" i
  mkdir -p "$dir"
  for ((i = 0; i < WORKERS; i++)); do
    tpu scp "$TPU_NAME:~/sft_jax_runs/$1/train.log" "$dir/worker_$i.log" "${common[@]}" \
      ${ssh_flags[@]+"${ssh_flags[@]}"} --worker="$i" || echo "could not fetch worker $i's log" >&2
  done
  echo "logs: $dir/worker_*.log" >&2
}

delete() {
  if [ "$QUEUED" = 1 ]; then
    gcloud compute tpus queued-resources delete "$TPU_NAME" "${common[@]}" --force --quiet
  else
    tpu delete "$TPU_NAME" "${common[@]}" --quiet
  fi
}

case "$cmd" in
  create) create ;;
  install) install ;;
  run) run ${@+"$@"} ;;
  all) create; install; run ${@+"$@"} ;;
  logs) ssh_worker "${1:-0}" "bash ~/sft_jax_worker.sh follow" ;;
  status) for ((i = 0; i < WORKERS; i++)); do echo "worker $i: $(ssh_worker "$i" "bash ~/sft_jax_worker.sh status" | tail -n 1)"; done ;;
  stop) ssh_worker all "bash ~/sft_jax_worker.sh stop" ;;
  delete) delete ;;
  *) echo "usage: $0 create|install|run|all [train args...] | logs [WORKER] | status | stop | delete" >&2; exit 2 ;;
esac
