#!/usr/bin/env bash
# Runs ON each TPU VM worker; launch/tpu_vm.sh copies it there as ~/sft_jax_worker.sh.
#
#   start RUN_ID WORKDIR [train args...]  start `python -m sft_jax.train` detached (setsid
#                                         nohup), so a dropped ssh or laptop does not stop it
#   status                                print the current run: "RUN_ID running|exit N|died"
#   stop                                  SIGTERM the current run (it saves and exits 0)
#   follow                                print the current run's log until the trainer exits
#
# Each run has ~/sft_jax_runs/RUN_ID/{train.log,exit_status,pid}; ~/sft_jax_runs/current
# points at the latest. The trainer inherits this script's environment.
set -u

runs="$HOME/sft_jax_runs"
current="$runs/current"
python="${SFT_JAX_PYTHON:-$HOME/sft_jax_venv/bin/python}"

alive() {  # the run in directory $1 still has its process group
  [ -f "$1/pid" ] && kill -0 "$(cat "$1/pid")" 2>/dev/null
}

stop() {
  [ -d "$current" ] || { echo "no run on $(hostname)"; return 0; }
  if alive "$current"; then
    kill -TERM "$(cat "$current/trainer_pid")" 2>/dev/null
    echo "sent SIGTERM to run $(basename "$(readlink "$current")") on $(hostname)"
  fi
}

free_tpu() {
  # A trainer of an earlier run (or one that lost its ssh) may still hold the TPU, and a
  # killed one leaves libtpu's lock file behind; either makes the new trainer fail.
  if [ -d "$current" ] && alive "$current"; then
    stop
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12; do alive "$current" || break; sleep 5; done
    alive "$current" && kill -KILL -- "-$(cat "$current/pid")" 2>/dev/null
  fi
  sudo -n fuser -k -KILL /dev/accel* /dev/vfio/[0-9]* 2>/dev/null
  sudo -n rm -f /tmp/libtpu_lockfile
}

start() {
  run_id="$1"; workdir="$2"; shift 2
  dir="$runs/$run_id"
  if [ -e "$dir" ]; then
    # gcloud reruns the whole command after a dropped connection (exit 255)
    echo "run $run_id already started on $(hostname); not starting it twice"
    return 0
  fi
  free_tpu
  mkdir -p "$dir" && ln -sfn "$dir" "$current"
  cd "$workdir" || return 1
  # bash -c: $0 is the run directory, "$@" the trainer command. `stop` signals the trainer
  # alone, so this wrapper lives on to record its exit status.
  # shellcheck disable=SC2016
  setsid nohup bash -c '"$@" >"$0/train.log" 2>&1 & echo $! >"$0/trainer_pid"; wait $!; echo $? >"$0/exit_status"' \
    "$dir" "$python" -m sft_jax.train "$@" </dev/null >/dev/null 2>&1 &
  echo "$!" >"$dir/pid"
  echo "started run $run_id on $(hostname)"
}

status() {
  if [ ! -d "$current" ]; then echo "none"; return 0; fi
  id="$(basename "$(readlink "$current")")"
  if [ -f "$current/exit_status" ]; then echo "$id exit $(cat "$current/exit_status")"
  elif alive "$current"; then echo "$id running"
  else echo "$id died"  # no exit status: killed -9, VM restarted or preempted
  fi
}

follow() {
  [ -d "$current" ] || { echo "no run on $(hostname)"; return 1; }
  touch "$current/train.log"
  if alive "$current"; then tail -n +1 -F --pid="$(cat "$current/pid")" "$current/train.log" 2>/dev/null
  else cat "$current/train.log"
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  start) start "$@" ;;
  status) status ;;
  stop) stop ;;
  follow) follow ;;
  *) echo "usage: $0 start RUN_ID WORKDIR [args...] | status | stop | follow" >&2; exit 2 ;;
esac
