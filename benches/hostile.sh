#!/usr/bin/env bash
# Hostile input against the HTTP front (docs/benchmarks.md#hostile-input): the release
# gateway in front of the simulator, attacked by benches/hostile.py one scenario at a time,
# each on a fresh gateway:
#   partial  2,000 connections holding a partial first line: gateway CPU over 10 s, and a
#            normal caller's latency beside them
#   heads    1,000 connections stuck mid-head after 400 KB of headers: gateway RSS
#   h2idle   an h2 connection that opens no stream but answers PINGs: how long it lives
#   evict    400 silent connections against max_connections = 200, then new callers
#     benches/hostile.sh [SCENARIO...]          # default: all four
#     GATEWAY_BIN=/tmp/old-gateway benches/hostile.sh partial   # another build (before/after)
# Extra arguments for one scenario: PARTIAL_ARGS="--conns 1000", HEADS_ARGS="--bytes 60000".
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
[[ -z ${GATEWAY_BIN:-} ]] && cargo build --release --bin receipt-gateway >/dev/null
bench_bin=${GATEWAY_BIN:-$bench_bin}
scenarios=("$@")
((${#scenarios[@]})) || scenarios=(partial heads h2idle evict)
ulimit -n "$(ulimit -Hn)"
dir=$(mktemp -d)
gw=
trap 'kill $sim ${gw:-} 2>/dev/null || true; rm -rf "$dir"' EXIT
start_simulator

for scenario in "${scenarios[@]}"; do
  port=$(free_port)
  limits="first_bytes_timeout_ms = 60000"
  case $scenario in
    evict) limits="max_connections = 200" ;;
    h2idle) limits="" ;;
  esac
  write_gateway_config "$dir/gateway.toml" "$port"
  # The [server] keys go in the config's [server] section.
  python3 - "$dir/gateway.toml" "$limits" <<'PY'
import sys
path, extra = sys.argv[1], sys.argv[2]
text = open(path).read().replace("[server]\n", "[server]\n" + extra + "\n", 1)
open(path, "w").write(text)
PY
  RUST_LOG=warn "$bench_bin" serve --config "$dir/gateway.toml" >"$dir/gateway.log" 2>&1 &
  gw=$!
  wait_for_http "http://127.0.0.1:$port/" || { cat "$dir/gateway.log"; exit 1; }
  echo "== $scenario ($bench_bin)"
  case $scenario in
    partial) python3 benches/hostile.py partial --data "127.0.0.1:$port" --pid "$gw" ${PARTIAL_ARGS:-} ;;
    heads) python3 benches/hostile.py heads --data "127.0.0.1:$port" --pid "$gw" ${HEADS_ARGS:-} ;;
    h2idle) python3 benches/hostile.py h2idle --data "127.0.0.1:$port" ${H2IDLE_ARGS:-} ;;
    evict) python3 benches/hostile.py evict --data "127.0.0.1:$port" ${EVICT_ARGS:-} ;;
    *) echo "unknown scenario $scenario"; exit 64 ;;
  esac
  kill "$gw"; wait "$gw" 2>/dev/null || true
  gw=
done
