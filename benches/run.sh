#!/bin/sh
# Builds the release binaries and runs the benchmark; arguments go to receipt-loadgen,
# e.g.  benches/run.sh --scenario under --duration 30, or a fleet: benches/run.sh --replicas 3
# (see `target/release/receipt-loadgen --help`; the default is --scenario all).
set -eu
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/receipt-loadgen "$@"
