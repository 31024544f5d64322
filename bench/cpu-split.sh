#!/usr/bin/env bash
# User and kernel CPU time per request of nginx and Portico (and of the upstream
# behind each), in the same run: where the CPU-ratio gap comes from.
#   bash bench/cpu-split.sh [REPS] [DURATION]      (defaults: 3, 5s)
# Same set-up as run.sh (pinning, one worker, equivalent headers), shorter.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${1:-3}"
DURATION="${2:-5s}"
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null; }
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p portico -p portico-bench-upstream
W="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; rm -rf "$W"' EXIT
taskset -c 0 target/release/portico-bench-upstream 127.0.0.1:19100 >/dev/null 2>&1 &
UP=$!
mkdir -p "$W/nginx/tmp"
cat >"$W/nginx/nginx.conf" <<EOC
worker_processes 1; daemon off; master_process off; pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 60s;
  client_body_temp_path $W/nginx/tmp/b; proxy_temp_path $W/nginx/tmp/p;
  fastcgi_temp_path $W/nginx/tmp/f; uwsgi_temp_path $W/nginx/tmp/u; scgi_temp_path $W/nginx/tmp/s;
  upstream hello { server 127.0.0.1:19100; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:19101;
    location / {
      proxy_pass http://hello; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr; proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$http_host; proxy_set_header X-Request-Id \$request_id;
    }
  }
}
EOC
taskset -c 1 nginx -p "$W/nginx" -c "$W/nginx/nginx.conf" -e "$W/nginx/error.log" &
NG=$!
cat >"$W/p.yaml" <<EOC
listen: ["127.0.0.1:19102"]
workers: 1
access_log: {enabled: false}
admin: {listen: "127.0.0.1:19103"}
upstreams:
  hello: {targets: [{url: "http://127.0.0.1:19100"}]}
routes:
  - {name: all, paths: ["/*"], upstream: hello}
EOC
taskset -c 1 target/release/portico run --config "$W/p.yaml" >/dev/null 2>&1 &
PX=$!
sleep 1.5
ticks() { local s; s="$(cat "/proc/$1/stat")"; s="${s##*) }"; read -r -a f <<<"$s"; echo "${f[11]} ${f[12]}"; }
hz="$(getconf CLK_TCK)"
printf '%-8s %12s %12s %16s %16s\n' target "user µs/req" "kernel µs/req" "upstream user" "upstream kernel"
for _ in $(seq "$REPS"); do
  for t in "nginx:19101:$NG" "portico:19102:$PX"; do
    IFS=: read -r name port pid <<<"$t"
    read -r u0 s0 <<<"$(ticks "$pid")"; read -r v0 w0 <<<"$(ticks "$UP")"
    n="$(taskset -c 0 wrk -t1 -c50 -d"$DURATION" "http://127.0.0.1:$port/" | awk '/requests in/{print $1}')"
    read -r u1 s1 <<<"$(ticks "$pid")"; read -r v1 w1 <<<"$(ticks "$UP")"
    awk -v n="$n" -v hz="$hz" -v a=$((u1-u0)) -v b=$((s1-s0)) -v c=$((v1-v0)) -v d=$((w1-w0)) -v name="$name" \
      'BEGIN { f = 1e6 / hz / n; printf "%-8s %12.2f %12.2f %16.2f %16.2f\n", name, a*f, b*f, c*f, d*f }'
  done
done
