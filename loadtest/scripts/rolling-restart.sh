#!/bin/sh
# Issue 5's rolling-restart check, end to end: starts a 3-node cluster (cluster-up.sh),
# runs the harness's `rolling` scenario against it — subscribers on n1, publishers on
# n2, over many topics — while restart-nodes.sh restarts every node one by one, then
# stops the cluster. The harness's report says how many events were lost, duplicated
# or reordered, and how many resets and reconnects there were; the script exits
# non-zero (3) if any event was lost, duplicated or reordered, or any reset was seen.
#
#   loadtest/scripts/rolling-restart.sh DIR [extra weft-loadtest flags]
#   env: BIN (default target/release), TRANSPORT (ws|sse|longpoll, default ws)
#
# Build first: cargo build --release -p weft-node -p weft-router -p weft-loadtest
set -eu

DIR=${1:?usage: rolling-restart.sh DIR [extra weft-loadtest flags]}
shift
BIN=${BIN:-target/release}
HERE=$(dirname "$0")
export BIN

"$HERE/cluster-up.sh" "$DIR" 3 >/dev/null
trap '"$HERE/cluster-down.sh" "$DIR"' EXIT
. "$DIR/cluster.env"

# `--slo` makes the harness exit 3 on any loss, duplicate, reorder, reset or stale
# subscription.
"$BIN/weft-loadtest" rolling \
    --target "$N1_URL" --publish-target "$N2_URL" \
    --transport "${TRANSPORT:-ws}" --subscribers 200 --topics 40 --rate 400 \
    --restart-cmd "$HERE/restart-nodes.sh $DIR" --restart-after 3s --restart-timeout 180s \
    --duration 15s --json "$DIR/report.json" \
    --slo 'lost=0,duplicates=0,reordered=0,resets=0,stale=0' "$@"
echo "rolling-restart: every node restarted; nothing lost, duplicated, reordered or reset" >&2
