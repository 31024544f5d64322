#!/usr/bin/env bash
# Portico benchmark harness: nginx vs HAProxy vs Portico in front of one upstream.
#
# Layout (2-core machine):
#   CPU 0: upstream (bench/upstream) + load generator (wrk / h2load)
#   CPU 1: the proxy under test (one worker / thread each)
#
# Throughput phase: `wrk -t1 -c$CONNS -d$DURATION` per target, interleaved
# (nginx, haproxy, portico, nginx, ...) for $REPS repetitions, after one warm-up
# run per target. For each run: req/s, p50/p99 latency, and the CPU time the
# proxy and the upstream consumed during the run (utime+stime from /proc).
#
# Latency phase: h2load at a fixed rate ($LAT_CLIENTS clients x $LAT_RPS_PER_CLIENT
# req/s for ~$LAT_SECONDS s) against the upstream directly and through each proxy;
# reports p50/p99 added over direct.
#
# See bench/README.md. All knobs are environment variables (defaults below).
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$BENCH_DIR/.." && pwd)"

REPS="${REPS:-5}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
CONNS="${CONNS:-50}"
LAT_CLIENTS="${LAT_CLIENTS:-10}"
LAT_RPS_PER_CLIENT="${LAT_RPS_PER_CLIENT:-1000}"
LAT_SECONDS="${LAT_SECONDS:-5}"
LAT_REPS="${LAT_REPS:-3}"
TARGETS="${TARGETS:-nginx haproxy portico}"
[[ "${PGO:-0}" != 1 || " $TARGETS " == *" portico-pgo "* ]] || TARGETS+=" portico-pgo"
PRIO="${PRIO:-nice}"                 # nice | chrt | none
FULL_CPU="${FULL_CPU:-95}"           # reps where other work left the proxy at least this % of its CPU
SKIP_BUILD="${SKIP_BUILD:-0}"
PORTICO_STALE=0
PORTICO_FAILED=0
SKIP_INSTALL="${SKIP_INSTALL:-0}"
LOADGEN_CPU="${LOADGEN_CPU:-0}"
UPSTREAM_CPU="${UPSTREAM_CPU:-0}"
PROXY_CPU="${PROXY_CPU:-1}"
BASE_PORT="${BASE_PORT:-19000}"
UPSTREAM_PORT="${UPSTREAM_PORT:-$BASE_PORT}"
NGINX_PORT="${NGINX_PORT:-$((BASE_PORT + 1))}"
HAPROXY_PORT="${HAPROXY_PORT:-$((BASE_PORT + 2))}"
PORTICO_PORT="${PORTICO_PORT:-$((BASE_PORT + 3))}"
PORTICO_ADMIN_PORT="${PORTICO_ADMIN_PORT:-$((BASE_PORT + 4))}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT_DIR/target}"
# Portico is built with the `dist` profile (fat LTO, one codegen unit: how a release
# binary ships); PROFILE=release measures the everyday build instead. The upstream is
# always the release build, so that ratios compare with earlier runs.
PROFILE="${PROFILE:-dist}"
PORTICO_BIN="${PORTICO_BIN:-$TARGET_DIR/$PROFILE/portico}"
# The `portico-pgo` target: the dist build optimized with a profile of its own training
# run, which is how release binaries are built (scripts/release.sh). bench/pgo.sh builds
# it (about 25 minutes more) unless SKIP_BUILD=1; PGO=1 (the default) adds the target,
# PGO=0 leaves it out and measures the dist build alone.
PGO="${PGO:-1}"
# (bench/pgo.sh builds for the host triple, so that its flags stay off build scripts.)
PGO_BIN="${PGO_BIN:-$TARGET_DIR/pgo/$(rustc -vV 2>/dev/null | sed -n 's/^host: //p')/dist/portico}"
PORTICO_PGO_PORT="${PORTICO_PGO_PORT:-$((BASE_PORT + 5))}"
PORTICO_PGO_ADMIN_PORT="${PORTICO_PGO_ADMIN_PORT:-$((BASE_PORT + 6))}"
# The `portico-policies` target (add it to TARGETS): the dist build with policies on its
# route (header transforms both ways, an IP rule): more CPU per request than `portico`.
PORTICO_POL_PORT="${PORTICO_POL_PORT:-$((BASE_PORT + 7))}"
PORTICO_POL_ADMIN_PORT="${PORTICO_POL_ADMIN_PORT:-$((BASE_PORT + 8))}"
UPSTREAM_BIN="${UPSTREAM_BIN:-$TARGET_DIR/release/portico-bench-upstream}"
RESULTS_DIR="${RESULTS_DIR:-$BENCH_DIR/results}"
# Portico's upstream: PORTICO_BALANCE sets its `balance:` (unset: the configuration's
# default, weighted), e.g. PORTICO_BALANCE=p2c_ewma vs PORTICO_BALANCE=round_robin;
# with consistent_hash, PORTICO_HASH_KEY is the `hash_key`. PORTICO_TARGETS lists the
# one upstream server that many times as targets (p2c_ewma draws and compares only
# with 2 or more).
PORTICO_BALANCE="${PORTICO_BALANCE:-}"
PORTICO_HASH_KEY="${PORTICO_HASH_KEY:-ip}"
PORTICO_TARGETS="${PORTICO_TARGETS:-1}"

log() { printf '[bench] %s\n' "$*" >&2; }
warn() { printf '[bench] WARNING: %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- cleanup ---
WORK="$(mktemp -d /tmp/portico-bench.XXXXXX)"
PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Give each process up to ~3s to exit, then force it.
        local i
        for i in $(seq 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ "${KEEP_WORK:-0}" == 1 ]]; then
        log "work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- install ---
install_deps() {
    local missing=()
    command -v nginx >/dev/null 2>&1 || missing+=(nginx)
    command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
    command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    if ((${#missing[@]} == 0)); then
        return
    fi
    [[ "$SKIP_INSTALL" == 1 ]] && die "missing: ${missing[*]} (SKIP_INSTALL=1)"
    log "installing from Debian: ${missing[*]}"
    local sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
    # Debian starts the packaged services where an init system runs; they
    # would compete for the CPUs. We only need the binaries.
    if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
        "${sudo[@]}" systemctl stop nginx haproxy 2>/dev/null || true
    fi
}

# ------------------------------------------------------------------ build ---
build() {
    if [[ "$SKIP_BUILD" == 1 ]]; then
        log "SKIP_BUILD=1: using existing binaries"
        return
    fi
    log "cargo build --profile $PROFILE -p portico; cargo build --release -p portico-bench-upstream"
    if ! (cd "$ROOT_DIR" && cargo build --release -p portico-bench-upstream \
        && cargo build --profile "$PROFILE" -p portico); then
        warn "building portico failed; building the upstream alone"
        PORTICO_STALE=1
        (cd "$ROOT_DIR" && cargo build --release -p portico-bench-upstream) \
            || warn "building the upstream failed too"
    fi
    if [[ "$PGO" == 1 ]]; then
        log "bash bench/pgo.sh (instrumented build, training run, optimized build)"
        "$BENCH_DIR/pgo.sh" || warn "the PGO build failed"
    fi
}

# --------------------------------------------------------------- helpers ---
prio_cmd=()
setup_prio() {
    case "$PRIO" in
        nice)
            if [[ "$(nice -n -10 nice 2>/dev/null)" == "-10" ]]; then
                prio_cmd=(nice -n -10)
            else
                warn "cannot raise priority with nice (not root?); running at normal priority"
            fi
            ;;
        chrt)
            if command -v chrt >/dev/null 2>&1 && chrt -f 10 true 2>/dev/null; then
                prio_cmd=(chrt -f 10)
            else
                warn "chrt -f not permitted; running at normal priority"
            fi
            ;;
        none) ;;
        *) die "PRIO must be nice, chrt or none" ;;
    esac
}

# Run a command pinned to a CPU at benchmark priority (foreground).
pinned() {
    local cpu=$1
    shift
    taskset -c "$cpu" "${prio_cmd[@]}" "$@"
}

# spawn CPU LOGFILE CMD...: start CMD pinned in the background and record it
# for cleanup; BG_PID is its pid. taskset and nice exec the command, so BG_PID
# is the process itself (a backgrounded shell function would be a subshell).
spawn() {
    local cpu=$1 logfile=$2
    shift 2
    taskset -c "$cpu" "${prio_cmd[@]}" "$@" >"$logfile" 2>&1 &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Wait until http://127.0.0.1:PORT/ answers `hello` (pid must stay alive).
wait_ready() {
    local name=$1 port=$2 pid=$3 i body
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 1
        body="$(curl -fsS --max-time 1 "http://127.0.0.1:$port/ready-check" 2>/dev/null || true)"
        if [[ "$body" == "hello" ]]; then
            return 0
        fi
        sleep 0.1
    done
    warn "$name did not answer on port $port within 10s"
    return 1
}

# utime+stime (clock ticks) summed over the given pids.
cpu_ticks() {
    local total=0 pid stat rest
    local -a f
    for pid in "$@"; do
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || continue
        rest="${stat##*) }"           # fields from 3 on (comm may contain spaces)
        read -r -a f <<<"$rest"
        total=$((total + f[11] + f[12])) # fields 14 (utime) and 15 (stime)
    done
    echo "$total"
}

# The proxy's pids (nginx: master + workers; others: the process itself).
declare -A TARGET_PID TARGET_PORT
proxy_pids() {
    local t=$1 pid=${TARGET_PID[$1]}
    echo "$pid"
    if [[ "$t" == nginx ]]; then
        pgrep -P "$pid" || true
    fi
}

# Percentage of CPU time (all CPUs) spent busy over one second.
cpu_busy_pct() {
    local -a a b
    read -r -a a < <(grep '^cpu ' /proc/stat)
    sleep 1
    read -r -a b < <(grep '^cpu ' /proc/stat)
    local i total=0 idle
    for i in 1 2 3 4 5 6 7 8; do
        total=$((total + b[i] - a[i]))
    done
    idle=$((b[4] - a[4] + b[5] - a[5]))
    ((total > 0)) || { echo 0; return; }
    echo $(((total - idle) * 100 / total))
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "nan"} else if (NR%2) {print a[(NR+1)/2]} else {printf "%.4f\n", (a[NR/2]+a[NR/2+1])/2}}'; }
minval() { sort -g | head -n1; }
maxval() { sort -g | tail -n1; }

fmt_us() { # microseconds -> human
    awk -v v="$1" 'BEGIN { if (v == "nan" || v == "") print "n/a"; else if (v+0 >= 10000 || v+0 <= -10000) printf "%.2f ms", v/1000; else printf "%.0f µs", v }'
}

# ------------------------------------------------------------ processes ---
start_upstream() {
    port_free "$UPSTREAM_PORT" || die "port $UPSTREAM_PORT is in use (set BASE_PORT)"
    spawn "$UPSTREAM_CPU" "$WORK/upstream.log" "$UPSTREAM_BIN" "127.0.0.1:$UPSTREAM_PORT"
    UPSTREAM_PID=$BG_PID
    wait_ready upstream "$UPSTREAM_PORT" "$UPSTREAM_PID" || {
        cat "$WORK/upstream.log" >&2
        die "upstream failed to start"
    }
}

start_nginx() {
    local d="$WORK/nginx"
    mkdir -p "$d/tmp"
    cat >"$d/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $d/nginx.pid;
error_log $d/error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    upstream hello {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 128;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://hello;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The headers Portico always sends upstream, so every upstream parses the
            # same request.
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_set_header X-Request-Id \$request_id;
        }
    }
}
EOF
    spawn "$PROXY_CPU" "$d/stdout.log" nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log"
    TARGET_PID[nginx]=$BG_PID
}

start_haproxy() {
    local d="$WORK/haproxy"
    mkdir -p "$d"
    cat >"$d/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse safe
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    # The headers Portico always sends upstream, so every upstream parses the same
    # request.
    option forwardfor
    unique-id-format %[uuid()]
    unique-id-header X-Request-Id
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend be

backend be
    server hello 127.0.0.1:$UPSTREAM_PORT
EOF
    haproxy -c -q -f "$d/haproxy.cfg" || die "invalid HAProxy config"
    # -db: stay in the foreground, single process.
    spawn "$PROXY_CPU" "$d/stdout.log" haproxy -db -f "$d/haproxy.cfg"
    TARGET_PID[haproxy]=$BG_PID
}

# start_portico [NAME BIN PORT ADMIN_PORT ROUTE_EXTRA]: the dist build (default) or
# another build of Portico under another target name, with the same configuration
# (ROUTE_EXTRA: more keys for the route, as YAML flow mapping entries).
start_portico() {
    local name=${1:-portico} bin=${2:-$PORTICO_BIN} port=${3:-$PORTICO_PORT} admin=${4:-$PORTICO_ADMIN_PORT}
    local extra=${5:-}
    local d="$WORK/$name"
    mkdir -p "$d"
    local targets="" balance="" i
    for ((i = 0; i < PORTICO_TARGETS; i++)); do
        targets+="${targets:+, }{url: \"http://127.0.0.1:$UPSTREAM_PORT\"}"
    done
    if [[ -n "$PORTICO_BALANCE" ]]; then
        balance=", balance: $PORTICO_BALANCE"
        [[ "$PORTICO_BALANCE" != consistent_hash ]] || balance+=", hash_key: \"$PORTICO_HASH_KEY\""
        log "$name upstream: balance $PORTICO_BALANCE, $PORTICO_TARGETS target(s)"
    fi
    cat >"$d/portico.yaml" <<EOF
listen: ["127.0.0.1:$port"]
workers: 1
access_log: {enabled: false}
admin: {listen: "127.0.0.1:$admin"}
upstreams:
  hello: {targets: [$targets]$balance}
routes:
  - {name: all, paths: ["/*"], upstream: hello$extra}
EOF
    spawn "$PROXY_CPU" "$d/stdout.log" "$bin" run --config "$d/portico.yaml"
    TARGET_PID[$name]=$BG_PID
}

start_portico-pgo() {
    start_portico portico-pgo "$PGO_BIN" "$PORTICO_PGO_PORT" "$PORTICO_PGO_ADMIN_PORT"
}

start_portico-policies() {
    local plugins='request-transformer: {headers: {add: {x-route: "${route.name}", x-client: "${client_ip}", x-id: "${request_id}"}}}, '
    plugins+='response-transformer: {headers: {add: {x-served-by: portico, x-policy: "on"}}}, '
    plugins+='ip-restriction: {allow: ["127.0.0.0/8"]}'
    start_portico portico-policies "$PORTICO_BIN" "$PORTICO_POL_PORT" "$PORTICO_POL_ADMIN_PORT" \
        ", plugins: {$plugins}"
}

# ----------------------------------------------------------------- phases ---
# wrk reporting script: exact percentiles in microseconds.
write_wrk_lua() {
    cat >"$WORK/report.lua" <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d non2xx=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
EOF
}

# busy_pct "BUSY0 TOTAL0" "BUSY1 TOTAL1": the busy share between two one_cpu_ticks.
busy_pct() {
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
        d = y[2] - x[2]; printf "%.0f", (d > 0 ? 100 * (y[1] - x[1]) / d : 0) }'
}

# Busy and total clock ticks of one CPU so far ("busy total").
one_cpu_ticks() {
    local -a f
    read -r -a f < <(grep "^cpu$1 " /proc/stat)
    echo "$((f[1] + f[2] + f[3] + f[6] + f[7] + f[8])) $((f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7] + f[8]))"
}

# CHILD_TICKS := CPU ticks (user + system) of the children the current (sub)shell has
# waited for. Read from /proc without forking (no `$(...)`): `times` in a pipeline or a
# command substitution runs in a new process, whose children's times start at zero.
children_ticks() {
    local stat rest
    local -a f
    read -r stat <"/proc/$BASHPID/stat"
    rest="${stat##*) }"
    read -r -a f <<<"$rest"
    CHILD_TICKS=$((f[13] + f[14])) # fields 16 (cutime) and 17 (cstime)
}

# run_wrk TARGET DURATION (in a subshell: its children are then wrk and short commands)
#   -> prints "rps p50_us p99_us proxy_ticks upstream_ticks requests errors non2xx
#              proxy_cpu_pct loadgen_ticks loadgen_cpu_busy_pct proxy_cpu_busy_pct"
run_wrk() {
    local t=$1 dur=$2 out
    local -a ppids
    mapfile -t ppids < <(proxy_pids "$t")
    local p0 u0 p1 u1 c0 c1 x0 x1
    p0=$(cpu_ticks "${ppids[@]}")
    u0=$(cpu_ticks "$UPSTREAM_PID")
    c0=$(one_cpu_ticks "$LOADGEN_CPU")
    x0=$(one_cpu_ticks "$PROXY_CPU")
    out="$(pinned "$LOADGEN_CPU" wrk -t1 -c"$CONNS" -d"$dur" --latency -s "$WORK/report.lua" \
        "http://127.0.0.1:${TARGET_PORT[$t]}/")"
    p1=$(cpu_ticks "${ppids[@]}")
    u1=$(cpu_ticks "$UPSTREAM_PID")
    c1=$(one_cpu_ticks "$LOADGEN_CPU")
    x1=$(one_cpu_ticks "$PROXY_CPU")
    # wrk's CPU time: this subshell's children (wrk, and a few short commands).
    children_ticks
    local wt=$CHILD_TICKS
    # How busy the load generator's CPU was: near 100 % the upstream's CPU time per
    # request depends on how that CPU is shared between it and wrk (bench/README.md).
    # And the proxy's CPU: a proxy below 100 % of its CPU while that CPU was busy lost
    # time to other work; one below 100 % on an idle CPU waited for the load side.
    local busy xbusy
    busy=$(busy_pct "$c0" "$c1")
    xbusy=$(busy_pct "$x0" "$x1")
    echo "$out" >>"$WORK/wrk-$t.log"
    local line
    line="$(grep '^RESULT ' <<<"$out" || true)"
    [[ -n "$line" ]] || die "no result from wrk for $t"
    local requests duration_us p50 p99 errors non2xx
    requests=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
    duration_us=$(sed -E 's/.*duration_us=([0-9]+).*/\1/' <<<"$line")
    p50=$(sed -E 's/.*p50_us=([0-9]+).*/\1/' <<<"$line")
    p99=$(sed -E 's/.*p99_us=([0-9]+).*/\1/' <<<"$line")
    errors=$(sed -E 's/.*errors=([0-9]+).*/\1/' <<<"$line")
    non2xx=$(sed -E 's/.*non2xx=([0-9]+).*/\1/' <<<"$line")
    if ((errors > 0 || non2xx > 0)); then
        warn "$t: $errors socket errors, $non2xx non-2xx responses"
    fi
    local rps
    rps=$(awk -v r="$requests" -v d="$duration_us" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
    # Share of its CPU the proxy used: below 100 % when other work took that CPU, or
    # when the proxy waited for the load side (tell them apart with $xbusy).
    local share
    share=$(awk -v t="$((p1 - p0))" -v d="$duration_us" -v c="$CLK" 'BEGIN { printf "%.0f", 100 * t / c / (d / 1e6) }')
    echo "$rps $p50 $p99 $((p1 - p0)) $((u1 - u0)) $requests $errors $non2xx $share $wt $busy $xbusy"
}

# Busy (non-idle, non-iowait; steal included) clock ticks of all CPUs so far.
system_busy_ticks() {
    local -a f
    read -r -a f < <(grep '^cpu ' /proc/stat)
    echo $((f[1] + f[2] + f[3] + f[6] + f[7] + f[8]))
}

# run_h2load NAME PORT TAG -> prints "p50_us p99_us other_cpu_pct"
# Must run in a subshell (command substitution): its children are then h2load and a
# few short commands.
run_h2load() {
    local name=$1 port=$2 tag=$3
    local n=$((LAT_CLIENTS * LAT_RPS_PER_CLIENT * LAT_SECONDS))
    local logf="$WORK/h2load-$name-$tag.tsv"
    rm -f "$logf" # h2load appends to an existing log file
    local -a ours=("$UPSTREAM_PID")
    [[ "$name" == direct ]] || mapfile -t -O 1 ours < <(proxy_pids "$name")
    local sys0 ours0 t0 up0
    sys0=$(system_busy_ticks)
    ours0=$(cpu_ticks "${ours[@]}")
    up0=$(cpu_ticks "$UPSTREAM_PID")
    t0=$(date +%s%N)
    pinned "$LOADGEN_CPU" h2load --h1 -c"$LAT_CLIENTS" --rps="$LAT_RPS_PER_CLIENT" -n "$n" \
        --log-file="$logf" "http://127.0.0.1:$port/" >"$WORK/h2load-$name-$tag.out" 2>&1 \
        || { cat "$WORK/h2load-$name-$tag.out" >&2; die "h2load against $name failed"; }
    local sys1 ours1 t1 loadgen up1
    sys1=$(system_busy_ticks)
    ours1=$(cpu_ticks "${ours[@]}")
    up1=$(cpu_ticks "$UPSTREAM_PID")
    t1=$(date +%s%N)
    # CPU time of this subshell's children, i.e. h2load (and a few short commands).
    children_ticks
    loadgen=$CHILD_TICKS
    # Busy CPU time of everything but the upstream, the proxy and h2load, as a
    # share of all CPUs: high values mean other work disturbed this run.
    local other
    other=$(awk -v b="$((sys1 - sys0 - (ours1 - ours0) - loadgen))" -v ns="$((t1 - t0))" \
        -v c="$CLK" -v cpus="$(nproc)" 'BEGIN { v = 100 * b / (ns / 1e9 * c * cpus); if (v < 0) v = 0; printf "%.0f", v }')
    ((other <= 10)) || warn "$name: ${other}% of the CPUs were busy with other work during the fixed-rate run"
    # Columns: start time (µs since epoch), status, µs until end of response.
    local bad
    bad=$(awk -F'\t' '$2 != 200' "$logf" | wc -l)
    ((bad == 0)) || warn "$name: $bad non-200 responses in the fixed-rate run"
    local done_n
    done_n=$(wc -l <"$logf")
    ((done_n >= n * 99 / 100)) || warn "$name: only $done_n of $n requests completed"
    cut -f3 "$logf" | sort -n | awk '
        { v[NR] = $1 }
        END {
            if (NR == 0) { print "nan nan"; exit }
            i50 = int(NR * 0.50 + 0.999999); if (i50 < 1) i50 = 1
            i99 = int(NR * 0.99 + 0.999999); if (i99 < 1) i99 = 1
            print v[i50], v[i99]
        }' | tr '\n' ' '
    # The proxy's and the upstream's CPU ticks over this run, and the requests done: at
    # a fixed rate every proxy hands the upstream the same load, so unlike the wrk runs
    # the upstream's cost per request does not depend on how fast the proxy is.
    echo "$other $((ours1 - ours0 - (up1 - up0))) $((up1 - up0)) $done_n"
}

# cpu_cols PROXY_TICKS UPSTREAM_TICKS REQUESTS -> "ratio<TAB>proxy µs/req<TAB>upstream µs/req"
# (ratio `nan` without proxy or upstream ticks, e.g. for the direct run).
cpu_cols() {
    awk -v p="$1" -v u="$2" -v n="$3" -v c="$CLK" 'BEGIN {
        if (n == 0) { print "nan\tnan\tnan"; exit }
        r = (p == 0 || u == 0) ? "nan" : sprintf("%.3f", p / u)
        printf "%s\t%.2f\t%.2f", r, p * 1e6 / c / n, u * 1e6 / c / n }'
}

# ------------------------------------------------------------------- main ---
main() {
    install_deps
    build
    [[ -x "$UPSTREAM_BIN" ]] || die "upstream binary not found: $UPSTREAM_BIN"
    setup_prio
    ((REPS >= 1)) || die "REPS must be >= 1"
    case "$PORTICO_BALANCE" in
        "" | weighted | round_robin | least_connections | p2c_ewma | consistent_hash | random) ;;
        *) die "PORTICO_BALANCE must be weighted, round_robin, least_connections, p2c_ewma, consistent_hash or random" ;;
    esac
    [[ "$PORTICO_TARGETS" =~ ^[1-9][0-9]*$ ]] || die "PORTICO_TARGETS must be a positive integer"
    (($(nproc) >= 2)) || warn "fewer than 2 CPUs: pinning is meaningless"

    local -a targets=()
    local t
    for t in $TARGETS; do
        case "$t" in
            nginx | haproxy) targets+=("$t") ;;
            portico | portico-policies)
                if [[ -x "$PORTICO_BIN" ]]; then
                    targets+=("$t")
                    ((PORTICO_STALE == 0)) \
                        || warn "portico did not build: benchmarking the OLD binary $PORTICO_BIN"
                else
                    warn "portico binary not found at $PORTICO_BIN: benchmarking nginx and haproxy only"
                fi
                ;;
            portico-pgo)
                if [[ -x "$PGO_BIN" ]]; then
                    targets+=(portico-pgo)
                else
                    warn "PGO binary not found at $PGO_BIN (bash bench/pgo.sh builds it): leaving portico-pgo out"
                fi
                ;;
            *) die "unknown target: $t" ;;
        esac
    done
    ((${#targets[@]} > 0)) || die "no targets"

    local busy
    busy=$(cpu_busy_pct)
    if ((busy > 10)); then
        warn "the CPUs are ${busy}% busy before we start: other work on this machine will skew the numbers"
    fi

    TARGET_PORT[nginx]=$NGINX_PORT
    TARGET_PORT[haproxy]=$HAPROXY_PORT
    TARGET_PORT[portico]=$PORTICO_PORT
    TARGET_PORT[portico-pgo]=$PORTICO_PGO_PORT
    TARGET_PORT[portico-policies]=$PORTICO_POL_PORT
    for t in "${targets[@]}"; do
        port_free "${TARGET_PORT[$t]}" || die "port ${TARGET_PORT[$t]} ($t) is in use (set BASE_PORT)"
    done
    [[ " ${targets[*]} " != *" portico "* ]] || port_free "$PORTICO_ADMIN_PORT" \
        || die "port $PORTICO_ADMIN_PORT (portico admin) is in use (set BASE_PORT)"
    [[ " ${targets[*]} " != *" portico-pgo "* ]] || port_free "$PORTICO_PGO_ADMIN_PORT" \
        || die "port $PORTICO_PGO_ADMIN_PORT (portico-pgo admin) is in use (set BASE_PORT)"
    [[ " ${targets[*]} " != *" portico-policies "* ]] || port_free "$PORTICO_POL_ADMIN_PORT" \
        || die "port $PORTICO_POL_ADMIN_PORT (portico-policies admin) is in use (set BASE_PORT)"

    log "starting upstream on 127.0.0.1:$UPSTREAM_PORT (CPU $UPSTREAM_CPU)"
    start_upstream
    local -a started=()
    for t in "${targets[@]}"; do
        log "starting $t on 127.0.0.1:${TARGET_PORT[$t]} (CPU $PROXY_CPU)"
        "start_$t"
        if wait_ready "$t" "${TARGET_PORT[$t]}" "${TARGET_PID[$t]}"; then
            started+=("$t")
            continue
        fi
        tail -n 30 "$WORK/$t/"*.log >&2 2>/dev/null || true
        # Portico is under development: report on the others rather than abort.
        [[ "$t" == portico* ]] || die "$t failed to start"
        warn "$t failed to start (log above): benchmarking the others only"
        PORTICO_FAILED=1
        kill -TERM "${TARGET_PID[$t]}" 2>/dev/null || true
    done
    targets=("${started[@]}")
    sleep 0.5 # let nginx's worker settle before we look it up

    write_wrk_lua
    CLK=$(getconf CLK_TCK)
    local runs="$WORK/runs.tsv"
    printf 'rep\ttarget\treq_per_s\tp50_us\tp99_us\tproxy_ticks\tupstream_ticks\trequests\terrors\tnon2xx\tcpu_ratio\tproxy_cpu_pct\tproxy_us_per_req\tupstream_us_per_req\tloadgen_us_per_req\tloadgen_cpu_busy_pct\tproxy_cpu_busy_pct\n' >"$runs"

    for t in "${targets[@]}"; do
        log "warm-up $t ($WARMUP)"
        run_wrk "$t" "$WARMUP" >/dev/null
    done

    local rep r
    for rep in $(seq "$REPS"); do
        for t in "${targets[@]}"; do
            r="$(run_wrk "$t" "$DURATION")"
            local rps p50 p99 pt ut req err n2 share wt busy xbusy
            read -r rps p50 p99 pt ut req err n2 share wt busy xbusy <<<"$r"
            # The ratio and each side's µs per request (wrk's: the same column of
            # cpu_cols with its ticks in the proxy's place).
            local ratio pus uus wus
            IFS=$'\t' read -r ratio pus uus <<<"$(cpu_cols "$pt" "$ut" "$req")"
            wus=$(cpu_cols "$wt" "$ut" "$req" | cut -f2)
            log "rep $rep/$REPS $t: $rps req/s, p50 ${p50}µs, p99 ${p99}µs, CPU proxy ${pt} / upstream ${ut} ticks (ratio $ratio)"
            ((xbusy - share <= 10)) || warn "$t: other work took $((xbusy - share))% of CPU $PROXY_CPU in this run"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
                "$rep" "$t" "$rps" "$p50" "$p99" "$pt" "$ut" "$req" "$err" "$n2" "$ratio" "$share" "$pus" "$uus" "$wus" "$busy" "$xbusy" >>"$runs"
        done
    done

    local rate=$((LAT_CLIENTS * LAT_RPS_PER_CLIENT))
    log "fixed-rate latency: $LAT_CLIENTS clients x $LAT_RPS_PER_CLIENT req/s, ${LAT_SECONDS}s per target, $LAT_REPS reps"
    # Each rep measures the upstream directly, then through each proxy; the
    # added latency is taken against the direct run of the same rep, so slow
    # drift on the machine cancels out.
    local lats="$WORK/latency.tsv"
    printf 'rep\ttarget\tp50_us\tp99_us\tadded_p50_us\tadded_p99_us\tother_cpu_pct\tproxy_ticks\tupstream_ticks\trequests\tcpu_ratio\tproxy_us_per_req\tupstream_us_per_req\n' >"$lats"
    local a b lat d50 d99 other pt ut n
    for rep in $(seq "$LAT_REPS"); do
        lat="$(run_h2load direct "$UPSTREAM_PORT" "$rep")"
        read -r d50 d99 other pt ut n <<<"$lat"
        log "latency rep $rep/$LAT_REPS direct: p50 ${d50}µs p99 ${d99}µs"
        printf '%s\tdirect\t%s\t%s\t0\t0\t%s\t0\t%s\t%s\t%s\n' "$rep" "$d50" "$d99" "$other" "$ut" "$n" \
            "$(cpu_cols 0 "$ut" "$n")" >>"$lats"
        for t in "${targets[@]}"; do
            lat="$(run_h2load "$t" "${TARGET_PORT[$t]}" "$rep")"
            read -r a b other pt ut n <<<"$lat"
            log "latency rep $rep/$LAT_REPS $t: p50 ${a}µs p99 ${b}µs (added $((a - d50)) / $((b - d99)) µs), CPU proxy $pt / upstream $ut ticks"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$t" "$a" "$b" "$((a - d50))" "$((b - d99))" "$other" "$pt" "$ut" "$n" \
                "$(cpu_cols "$pt" "$ut" "$n")" >>"$lats"
        done
    done

    # ------------------------------------------------------------ report ---
    col() { awk -F'\t' -v t="$1" -v c="$2" 'NR > 1 && $2 == t { print $c }' "$runs"; }
    lcol() { awk -F'\t' -v t="$1" -v c="$2" 'NR > 1 && $2 == t { print $c }' "$lats"; }
    # The same, from the reps in which other work took at most 100 - $FULL_CPU % of the
    # proxy's CPU (its busy share minus the proxy's): a proxy that lost CPU to other
    # work shows a lower ratio (the upstream then waits more between requests and
    # spends more per request), so those reps are set apart. A proxy below 100 % on an
    # otherwise idle CPU was waiting for the load side, which is not a disturbance.
    fcol() { awk -F'\t' -v t="$1" -v c="$2" -v f="$FULL_CPU" 'NR > 1 && $2 == t && $17 - $12 <= 100 - f { print $c }' "$runs"; }
    local rate_label
    rate_label=$(awk -v r="$rate" 'BEGIN { if (r % 1000 == 0) printf "%dk", r / 1000; else printf "%d", r }')
    local md="$WORK/latest.md"
    {
        echo "# Portico benchmark — $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo
        if ((PORTICO_STALE)) && [[ " ${targets[*]} " == *" portico "* ]]; then
            echo "**Warning: portico failed to build; these are the numbers of an older binary.**"
            echo
        fi
        if ((PORTICO_FAILED)); then
            echo "**Warning: portico failed to start and is not in the table.**"
            echo
        fi
        echo "wrk -t1 -c$CONNS -d$DURATION, $REPS interleaved reps (+$WARMUP warm-up per target); proxy on CPU $PROXY_CPU (1 worker), upstream + load generator on CPU $UPSTREAM_CPU/$LOADGEN_CPU; priority: ${prio_cmd[*]:-normal}."
        if [[ -n "$PORTICO_BALANCE" || "$PORTICO_TARGETS" != 1 ]]; then
            echo "Portico's upstream: \`balance: ${PORTICO_BALANCE:-weighted}\`, $PORTICO_TARGETS target(s) (the same server)."
        fi
        echo "Fixed-rate: h2load --h1 -c$LAT_CLIENTS --rps=$LAT_RPS_PER_CLIENT ($rate req/s) for ${LAT_SECONDS}s, $LAT_REPS reps (median); direct to the upstream: p50 $(fmt_us "$(lcol direct 3 | median)") / p99 $(fmt_us "$(lcol direct 4 | median)")."
        echo
        echo "| target | req/s (median) | p50 | p99 | CPU ratio median (min–max) | ratio median, reps with ≤ $((100 - FULL_CPU)) % other work on CPU $PROXY_CPU (n) | added p50 / p99 @ $rate_label req/s | CPU ratio @ $rate_label req/s (proxy µs/req) | proxy µs/req (median) | CPU $LOADGEN_CPU busy % (median) |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for t in "${targets[@]}"; do
            local rps_m p50_m p99_m rmed rmin rmax add50 add99 fmed fn
            rps_m=$(col "$t" 3 | median)
            p50_m=$(col "$t" 4 | median)
            p99_m=$(col "$t" 5 | median)
            rmed=$(col "$t" 11 | median)
            rmin=$(col "$t" 11 | minval)
            rmax=$(col "$t" 11 | maxval)
            fmed=$(fcol "$t" 11 | median)
            fn=$(fcol "$t" 11 | wc -l)
            add50=$(lcol "$t" 5 | median)
            add99=$(lcol "$t" 6 | median)
            local lrat lpus
            lrat=$(lcol "$t" 11 | median)
            lpus=$(lcol "$t" 12 | median)
            local pus_m busy_m
            pus_m=$(col "$t" 13 | median)
            busy_m=$(col "$t" 16 | median)
            printf '| %s | %s | %s | %s | %.2f (%.2f–%.2f) | %s (%d) | %s / %s | %.2f (%.1f) | %.2f | %.0f |\n' \
                "$t" "$(printf '%.0f' "$rps_m")" "$(fmt_us "$p50_m")" "$(fmt_us "$p99_m")" \
                "$rmed" "$rmin" "$rmax" "$(awk -v v="$fmed" 'BEGIN { if (v == "nan") print "n/a"; else printf "%.2f", v }')" \
                "$fn" "$(fmt_us "$add50")" "$(fmt_us "$add99")" "$lrat" "$lpus" "$pus_m" "$busy_m"
        done
        local saturated
        saturated=$(awk -F'\t' 'NR > 1 && $16 >= 95 { n++ } END { print n + 0 }' "$runs")
        if ((saturated > 0)); then
            echo
            echo "CPU $LOADGEN_CPU (wrk and the upstream) was at least 95 % busy in $saturated of the wrk runs. There the upstream's CPU per request follows the throughput, and the saturating CPU ratio is about proxy CPU % × (1 + wrk µs/req ÷ upstream µs/req) ÷ CPU $LOADGEN_CPU busy %: a proxy that is the bottleneck (near 100 % of its CPU) lands near 1 + wrk/upstream whatever its own cost, and only a proxy cheaper per request than wrk and the upstream together goes below (bench/README.md). The fixed-rate ratio and the proxy µs/req compare the proxies' cost."
        fi
        echo
        echo "<details><summary>Per-run data (CPU in clock ticks of 1/${CLK} s; proxy CPU % = share of its CPU the proxy got during the run)</summary>"
        echo
        echo "| rep | target | req/s | p50 µs | p99 µs | proxy CPU | upstream CPU | requests | errors | non-2xx | ratio | proxy CPU % | proxy µs/req | upstream µs/req | wrk µs/req | CPU $LOADGEN_CPU busy % | CPU $PROXY_CPU busy % |"
        echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        awk -F'\t' 'NR > 1 { printf "| %s |", $1; for (i = 2; i <= NF; i++) printf " %s |", $i; printf "\n" }' "$runs"
        echo
        echo "| rep | target | p50 µs @ $rate_label | p99 µs @ $rate_label | added p50 µs | added p99 µs | other CPU % | proxy CPU | upstream CPU | requests | ratio | proxy µs/req | upstream µs/req |"
        echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        awk -F'\t' 'NR > 1 { printf "| %s |", $1; for (i = 2; i <= NF; i++) printf " %s |", $i; printf "\n" }' "$lats"
        echo
        echo "</details>"
        echo
        echo "Versions: $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(haproxy -v 2>/dev/null | head -n1 | awk '{print "HAProxy " $3}'), $(wrk -v 2>&1 | head -n1 | awk '{print $1, $2}'), $(h2load --version 2>/dev/null | head -n1); portico $(cd "$ROOT_DIR" && git describe --always --dirty 2>/dev/null || echo '(no commit)'); $(uname -sr); $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')."
    } >"$md"

    mkdir -p "$RESULTS_DIR"
    cp "$md" "$RESULTS_DIR/latest.md"
    cp "$runs" "$RESULTS_DIR/latest-runs.tsv"
    cp "$lats" "$RESULTS_DIR/latest-latency.tsv"
    echo
    cat "$md"
    echo
    log "written to $RESULTS_DIR/latest.md"
}

main "$@"
