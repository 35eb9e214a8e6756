#!/usr/bin/env bash
# Fuzz static/wasm/qz.c natively with libFuzzer + AddressSanitizer + UBSan (harness: tools/fuzz_qz.c).
#
#   tools/fuzz.sh            short run: 60 s, one process (what CI or a reviewer runs)
#   tools/fuzz.sh long       long run: 1 h, 2 jobs (before a release, or after touching qz.c)
#   tools/fuzz.sh 300        any number of seconds
#
# Needs clang with libFuzzer (Debian: apt-get install clang). The corpus starts from tests/golden/*.qz and is
# kept in $FUZZ_DIR (default /tmp/qz-fuzz), so later runs resume from what earlier runs found. A crash is written
# to $FUZZ_DIR/crash-*; reproduce it with:  $FUZZ_DIR/fuzz_qz $FUZZ_DIR/crash-<hash>
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_DIR="${FUZZ_DIR:-/tmp/qz-fuzz}"
MODE="${1:-short}"
case "$MODE" in
  short) SECONDS_TO_RUN=60;   PARALLEL=() ;;
  long)  SECONDS_TO_RUN=3600; PARALLEL=(-fork=2) ;;  # two processes; logs go to stdout
  *[!0-9]*) echo "usage: $0 [short|long|SECONDS]" >&2; exit 2 ;;
  *)     SECONDS_TO_RUN="$MODE"; PARALLEL=() ;;
esac

command -v clang >/dev/null || { echo "clang not found: apt-get install clang" >&2; exit 1; }
mkdir -p "$FUZZ_DIR/corpus"
cp -n "$ROOT"/tests/golden/*.qz "$FUZZ_DIR/corpus/" 2>/dev/null || true

# -mssse3: the SIMD paths of qz.c (lookup16) are built and fuzzed too, as in the gcc and wasm builds
clang -g -O1 -mssse3 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  "$ROOT/tools/fuzz_qz.c" -o "$FUZZ_DIR/fuzz_qz"

cd "$FUZZ_DIR"
# -max_len 65536: room for chunks with several dictionary resets; -timeout 5: a decode is linear, never slow
"$FUZZ_DIR/fuzz_qz" -max_total_time="$SECONDS_TO_RUN" "${PARALLEL[@]}" \
  -max_len=65536 -timeout=5 -print_final_stats=1 "$FUZZ_DIR/corpus"
