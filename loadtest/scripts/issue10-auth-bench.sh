#!/bin/sh
# What client authentication costs on the hot paths (issue 10). One release node per
# run, fresh each time, in three modes, alternating so that a disturbance hits all:
#   anon   development mode: no credentials;
#   hs256  [auth] hmac_secret: every WebSocket handshake carries a JWT (HS256);
#   rs256  [auth] public_keys: every handshake carries a JWT (RS256, 2048-bit key);
#   key    [[auth.api_keys]]: every REST publish carries an API key (SHA-256 lookup).
# Two loads:
#   connect  CONNECTIONS WebSocket sessions opened at RATE/s (token verified per
#            handshake in hs256 / rs256): node CPU per connect, connect latency;
#   publish  one topic, 1 subscriber, ordered publisher at PUB_RATE/s offered with
#            256 in flight (API key per request in key / hs256 mode): publishes/s
#            achieved, publish latency, node CPU per publish.
# Reports (JSON) go to OUT; a summary table is printed.
#
#   loadtest/scripts/issue10-auth-bench.sh OUT   env: BIN (default target/release),
#        RUNS (2), CONNECTIONS (4000), RATE (2000), PUB_RATE (5000), SECONDS (8)
set -eu

OUT=${1:?usage: issue10-auth-bench.sh OUT}
BIN=${BIN:-target/release}
RUNS=${RUNS:-2}
CONNECTIONS=${CONNECTIONS:-4000}
RATE=${RATE:-2000}
PUB_RATE=${PUB_RATE:-5000}
SECONDS_=${SECONDS:-8}
mkdir -p "$OUT"
NODE_PID=
trap '[ -z "$NODE_PID" ] || kill "$NODE_PID" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM

SECRET=bench-secret-bench-secret-bench-secret
KEY=bench-api-key-0123456789
KEY_SHA=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
[ -f "$OUT/rsa.key" ] || openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$OUT/rsa.key" 2>/dev/null
openssl pkey -in "$OUT/rsa.key" -pubout -out "$OUT/rsa.pub.pem" 2>/dev/null

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
jwt() { # ALG
    header=$(printf '{"alg":"%s","typ":"JWT"}' "$1" | b64url)
    exp=$(( $(date +%s) + 3600 ))
    payload=$(printf '{"sub":"bench","exp":%s,"weft":{"sub":[">"],"pub":[">"]}}' "$exp" | b64url)
    if [ "$1" = HS256 ]; then
        sig=$(printf %s "$header.$payload" | openssl dgst -sha256 -hmac "$SECRET" -binary | b64url)
    else
        sig=$(printf %s "$header.$payload" | openssl dgst -sha256 -sign "$OUT/rsa.key" -binary | b64url)
    fi
    printf %s "$header.$payload.$sig"
}

start_node() { # MODE
    cfg="$OUT/node-$1.toml"
    case $1 in
        anon) : > "$cfg" ;;
        hs256) printf '[auth]\nhmac_secret = "%s"\n[[auth.api_keys]]\nname = "bench"\nsha256 = "%s"\npublish = [">"]\nsubscribe = [">"]\n' "$SECRET" "$KEY_SHA" > "$cfg" ;;
        rs256) printf '[auth]\npublic_keys = ["%s"]\n[[auth.api_keys]]\nname = "bench"\nsha256 = "%s"\npublish = [">"]\nsubscribe = [">"]\n' "$OUT/rsa.pub.pem" "$KEY_SHA" > "$cfg" ;;
        key) printf '[[auth.api_keys]]\nname = "bench"\nsha256 = "%s"\npublish = [">"]\nsubscribe = [">"]\n' "$KEY_SHA" > "$cfg" ;;
    esac
    # Every connection carries the same subject: lift the per-user session cap.
    printf '[limits]\nmax_connections_per_user = 1000000\n' >> "$cfg"
    rm -rf "$OUT/data" "$OUT/ready.json"
    "$BIN/weft-node" --config "$cfg" --http-listen 127.0.0.1:0 --cluster-listen 127.0.0.1:0 \
        --data-dir "$OUT/data" --ready-file "$OUT/ready.json" --max-connections-per-ip 100000 \
        > "$OUT/node-$1.log" 2>&1 &
    NODE_PID=$!
    i=0
    while [ ! -s "$OUT/ready.json" ]; do
        i=$((i + 1)); [ $i -lt 100 ] || { echo "node did not start" >&2; exit 1; }
        sleep 0.1
    done
    TARGET=http://$(sed 's/.*"http":"\([^"]*\)".*/\1/' "$OUT/ready.json")
}

stop_node() { kill "$NODE_PID"; wait "$NODE_PID" 2>/dev/null || true; NODE_PID=; }

for run in $(seq 1 "$RUNS"); do
    for mode in anon hs256 rs256 key; do
        case $mode in
            anon) conn_token=; pub_token= ;;
            hs256) conn_token=$(jwt HS256); pub_token=$(jwt HS256) ;;
            rs256) conn_token=$(jwt RS256); pub_token=$(jwt RS256) ;;
            key) conn_token=$KEY; pub_token=$KEY ;;
        esac
        start_node "$mode"
        "$BIN/weft-loadtest" connect --target "$TARGET" --connections "$CONNECTIONS" \
            --rate "$RATE" --duration 2s --target-pid "$NODE_PID" --quiet \
            ${conn_token:+--token "$conn_token"} --json "$OUT/connect-$mode-$run.json" >/dev/null
        stop_node
        start_node "$mode"
        "$BIN/weft-loadtest" fanout --target "$TARGET" --subscribers 1 --topics 1 \
            --rate "$PUB_RATE" --max-inflight 256 --duration "${SECONDS_}s" --target-pid "$NODE_PID" \
            --quiet ${pub_token:+--token "$pub_token"} --json "$OUT/publish-$mode-$run.json" >/dev/null
        stop_node
    done
done

python3 - "$OUT" <<'EOF'
import json, glob, sys, os
out = sys.argv[1]
print("| mode | load | run | connects/s | connect p50 / p99 µs | node CPU µs per connect | publishes/s | publish p50 / p99 µs | node CPU µs per publish |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(out, "*-*-*.json"))):
    load, mode, run = os.path.basename(path)[:-5].split("-")
    r = json.load(open(path))
    t = r.get("target") or {}
    if load == "connect":
        cpu = t.get("cpu_run_s", 0) / max(r["connects"], 1) * 1e6
        print(f"| {mode} | connect | {run} | {r['connect_per_s']:.0f} | {r['connect_latency_us']['p50']} / {r['connect_latency_us']['p99']} | {cpu:.1f} | | | |")
    else:
        cpu = t.get("cpu_s", 0) / max(r["published"], 1) * 1e6
        print(f"| {mode} | publish | {run} | | | | {r['publish_per_s']:.0f} | {r['publish_latency_us']['p50']} / {r['publish_latency_us']['p99']} | {cpu:.1f} |")
EOF
