#!/usr/bin/env bash
# Start one training process per device on this server and wait for all of them.
#
#   bash run_singlenode.sh "<command>" <rank_table.json> "[START,END)" <RANK_SIZE>
#
# Ascend (a /dev/davinci* device is present, or VISUAL_MLLM_LAUNCHER=ascend): validates the rank table,
# exports RANK_TABLE_FILE and RANK_SIZE, and for each device i in [START,END) DEVICE_ID=i and
# RANK_ID=i-START, runs the command in the background with its log in output/log/rank_{RANK_ID}/.
# Elsewhere (CPU, or VISUAL_MLLM_LAUNCHER=msrun): runs the same command as RANK_SIZE workers of
# MindSpore's dynamic cluster on this host, as msrun starts them (a scheduler process plus workers with
# MS_ROLE/MS_NODE_ID; the rank table is not used), logs in output/log/rank_{RANK_ID}/ too.
# Exits non-zero if any process fails, naming its rank and log, and stops the others: SIGTERM to each
# process group (a training rank finishes its step and writes a checkpoint), then SIGKILL to whatever still
# runs STOP_GRACE_SECONDS later (default 30; a rank blocked in a collective whose peer died never returns).
# Ctrl-C / SIGTERM to this script stops every process the same way.
# CPU workers are pinned to their share of this process's cores (rank r gets cores r*K..r*K+K-1 of the N
# usable ones, K = N / RANK_SIZE; as msrun --bind_core): unpinned, the kernel often runs both ranks of a
# step on one core after they wake from a collective. BIND_CORES=0 turns this off; it is skipped when
# there are fewer cores than ranks or no taskset.
set -uo pipefail

usage() { echo "usage: bash run_singlenode.sh \"<command>\" <rank_table.json> \"[START,END)\" <RANK_SIZE>" >&2; exit 2; }
[ $# -eq 4 ] || usage
COMMAND=$1; RANK_TABLE=$2; RANGE=$3; RANK_SIZE=$4
PYTHON=${PYTHON:-python}

if ! [[ $RANGE =~ ^\[([0-9]+),([0-9]+)\)$ ]]; then
  echo "error: device range '$RANGE' must look like '[START,END)', e.g. '[0,8)'" >&2; exit 2
fi
START=${BASH_REMATCH[1]}; END=${BASH_REMATCH[2]}
if ! [[ $RANK_SIZE =~ ^[0-9]+$ ]] || [ "$RANK_SIZE" -lt 1 ]; then
  echo "error: RANK_SIZE '$RANK_SIZE' must be a positive whole number" >&2; exit 2
fi
if [ $((END - START)) -ne "$RANK_SIZE" ]; then
  echo "error: device range $RANGE holds $((END - START)) device(s) but RANK_SIZE is $RANK_SIZE" >&2; exit 2
fi

LAUNCHER=${VISUAL_MLLM_LAUNCHER:-}
if [ -z "$LAUNCHER" ]; then
  if compgen -G "/dev/davinci[0-9]*" > /dev/null; then LAUNCHER=ascend; else LAUNCHER=msrun; fi
fi
LOG_ROOT=${LOG_ROOT:-output/log}
export RANK_SIZE

case "$LAUNCHER" in
  ascend)
    "$PYTHON" -m visual_mllm.cli.rank_table validate "$RANK_TABLE" --rank_size "$RANK_SIZE" --device_num "$RANGE" >/dev/null || exit 2
    export RANK_TABLE_FILE
    RANK_TABLE_FILE=$(realpath "$RANK_TABLE")
    ;;
  msrun)
    # MindSpore's dynamic cluster, as msrun starts it: one scheduler and RANK_SIZE workers on this host.
    export MS_WORKER_NUM=$RANK_SIZE MS_SCHED_HOST=127.0.0.1 MS_SCHED_PORT=${MASTER_PORT:-$((8000 + RANDOM % 2000))}
    export MS_TOPO_TIMEOUT=${MS_TOPO_TIMEOUT:-120}
    ;;
  *) echo "error: VISUAL_MLLM_LAUNCHER must be ascend or msrun, got '$LAUNCHER'" >&2; exit 2 ;;
esac

# The cores of each CPU worker (msrun path): CORES_OF[rank] = "0,1" etc., empty = not pinned.
declare -A CORES_OF
if [ "$LAUNCHER" = "msrun" ] && [ "${BIND_CORES:-1}" != "0" ] && command -v taskset > /dev/null; then
  ALLOWED=()
  LIST=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status 2>/dev/null)
  IFS=, read -ra PARTS <<< "$LIST"
  for part in "${PARTS[@]}"; do
    if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
      for ((c = BASH_REMATCH[1]; c <= BASH_REMATCH[2]; c++)); do ALLOWED+=("$c"); done
    elif [[ $part =~ ^[0-9]+$ ]]; then ALLOWED+=("$part"); fi
  done
  PER_RANK=$(( ${#ALLOWED[@]} / RANK_SIZE ))
  if [ "$PER_RANK" -ge 1 ]; then
    for ((r = 0; r < RANK_SIZE; r++)); do
      CORES=("${ALLOWED[@]:$((r * PER_RANK)):$PER_RANK}")
      CORES_OF[$r]=$(IFS=,; echo "${CORES[*]}")
    done
  fi
fi

declare -A RANK_OF  # pid -> process name, until it has exited
declare -A NAME_OF  # pid -> process name, of every process started (its process group may outlive it)
# Each process in its own session/process group (setsid keeps the pid: a background job is no group
# leader), so that stopping it also stops what `bash -c "<command>"` started under it.
SETSID=$(command -v setsid || true)
start_process() {  # name, cores ("" = any), extra environment assignments...
  local name=$1 cores=$2 bind=() where=""; shift 2
  if [ -n "$cores" ]; then bind=(taskset -c "$cores"); where=", cores $cores"; fi
  mkdir -p "$LOG_ROOT/$name"
  $SETSID "${bind[@]}" env "$@" bash -c "$COMMAND" > "$LOG_ROOT/$name/run.log" 2>&1 < /dev/null &
  RANK_OF[$!]=$name
  NAME_OF[$!]=$name
  echo "$name: pid $!$where, log $LOG_ROOT/$name/run.log"
}
running() {  # names of the started processes of which something still runs
  local pid names=()
  for pid in "${!NAME_OF[@]}"; do
    if [ -n "${RANK_OF[$pid]:-}" ] || { [ -n "$SETSID" ] && kill -0 -- "-$pid" 2>/dev/null; }; then
      names+=("${NAME_OF[$pid]}")
    fi
  done
  echo "${names[*]}"
}
signal_all() {  # signal: to every process started (to its process group, when it has one)
  local pid
  for pid in "${!NAME_OF[@]}"; do
    [ -n "$SETSID" ] && kill "-$1" -- "-$pid" 2>/dev/null
    [ -n "${RANK_OF[$pid]:-}" ] && kill "-$1" "$pid" 2>/dev/null
  done
}
FAILED=0
STOPPING=0
TIMER=""  # pid of a `sleep` that wakes the wait below when the grace period after SIGTERM is over
STOP_GRACE_SECONDS=${STOP_GRACE_SECONDS:-30}
stop_all() {  # SIGTERM now; SIGKILL to what still runs when the grace period is over
  signal_all TERM
  if [ $STOPPING -eq 0 ]; then
    STOPPING=1
    STOP_DEADLINE=$((SECONDS + STOP_GRACE_SECONDS))
    sleep "$STOP_GRACE_SECONDS" &
    TIMER=$!
  fi
}
kill_the_rest() {
  local names
  names=$(running)
  if [ -n "$names" ]; then
    echo "error: still running ${STOP_GRACE_SECONDS}s after SIGTERM, killing: $names" >&2
    signal_all KILL
    local tries  # SIGKILL is delivered asynchronously: wait (up to 5 s) until they are gone before exiting
    for ((tries = 0; tries < 50; tries++)); do [ -n "$(running)" ] || break; sleep 0.1; done
  fi
}
on_signal() {
  echo "error: $1 received, stopping every process" >&2
  [ $FAILED -ne 0 ] || FAILED=$2
  stop_all
}
trap 'on_signal SIGINT 130' INT
trap 'on_signal SIGTERM 143' TERM

if [ "$LAUNCHER" = "msrun" ]; then
  start_process scheduler "" MS_ROLE=MS_SCHED RANK_ID=0
fi
for ((i = START; i < END; i++)); do
  RANK=$((i - START))
  if [ "$LAUNCHER" = "msrun" ]; then
    start_process "rank_$RANK" "${CORES_OF[$RANK]:-}" MS_ROLE=MS_WORKER MS_NODE_ID=$RANK RANK_ID=$RANK DEVICE_ID=$i
  else
    start_process "rank_$RANK" "" RANK_ID=$RANK DEVICE_ID=$i
  fi
done

# Wait for every process; at the first failure stop the others (they would wait for it forever).
exited() {  # pid, status
  local name=${RANK_OF[$1]}
  unset "RANK_OF[$1]"
  if [ "$2" -ne 0 ] && [ $FAILED -eq 0 ]; then
    FAILED=1
    echo "error: $name exited with status $2, see $LOG_ROOT/$name/run.log" >&2
    stop_all
  fi
}
grace_over() {
  TIMER=""
  kill_the_rest
}
collect_ended() {
  # Processes that ended while bash ran something else (a trap, a command substitution) may already be
  # reaped and dropped from its job table, which `wait -n` then no longer reports ("no such job"); a
  # plain `wait PID` still returns their status.
  local pid
  for pid in "${!RANK_OF[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then wait "$pid"; exited "$pid" $?; fi
  done
  if [ -n "$TIMER" ] && ! kill -0 "$TIMER" 2>/dev/null; then wait "$TIMER"; grace_over; fi
}
while collect_ended; [ ${#RANK_OF[@]} -gt 0 ]; do
  DONE=""
  wait -n -p DONE "${!RANK_OF[@]}" $TIMER 2>/dev/null
  STATUS=$?
  if [ -n "${DONE:-}" ]; then
    if [ "$DONE" = "$TIMER" ]; then grace_over; else exited "$DONE" $STATUS; fi
  elif [ $STATUS -eq 127 ]; then
    sleep 0.1  # nothing left for `wait -n`: collect_ended finds what ended
  fi  # else a trapped signal interrupted the wait
done
if [ $STOPPING -eq 1 ]; then  # the processes have exited; what they started may still be running
  while [ -n "$(running)" ] && [ $SECONDS -lt $STOP_DEADLINE ]; do sleep 0.2; done
  kill_the_rest
fi
if [ -n "$TIMER" ]; then kill "$TIMER" 2>/dev/null; wait "$TIMER" 2>/dev/null; fi
[ $FAILED -ne 0 ] || echo "all $RANK_SIZE rank(s) finished; logs in $LOG_ROOT/rank_<r>/run.log"
exit $FAILED
