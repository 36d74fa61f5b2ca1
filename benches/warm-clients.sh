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
rounds=${1:-3}
command -v wrk >/dev/null || { echo "warm-clients: wrk is not installed (apt-get install wrk)"; exit 1; }
cargo build --release --bins >/dev/null
bin=target/release/receipt-gateway
dir=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port=$(free_port)
export TENCENT_IM_SECRET_KEY=warm-clients-benchmark-key
"$bin" simulate --listen "127.0.0.1:$sim_port" --app 1400000000:administrator >/dev/null 2>&1 &
sim=$!
trap 'kill $sim 2>/dev/null; rm -rf "$dir"' EXIT
clients=""
for i in $(seq 0 9); do
  export "WARM_CLIENT_TOKEN_$i=warm-clients-token-$i-$RANDOM$RANDOM"
  clients+=$'\n'"[[clients]]"$'\n'"id = \"service-$i\""$'\n'"token_env = \"WARM_CLIENT_TOKEN_$i\""$'\n'"weight = $((i % 3 + 1))"$'\n'
done
body='{"GroupId":"g-warm","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":2},{"MsgSeq":3},{"MsgSeq":4},{"MsgSeq":5}]}'
cat >"$dir/none.lua" <<EOF
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
EOF
cat >"$dir/ten.lua" <<EOF
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-client-id"] = "service-7"
wrk.headers["Authorization"] = "Bearer $WARM_CLIENT_TOKEN_7"
EOF
path=/v4/group_open_http_svc/get_group_msg_receipt
for round in $(seq "$rounds"); do
  for mode in none ten; do
    port=$(free_port)
    cat >"$dir/$mode.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:0"
[cache]
ttl_ms = 600000
[[apps]]
sdkappid = 1400000000
region = "singapore"
identifier = "administrator"
endpoint = "http://127.0.0.1:$sim_port"
EOF
    if [ "$mode" = ten ]; then echo "$clients" >>"$dir/$mode.toml"; fi
    RUST_LOG=warn "$bin" serve --config "$dir/$mode.toml" >/dev/null 2>&1 &
    gw=$!
    for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
    auth=()
    if [ "$mode" = ten ]; then auth=(-H "x-client-id: service-7" -H "Authorization: Bearer $WARM_CLIENT_TOKEN_7"); fi
    curl -s -o /dev/null "${auth[@]}" -XPOST "http://127.0.0.1:$port$path" -d "$body"
    status=$(curl -s -o /dev/null -w '%{http_code}' "${auth[@]}" -XPOST "http://127.0.0.1:$port$path" -d "$body")
    cpu0=$(awk '{print $14+$15}' "/proc/$gw/stat")
    out=$(wrk -t2 -c64 -d5s -s "$dir/$mode.lua" "http://127.0.0.1:$port$path")
    cpu1=$(awk '{print $14+$15}' "/proc/$gw/stat")
    n=$(echo "$out" | awk '/requests in/{print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    non2xx=$(echo "$out" | awk '/Non-2xx/{print $NF}')
    ticks=$(getconf CLK_TCK)
    label=$([ "$mode" = ten ] && echo "10 clients, tokens on" || echo "no clients")
    echo "round $round $label: $rps req/s, $(python3 -c "print(round(($cpu1-$cpu0)/$ticks*1e6/$n, 2))") us CPU/request (status $status, non-2xx ${non2xx:-0})"
    kill $gw; wait $gw 2>/dev/null || true
  done
done
