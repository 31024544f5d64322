#!/usr/bin/env bash
# Where Portico's CPU goes per proxied request, sampled: the kernel, libc, Portico's
# own code, and of that the part spent on or right after lock-prefixed instructions
# (atomic reference counts, locks: their cost lands on the next instruction), with the
# busiest of those sites named by source line.
#   bash bench/atomics.sh [BIN] [DURATION]
# BIN: a Portico binary with line tables (default: the `profiling` build, built if
# missing); DURATION: seconds under load (default 8). Same pinning as run.sh: the
# upstream and wrk on CPU 0, the gateway on CPU 1. Needs perf, objdump, addr2line and
# python3; cpu-clock sampling, so it works without hardware counters (in a VM).
# Compare two builds in the same minute: the machine's load moves these figures too.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/profiling/portico}"
DUR="${2:-8}"
UPSTREAM="${UPSTREAM_BIN:-target/profiling/portico-bench-upstream}"
for t in perf objdump addr2line python3; do
    command -v "$t" >/dev/null || { echo "atomics.sh: $t is missing" >&2; exit 1; }
done
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
if [[ ! -x "$BIN" || ! -x "$UPSTREAM" ]]; then
    CARGO_INCREMENTAL=0 cargo build -q --profile profiling -p portico -p portico-bench-upstream
fi
BIN="$(realpath "$BIN")"
W="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; rm -rf "$W"' EXIT
PORT="${PORT:-19161}"
taskset -c 0 nice -n -10 "$UPSTREAM" "127.0.0.1:$((PORT + 1))" >/dev/null 2>&1 &
cat >"$W/p.yaml" <<EOF
listen: ["127.0.0.1:$PORT"]
workers: 1
access_log: {enabled: false}
admin: {listen: "127.0.0.1:$((PORT + 2))"}
upstreams:
  hello: {targets: [{url: "http://127.0.0.1:$((PORT + 1))"}]}
routes:
  - {name: all, paths: ["/*"], upstream: hello}
EOF
taskset -c 1 nice -n -10 "$BIN" run --config "$W/p.yaml" >/dev/null 2>&1 &
PX=$!
for _ in $(seq 50); do
    curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break
    sleep 0.1
done
taskset -c 0 wrk -t1 -c50 -d2s "http://127.0.0.1:$PORT/" >/dev/null
perf record -q -e cpu-clock -F 15000 -p "$PX" -o "$W/perf.data" -- sleep "$DUR" >/dev/null 2>&1 &
PR=$!
REQS=$(taskset -c 0 wrk -t1 -c50 -d"${DUR}s" "http://127.0.0.1:$PORT/" | awk '/requests in/ {print $1}')
wait "$PR"
[[ "$REQS" =~ ^[0-9]+$ && "$REQS" -gt 0 ]] || { echo "atomics.sh: wrk sent no requests" >&2; exit 1; }
perf script -i "$W/perf.data" -F ip,dso 2>/dev/null >"$W/ips.txt"
perf script -i "$W/perf.data" --show-mmap-events 2>/dev/null \
    | grep -m1 "PERF_RECORD_MMAP.*r-xp $BIN" >"$W/mmap.txt" || true
objdump -d --no-show-raw-insn "$BIN" >"$W/dis.txt"
readelf -lW "$BIN" >"$W/phdr.txt"
python3 - "$W" "$BIN" "$REQS" <<'PYEOF'
import collections, re, subprocess, sys
w, binary, reqs = sys.argv[1], sys.argv[2], int(sys.argv[3])
name = binary.rsplit('/', 1)[-1]
by_dso = collections.Counter()
own = collections.Counter()
for line in open(f'{w}/ips.txt'):
    parts = line.split()
    if len(parts) < 2:
        continue
    dso = parts[1].strip('()').rsplit('/', 1)[-1]
    by_dso[dso] += 1
    if dso == name:
        own[int(parts[0], 16)] += 1
# Runtime address -> file address: the executable mapping's start and file offset,
# and the text segment's address minus its offset.
m = re.search(r'\[(0x[0-9a-f]+)\((0x[0-9a-f]+)\) @ (0x[0-9a-f]+)', open(f'{w}/mmap.txt').read())
start, off = int(m.group(1), 16), int(m.group(3), 16)
delta = 0
for l in open(f'{w}/phdr.txt'):
    f = l.split()
    if f and f[0] == 'LOAD' and 'E' in f[6:-1]:
        delta = int(f[2], 16) - int(f[1], 16)
        break
own = {a - start + off + delta: c for a, c in own.items()}
addrs, insns = [], []
for l in open(f'{w}/dis.txt'):
    m = re.match(r'\s+([0-9a-f]+):\t(.*)', l)
    if m:
        addrs.append(int(m.group(1), 16))
        insns.append(m.group(2))
at_lock = collections.Counter()
for k in range(1, len(addrs)):
    if insns[k - 1].startswith(('lock', 'xchg')):
        c = own.get(addrs[k], 0) + own.get(addrs[k - 1], 0)
        if c:
            at_lock[addrs[k - 1]] = c
total = sum(by_dso.values())
print(f'{reqs} requests, {total} samples ({total / reqs:.4f} per request)')
for dso, c in by_dso.most_common(6):
    print(f'  {dso:<24} {c:>8}  {c / reqs:.4f} per request  {100 * c / total:5.1f} %')
locked = sum(at_lock.values())
mine = sum(own.values())
print(f'  of {name}: on or after lock instructions {locked} ({locked / reqs:.4f} per request, '
      f'{100 * locked / max(mine, 1):.1f} % of its samples)')
print('busiest lock sites (samples: innermost <- callers, file:line):')
for a, c in at_lock.most_common(15):
    out = subprocess.run(['addr2line', '-C', '-f', '-i', '-e', binary, hex(a)],
                         capture_output=True, text=True).stdout.split('\n')
    frames = [(out[i], out[i + 1].rsplit('/', 1)[-1]) for i in range(0, len(out) - 1, 2)]
    print(f'  {c:>5}  ' + ' <- '.join(f"{fn.split('::')[-1][:32]}@{loc}" for fn, loc in frames[1:6]))
PYEOF
