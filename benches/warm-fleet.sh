#!/usr/bin/env bash
# Is a cache hit as fast with fleet.backend = "redis" as without? Runs one release gateway
# in front of the simulator, warms one 5-MsgSeq query, and measures it with wrk
# (-t2 -c64, 5 s), alternating fleet.backend "none" and "redis" for ROUNDS rounds, with the
# gateway's CPU time per request from /proc. Needs wrk and redis-server (Debian packages).
#     benches/warm-fleet.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
rounds=${1:-3}
for tool in wrk redis-server; do
  command -v "$tool" >/dev/null || { echo "warm-fleet: $tool is not installed (apt-get install $tool)"; exit 1; }
done
cargo build --release --bins >/dev/null
dir=$(mktemp -d)
start_simulator
redis-server --port 0 --unixsocket "$dir/redis.sock" --save "" --appendonly no --dir "$dir" >/dev/null 2>&1 &
redis=$!
trap 'kill $sim $redis 2>/dev/null; rm -rf "$dir"' EXIT
write_post_lua "$dir/post.lua"
for round in $(seq "$rounds"); do
  for mode in none redis; do
    port=$(free_port)
    write_gateway_config "$dir/$mode.toml" "$port" "[fleet]
backend = \"$mode\"
[redis]
url = \"unix://$dir/redis.sock\""
    RUST_LOG=warn "$bench_bin" serve --config "$dir/$mode.toml" >/dev/null 2>&1 &
    gw=$!
    wait_for_http "http://127.0.0.1:$port/" || true
    curl -s -o /dev/null -XPOST "http://127.0.0.1:$port$bench_path" -d "$bench_body"
    cache=$(curl -s -o /dev/null -D - -XPOST "http://127.0.0.1:$port$bench_path" -d "$bench_body" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache"{print $2}')
    cpu0=$(cpu_ticks $gw)
    out=$(wrk -t2 -c64 -d5s -s "$dir/post.lua" "http://127.0.0.1:$port$bench_path")
    cpu1=$(cpu_ticks $gw)
    n=$(echo "$out" | awk '/requests in/{print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    echo "round $round fleet.backend=$mode: $rps req/s, $(cpu_us_per_request "$cpu0" "$cpu1" "$n") us CPU/request (X-Cache: $cache)"
    kill $gw; wait $gw 2>/dev/null || true
  done
done
