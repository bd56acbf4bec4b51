#!/bin/sh
# Issue 12's fan-out table, Weft beside nats-server: the same ordered fan-out (one
# publish in flight per topic, 100-byte events, WebSocket subscribers) against a fresh
# weft-node (release, development mode on loopback) and a fresh nats-server (WebSocket
# listener, no TLS) per run, alternating which goes first, RUNS times each:
#   fan5k    5,000 subscribers x 1 topic       at   100 events/s   (2 worker processes)
#   fan500     500 subscribers x 1 topic       at 2,000 events/s
#   fan1k    1,000 subscribers x 1 topic       at   100 events/s
#   fan10k  10,000 subscribers over 1,000 topics at 2,000 events/s (2 worker processes)
# Every run samples the server (--target-pid) and the harness's own CPU. The medians
# go to OUT/summary.md (also summary.json, summary.html); every report to OUT.
#
#   loadtest/scripts/issue12-bench.sh OUT [--quick]
#     env: BIN (default target/release: weft-node, weft-loadtest), NATS_SERVER
#          (default: nats-server on PATH, else /usr/sbin/nats-server), RUNS (3),
#          SECONDS_PER_RUN (30)
#   --quick: a smoke check of the script itself — 3 s runs, a tenth of the
#            subscribers, 1 run each unless RUNS is set. Its figures mean nothing.
#
# Each load is one weft-vs-nats.sh call (fresh servers, alternating order, bounded
# waits, every run under timeout(1), servers stopped by their PIDs).
set -eu

OUT=${1:?usage: issue12-bench.sh OUT [--quick]}
QUICK=
[ "${2:-}" = --quick ] && QUICK=1
BIN=${BIN:-target/release}
LT="$BIN/weft-loadtest"
NODE="$BIN/weft-node"
NATS=${NATS_SERVER:-$(command -v nats-server 2>/dev/null || echo /usr/sbin/nats-server)}
if [ -n "$QUICK" ]; then
    RUNS=${RUNS:-1}
    SECS=3
    SCALE=10
else
    RUNS=${RUNS:-3}
    SECS=${SECONDS_PER_RUN:-30}
    SCALE=1
fi
for b in "$LT" "$NODE" "$NATS"; do
    [ -x "$b" ] || { echo "issue12-bench: $b is missing (cargo build --release -p weft-node -p weft-loadtest; apt-get install nats-server)" >&2; exit 1; }
done
mkdir -p "$OUT"
: > "$OUT/runs.txt"
HERE=$(dirname "$0")
LOADS="fan5k:5000:1:100:2 fan500:500:1:2000:1 fan1k:1000:1:100:1 fan10k:10000:1000:2000:2"
for spec in $LOADS; do
    IFS=: read -r load subs topics rate workers <<EOF
$spec
EOF
    # A fresh server per run, alternating, RUNS each (weft-vs-nats.sh); a run may
    # take its ramp (2,000 connects/s), the load, the drain and a margin.
    RUNS=$RUNS BIN=$BIN NATS_SERVER=$NATS RUN_TIMEOUT=$(( subs / SCALE / 2000 + SECS + 120 )) \
        "$HERE/weft-vs-nats.sh" "$OUT" "$load" -- fanout --ordered \
        --subscribers $(( subs / SCALE )) --topics "$topics" --rate "$rate" \
        --payload-bytes 100 --duration "${SECS}s" --workers "$workers" > /dev/null
done

reports=
for spec in $LOADS; do
    load=${spec%%:*}
    for f in "$OUT/$load"-weft-*.json "$OUT/$load"-nats-*.json; do
        [ -f "$f" ] && reports="$reports $f"
    done
done
# shellcheck disable=SC2086 # the report paths are a list
"$LT" compare $reports --markdown "$OUT/table.md" --json "$OUT/summary.json" \
    --html "$OUT/summary.html" > /dev/null
{
    echo "# Issue 12: fan-out, Weft beside nats-server"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r); $("$NATS" --version);" \
        "$RUNS run(s) per system and load, ${SECS}s each${QUICK:+ (--quick: a tenth of the subscribers, figures mean nothing)}."
    echo "Ordered publishers (one publish in flight per topic; Weft: 201, NATS: PONG after PUB+PING), 100-byte events, WebSocket subscribers; medians per figure."
    echo "Server cores / deliveries per server CPU-s from --target-pid; harness cores are the load processes' own CPU."
    echo
    cat "$OUT/table.md"
    echo
    echo "Runs (exit codes):"
    echo
    sed 's/^/    /' "$OUT/runs.txt"
} > "$OUT/summary.md"
rm -f "$OUT/table.md"
cat "$OUT/summary.md"
