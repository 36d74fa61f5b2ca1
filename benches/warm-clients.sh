#!/usr/bin/env bash
# Is a cache hit as fast with ten configured clients (bearer tokens on) as without?
# Runs one release gateway in front of the simulator, warms one 5-MsgSeq query, and
# measures it with wrk (-t2 -c64, 5 s), alternating a config without [[clients]] and one
# with ten clients, each with a token (the requests name one of them and send its
# token), for ROUNDS rounds, with the gateway's CPU time per request from /proc.
# Needs wrk (Debian package).
#     benches/warm-clients.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
rounds=${1:-3}
command -v wrk >/dev/null || { echo "warm-clients: wrk is not installed (apt-get install wrk)"; exit 1; }
cargo build --release --bins >/dev/null
dir=$(mktemp -d)
start_simulator
trap 'kill $sim 2>/dev/null; rm -rf "$dir"' EXIT
clients=""
for i in $(seq 0 9); do
  export "WARM_CLIENT_TOKEN_$i=warm-clients-token-$i-$RANDOM$RANDOM"
  clients+=$'\n'"[[clients]]"$'\n'"id = \"service-$i\""$'\n'"token_env = \"WARM_CLIENT_TOKEN_$i\""$'\n'"weight = $((i % 3 + 1))"$'\n'
done
write_post_lua "$dir/none.lua"
write_post_lua "$dir/ten.lua" x-client-id service-7 Authorization "Bearer $WARM_CLIENT_TOKEN_7"
for round in $(seq "$rounds"); do
  for mode in none ten; do
    port=$(free_port)
    more=""
    if [ "$mode" = ten ]; then more=$clients; fi
    write_gateway_config "$dir/$mode.toml" "$port" "$more"
    RUST_LOG=warn "$bench_bin" serve --config "$dir/$mode.toml" >/dev/null 2>&1 &
    gw=$!
    wait_for_http "http://127.0.0.1:$port/" || true
    auth=()
    if [ "$mode" = ten ]; then auth=(-H "x-client-id: service-7" -H "Authorization: Bearer $WARM_CLIENT_TOKEN_7"); fi
    curl -s -o /dev/null "${auth[@]}" -XPOST "http://127.0.0.1:$port$bench_path" -d "$bench_body"
    status=$(curl -s -o /dev/null -w '%{http_code}' "${auth[@]}" -XPOST "http://127.0.0.1:$port$bench_path" -d "$bench_body")
    cpu0=$(cpu_ticks $gw)
    out=$(wrk -t2 -c64 -d5s -s "$dir/$mode.lua" "http://127.0.0.1:$port$bench_path")
    cpu1=$(cpu_ticks $gw)
    n=$(echo "$out" | awk '/requests in/{print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    non2xx=$(echo "$out" | awk '/Non-2xx/{print $NF}')
    label=$([ "$mode" = ten ] && echo "10 clients, tokens on" || echo "no clients")
    echo "round $round $label: $rps req/s, $(cpu_us_per_request "$cpu0" "$cpu1" "$n") us CPU/request (status $status, non-2xx ${non2xx:-0})"
    kill $gw; wait $gw 2>/dev/null || true
  done
done
