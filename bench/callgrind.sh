#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: deterministic, so
# two builds can be compared on a noisy machine. Kernel time is not included.
#   bash bench/callgrind.sh [REQUESTS]        (default 20000)
#   PROFILE=dist bash bench/callgrind.sh      (the fat-LTO build; default: release)
#   SKIP_BUILD=1 ...                          (use the binaries already built)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20000}"
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }
PROFILE="${PROFILE:-release}"
BIN="target/$PROFILE"
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --profile "$PROFILE" -q -p portico -p portico-bench-upstream
d="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] && cp "$d/cg.out" "$KEEP"; rm -rf "$d"' EXIT
cat >"$d/p.yaml" <<YAML
listen: ["127.0.0.1:19180"]
workers: 1
access_log: {enabled: false}
admin: {listen: "127.0.0.1:19181"}
upstreams:
  hello: {targets: [{url: "http://127.0.0.1:19182"}]}
routes:
  - {name: all, paths: ["/*"], upstream: hello}
YAML
"$BIN"/portico-bench-upstream 127.0.0.1:19182 >/dev/null 2>&1 &
run() { # requests -> total instructions
  valgrind --tool=callgrind --callgrind-out-file="$d/cg.out" "$BIN"/portico run --config "$d/p.yaml" >/dev/null 2>&1 &
  local px=$!
  for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:19180/ && break; sleep 0.3; done
  [ "$1" -gt 1 ] && h2load --h1 -n "$1" -c 10 http://127.0.0.1:19180/ >/dev/null
  kill -TERM "$px"; wait "$px" || true
  grep -E "^(summary|totals):" "$d/cg.out" | head -1 | awk '{print $2}'
}
base=$(run 1)
total=$(run "$N")
echo "instructions per request: $(( (total - base) / N ))  (start-up ${base}, total ${total}, ${N} requests)"
