#!/usr/bin/env bash
# Build Portico's dist binary with profile-guided optimization (PGO):
#   1. an instrumented dist build (target/pgo-gen),
#   2. a training run of it (bench/pgo-train.sh: plain proxying, policies, HTTP/2,
#      errors — not only the benchmark's request),
#   3. the dist build again, optimized with the merged profile (target/pgo).
# The result: target/pgo/<host triple>/dist/portico, the release binary
# (scripts/release.sh packages it). bench/run.sh measures it as the `portico-pgo`
# target, next to the plain dist build.
#
#   bash bench/pgo.sh          (about 30 minutes on 2 cores: two full builds)
#
# Needs rustup's llvm-tools component (llvm-profdata of the compiler's own LLVM) and,
# for the training run, curl, wrk and h2load; installed here when missing. `--target`
# keeps the profiling flags off build scripts and proc macros.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
HOST="$(rustc -vV | sed -n 's/^host: //p')"
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata"
if [[ ! -x "$PROFDATA" ]]; then
    rustup component add llvm-tools
fi
[[ -x "$PROFDATA" ]] || { echo "llvm-profdata not found at $PROFDATA" >&2; exit 1; }
# The training run's clients (bench/run.sh installs the same ones before calling this).
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if ((${#missing[@]} > 0)); then
    command -v apt-get >/dev/null 2>&1 || { echo "missing ${missing[*]}, and no apt-get" >&2; exit 1; }
    sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo)
    echo "[pgo] installing ${missing[*]}"
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
DATA="$TARGET_DIR/pgo-data"
rm -rf "$DATA"
mkdir -p "$DATA"

echo "[pgo] 1/3 instrumented build"
RUSTFLAGS="-Cprofile-generate=$DATA" CARGO_TARGET_DIR="$TARGET_DIR/pgo-gen" \
    cargo build --profile dist --target "$HOST" -p portico
cargo build --release -p portico-bench-upstream

echo "[pgo] 2/3 training run"
LLVM_PROFILE_FILE="$DATA/portico-%p-%m.profraw" \
    bash bench/pgo-train.sh "$TARGET_DIR/pgo-gen/$HOST/dist/portico" "$TARGET_DIR/release/portico-bench-upstream"
shopt -s nullglob
raw=("$DATA"/portico-*.profraw)
((${#raw[@]} > 0)) || { echo "[pgo] the training run wrote no profile" >&2; exit 1; }
"$PROFDATA" merge -o "$DATA/merged.profdata" "${raw[@]}"

echo "[pgo] 3/3 optimized build"
RUSTFLAGS="-Cprofile-use=$DATA/merged.profdata" CARGO_TARGET_DIR="$TARGET_DIR/pgo" \
    cargo build --profile dist --target "$HOST" -p portico
echo "[pgo] built $TARGET_DIR/pgo/$HOST/dist/portico"
