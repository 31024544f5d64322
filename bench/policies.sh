#!/usr/bin/env bash
# The per-request CPU cost of traffic policies: Portico plain (proxying) vs a `cache`
# hit (answered from memory, the upstream not asked) vs `rate-limit` local vs
# `rate-limit` cluster (a real redis-server on CPU 0), each in front of the same
# upstream, measured in one run and interleaved (plain, cache-hit, ..., plain, ...).
#
# Reported per variant: the gateway's CPU µs per request, the upstream's, their
# ratio, Redis's µs per request (cluster only), and the difference from plain. The
# limits are set far above what the run sends, so every request is admitted and the
# figure is the cost of counting.
#
#   bash bench/policies.sh            (REPS=3 DURATION=8s CONNS=50 by default)
#
# Layout: upstream + wrk + redis-server on CPU 0, the gateway on CPU 1 (one worker).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${REPS:-3}"
DURATION="${DURATION:-8s}"
CONNS="${CONNS:-50}"
BASE="${BASE_PORT:-19400}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
cargo build --release -q -p portico -p portico-bench-upstream
W="$(mktemp -d /tmp/portico-policy-bench.XXXXXX)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
TICK_US=$((1000000 / $(getconf CLK_TCK)))

ticks() { # utime+stime of a pid, in clock ticks
    local s rest
    s="$(cat "/proc/$1/stat")"; rest="${s##*) }"
    local -a f; read -r -a f <<<"$rest"
    echo $((f[11] + f[12]))
}

taskset -c 0 target/release/portico-bench-upstream "127.0.0.1:$BASE" >/dev/null 2>&1 &
UP=$!
REDIS_PORT=$((BASE + 99))
taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$W/redis.log" 2>&1 &
RD=$!

declare -A PORT=() PID=()
NEXT_PORT=$((BASE + 1))
variant() { # name, plugins yaml (one line)
    local name=$1 plugins=$2 port=$NEXT_PORT
    NEXT_PORT=$((NEXT_PORT + 2))
    PORT[$name]=$port
    cat >"$W/$name.yaml" <<YAML
listen: ["127.0.0.1:$port"]
admin: {listen: "127.0.0.1:$((port + 1))"}
workers: 1
access_log: {enabled: false}
store: {path: "$W/$name.db"}
upstreams:
  hello: {targets: [{url: "http://127.0.0.1:$BASE"}]}
routes:
  - {name: all, paths: ["/*"], upstream: hello, plugins: $plugins}
YAML
    taskset -c 1 target/release/portico run --config "$W/$name.yaml" >"$W/$name.log" 2>&1 &
    PID[$name]=$!
}
NAMES=(plain cache-hit rate-limit-local rate-limit-cluster)
variant plain "{}"
variant cache-hit "{cache: {default_ttl: 1h}}"
variant rate-limit-local "{rate-limit: {limits: [{requests: 1000000000, per: 1s}]}}"
variant rate-limit-cluster "{rate-limit: {mode: cluster, redis: {url: \"redis://127.0.0.1:$REDIS_PORT\"}, limits: [{requests: 1000000000, per: 1s}]}}"
for n in "${NAMES[@]}"; do
    for _ in $(seq 100); do
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[$n]}/" || true)
        [ "$code" = 200 ] && break; sleep 0.1
    done
    [ "$code" = 200 ] || { echo "$n does not answer 200 ($code):"; tail -5 "$W/$n.log"; exit 1; }
done
# The cache answers from memory from now on.
[ "$(curl -s -o /dev/null -w '%header{x-cache}' "http://127.0.0.1:${PORT[cache-hit]}/")" = HIT ] || { echo "cache-hit: not a hit"; exit 1; }

declare -A PX UPT RDT REQ
for n in "${NAMES[@]}"; do PX[$n]=0; UPT[$n]=0; RDT[$n]=0; REQ[$n]=0; done
for rep in $(seq "$REPS"); do
    for n in "${NAMES[@]}"; do
        p0=$(ticks "${PID[$n]}"); u0=$(ticks "$UP"); r0=$(ticks "$RD")
        out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"$DURATION" "http://127.0.0.1:${PORT[$n]}/")
        p1=$(ticks "${PID[$n]}"); u1=$(ticks "$UP"); r1=$(ticks "$RD")
        r=$(awk '/requests in/ {print $1}' <<<"$out")
        grep -q "Non-2xx" <<<"$out" && { echo "$n: non-2xx answers"; echo "$out"; exit 1; }
        PX[$n]=$((PX[$n] + p1 - p0)); UPT[$n]=$((UPT[$n] + u1 - u0)); RDT[$n]=$((RDT[$n] + r1 - r0)); REQ[$n]=$((REQ[$n] + r))
        echo "rep $rep $n: $r requests, proxy $((p1 - p0)) ticks, upstream $((u1 - u0)) ticks, redis $((r1 - r0)) ticks" >&2
    done
done
echo
echo "| variant | requests | proxy µs/req | upstream µs/req | ratio proxy/upstream | redis µs/req | added proxy µs/req vs plain |"
echo "|---|---|---|---|---|---|---|"
base=$(awk -v p="${PX[plain]}" -v r="${REQ[plain]}" -v t="$TICK_US" 'BEGIN {printf "%.3f", p * t / r}')
for n in "${NAMES[@]}"; do
    awk -v n="$n" -v p="${PX[$n]}" -v u="${UPT[$n]}" -v d="${RDT[$n]}" -v r="${REQ[$n]}" -v t="$TICK_US" -v b="$base" 'BEGIN {
        px = p * t / r; up = u * t / r; rd = d * t / r
        ratio = up > 0.05 ? sprintf("%.2f", px / up) : "(upstream idle)"
        printf "| %s | %d | %.2f | %.2f | %s | %.2f | %+.2f |\n", n, r, px, up, ratio, rd, px - b }'
done
echo
echo "wrk -t1 -c$CONNS -d$DURATION x $REPS interleaved reps; gateway on CPU 1 (1 worker), upstream, wrk and redis-server on CPU 0; $(git describe --always --dirty)."
