#!/usr/bin/env bash
# Portico's whole test suite: installs what the tests need, then runs format and lint
# checks, unit tests and end-to-end tests (which start the real binary against real
# upstream servers on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# Discovery e2e tests run real servers (they fail, not skip, without them).
[ -x /usr/sbin/dnsmasq ] || command -v dnsmasq >/dev/null 2>&1 || need_apt+=(dnsmasq-base)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "warning: missing ${need_apt[*]}; tests that need them will fail or skip" >&2
  fi
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# portico-upstream alone: without its `kubernetes` feature.
cargo clippy -p portico-upstream --all-targets --locked -- -D warnings

echo "==> cargo test"
cargo test --workspace --locked 2>&1 | tee target/test-output.txt
# Summary line for CI: totals over every test binary.
awk '/^test result:/ {p+=$4; f+=$6; i+=$8} END {printf "%d passed, %d failed, %d skipped\n", p, f, i}' target/test-output.txt
