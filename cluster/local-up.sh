#!/usr/bin/env bash
# Start a real multi-node Ray cluster on this machine: one head node and N worker nodes,
# each its own `ray start` (own raylet, object store and log folder), joined over 127.0.0.1.
#
#   cluster/local-up.sh --workers 2
#   ray job submit --address http://127.0.0.1:8275 --working-dir . -- \
#       python jobs/pipeline.py --config jobs/configs/pipeline-demo.yaml
#   cluster/local-down.sh
#
# Settings (environment variables; the defaults keep clear of a default `ray start --head` or
# `ray.init()`, which use 6379 / 8265 / 10001 / 52365):
#   RAY=ray                         ray executable; its folder goes first on PATH, so the jobs'
#                                   `python` is the same environment
#   RAY_PORT=6390                   head GCS port (the cluster address); Ray binds it on all
#                                   interfaces, not just 127.0.0.1 (token auth guards it)
#   DASHBOARD_PORT=8275             dashboard and job-submission server, bound to 127.0.0.1 only
#   RAY_CLIENT_SERVER_PORT=RAY_PORT+1   Ray Client (ray://) server on the head
#   NUM_WORKERS=1                   worker nodes (same as --workers)
#   NUM_CPUS=2                      logical CPUs each node advertises (same as --num-cpus)
#   OBJECT_STORE_MEMORY=1000000000  object store bytes per node ("auto": Ray's default of 30%
#                                   of RAM per node, which N+1 nodes on one machine overcommit)
#   KD_RAY_LOCAL_DIR=/tmp/kd-ray-local   one Ray temp dir per node (logs, sockets) and start logs
#   READY_TIMEOUT=120               seconds to wait for all nodes to register
#   RAY_AUTH_MODE                   token | disabled; unset: token if a token exists (see below)
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

NUM_WORKERS=${NUM_WORKERS:-1}
NUM_CPUS=${NUM_CPUS:-2}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --workers) NUM_WORKERS=${2:?--workers needs a number}; shift 2 ;;
        --workers=*) NUM_WORKERS=${1#*=}; shift ;;
        --num-cpus) NUM_CPUS=${2:?--num-cpus needs a number}; shift 2 ;;
        --num-cpus=*) NUM_CPUS=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "local-up.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
[[ "$NUM_WORKERS" =~ ^[0-9]+$ ]] || { echo "local-up.sh: --workers must be a whole number >= 0, got '$NUM_WORKERS'" >&2; exit 2; }
[[ "$NUM_CPUS" =~ ^[1-9][0-9]*$ ]] || { echo "local-up.sh: --num-cpus must be a whole number >= 1, got '$NUM_CPUS'" >&2; exit 2; }

RAY=${RAY:-ray}
RAY_PORT=${RAY_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8275}
# Outside 10002-19999, the range Ray keeps for worker processes.
RAY_CLIENT_SERVER_PORT=${RAY_CLIENT_SERVER_PORT:-$((RAY_PORT + 1))}
OBJECT_STORE_MEMORY=${OBJECT_STORE_MEMORY:-1000000000}
LOCAL_DIR=${KD_RAY_LOCAL_DIR:-/tmp/kd-ray-local}
READY_TIMEOUT=${READY_TIMEOUT:-120}
NODE_IP=127.0.0.1
ADDRESS="$NODE_IP:$RAY_PORT"
DASHBOARD_URL="http://$NODE_IP:$DASHBOARD_PORT"

RAY_BIN=$(command -v "$RAY") || { echo "local-up.sh: '$RAY' not found; activate the virtualenv or set RAY=/path/to/ray" >&2; exit 1; }
# Jobs run `python` from the raylet's PATH: make it the interpreter that owns this `ray`.
RAY_DIR=$(dirname "$RAY_BIN")
export PATH="$RAY_DIR:$PATH"
export RAY_USAGE_STATS_ENABLED=0

# Token auth: `ray start --head` turns it on by itself when a token exists (~/.ray/auth_token,
# which a local `ray.init()` creates), but `ray start --address` and the ray CLI follow only
# RAY_AUTH_MODE; without it the workers cannot join. So decide once, as the head would, for all.
if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
    if [[ -n "${RAY_AUTH_TOKEN:-}" || -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then
        RAY_AUTH_MODE=token
    else
        RAY_AUTH_MODE=disabled
    fi
fi
export RAY_AUTH_MODE

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$RAY_PORT" "$DASHBOARD_PORT" "$RAY_CLIENT_SERVER_PORT"; do
    if port_in_use "$port"; then
        echo "local-up.sh: port $port is already in use (a cluster from an earlier local-up.sh? run cluster/local-down.sh)," >&2
        echo "             or pick others with RAY_PORT / DASHBOARD_PORT / RAY_CLIENT_SERVER_PORT" >&2
        exit 1
    fi
done

mkdir -p "$LOCAL_DIR/logs"
# Read by local-down.sh (also after a failed start) and tests/cluster_helpers.py.
cat >"$LOCAL_DIR/cluster.env" <<ENV
RAY_ADDRESS=$ADDRESS
DASHBOARD_URL=$DASHBOARD_URL
RAY_PORT=$RAY_PORT
NUM_NODES=$((NUM_WORKERS + 1))
RAY_AUTH_MODE=$RAY_AUTH_MODE
ENV

# A failed start leaves nothing running: stop the nodes that did start.
trap 'rc=$?; if (( rc != 0 )); then echo "local-up.sh: failed; stopping the nodes that started" >&2; KD_RAY_LOCAL_DIR="$LOCAL_DIR" RAY="$RAY_BIN" "$(dirname "$0")/local-down.sh" --by-pid >&2 || true; fi' EXIT

# Every node on one machine would otherwise take the fixed dashboard-agent port 52365 (the
# first wins, the others log bind errors); 0 lets each pick a free port and report it to GCS.
node_args=(--node-ip-address="$NODE_IP" --num-cpus="$NUM_CPUS" --num-gpus=0
           --dashboard-agent-listen-port=0 --disable-usage-stats)
[[ "$OBJECT_STORE_MEMORY" == auto ]] || node_args+=(--object-store-memory="$OBJECT_STORE_MEMORY")

# Runs `ray start ...`, keeping its chatter in a log file and showing it only on failure.
ray_start() {
    local name=$1; shift
    local log="$LOCAL_DIR/logs/$name.start.log"
    if ! "$RAY_BIN" start "$@" >"$log" 2>&1; then
        echo "local-up.sh: 'ray start' for $name failed; the end of its output ($log):" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
}

echo "Starting Ray head at $ADDRESS (dashboard $DASHBOARD_URL), $NUM_CPUS CPUs, auth: $RAY_AUTH_MODE"
# --temp-dir per node (`ray start --help`: "Can be specified per node"): each node keeps its own
# logs and sockets, so each node's log monitor tails only its own files (no doubled job logs).
ray_start head --head "${node_args[@]}" \
    --port="$RAY_PORT" \
    --dashboard-host=127.0.0.1 \
    --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$RAY_CLIENT_SERVER_PORT" \
    --temp-dir="$LOCAL_DIR/head"

for i in $(seq 1 "$NUM_WORKERS"); do
    echo "Starting Ray worker node $i/$NUM_WORKERS, $NUM_CPUS CPUs"
    ray_start "worker-$i" "${node_args[@]}" \
        --address="$ADDRESS" \
        --temp-dir="$LOCAL_DIR/worker-$i"
done

# The cluster is ready when every node is listed under "Active" in `ray status`.
want=$((NUM_WORKERS + 1))
alive=0
deadline=$((SECONDS + READY_TIMEOUT))
while (( SECONDS < deadline )); do
    alive=$("$RAY_BIN" status --address "$ADDRESS" 2>/dev/null \
        | awk '/^Active:/{on=1; next} /^Pending:/{on=0} on && /node_/{n++} END{print n+0}') || alive=0
    if (( alive >= want )); then break; fi
    sleep 1
done
if (( alive < want )); then
    echo "local-up.sh: only $alive of $want nodes registered within ${READY_TIMEOUT}s; logs under $LOCAL_DIR" >&2
    exit 1
fi
# Any HTTP answer means the job server is up (401 when token auth is on).
until [[ "$(curl -s -o /dev/null -w '%{http_code}' "$DASHBOARD_URL/api/version")" != 000 ]]; do
    if (( SECONDS >= deadline )); then echo "local-up.sh: job server at $DASHBOARD_URL did not answer" >&2; exit 1; fi
    sleep 1
done

auth_line=""
if [[ "$RAY_AUTH_MODE" == token ]]; then
    auth_line="  token auth is on: 'export RAY_AUTH_MODE=token' so the ray CLI sends the token"$'\n'
fi
cat <<MSG

Ray cluster up: $want nodes ($NUM_WORKERS workers), $((want * NUM_CPUS)) CPUs; logs in $LOCAL_DIR.
${auth_line}  status:    ray status --address $ADDRESS
  dashboard: $DASHBOARD_URL
  stop:      cluster/local-down.sh

Run the demo pipeline on it:
ray job submit --address $DASHBOARD_URL --working-dir . -- python jobs/pipeline.py --config jobs/configs/pipeline-demo.yaml
MSG
