#!/bin/sh
# Idle-memory figure of BENCHMARKS.md (issue 12 item 5): a fresh release weft-node
# (development mode on loopback, embedded router) and CONNECTIONS idle WebSocket
# sessions over TOPICS topics (TOPICS = CONNECTIONS: one private topic each); the
# harness prints the node's RSS per connection ("KiB per connection").
#
#   loadtest/scripts/idle-memory.sh TOPICS [CONNECTIONS]   env: BIN (target/release)
#
# Bounded: the node gets 30 s to start, the harness 300 s; only the node started here
# is stopped, by its PID.
set -eu

TOPICS=${1:?usage: idle-memory.sh TOPICS [CONNECTIONS]}
CONNECTIONS=${2:-15000}
BIN=${BIN:-target/release}
# One process holds every session: inside a 20,000 open-files limit.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
DIR=$(mktemp -d)
PID=
trap '[ -z "$PID" ] || { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; } || true; rm -rf "$DIR"' EXIT
"$BIN/weft-node" --http-listen 127.0.0.1:0 --cluster-listen 127.0.0.1:0 \
    --data-dir "$DIR/data" --ready-file "$DIR/ready" >"$DIR/node.log" 2>&1 &
PID=$!
n=0
while [ ! -s "$DIR/ready" ]; do
    n=$((n + 1))
    [ "$n" -le 300 ] || { echo "idle-memory: the node did not start; see $DIR/node.log" >&2; exit 1; }
    sleep 0.1
done
URL=http://$(jq -r .http "$DIR/ready")
timeout 300 "$BIN/weft-loadtest" connect --target "$URL" --transport ws \
    --connections "$CONNECTIONS" --rate 10000 --topics "$TOPICS" --workers 2 \
    --duration 5s --target-pid "$PID" --quiet | grep -E "target|connects"
