#!/usr/bin/env bash
# Before/after comparison of two builds of the gateway, alternated in one run so that a
# busy machine disturbs both alike: `receipt-loadgen --scenario under`, then `over`, each
# before then after, then `--scenario warm --peer gateway` before then after; ROUNDS
# times over. BEFORE and AFTER are checkouts (e.g. `git worktree add ../before <commit>`)
# where `cargo build --release --bins` has been run. Results go to OUT, one file per run.
#
#   BEFORE=../before AFTER=. bash benches/ab.sh
set -euo pipefail
: "${BEFORE:?BEFORE=<checkout with a release build>}" "${AFTER:?AFTER=<checkout with a release build>}"
out="${OUT:-target/bench-ab}"
rounds="${ROUNDS:-2}"
mkdir -p "$out"
run() { "$1/target/release/receipt-loadgen" "${@:3}" > "$out/$2.txt" 2>&1; }
for round in $(seq 1 "$rounds"); do
  for scenario in under over; do
    run "$BEFORE" "$scenario-before-$round" --scenario "$scenario"
    run "$AFTER" "$scenario-after-$round" --scenario "$scenario"
  done
  run "$BEFORE" "warm-before-$round" --scenario warm --peer gateway
  run "$AFTER" "warm-after-$round" --scenario warm --peer gateway
done
grep -H -E '^(upstream|latency|status):|warm cache  ' "$out"/*.txt
