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
. "$(dirname "$0")/cluster-lib.sh"

i=1
while [ "$i" -le "$NODES" ]; do
    pid=$(eval echo "\$N${i}_PID")
    http=$(jq -r .http "$DIR/n$i.ready")
    cluster=$(jq -r .cluster "$DIR/n$i.ready")
    router=$(jq -r .listen "$DIR/router.ready")
    echo "restart-nodes: n$i (pid $pid): SIGTERM" >&2
    t0=$(date +%s)
    kill -TERM "$pid"
    wait_until 600 "restart-nodes: n$i did not exit within 60 s" exited "$pid"
    echo "restart-nodes: n$i exited after $(($(date +%s) - t0)) s; starting it again" >&2
    rm -f "$DIR/n$i.ready"
    start_node "$DIR" "$i" "$CERTS" "$http" "$cluster" "$router"
    newpid=$!
    echo "$newpid" >>"$DIR/pids"
    sed -i "s/^N${i}_PID=.*/N${i}_PID=$newpid/" "$DIR/cluster.env"
    wait_until 600 "restart-nodes: cluster not converged 60 s after restarting n$i" \
        converged "$NODES"
    echo "restart-nodes: n$i back, cluster converged" >&2
    i=$((i + 1))
done
