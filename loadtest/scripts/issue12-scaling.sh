#!/bin/sh
# How the node's cost per delivery grows (issue 12, "how the cost grows"): one hot
# topic, ordered publisher, 100-byte events, WebSocket subscribers, a fresh release
# weft-node per point (weft-vs-nats.sh with ONLY=weft), then one table of node CPU per
# delivery beside the harness's own CPU:
#   - subscribers 500, 5,000, 15,000 at RATE_FOR_SUBS events/s (default 20);
#   - rates 10, 100, 500, 1,000, 2,000 events/s to SUBS_FOR_RATE subscribers (500).
#
#   loadtest/scripts/issue12-scaling.sh OUT      env: BIN (target/release), RUNS (1),
#                                                SECONDS_PER_RUN (20)
#
# Writes OUT/scaling.md. Bounded: every harness run has a timeout (weft-vs-nats.sh).
set -eu
OUT=${1:?usage: issue12-scaling.sh OUT}
BIN=${BIN:-target/release}
RUNS=${RUNS:-1}
SECS=${SECONDS_PER_RUN:-20}
RATE_FOR_SUBS=${RATE_FOR_SUBS:-20}
SUBS_FOR_RATE=${SUBS_FOR_RATE:-500}
HERE=$(dirname "$0")
mkdir -p "$OUT"
: > "$OUT/runs.txt"
point() { # NAME SUBSCRIBERS RATE
    # 15,000 sockets in one harness process would pass its open-files limit: 2 workers.
    workers=1
    [ "$2" -le 8000 ] || workers=2
    ONLY=weft RUNS=$RUNS BIN=$BIN RUN_TIMEOUT=$(( $2 / 2000 + SECS + 120 )) \
        "$HERE/weft-vs-nats.sh" "$OUT" "$1" -- fanout --ordered --subscribers "$2" \
        --topics 1 --rate "$3" --payload-bytes 100 --duration "${SECS}s" \
        --workers "$workers" > /dev/null
}
for s in 500 5000 15000; do point "subs$s" "$s" "$RATE_FOR_SUBS"; done
for r in 10 100 500 1000 2000; do point "rate$r" "$SUBS_FOR_RATE" "$r"; done

{
    echo "| subscribers | offered/s | publishes/s achieved | deliveries/s | node cores | node µs per delivery | harness cores | delivery p50 / p99 | publish-ack p99 | reconnects |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    for name in subs500 subs5000 subs15000 rate10 rate100 rate500 rate1000 rate2000; do
        for f in "$OUT/$name"-weft-*.json; do
            [ -f "$f" ] || continue
            jq -r '"| \(.subscribers) | \(.offered_per_s) | \(.publish_achieved_per_s | floor) | \(.deliveries_per_s | floor) | \(.target.cpu_cores) | \(1000000 / .deliveries_per_target_cpu_s * 100 | round / 100) | \(.harness_cpu_cores) | \(.latency_us.p50 / 1000) / \(.latency_us.p99 / 1000) ms | \(.publish_latency_us.p99 / 1000) ms | \(.reconnects) |"' "$f"
        done
    done
} > "$OUT/scaling.md"
cat "$OUT/scaling.md"
