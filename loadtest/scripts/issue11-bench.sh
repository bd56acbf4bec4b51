#!/bin/sh
# What mutual TLS on the cluster links costs (issue 11): two of issue3-bench.sh's
# configurations, each on a fresh cluster with TLS (the default) and with
# --cluster-insecure, RUNS times, alternating so that a disturbance hits both alike:
#   cost-relayed       100 topics owned by n1, subscribers on n2, 2,000 events/s:
#                      every event relayed once (CPU per relayed event, both nodes);
#   latency-mirror     1,000 WS subscribers on n2 x 100 events/s on one topic owned
#                      by n1, publishing to n1 (publish -> relay -> deliver latency).
# Each run is wrapped in relay-cost.sh (CPU and relay counters per node, and the share
# of the machine that went elsewhere). Reports go to OUT.
#
#   loadtest/scripts/issue11-bench.sh OUT      env: BIN (default target/release),
#                                              RUNS (default 2), QUIET (set: wait for
#                                              a quiet machine before each run)
set -eu

OUT=${1:?usage: issue11-bench.sh OUT}
BIN=${BIN:-target/release}
RUNS=${RUNS:-2}
HERE=$(dirname "$0")
LT="$BIN/weft-loadtest"
mkdir -p "$OUT"
CLUSTER=
trap '[ -z "$CLUSTER" ] || "$HERE/cluster-down.sh" "$CLUSTER"' EXIT
trap 'exit 130' INT TERM

# run NAME MODE SUBSCRIBERS -- weft-loadtest arguments… (publishers on n1)
run() {
    name=$1
    mode=$2
    subs=$3
    shift 4
    CLUSTER="$OUT/cluster-$name"
    rm -rf "$CLUSTER"
    if [ "$mode" = plain ]; then
        CLUSTER_INSECURE=1 BIN=$BIN "$HERE/cluster-up.sh" "$CLUSTER" 2 >/dev/null
    else
        BIN=$BIN "$HERE/cluster-up.sh" "$CLUSTER" 2 >/dev/null
    fi
    . "$CLUSTER/cluster.env"
    target=$(eval echo "\$N${subs}_URL")
    pid=$(eval echo "\$N${subs}_PID")
    : >"$OUT/$name.txt"
    if [ -n "${QUIET:-}" ]; then
        "$HERE/wait-quiet.sh" 10 600 >>"$OUT/$name.txt" || true
    fi
    echo "\$ weft-loadtest $* --target \$N${subs}_URL --publish-target \$N1_URL ($mode)" \
        >>"$OUT/$name.txt"
    "$HERE/relay-cost.sh" "$CLUSTER" -- "$LT" "$@" --target "$target" \
        --publish-target "$N1_URL" --target-pid "$pid" --quiet \
        --json "$OUT/$name.json" >>"$OUT/$name.txt" 2>&1 || true
    "$HERE/cluster-down.sh" "$CLUSTER"
    CLUSTER=
    cat "$OUT/$name.txt"
}

cost="fanout --transport ws --topics 100 --subscribers 100 --rate 2000 --payload-bytes 100 --duration 20s --topic-owner n1"
fan="fanout --transport ws --topics 1 --subscribers 1000 --rate 100 --payload-bytes 100 --duration 15s --topic-owner n1"
i=1
while [ "$i" -le "$RUNS" ]; do
    for mode in tls plain; do
        # shellcheck disable=SC2086 # the arguments are a list
        run "cost-relayed-$mode-$i" "$mode" 2 -- $cost
        # shellcheck disable=SC2086
        run "latency-mirror-$mode-$i" "$mode" 2 -- $fan
    done
    i=$((i + 1))
done
