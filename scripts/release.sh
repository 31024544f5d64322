#!/usr/bin/env bash
# Build and package Portico's release binary.
#
# The release binary is the `dist` profile (fat LTO, one codegen unit) optimized with a
# profile of its own training run (profile-guided optimization, bench/pgo.sh): on this
# project's machine it executes about a quarter fewer instructions per proxied request
# than the same build without a profile (docs/performance.md). The training traffic
# (bench/pgo-train.sh) covers plain proxying over HTTP/1.1 and h2c, header transforms,
# CORS, key-auth with a rate limit, refusals and small request bodies; code it does not
# reach is still compiled and correct, only laid out as cold.
#
#   bash scripts/release.sh          # ~30 min on 2 cores: two full builds and the training
#   PGO=0 bash scripts/release.sh    # the dist build without a profile (~6 min)
#
# Output: target/release-dist/portico-VERSION-TRIPLE.tar.gz (the binary, README.md,
# docs/, examples/) and its .sha256. Before packaging, the binary must report its
# version, validate every file in examples/, and answer on its built-in defaults.
#
# Needs the Rust toolchain through rustup; bench/pgo.sh adds its llvm-tools component
# and installs the training run's curl, wrk and h2load from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PGO="${PGO:-1}"
HOST="$(rustc -vV | sed -n 's/^host: //p')"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="$TARGET_DIR/release-dist"

log() { printf '[release] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ "$PGO" == 1 ]]; then
    bash bench/pgo.sh
    BIN="$TARGET_DIR/pgo/$HOST/dist/portico"
else
    cargo build --profile dist -p portico
    BIN="$TARGET_DIR/dist/portico"
fi
[[ -x "$BIN" ]] || die "no binary at $BIN"

# The binary must work before it is packaged.
command -v curl >/dev/null 2>&1 || die "curl is needed to check the binary"
VERSION="$("$BIN" --version | awk '{print $2}')"
[[ -n "$VERSION" ]] || die "$BIN --version printed no version"
for f in examples/*.yaml; do
    "$BIN" validate "$f" >/dev/null || die "$BIN validate $f failed"
done
SMOKE="$(mktemp -d)"
trap 'kill "${PID:-}" 2>/dev/null || true; rm -rf "$SMOKE"' EXIT
# In an empty directory: no portico.yaml, so the built-in defaults (8080 and 9080).
(cd "$SMOKE" && exec "$BIN" run) >"$SMOKE/out.log" 2>&1 &
PID=$!
ok=0
for _ in $(seq 50); do
    if curl -fs -o /dev/null http://127.0.0.1:8080/hello && curl -fs -o /dev/null http://127.0.0.1:9080/health; then
        ok=1
        break
    fi
    sleep 0.2
done
((ok == 1)) || { tail -20 "$SMOKE/out.log" >&2; die "the binary did not answer on its defaults (is 8080 or 9080 taken?)"; }
kill -TERM "$PID"
wait "$PID" || die "the binary did not exit 0 on SIGTERM"
PID=

NAME="portico-$VERSION-$HOST"
rm -rf "${OUT:?}/$NAME" "$OUT/$NAME.tar.gz" "$OUT/$NAME.tar.gz.sha256"
mkdir -p "$OUT/$NAME"
cp "$BIN" "$OUT/$NAME/portico"
cp -r README.md docs examples "$OUT/$NAME/"
tar -C "$OUT" -czf "$OUT/$NAME.tar.gz" "$NAME"
(cd "$OUT" && sha256sum "$NAME.tar.gz" >"$NAME.tar.gz.sha256")
rm -rf "${OUT:?}/$NAME"
log "built $OUT/$NAME.tar.gz ($([[ "$PGO" == 1 ]] && echo "PGO" || echo "no profile"))"
