#!/bin/sh
# Shared by cluster-up.sh and restart-nodes.sh (sourced, POSIX sh): the flags a member
# starts with, the bounded waits, and what "converged" means.

# member_tls CERTS MEMBER: the cluster flags of MEMBER (router-1, n1, …); CERTS empty
# means plaintext links.
member_tls() {
    if [ -z "$1" ]; then
        echo "--cluster-insecure"
        return
    fi
    f=$2
    case $f in n*) f=node-$f ;; esac
    echo "--cluster-ca-file $1/ca.crt --cluster-cert-file $1/$f.crt --cluster-key-file $1/$f.key"
}

# wait_until TRIES MESSAGE COMMAND…: runs COMMAND every 0.1 s until it succeeds; after
# TRIES failures prints MESSAGE and exits 1. Every wait in these scripts is bounded.
wait_until() {
    tries=$1
    message=$2
    shift 2
    n=0
    until "$@"; do
        n=$((n + 1))
        if [ "$n" -gt "$tries" ]; then
            echo "$message" >&2
            exit 1
        fi
        sleep 0.1
    done
}

# exited PID: the process is gone.
exited() {
    ! kill -0 "$1" 2>/dev/null
}

# converged NODES: every node (N<i>_URL from cluster.env) sees NODES active members and
# has a relay link to every other node.
converged() {
    j=1
    while [ "$j" -le "$1" ]; do
        u=$(eval echo "\$N${j}_URL")
        curl -sf --max-time 2 "$u/v1/cluster" | jq -e --argjson n "$1" \
            '([.members[] | select(.state == "active")] | length) == $n
             and ((.this_node.relay_links // []) | length) == $n - 1' >/dev/null || return 1
        j=$((j + 1))
    done
}

# start_node DIR I CERTS HTTP CLUSTER ROUTER: starts weft-node n<I> in the background
# (BIN names the binaries' folder), its log appended to DIR/n<I>.log; `$!` is its PID.
start_node() {
    # shellcheck disable=SC2046 # member_tls is a list of flags
    "$BIN/weft-node" $(member_tls "$3" "n$2") --node-id "n$2" --http-listen "$4" \
        --cluster-listen "$5" --router "$6" --data-dir "$1/n$2" --ready-file "$1/n$2.ready" \
        >>"$1/n$2.log" 2>&1 &
}

# For benchmark scripts that run one fresh cluster after another (they set OUT, LT and
# HERE). The cluster in CLUSTER is stopped however the script exits.
stop_cluster_on_exit() {
    CLUSTER=
    trap '[ -z "$CLUSTER" ] || "$HERE/cluster-down.sh" "$CLUSTER"' EXIT
    trap 'exit 130' INT TERM
}

# bench_cluster NAME SUBS PUBS -- weft-loadtest arguments…: a fresh two-node cluster
# (cluster-up.sh; CLUSTER_INSECURE as exported), one harness run with its subscribers
# on n<SUBS> and its publishers on n<PUBS>, wrapped in relay-cost.sh, into
# OUT/NAME.txt and OUT/NAME.json; the cluster is stopped after. QUIET_LIMIT set: first
# wait (at most that many tenths of a second) for a quiet machine. NOTE set: shown
# after the command line in the report.
bench_cluster() {
    name=$1
    subs=$2
    pubs=$3
    shift 4
    CLUSTER="$OUT/cluster-$name"
    rm -rf "$CLUSTER"
    BIN=$BIN "$HERE/cluster-up.sh" "$CLUSTER" 2 >/dev/null
    . "$CLUSTER/cluster.env"
    target=$(eval echo "\$N${subs}_URL")
    publish=$(eval echo "\$N${pubs}_URL")
    pid=$(eval echo "\$N${subs}_PID")
    : >"$OUT/$name.txt"
    if [ -n "${QUIET_LIMIT:-}" ]; then
        "$HERE/wait-quiet.sh" 10 "$QUIET_LIMIT" >>"$OUT/$name.txt" || true
    fi
    echo "\$ weft-loadtest $* --target \$N${subs}_URL --publish-target \$N${pubs}_URL${NOTE:+ ($NOTE)}" \
        >>"$OUT/$name.txt"
    "$HERE/relay-cost.sh" "$CLUSTER" -- "$LT" "$@" --target "$target" \
        --publish-target "$publish" --target-pid "$pid" --quiet \
        --json "$OUT/$name.json" >>"$OUT/$name.txt" 2>&1 || true
    "$HERE/cluster-down.sh" "$CLUSTER"
    CLUSTER=
    cat "$OUT/$name.txt"
}
