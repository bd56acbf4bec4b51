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
. "$HERE/cluster-lib.sh"
stop_cluster_on_exit
QUIET_LIMIT=${QUIET:+600}

# run NAME MODE SUBSCRIBERS -- weft-loadtest arguments… (publishers on n1)
run() {
    name=$1
    NOTE=$2
    subs=$3
    shift 4
    if [ "$NOTE" = plain ]; then
        export CLUSTER_INSECURE=1
    else
        unset CLUSTER_INSECURE
    fi
    bench_cluster "$name" "$subs" 1 -- "$@"
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
