#!/bin/sh
# Runs one command (a weft-loadtest run) against a cluster-up.sh cluster and prints,
# per node, the CPU seconds it used meanwhile (utime + stime from /proc/PID/stat) and
# its relay counters' deltas (/metrics), with CPU µs per relayed event.
#
#   loadtest/scripts/relay-cost.sh DIR -- COMMAND [ARGS…]
#
# The node copies its counters into /metrics once a second, so the final read waits
# 1.5 s after the command; the CPU figures include that idle wait and the harness's
# ramp and drain (whatever the node did during the whole command). The last line splits
# the machine's busy CPU (/proc/stat) into nodes, router, the command and `other`
# (everything else on the machine: a disturbed run shows there). Process and machine
# times are sampled differently, so `other` is approximate and may read slightly
# negative.
set -eu

DIR=${1:?usage: relay-cost.sh DIR -- COMMAND…}
shift
[ "${1:-}" = "--" ] && shift
. "$DIR/cluster.env"
TCK=$(getconf CLK_TCK)

cpu_ticks() {
    # Fields 14 and 15 of /proc/PID/stat, counted after the command name's ')'.
    sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

metric() {
    curl -sf --max-time 5 "$1/metrics" |
        awk -v m="$2" 'index($1, m "{") == 1 || $1 == m { s += $2 } END { printf "%d\n", s }'
}

snapshot() {
    i=1
    while [ "$i" -le "$NODES" ]; do
        url=$(eval echo "\$N${i}_URL")
        pid=$(eval echo "\$N${i}_PID")
        echo "n$i $(cpu_ticks "$pid") $(metric "$url" weft_relay_events_sent_total) \
$(metric "$url" weft_relay_events_received_total) \
$(metric "$url" weft_relay_publishes_forwarded_total)"
        i=$((i + 1))
    done
}

# Busy CPU seconds of the whole machine (/proc/stat), and of this shell's waited-for
# children (the command), so that other load on the machine shows.
machine_ticks() {
    awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}
children_ticks() {
    sed 's/.*) //' "/proc/$$/stat" | awk '{ print $14 + $15 }'
}

sleep 1.5
before=$(snapshot)
router0=$(cpu_ticks "$ROUTER_PID")
machine0=$(machine_ticks)
children0=$(children_ticks)
t0=$(date +%s.%N)
status=0
"$@" || status=$?
t1=$(date +%s.%N)
children1=$(children_ticks)
machine1=$(machine_ticks)
router1=$(cpu_ticks "$ROUTER_PID")
sleep 1.5
after=$(snapshot)

echo "relay cost (CPU over the whole command; relay counters' deltas):"
printf '%s\n%s\n' "$before" "$after" | awk -v tck="$TCK" '
    { key = $1 }
    seen[key]++ == 0 { c0[key] = $2; s0[key] = $3; r0[key] = $4; f0[key] = $5; order[++n] = key; next }
    { c1[key] = $2; s1[key] = $3; r1[key] = $4; f1[key] = $5 }
    END {
        printf "  %-4s %9s %12s %12s %12s %12s %12s\n", "node", "cpu_s", "sent", "received",
            "forwarded", "cpu_us/sent", "cpu_us/recv"
        for (i = 1; i <= n; i++) {
            k = order[i]; cpu = (c1[k] - c0[k]) / tck
            s = s1[k] - s0[k]; r = r1[k] - r0[k]; f = f1[k] - f0[k]
            printf "  %-4s %9.2f %12d %12d %12d %12s %12s\n", k, cpu, s, r, f,
                (s > 0 ? sprintf("%.2f", cpu * 1e6 / s) : "-"),
                (r > 0 ? sprintf("%.2f", cpu * 1e6 / r) : "-")
        }
    }'
nodes=$(printf '%s\n%s\n' "$before" "$after" | awk '
    seen[$1]++ == 0 { c0[$1] = $2; next } { d += $2 - c0[$1] } END { print d }')
awk -v tck="$TCK" -v m="$((machine1 - machine0))" -v h="$((children1 - children0))" \
    -v r="$((router1 - router0))" -v n="$nodes" -v t0="$t0" -v t1="$t1" 'BEGIN {
    printf "  during the command (%.1f s): machine %.2f CPU s busy = nodes %.2f (incl. the 1.5 s after) + router %.2f + command %.2f + other %.2f\n",
        t1 - t0, m / tck, n / tck, r / tck, h / tck, (m - n - r - h) / tck
}'
exit "$status"
