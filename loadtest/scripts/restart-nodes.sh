#!/bin/sh
# Restarts every node of a cluster-up.sh cluster, one at a time: SIGTERM (the node
# hands its topics over and closes its sessions gradually), wait for it to exit, start
# it again on the same node id, addresses and data dir, and wait until the whole
# cluster has converged again before the next one. Bounded: 60 s per step.
#
#   loadtest/scripts/restart-nodes.sh DIR
#   env: BIN (default target/release)
set -eu

DIR=${1:?usage: restart-nodes.sh DIR}
BIN=${BIN:-target/release}
. "$DIR/cluster.env"

converged() {
    j=1
    while [ "$j" -le "$NODES" ]; do
        u=$(eval echo "\$N${j}_URL")
        curl -sf --max-time 2 "$u/v1/cluster" | jq -e --argjson n "$NODES" \
            '([.members[] | select(.state == "active")] | length) == $n
             and ((.this_node.relay_links // []) | length) == $n - 1' >/dev/null || return 1
        j=$((j + 1))
    done
}

i=1
while [ "$i" -le "$NODES" ]; do
    pid=$(eval echo "\$N${i}_PID")
    http=$(jq -r .http "$DIR/n$i.ready")
    cluster=$(jq -r .cluster "$DIR/n$i.ready")
    if [ -z "$CERTS" ]; then
        tls=--cluster-insecure
    else
        tls="--cluster-ca-file $CERTS/ca.crt --cluster-cert-file $CERTS/node-n$i.crt --cluster-key-file $CERTS/node-n$i.key"
    fi
    router=$(jq -r .listen "$DIR/router.ready")
    echo "restart-nodes: n$i (pid $pid): SIGTERM" >&2
    t0=$(date +%s)
    kill -TERM "$pid"
    n=0
    while kill -0 "$pid" 2>/dev/null; do
        n=$((n + 1))
        if [ "$n" -gt 600 ]; then
            echo "restart-nodes: n$i did not exit within 60 s" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "restart-nodes: n$i exited after $(($(date +%s) - t0)) s; starting it again" >&2
    rm -f "$DIR/n$i.ready"
    # shellcheck disable=SC2086 # $tls is a list of flags
    "$BIN/weft-node" $tls --node-id "n$i" --http-listen "$http" --cluster-listen "$cluster" \
        --router "$router" --data-dir "$DIR/n$i" --ready-file "$DIR/n$i.ready" \
        >>"$DIR/n$i.log" 2>&1 &
    newpid=$!
    echo "$newpid" >>"$DIR/pids"
    sed -i "s/^N${i}_PID=.*/N${i}_PID=$newpid/" "$DIR/cluster.env"
    n=0
    until converged; do
        n=$((n + 1))
        if [ "$n" -gt 600 ]; then
            echo "restart-nodes: cluster not converged 60 s after restarting n$i" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "restart-nodes: n$i back, cluster converged" >&2
    i=$((i + 1))
done
