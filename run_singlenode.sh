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
# Exits non-zero if any process fails, naming its rank and log, and stops the others.
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

declare -A RANK_OF  # pid -> process name, while it runs
start_process() {  # name, extra environment assignments...
  local name=$1; shift
  mkdir -p "$LOG_ROOT/$name"
  env "$@" bash -c "$COMMAND" > "$LOG_ROOT/$name/run.log" 2>&1 &
  RANK_OF[$!]=$name
  echo "$name: pid $!, log $LOG_ROOT/$name/run.log"
}
if [ "$LAUNCHER" = "msrun" ]; then
  start_process scheduler MS_ROLE=MS_SCHED RANK_ID=0
fi
for ((i = START; i < END; i++)); do
  RANK=$((i - START))
  if [ "$LAUNCHER" = "msrun" ]; then
    start_process "rank_$RANK" MS_ROLE=MS_WORKER MS_NODE_ID=$RANK RANK_ID=$RANK DEVICE_ID=$i
  else
    start_process "rank_$RANK" RANK_ID=$RANK DEVICE_ID=$i
  fi
done

# Wait for every process; at the first failure stop the others (they would wait for it forever).
FAILED=0
while [ ${#RANK_OF[@]} -gt 0 ]; do
  wait -n -p DONE "${!RANK_OF[@]}"
  STATUS=$?
  NAME=${RANK_OF[$DONE]}
  unset "RANK_OF[$DONE]"
  if [ $STATUS -ne 0 ] && [ $FAILED -eq 0 ]; then
    FAILED=1
    echo "error: $NAME exited with status $STATUS, see $LOG_ROOT/$NAME/run.log" >&2
    kill "${!RANK_OF[@]}" 2>/dev/null
  fi
done
exit $FAILED
