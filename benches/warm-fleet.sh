#!/usr/bin/env bash
# Is a cache hit as fast with fleet.backend = "redis" as without? Runs one release gateway
# in front of the simulator, warms one 5-MsgSeq query, and measures it with wrk
# (-t2 -c64, 5 s), alternating fleet.backend "none" and "redis" for ROUNDS rounds, with the
# gateway's CPU time per request from /proc. Needs wrk and redis-server (Debian packages).
#     benches/warm-fleet.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
for tool in wrk redis-server; do
  command -v "$tool" >/dev/null || { echo "warm-fleet: $tool is not installed (apt-get install $tool)"; exit 1; }
done
cargo build --release --bins >/dev/null
bin=target/release/receipt-gateway
dir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port=$(free_port)
export TENCENT_IM_SECRET_KEY=warm-fleet-benchmark-key
"$bin" simulate --listen "127.0.0.1:$sim_port" --app 1400000000:administrator >/dev/null 2>&1 &
sim=$!
redis-server --port 0 --unixsocket "$dir/redis.sock" --save "" --appendonly no --dir "$dir" >/dev/null 2>&1 &
redis=$!
trap 'kill $sim $redis 2>/dev/null; rm -rf "$dir"' EXIT
body='{"GroupId":"g-warm","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":2},{"MsgSeq":3},{"MsgSeq":4},{"MsgSeq":5}]}'
cat >"$dir/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
EOF
path=/v4/group_open_http_svc/get_group_msg_receipt
for round in $(seq "$rounds"); do
  for mode in none redis; do
    port=$(free_port)
    cat >"$dir/$mode.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:0"
[cache]
ttl_ms = 600000
[fleet]
backend = "$mode"
[redis]
url = "unix://$dir/redis.sock"
[[apps]]
sdkappid = 1400000000
region = "singapore"
identifier = "administrator"
endpoint = "http://127.0.0.1:$sim_port"
EOF
    RUST_LOG=warn "$bin" serve --config "$dir/$mode.toml" >/dev/null 2>&1 &
    gw=$!
    for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
    curl -s -o /dev/null -XPOST "http://127.0.0.1:$port$path" -d "$body"
    cache=$(curl -s -o /dev/null -D - -XPOST "http://127.0.0.1:$port$path" -d "$body" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache"{print $2}')
    cpu0=$(awk '{print $14+$15}' "/proc/$gw/stat")
    out=$(wrk -t2 -c64 -d5s -s "$dir/post.lua" "http://127.0.0.1:$port$path")
    cpu1=$(awk '{print $14+$15}' "/proc/$gw/stat")
    n=$(echo "$out" | awk '/requests in/{print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    ticks=$(getconf CLK_TCK)
    echo "round $round fleet.backend=$mode: $rps req/s, $(python3 -c "print(round(($cpu1-$cpu0)/$ticks*1e6/$n, 2))") us CPU/request (X-Cache: $cache)"
    kill $gw; wait $gw 2>/dev/null || true
  done
done
