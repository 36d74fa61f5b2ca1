#!/usr/bin/env bash
# Instructions the gateway executes per warm-cache hit, counted by valgrind's callgrind:
# a deterministic figure for comparing two builds of the hit path, where the wall-clock
# benchmark (receipt-loadgen --scenario warm) moves by 10-20 % between runs on a shared
# machine. User-space instructions only: the kernel's share (the socket calls) is the same
# for every build and is not counted.
#
#   bash benches/callgrind.sh [gateway binary] [seconds of wrk]
#   PEER=hyper bash benches/callgrind.sh   # the same count for the parsing hyper server
#
# Default binary: target/profiling/receipt-gateway (cargo build --profile profiling --bins),
# whose symbols let callgrind_annotate name the functions. Needs valgrind and wrk (apt).
# Prints instructions per request over wrk's requests (one connection-bound thread, 4
# connections) of one cached 5-MsgSeq POST, after a warm-up that fills the cache;
# start-up is not counted. PEER=hyper counts receipt-loadgen's trivial hyper server that
# parses the request and serialises the answer (warm's "hyper, parses + serialises").
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/profiling/receipt-gateway}
duration=${2:-8}
for tool in valgrind callgrind_control wrk curl; do
    command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is missing (apt-get install valgrind wrk curl)" >&2; exit 2; }
done
[[ -x $bin ]] || { echo "callgrind.sh: no binary at $bin" >&2; exit 2; }

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port=$(free_port) data_port=$(free_port) admin_port=$(free_port)
export TENCENT_IM_SECRET_KEY=callgrind-secret-key
"$bin" simulate --listen "127.0.0.1:$sim_port" --app 1400000000:administrator >"$dir/sim.log" 2>&1 &
pids+=($!)
cat >"$dir/gateway.toml" <<EOF
[server]
listen = "127.0.0.1:$data_port"
admin_listen = "127.0.0.1:$admin_port"
# The table's statuses, so that wrk's Non-2xx line sees the gateway's errors (by default
# they are sent as HTTP 200, as Tencent sends its own: docs/design.md#errors).
error_status = "http"

[cache]
ttl_ms = 600000
stale_ms = 60000

[[apps]]
sdkappid = 1400000000
identifier = "administrator"
secret_key_env = "TENCENT_IM_SECRET_KEY"
endpoint = "http://127.0.0.1:$sim_port"
EOF
if [[ ${PEER:-gateway} == hyper ]]; then
    server=(target/profiling/receipt-loadgen --serve-baseline "$data_port" --baseline-kind parsing)
    [[ -x ${server[0]} ]] || { echo "callgrind.sh: no ${server[0]} (cargo build --profile profiling --bins)" >&2; exit 2; }
    bin=${server[0]}
else
    server=("$bin" serve --config "$dir/gateway.toml")
fi
RUST_LOG=warn valgrind --tool=callgrind ${CALLGRIND_OPTS:-} --callgrind-out-file="$dir/callgrind.out" "${server[@]}" >"$dir/gateway.log" 2>&1 &
gateway=$!
pids+=($gateway)

body='{"GroupId":"@TGS#callgrind","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":2},{"MsgSeq":3},{"MsgSeq":4},{"MsgSeq":5}]}'
url="http://127.0.0.1:$data_port/v4/group_open_http_svc/get_group_msg_receipt?sdkappid=1400000000"
for _ in $(seq 1 600); do
    curl -s -o /dev/null -X POST "$url" -d '{}' && break
    sleep 0.1
done
# Warm-up: the first asks upstream, the rest are hits; the answer must be a HIT.
for _ in 1 2 3; do
    curl -s -m 10 -o "$dir/answer" -D "$dir/headers" -X POST "$url" -H 'Content-Type: application/json' -d "$body"
done
[[ ${PEER:-gateway} == hyper ]] || grep -qi '^x-cache: HIT' "$dir/headers" || { echo "callgrind.sh: the warm-up did not end in a HIT:" >&2; cat "$dir/headers" "$dir/answer" >&2; exit 1; }

printf 'wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\n' \
    "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$body")" >"$dir/post.lua"
callgrind_control --zero "$gateway" >/dev/null
wrk -t1 -c4 -d"${duration}s" --timeout 10s -s "$dir/post.lua" "$url" >"$dir/wrk.out"
callgrind_control --dump "$gateway" >/dev/null
requests=$(awk '/requests in/ {print $1}' "$dir/wrk.out")
grep -q "Non-2xx" "$dir/wrk.out" && { echo "callgrind.sh: some answers were not 200:" >&2; cat "$dir/wrk.out" >&2; exit 1; }
out=$(ls -t "$dir"/callgrind.out* | head -1)
instructions=$(awk '/^(summary|totals):/ {print $2; exit}' "$out")
echo "binary $bin: $requests requests, $instructions instructions, $((instructions / requests)) per request"
if [[ -n ${CALLGRIND_KEEP:-} ]]; then cp "$out" "$CALLGRIND_KEEP"; echo "profile kept in $CALLGRIND_KEEP (callgrind_annotate $CALLGRIND_KEEP)"; fi
