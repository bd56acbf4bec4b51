#!/bin/sh
# Starts a loopback benchmark cluster: one weft-router and NODES weft-nodes (n1, n2, …),
# each on its own 127.0.0.x address with ports the kernel picks, and waits (at most
# 60 s) until every node sees every member active and has a relay link to every other
# node. Writes DIR/cluster.env (N<i>_URL, N<i>_PID, ROUTER_PID, NODES) for the other
# scripts, DIR/pids (every PID started here, for cluster-down.sh) and one log per
# process.
#
#   loadtest/scripts/cluster-up.sh DIR [NODES]
#   env: BIN (default target/release), IP_BASE (default 220: router on 127.0.0.220,
#        node i on 127.0.0.(220+i)), HEARTBEAT_TIMEOUT_MS (default 3000),
#        CLUSTER_INSECURE (set: plaintext cluster links, for comparing against TLS)
#
# Cluster links are mutual TLS by default: `weft-router certs` writes a dev CA and
# one certificate per member into DIR/certs (CERTS in cluster.env; empty = insecure).
# DIR must not contain spaces.
set -eu

DIR=${1:?usage: cluster-up.sh DIR [NODES]}
NODES=${2:-2}
BIN=${BIN:-target/release}
BASE=${IP_BASE:-220}
HB=${HEARTBEAT_TIMEOUT_MS:-3000}
. "$(dirname "$0")/cluster-lib.sh"

mkdir -p "$DIR"
if [ -s "$DIR/pids" ]; then
    echo "cluster-up: $DIR/pids exists; stop that cluster first (cluster-down.sh $DIR)" >&2
    exit 1
fi
: >"$DIR/pids"

if [ -n "${CLUSTER_INSECURE:-}" ]; then
    CERTS=
else
    CERTS=$DIR/certs
    "$BIN/weft-router" certs --out "$CERTS" --routers 1 \
        --nodes "$(seq -s, -f 'n%g' 1 "$NODES")" >/dev/null
fi
# shellcheck disable=SC2046 # member_tls is a list of flags
"$BIN/weft-router" $(member_tls "$CERTS" router-1) --id 1 --listen "127.0.0.$BASE:0" --data-dir "$DIR/router" \
    --ready-file "$DIR/router.ready" --heartbeat-timeout-ms "$HB" >"$DIR/router.log" 2>&1 &
echo $! >>"$DIR/pids"
echo "ROUTER_PID=$!" >"$DIR/cluster.env"
echo "CERTS=$CERTS" >>"$DIR/cluster.env"
wait_until 300 "cluster-up: $DIR/router.ready did not appear within 30 s; see $DIR/*.log" \
    test -s "$DIR/router.ready"
ROUTER=$(jq -r .listen "$DIR/router.ready")

i=1
while [ "$i" -le "$NODES" ]; do
    ip=127.0.0.$((BASE + i))
    start_node "$DIR" "$i" "$CERTS" "$ip:0" "$ip:0" "$ROUTER"
    echo $! >>"$DIR/pids"
    i=$((i + 1))
done
i=1
while [ "$i" -le "$NODES" ]; do
    wait_until 300 "cluster-up: $DIR/n$i.ready did not appear within 30 s; see $DIR/*.log" \
        test -s "$DIR/n$i.ready"
    echo "N${i}_URL=http://$(jq -r .http "$DIR/n$i.ready")" >>"$DIR/cluster.env"
    echo "N${i}_PID=$(jq -r .pid "$DIR/n$i.ready")" >>"$DIR/cluster.env"
    i=$((i + 1))
done
echo "NODES=$NODES" >>"$DIR/cluster.env"

# Converged: all members active, links to every other node, on every node.
. "$DIR/cluster.env"
wait_until 600 "cluster-up: not converged within 60 s; see $DIR/*.log" converged "$NODES"
cat "$DIR/cluster.env"
