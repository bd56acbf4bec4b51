#!/bin/sh
# Stops what cluster-up.sh started in DIR, by the PIDs it recorded: SIGTERM, then
# SIGKILL for any still there after 10 s.
#
#   loadtest/scripts/cluster-down.sh DIR
set -u

DIR=${1:?usage: cluster-down.sh DIR}
[ -s "$DIR/pids" ] || exit 0
PIDS=$(cat "$DIR/pids")
for p in $PIDS; do
    kill -TERM "$p" 2>/dev/null || true
done
n=0
for p in $PIDS; do
    while kill -0 "$p" 2>/dev/null && [ "$n" -lt 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    kill -KILL "$p" 2>/dev/null || true
done
: >"$DIR/pids"
