#!/bin/sh
# Issue 12's cross-node tail: 200 WebSocket subscribers over 20 topics at 200 events/s
# (2,000 deliveries/s, nothing saturated), ordered publishers, 100-byte events, on
#   single   one weft-node (development mode on loopback)
#   local    a 3-node cluster (mutual TLS, cluster-up.sh), subscribers and publisher on n1
#   remote   the same cluster, subscribers on n1, publisher on n2
# RUNS runs each (default 3), a fresh node or cluster per run. Prints one line per run
# (delivery p50/p90/p99, publish-ack p99) and writes every report to OUT.
#
#   loadtest/scripts/issue12-cross-node.sh OUT
#   env: BIN (default target/release), RUNS (3), SECONDS_PER_RUN (20)
#
# Bounded: each harness run is under timeout(1); servers are stopped by their PIDs
# (cluster-down.sh, or the single node's PID).
set -eu

OUT=${1:?usage: issue12-cross-node.sh OUT}
BIN=${BIN:-target/release}
RUNS=${RUNS:-3}
SECS=${SECONDS_PER_RUN:-20}
HERE=$(dirname "$0")
LT="$BIN/weft-loadtest"
mkdir -p "$OUT"
LOAD="fanout --ordered --subscribers 200 --topics 20 --rate 200 --payload-bytes 100 --duration ${SECS}s --quiet"

run=1
while [ "$run" -le "$RUNS" ]; do
    # One node.
    "$BIN/weft-node" --http-listen 127.0.0.1:18410 --cluster-listen 127.0.0.1:0 \
        --data-dir "$OUT/single-data-$run" >"$OUT/single-$run.log" 2>&1 &
    pid=$!
    n=0
    until curl -sf --max-time 1 http://127.0.0.1:18410/readyz >/dev/null; do
        n=$((n + 1)); [ "$n" -gt 100 ] && { echo "node did not start" >&2; kill "$pid"; exit 1; }
        sleep 0.1
    done
    # shellcheck disable=SC2086 # LOAD is a list of options
    timeout $((SECS + 120)) "$LT" $LOAD --target http://127.0.0.1:18410 \
        --target-pid "$pid" --json "$OUT/single-$run.json" >"$OUT/single-$run.txt" 2>&1 || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
    rm -rf "$OUT/single-data-$run"

    # Three nodes.
    dir="$OUT/cluster-$run"
    rm -rf "$dir"
    BIN=$BIN IP_BASE=230 "$HERE/cluster-up.sh" "$dir" 3 >/dev/null
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
    # shellcheck disable=SC2086
    timeout $((SECS + 120)) "$LT" $LOAD --target "$N1_URL" --publish-target "$N1_URL" \
        --target-pid "$N1_PID" --json "$OUT/local-$run.json" >"$OUT/local-$run.txt" 2>&1 || true
    # shellcheck disable=SC2086
    timeout $((SECS + 120)) "$LT" $LOAD --target "$N1_URL" --publish-target "$N2_URL" \
        --target-pid "$N1_PID" --json "$OUT/remote-$run.json" >"$OUT/remote-$run.txt" 2>&1 || true
    "$HERE/cluster-down.sh" "$dir"
    for k in single local remote; do
        grep -E "delivery|lost" "$OUT/$k-$run.txt" | head -4 | sed "s/^/$k-$run: /"
    done
    run=$((run + 1))
done
