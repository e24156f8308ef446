#!/usr/bin/env bash
# Stop the local Ray cluster that cluster/local-up.sh started.
#
#   cluster/local-down.sh           # stop this cluster's nodes, and only them
#   cluster/local-down.sh --all     # plain `ray stop`: every Ray process on this machine
#   cluster/local-down.sh --by-pid  # never `ray stop`: always stop by pid, as below (the tests use this)
#   cluster/local-down.sh --clean   # also delete $KD_RAY_LOCAL_DIR (node logs)
#
# `ray stop` is the clean, preferred way (SIGTERM, a grace period, then SIGKILL), and this script
# uses it when this cluster is the only Ray on the machine. But `ray stop` knows nothing of
# clusters: it stops EVERY Ray process on the machine that it may signal (all users' when run as
# root), including another `ray start` cluster or the local instance of a `ray.init()` in a test
# or notebook. So when other Ray nodes are running, the script stops only this cluster's
# processes instead, by pid: those started with an option pointing under $KD_RAY_LOCAL_DIR (each
# node's --temp-dir), and their children (workers, job drivers); SIGTERM, up to GRACE_PERIOD
# seconds, then SIGKILL; GCS last. --by-pid does that even when no other Ray node is seen, since
# another Ray instance may be starting at that very moment (a test session's `ray.init()`).
#
# Settings: RAY (ray executable), KD_RAY_LOCAL_DIR (as for local-up.sh), GRACE_PERIOD=20.
set -euo pipefail

ALL=0
CLEAN=0
BY_PID=0
for arg in "$@"; do
    case "$arg" in
        --all) ALL=1 ;;
        --clean) CLEAN=1 ;;
        --by-pid) BY_PID=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "local-down.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

RAY=${RAY:-ray}
LOCAL_DIR=${KD_RAY_LOCAL_DIR:-/tmp/kd-ray-local}
GRACE_PERIOD=${GRACE_PERIOD:-20}
RAY_PORT=$(sed -n 's/^RAY_PORT=//p' "$LOCAL_DIR/cluster.env" 2>/dev/null || true)
RAY_PORT=${RAY_PORT:-6390}
UID_=$(id -u)

# Pids of this user's processes with an option set to a path under $LOCAL_DIR (gcs_server,
# raylet, dashboard, monitor, log monitor all get --temp-dir/--session-dir/--log_dir=...), not
# e.g. a `tail -f` of a log there; plus the head's Ray Client server (--address=<ip>:RAY_PORT).
cluster_seed_pids() {
    local pid cmdline
    for pid in $(pgrep -u "$UID_" -f -- "=$LOCAL_DIR/|ray[.]util[.]client[.]server" || true); do
        [[ "$pid" == "$$" ]] && continue
        cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
        if [[ "$cmdline" == *"=$LOCAL_DIR/"* ]] ||
           [[ "$cmdline" == *ray.util.client.server* && "$cmdline" == *" --address="*":$RAY_PORT "* ]]; then
            echo "$pid"
        fi
    done
}

# The seeds plus all their descendants (Ray workers are children of their node's raylet).
cluster_pids() {
    local seeds
    seeds=$(cluster_seed_pids)
    [[ -n "$seeds" ]] || return 0
    ps -e -o pid=,ppid= | awk -v seeds="$seeds" '
        BEGIN { n = split(seeds, s, "\n"); for (i = 1; i <= n; i++) keep[s[i]] = 1 }
        { parent[$1] = $2 }
        END {
            do { grew = 0
                 for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 }
            } while (grew)
            for (p in keep) if (p != "") print p
        }'
}

# Raylets (one per node), of any user, that local-up.sh did not start.
foreign_raylets() {
    local pid
    for pid in $(pgrep -x raylet || true); do
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "=$LOCAL_DIR/" || echo "$pid"
    done
}

alive() { local p; for p in "$@"; do if kill -0 "$p" 2>/dev/null; then echo "$p"; fi; done; }

# SIGTERM the given pids, wait up to GRACE_PERIOD seconds, then SIGKILL what is left.
terminate() {
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    local deadline=$((SECONDS + GRACE_PERIOD)) left=()
    while mapfile -t left < <(alive "$@"); (( ${#left[@]} > 0 && SECONDS < deadline )); do sleep 0.5; done
    if (( ${#left[@]} > 0 )); then
        echo "SIGKILL after ${GRACE_PERIOD}s: ${left[*]}"
        kill -KILL "${left[@]}" 2>/dev/null || true
    fi
}

ours=$(cluster_pids)
foreign=$(foreign_raylets)
if [[ -z "$ours" ]] && (( ! ALL )); then
    echo "No Ray nodes of this cluster ($LOCAL_DIR) are running."
elif (( ALL )) || { [[ -z "$foreign" ]] && (( ! BY_PID )); }; then
    RAY_BIN=$(command -v "$RAY") || { echo "local-down.sh: '$RAY' not found; activate the virtualenv or set RAY=/path/to/ray" >&2; exit 1; }
    echo "Stopping all Ray processes on this machine (ray stop)"
    "$RAY_BIN" stop --grace-period "$GRACE_PERIOD" >/dev/null 2>&1 || true
else
    if [[ -n "$foreign" ]]; then
        echo "Other Ray nodes run here (raylet pids ${foreign//$'\n'/ }); stopping only this cluster's processes"
    else
        echo "Stopping this cluster's processes by pid"
    fi
    gcs=()
    rest=()
    for pid in $ours; do
        if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == gcs_server ]]; then gcs+=("$pid"); else rest+=("$pid"); fi
    done
    terminate "${rest[@]}"
    terminate "${gcs[@]}"
fi

remaining=$(cluster_pids)
if [[ -n "$remaining" ]]; then
    echo "local-down.sh: processes of this cluster are still running: ${remaining//$'\n'/ }" >&2
    exit 1
fi
rm -f "$LOCAL_DIR/cluster.env"
if (( CLEAN )); then rm -rf "$LOCAL_DIR"; fi
echo "Ray cluster stopped."
