#!/bin/sh
# HTTP publish throughput of BENCHMARKS.md: a fresh release weft-node (development
# mode on loopback) and wrk (Debian package `wrk`) posting one 21-byte JSON event per
# request over CONNECTIONS kept-alive connections, to 100 topics in turn. Prints the
# requests per second, the node's CPU (utime + stime from /proc over the measured
# window) and the node CPU per request. wrk rather than the harness: the harness's
# HTTP client costs more per request than the node, and on shared cores it would
# measure itself.
#
#   loadtest/scripts/publish-wrk.sh [CONNECTIONS] [SECONDS]
#     env: BIN (target/release: weft-node), LABEL (printed first, default "weft")
#
# Bounded: the node gets 10 s to start; a 3 s warm-up, then one SECONDS-long run; only
# the node started here is stopped, by its PID.
set -eu

CONNECTIONS=${1:-64}
SECONDS_=${2:-10}
BIN=${BIN:-target/release}
LABEL=${LABEL:-weft}
command -v wrk >/dev/null || { echo "publish-wrk: wrk is missing (apt-get install wrk)" >&2; exit 1; }
DIR=$(mktemp -d)
PID=
# The node writes its data directory while it shuts down: wait for it before removing.
trap '[ -z "$PID" ] || { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; } || true; rm -rf "$DIR"' EXIT
cat >"$DIR/post.lua" <<'EOF'
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/topics/bench.t" .. (n % 100) .. "/events",
    {["content-type"] = "application/json"}, '{"px":101.25,"qty":3}')
end
EOF
"$BIN/weft-node" --http-listen 127.0.0.1:0 --cluster-listen 127.0.0.1:0 \
    --data-dir "$DIR/data" --ready-file "$DIR/ready" >"$DIR/node.log" 2>&1 &
PID=$!
n=0
while [ ! -s "$DIR/ready" ]; do
    n=$((n + 1))
    [ "$n" -le 100 ] || { echo "publish-wrk: the node did not start; see $DIR/node.log" >&2; exit 1; }
    sleep 0.1
done
URL=http://$(sed 's/.*"http":"\([^"]*\)".*/\1/' "$DIR/ready")
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
wrk -t1 -c16 -d3s -s "$DIR/post.lua" "$URL" >/dev/null
c0=$(cpu)
wrk -t1 -c"$CONNECTIONS" -d"${SECONDS_}s" -s "$DIR/post.lua" "$URL" >"$DIR/wrk.txt"
c1=$(cpu)
ticks=$(getconf CLK_TCK)
awk -v label="$LABEL" -v c0="$c0" -v c1="$c1" -v t="$ticks" -v s="$SECONDS_" '
    /Requests\/sec/ { rps = $2 }
    /^ +Latency/ { avg = $2; max = $4 }
    /Non-2xx/ { bad = $NF }
    END {
        cpu = (c1 - c0) / t
        printf "%s: %.0f requests/s, node %.2f CPU-s in %d s (%.2f cores), %.1f us per request, latency avg %s max %s, non-2xx %d\n",
            label, rps, cpu, s, cpu / s, cpu * 1e6 / (rps * s), avg, max, bad + 0
    }' "$DIR/wrk.txt"
