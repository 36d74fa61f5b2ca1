#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30), one after the other, and prints
# a per-target summary; stops at the first crash, naming its reproducer.
#
#   tests/fuzz/run.sh [SECONDS] [TARGET...]
#
# Works from any directory and from a clean checkout: installs cargo-fuzz when missing
# (nightly is used when present, else the default toolchain), builds every target once, then runs each on its
# committed seeds (corpus/<target>/) and regression inputs (artifacts-found/<target>/),
# growing a working corpus in target/corpus/<target>/ that later runs start from.
# Extra libFuzzer flags go in FUZZ_ARGS (e.g. FUZZ_ARGS="-rss_limit_mb=4096").
#
# Built without a sanitizer by default (FUZZ_SANITIZER=none): the gateway forbids unsafe
# code, so AddressSanitizer would only watch its dependencies, and it costs a third more
# build time and 3-6x the executions per second. Panics, overflow (debug assertions are
# on), timeouts and running out of memory are caught either way. FUZZ_SANITIZER=address
# gives cargo-fuzz's default build.
set -euo pipefail

FUZZ_DIR="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$FUZZ_DIR/../.." && pwd)"
cd "$ROOT"
REL="${FUZZ_DIR#"$ROOT"/}"

SECONDS_EACH="${1:-30}"
if ! [[ "$SECONDS_EACH" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [SECONDS] [TARGET...]  (SECONDS a positive integer, default 30)" >&2
  exit 64
fi
shift $(($# > 0 ? 1 : 0))
ALL_TARGETS=(receipt_request detail_request callback_body receipt_response usersig config)
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi

# The toolchain: nightly when the machine has it; else (CI's machines have one toolchain
# and can fetch no other) the default one with RUSTC_BOOTSTRAP=1, which lets stable rustc
# take the nightly-only flags cargo-fuzz passes (without a sanitizer, nothing else differs).
# FUZZ_TOOLCHAIN=default takes the second way on any machine (as CI does).
if [ "${FUZZ_TOOLCHAIN:-}" != default ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  TOOLCHAIN=(+nightly)
else
  echo "no nightly toolchain: fuzzing with the default one and RUSTC_BOOTSTRAP=1"
  TOOLCHAIN=()
  FUZZ_BOOTSTRAP=1
fi
# cargo-fuzz only drives cargo: a debug build of it installs in a third of the time of a
# release build (31 s against 1m49s on two busy cores) and runs no slower that anyone would
# notice. The version is pinned, so that a new release cannot change CI's fuzz step
# unannounced.
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --debug
fi

SANITIZER="${FUZZ_SANITIZER:-none}"
fuzz() {
  if [ -n "${FUZZ_BOOTSTRAP:-}" ]; then
    RUSTC_BOOTSTRAP=1 cargo "${TOOLCHAIN[@]}" fuzz "$1" --fuzz-dir "$REL" --sanitizer "$SANITIZER" "${@:2}"
  else
    cargo "${TOOLCHAIN[@]}" fuzz "$1" --fuzz-dir "$REL" --sanitizer "$SANITIZER" "${@:2}"
  fi
}

echo "building ${#TARGETS[@]} fuzz targets (sanitizer: $SANITIZER)"
build_started=$(date +%s)
for target in "${TARGETS[@]}"; do
  if [ ! -f "$REL/fuzz_targets/$target.rs" ]; then
    echo "unknown fuzz target $target (there are: ${ALL_TARGETS[*]})" >&2
    exit 64
  fi
done
# One build for all of them: the gateway and its dependencies are compiled once.
fuzz build
echo "built in $(($(date +%s) - build_started)) s"

dict_of() {
  case "$1" in
    config) echo "$REL/dict/config.dict" ;;
    *) echo "$REL/dict/json.dict" ;;
  esac
}

# "name value" from libFuzzer's final stats, or the last pulse line's "cov: N".
stat_of() { sed -n "s/^stat::$2: *\([0-9]*\).*/\1/p" "$1" | tail -n 1; }
pulse_of() { { grep -o "$2: [0-9]*" "$1" || true; } | tail -n 1 | sed 's/.*: //'; }

LOGS="$REL/target/logs"
mkdir -p "$LOGS"
summary=()
for target in "${TARGETS[@]}"; do
  work="$REL/target/corpus/$target"
  mkdir -p "$work"
  corpora=("$work" "$REL/corpus/$target")
  if [ -d "$REL/artifacts-found/$target" ]; then corpora+=("$REL/artifacts-found/$target"); fi
  log="$LOGS/$target.log"
  echo "fuzzing $target for $SECONDS_EACH s (log: $log)"
  started=$(date +%s)
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
  if ! fuzz run "$target" "${corpora[@]}" -- \
    -max_total_time="$SECONDS_EACH" -dict="$(dict_of "$target")" -timeout=10 -print_final_stats=1 \
    ${FUZZ_ARGS:-} >"$log" 2>&1; then
    echo
    echo "FUZZING FAILED: $target (full log: $log)"
    echo "-------------------------------------------------------------------------------"
    # The build error, or the panic or sanitizer report and cargo-fuzz's account of the
    # input (its own backtrace after that says nothing about the crash).
    grep -E -m 3 '^error(\[E[0-9]+\])?:' "$log" || true
    grep -E -m 1 -A 2 'panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)' "$log" || true
    sed -n '/^Failing input:/,/^Error: Fuzz target exited/p' "$log"
    echo "-------------------------------------------------------------------------------"
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    if [ -n "$artifact" ]; then
      echo "reproducer: $artifact"
      echo "reproduce:  cargo +nightly fuzz run --fuzz-dir $REL -s $SANITIZER $target $artifact"
      echo "minimise:   cargo +nightly fuzz tmin --fuzz-dir $REL -s $SANITIZER $target $artifact"
      echo "then keep the minimised input as $REL/artifacts-found/$target/<name> (a regression input)"
    fi
    exit 1
  fi
  runs=$(stat_of "$log" number_of_executed_units)
  per_s=$(stat_of "$log" average_exec_per_sec)
  summary+=("$(printf '%-18s %12s %10s %8s %8s %8s %6s' "$target" "${runs:-?}" "${per_s:-?}" \
    "$(pulse_of "$log" cov)" "$(pulse_of "$log" ft)" "$(pulse_of "$log" corp)" "$(($(date +%s) - started))")")
done

echo
printf '%-18s %12s %10s %8s %8s %8s %6s\n' target execs execs/s cov features corpus wall_s
printf '%s\n' "${summary[@]}"
echo "no crashes: ${#TARGETS[@]} targets, $SECONDS_EACH s each, $(($(date +%s) - build_started)) s in all"
