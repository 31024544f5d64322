#!/usr/bin/env bash
# The per-request CPU cost of authentication: Portico plain vs with `key-auth` vs with
# `jwt` (RS256, static public key), each in front of the same upstream, measured in
# one run and interleaved (plain, key-auth, jwt, plain, ...).
#
# The figure that holds steady on a shared machine is the proxy's CPU time per
# request divided by the upstream's in the same run (see docs/performance.md); this
# script reports it for each variant and the difference from plain in µs/request.
#
#   bash bench/auth.sh            (REPS=3 DURATION=8s CONNS=50 by default)
#
# Layout: upstream + wrk on CPU 0, the gateway on CPU 1 (one worker).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${REPS:-3}"
DURATION="${DURATION:-8s}"
CONNS="${CONNS:-50}"
BASE="${BASE_PORT:-19300}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
cargo build --release -q -p portico -p portico-bench-upstream
W="$(mktemp -d /tmp/portico-auth-bench.XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
TICK_US=$((1000000 / $(getconf CLK_TCK)))

ticks() { # utime+stime of a pid, in clock ticks
    local s rest
    s="$(cat "/proc/$1/stat")"; rest="${s##*) }"
    local -a f; read -r -a f <<<"$rest"
    echo $((f[11] + f[12]))
}
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }

# An RS256 token valid for a day, and its public key.
openssl genrsa -out "$W/key.pem" 2048 2>/dev/null
openssl rsa -in "$W/key.pem" -pubout -out "$W/pub.pem" 2>/dev/null
now=$(date +%s)
h=$(printf '{"alg":"RS256","typ":"JWT"}' | b64url)
p=$(printf '{"sub":"bench@example.com","iss":"bench","aud":"api","iat":%d,"exp":%d}' "$now" $((now + 86400)) | b64url)
sig=$(printf '%s.%s' "$h" "$p" | openssl dgst -sha256 -sign "$W/key.pem" -binary | b64url)
JWT="$h.$p.$sig"
KEY="bench-key-0123456789abcdef"

taskset -c 0 target/release/portico-bench-upstream "127.0.0.1:$BASE" >/dev/null 2>&1 &
UP=$!

declare -A PORT=() PID=() HDR=()
NEXT_PORT=$((BASE + 1))
variant() { # name, plugins yaml (one line), header
    local name=$1 plugins=$2 port=$NEXT_PORT
    NEXT_PORT=$((NEXT_PORT + 2))
    PORT[$name]=$port
    HDR[$name]=$3
    cat >"$W/$name.yaml" <<YAML
listen: ["127.0.0.1:$port"]
admin: {listen: "127.0.0.1:$((port + 1))"}
workers: 1
access_log: {enabled: false}
store: {path: "$W/$name.db"}
consumers:
  - name: bench
    credentials:
      - {type: key-auth, key: "$KEY"}
      - {type: jwt, subject: "bench@example.com"}
upstreams:
  hello: {targets: [{url: "http://127.0.0.1:$BASE"}]}
routes:
  - {name: all, paths: ["/*"], upstream: hello, plugins: $plugins}
YAML
    taskset -c 1 target/release/portico run --config "$W/$name.yaml" >"$W/$name.log" 2>&1 &
    PID[$name]=$!
}
variant plain "{}" "x-bench: 1"
variant key-auth "{key-auth: {}}" "apikey: $KEY"
PUB_ESC=$(awk '{printf "%s\\n", $0}' "$W/pub.pem")
variant jwt "{jwt: {issuer: bench, audiences: [api], algorithms: [RS256], public_key: \"$PUB_ESC\"}}" "authorization: Bearer $JWT"
for n in "${!PORT[@]}"; do
    for _ in $(seq 100); do
        code=$(curl -s -o /dev/null -w '%{http_code}' -H "${HDR[$n]}" "http://127.0.0.1:${PORT[$n]}/" || true)
        [ "$code" = 200 ] && break; sleep 0.1
    done
    [ "$code" = 200 ] || { echo "$n does not answer 200 ($code):"; tail -5 "$W/$n.log"; exit 1; }
done

declare -A PX UPT REQ
for n in plain key-auth jwt; do PX[$n]=0; UPT[$n]=0; REQ[$n]=0; done
for rep in $(seq "$REPS"); do
    for n in plain key-auth jwt; do
        p0=$(ticks "${PID[$n]}"); u0=$(ticks "$UP")
        out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"$DURATION" -H "${HDR[$n]}" "http://127.0.0.1:${PORT[$n]}/")
        p1=$(ticks "${PID[$n]}"); u1=$(ticks "$UP")
        r=$(awk '/requests in/ {print $1}' <<<"$out")
        grep -q "Non-2xx" <<<"$out" && { echo "$n: non-2xx answers"; echo "$out"; exit 1; }
        PX[$n]=$((PX[$n] + p1 - p0)); UPT[$n]=$((UPT[$n] + u1 - u0)); REQ[$n]=$((REQ[$n] + r))
        echo "rep $rep $n: $r requests, proxy $((p1 - p0)) ticks, upstream $((u1 - u0)) ticks" >&2
    done
done
echo
echo "| variant | requests | proxy µs/req | upstream µs/req | ratio proxy/upstream | added µs/req vs plain |"
echo "|---|---|---|---|---|---|"
base=$(awk -v p="${PX[plain]}" -v r="${REQ[plain]}" -v t="$TICK_US" 'BEGIN {printf "%.3f", p * t / r}')
for n in plain key-auth jwt; do
    awk -v n="$n" -v p="${PX[$n]}" -v u="${UPT[$n]}" -v r="${REQ[$n]}" -v t="$TICK_US" -v b="$base" 'BEGIN {
        px = p * t / r; up = u * t / r
        printf "| %s | %d | %.2f | %.2f | %.2f | %+.2f |\n", n, r, px, up, px / up, px - b }'
done
echo
echo "wrk -t1 -c$CONNS -d$DURATION x $REPS interleaved reps; gateway on CPU 1 (1 worker), upstream and wrk on CPU 0; $(git describe --always --dirty)."
