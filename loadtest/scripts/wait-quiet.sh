#!/bin/sh
# Waits until the machine is quiet — less than BUSY_PCT (default 10) percent of all
# CPUs busy over a 2 s sample — for at most MAX_S seconds (default 600), then prints
# the last sample. Exit 1 if it never got quiet. For benchmarks on a shared machine.
#
#   loadtest/scripts/wait-quiet.sh [BUSY_PCT] [MAX_S]
set -eu

PCT=${1:-10}
MAX=${2:-600}

sample() {
    awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat
}

waited=0
while :; do
    a=$(sample)
    sleep 2
    b=$(sample)
    busy=$(echo "$a $b" | awk '{ d = $4 - $2; printf "%d", (d > 0 ? 100 * ($3 - $1) / d : 0) }')
    if [ "$busy" -lt "$PCT" ]; then
        echo "machine quiet: ${busy}% busy (waited ${waited}s)"
        exit 0
    fi
    waited=$((waited + 2))
    if [ "$waited" -ge "$MAX" ]; then
        echo "machine still ${busy}% busy after ${MAX}s" >&2
        exit 1
    fi
done
