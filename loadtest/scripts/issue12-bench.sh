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
# Bounded: every wait loop has a count, every harness run a timeout(1); only the
# servers this script started are stopped, by their PIDs.
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
# 10,000 connections per server process, 5,000 per harness worker: well inside 20,000.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

SERVER_PID=
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill "$SERVER_PID" 2>/dev/null || true
    i=0
    while kill -0 "$SERVER_PID" 2>/dev/null && [ $i -lt 100 ]; do
        i=$((i + 1)); sleep 0.1
    done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
trap stop_server EXIT
trap 'exit 130' INT TERM

start_weft() { # NAME
    dir="$OUT/server-$1"
    rm -rf "$dir"; mkdir -p "$dir"
    # Anonymous clients all count as one user: lift the per-user session cap.
    printf '[limits]\nmax_connections_per_user = 1000000\n' > "$dir/node.toml"
    "$NODE" --config "$dir/node.toml" --http-listen 127.0.0.1:0 --cluster-listen 127.0.0.1:0 \
        --data-dir "$dir/data" --ready-file "$dir/ready.json" --max-connections-per-ip 100000 \
        > "$dir/node.log" 2>&1 &
    SERVER_PID=$!
    i=0
    while [ ! -s "$dir/ready.json" ]; do
        i=$((i + 1)); [ $i -lt 100 ] || { echo "weft-node did not start: $dir/node.log" >&2; exit 1; }
        sleep 0.1
    done
    TARGET=http://$(sed 's/.*"http":"\([^"]*\)".*/\1/' "$dir/ready.json")
    SYSTEM_ARGS=
}

start_nats() { # NAME
    dir="$OUT/server-$1"
    rm -rf "$dir"; mkdir -p "$dir"
    printf 'listen: "127.0.0.1:-1"\nwebsocket {\n  listen: "127.0.0.1:-1"\n  no_tls: true\n}\n' > "$dir/nats.conf"
    "$NATS" -c "$dir/nats.conf" -l "$dir/nats.log" >/dev/null 2>&1 &
    SERVER_PID=$!
    i=0
    port=
    while [ -z "$port" ]; do
        i=$((i + 1)); [ $i -lt 100 ] || { echo "nats-server did not start: $dir/nats.log" >&2; exit 1; }
        sleep 0.1
        port=$(sed -n 's/.*websocket clients on ws:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$dir/nats.log" 2>/dev/null | head -n 1)
    done
    TARGET=ws://127.0.0.1:$port
    SYSTEM_ARGS="--system nats"
}

# run LOAD SYSTEM RUN SUBSCRIBERS TOPICS RATE WORKERS (POSIX sh has no locals: the
# names used here are used nowhere else)
run() {
    name="$1-$2-$3"
    "start_$2" "$name"
    run_subs=$(( $4 / SCALE ))
    # Ramp at 2,000 connects/s, the load, the drain, and margin.
    limit=$(( run_subs / 2000 + SECS + 120 ))
    echo "\$ weft-loadtest fanout $SYSTEM_ARGS --target $TARGET --subscribers $run_subs --topics $5 --rate $6 --workers $7 (pid $SERVER_PID)" \
        > "$OUT/$name.txt"
    rc=0
    # shellcheck disable=SC2086 # SYSTEM_ARGS is a list
    timeout --kill-after=10 "$limit" "$LT" fanout $SYSTEM_ARGS --target "$TARGET" --ordered \
        --subscribers "$run_subs" --topics "$5" --rate "$6" --payload-bytes 100 \
        --duration "${SECS}s" --workers "$7" --target-pid "$SERVER_PID" --quiet \
        --json "$OUT/$name.json" >> "$OUT/$name.txt" 2>&1 || rc=$?
    stop_server
    echo "$name: exit $rc" | tee -a "$OUT/runs.txt"
    [ $rc -eq 0 ] || tail -n 5 "$OUT/$name.txt" >&2
}

: > "$OUT/runs.txt"
LOADS="fan5k:5000:1:100:2 fan500:500:1:2000:1 fan1k:1000:1:100:1 fan10k:10000:1000:2000:2"
for spec in $LOADS; do
    IFS=: read -r load subs topics rate workers <<EOF
$spec
EOF
    r=1
    while [ $r -le "$RUNS" ]; do
        # Alternate which system goes first, so a drift on the machine hits both.
        if [ $((r % 2)) -eq 1 ]; then order="weft nats"; else order="nats weft"; fi
        for system in $order; do
            run "$load" "$system" "$r" "$subs" "$topics" "$rate" "$workers"
        done
        r=$((r + 1))
    done
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
