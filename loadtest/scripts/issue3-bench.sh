#!/bin/sh
# The issue-3 cluster relay figures of BENCHMARKS.md. Each run gets a fresh cluster (a
# router and two nodes on loopback, cluster-up.sh: no topics left from earlier runs),
# waits until the machine is quiet (wait-quiet.sh) and is wrapped in relay-cost.sh
# (both nodes' CPU and relay counters):
#   latency-*  1,000 WS subscribers x 100 events/s on one topic owned by n1, with the
#              subscribers on the owner or on n2 (a mirror), publishing to either;
#   cost-*     100 topics owned by n1, one subscriber each, 2,000 events/s: subscribers
#              on n1 (no relay) or on n2 (every event relayed once);
#   subscribe-* 2,000 fresh topics subscribed on n2 at 200/s and 1,000/s, owned by n1
#              (no local interest: the mirror must follow the owner) or by n2.
# Every configuration runs three times (suffix -1, -2, -3).
# Reports (JSON and the printed tables) go to OUT; each cluster is stopped after its
# run.
#
#   loadtest/scripts/issue3-bench.sh OUT        env: BIN (default target/release),
#                                               ONLY (run names to run, e.g. "cost-")
set -eu

OUT=${1:?usage: issue3-bench.sh OUT}
BIN=${BIN:-target/release}
HERE=$(dirname "$0")
LT="$BIN/weft-loadtest"
mkdir -p "$OUT"
. "$HERE/cluster-lib.sh"
stop_cluster_on_exit
QUIET_LIMIT=900

# run NAME SUBSCRIBERS PUBLISHERS -- weft-loadtest arguments…
# SUBSCRIBERS and PUBLISHERS are 1 or 2 (node n1 or n2; n1 owns the topics unless the
# arguments say otherwise). A run that other processes disturbed (more than 5 % of the
# machine's CPU went to neither the cluster nor the harness) is kept as
# NAME.disturbed-N.txt and run again, at most 3 times.
run() {
    name=$1
    case "$name" in "${ONLY:-}"*) ;; *) return 0 ;; esac
    try=1
    while :; do
        bench_cluster "$@"
        share=$(awk -v cpus="$(nproc)" '/during the command/ {
            gsub(/[()]/, ""); secs = $4
            for (i = 1; i <= NF; i++) if ($i == "other") other = $(i + 1)
            printf "%d", (secs > 0 ? 100 * other / (cpus * secs) : 100) }' "$OUT/$name.txt")
        if [ "${share:-100}" -le 5 ] || [ "$try" -ge 3 ]; then
            return 0
        fi
        echo "($name disturbed: ${share}% of the machine went elsewhere; again)"
        mv "$OUT/$name.txt" "$OUT/$name.disturbed-$try.txt"
        try=$((try + 1))
    done
}

fan="fanout --transport ws --topics 1 --subscribers 1000 --rate 100 --payload-bytes 100 --duration 15s --topic-owner n1"
for i in 1 2 3; do
    run "latency-owner-pub-owner-$i" 1 1 -- $fan
    run "latency-mirror-pub-owner-$i" 2 1 -- $fan
    run "latency-mirror-pub-mirror-$i" 2 2 -- $fan
    run "latency-owner-pub-mirror-$i" 1 2 -- $fan
done

cost="fanout --transport ws --topics 100 --subscribers 100 --rate 2000 --payload-bytes 100 --duration 20s --topic-owner n1"
for i in 1 2 3; do
    run "cost-local-$i" 1 1 -- $cost
    run "cost-relayed-$i" 2 1 -- $cost
done

for rate in 200 1000; do
    sub="subscribe --topics 2000 --per-connection 100 --payload-bytes 100 --rate $rate"
    for i in 1 2 3; do
        run "subscribe-mirror-$rate-$i" 2 1 -- $sub --topic-owner n1
        run "subscribe-owner-$rate-$i" 2 2 -- $sub --topic-owner n2
    done
done
