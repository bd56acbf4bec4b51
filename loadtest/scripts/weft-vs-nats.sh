#!/bin/sh
# One weft-loadtest scenario against Weft and against nats-server, side by side: a
# fresh weft-node (release, development mode on loopback) and a fresh nats-server
# (WebSocket listener, no TLS) for every run, alternating which goes first, RUNS times
# each, every run with --target-pid; then `weft-loadtest compare` takes the medians.
#
#   loadtest/scripts/weft-vs-nats.sh OUT NAME -- SCENARIO [weft-loadtest options...]
#     e.g. weft-vs-nats.sh /tmp/cmp fan500 -- fanout --ordered --subscribers 500 \
#              --topics 1 --rate 2000 --payload-bytes 100 --duration 30s
#     env: BIN (default target/release: weft-node, weft-loadtest), NATS_SERVER
#          (default: nats-server on PATH, else /usr/sbin/nats-server), RUNS (3),
#          RUN_TIMEOUT (seconds one harness run may take, default 600),
#          BEFORE (a directory holding another build's weft-node: that build runs
#          as system "weft-before" in place of nats-server, for before/after checks),
#          ONLY=weft (Weft alone: no other system runs),
#          WEFT_PUBLISH_VIA (http or stream, default http: how the harness publishes
#          to Weft, --publish-via; the NATS runs always use their NATS links)
#
# Writes OUT/NAME-<weft|nats>-<run>.json and .txt (the harness's output), appends
# "NAME-<system>-<run>: exit N" to OUT/runs.txt, and writes the comparison to
# OUT/NAME-compare.md, .json and .html. --target, --system, --target-pid, --json and
# --quiet are added here; give everything else. Bounded: every wait loop has a count,
# every harness run a timeout(1); only the servers this script started are stopped,
# by their PIDs.
set -eu

OUT=${1:?usage: weft-vs-nats.sh OUT NAME -- SCENARIO [options...]}
NAME=${2:?usage: weft-vs-nats.sh OUT NAME -- SCENARIO [options...]}
[ "${3:-}" = -- ] || { echo "usage: weft-vs-nats.sh OUT NAME -- SCENARIO [options...]" >&2; exit 2; }
shift 3
[ $# -gt 0 ] || { echo "weft-vs-nats.sh: no scenario given" >&2; exit 2; }
BIN=${BIN:-target/release}
LT="$BIN/weft-loadtest"
NODE="$BIN/weft-node"
NATS=${NATS_SERVER:-$(command -v nats-server 2>/dev/null || echo /usr/sbin/nats-server)}
RUNS=${RUNS:-3}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
if [ -n "${BEFORE:-}" ]; then
    OTHER=before
    NATS="$BEFORE/weft-node"
else
    OTHER=nats
fi
for b in "$LT" "$NODE" "$NATS"; do
    [ -x "$b" ] || { echo "weft-vs-nats.sh: $b is missing (cargo build --release -p weft-node -p weft-loadtest; apt-get install nats-server)" >&2; exit 1; }
done
mkdir -p "$OUT"
# Up to 10,000 connections per server process: inside a 20,000 open-files limit.
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

start_weft() { # DIR
    # Anonymous clients all count as one user: lift the per-user session cap.
    printf '[limits]\nmax_connections_per_user = 1000000\n' > "$1/node.toml"
    "$NODE" --config "$1/node.toml" --http-listen 127.0.0.1:0 --cluster-listen 127.0.0.1:0 \
        --data-dir "$1/data" --ready-file "$1/ready.json" --max-connections-per-ip 100000 \
        > "$1/node.log" 2>&1 &
    SERVER_PID=$!
    i=0
    while [ ! -s "$1/ready.json" ]; do
        i=$((i + 1)); [ $i -lt 100 ] || { echo "weft-node did not start: $1/node.log" >&2; exit 1; }
        sleep 0.1
    done
    TARGET=http://$(sed 's/.*"http":"\([^"]*\)".*/\1/' "$1/ready.json")
}

start_before() { # DIR: the BEFORE build, started like BIN's
    after=$NODE
    NODE="$BEFORE/weft-node"
    start_weft "$1"
    NODE=$after
}

start_nats() { # DIR
    printf 'listen: "127.0.0.1:-1"\nwebsocket {\n  listen: "127.0.0.1:-1"\n  no_tls: true\n}\n' > "$1/nats.conf"
    "$NATS" -c "$1/nats.conf" -l "$1/nats.log" >/dev/null 2>&1 &
    SERVER_PID=$!
    i=0
    port=
    while [ -z "$port" ]; do
        i=$((i + 1)); [ $i -lt 100 ] || { echo "nats-server did not start: $1/nats.log" >&2; exit 1; }
        sleep 0.1
        port=$(sed -n 's/.*websocket clients on ws:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$1/nats.log" 2>/dev/null | head -n 1)
    done
    TARGET=ws://127.0.0.1:$port
}

r=1
while [ $r -le "$RUNS" ]; do
    # Alternate which system goes first, so a drift on the machine hits both alike.
    if [ $((r % 2)) -eq 1 ]; then order="weft $OTHER"; else order="$OTHER weft"; fi
    [ "${ONLY:-}" = weft ] && order=weft
    for system in $order; do
        run="$NAME-$system-$r"
        dir="$OUT/server-$run"
        rm -rf "$dir"; mkdir -p "$dir"
        "start_$system" "$dir"
        as=$system
        [ "$system" = before ] && as=weft
        via="-u WEFT_LOADTEST_PUBLISH_VIA"
        [ "$as" = weft ] && via="WEFT_LOADTEST_PUBLISH_VIA=${WEFT_PUBLISH_VIA:-http}"
        echo "\$ $via weft-loadtest $* --system $as --target $TARGET --target-pid $SERVER_PID" > "$OUT/$run.txt"
        rc=0
        # shellcheck disable=SC2086 # $via is one env(1) operand, or its option and name
        env $via timeout --kill-after=10 "$RUN_TIMEOUT" "$LT" "$@" --system "$as" --target "$TARGET" \
            --target-pid "$SERVER_PID" --quiet --json "$OUT/$run.json" >> "$OUT/$run.txt" 2>&1 || rc=$?
        stop_server
        if [ "$system" = before ] && [ -f "$OUT/$run.json" ]; then
            # The comparison groups by system: name the other build apart.
            jq '.system = "weft-before"' "$OUT/$run.json" > "$OUT/$run.json.tmp" &&
                mv "$OUT/$run.json.tmp" "$OUT/$run.json"
        fi
        rm -rf "$dir/data"
        echo "$run: exit $rc" | tee -a "$OUT/runs.txt"
        [ $rc -eq 0 ] || tail -n 5 "$OUT/$run.txt" >&2
    done
    r=$((r + 1))
done

reports=
for f in "$OUT/$NAME"-weft-*.json "$OUT/$NAME-$OTHER"-*.json; do
    [ -f "$f" ] && reports="$reports $f"
done
[ -n "$reports" ] || { echo "weft-vs-nats.sh: no run wrote a report" >&2; exit 1; }
# shellcheck disable=SC2086 # the report paths are a list
"$LT" compare $reports --markdown "$OUT/$NAME-compare.md" --json "$OUT/$NAME-compare.json" \
    --html "$OUT/$NAME-compare.html"
