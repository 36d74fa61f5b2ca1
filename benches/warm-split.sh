#!/usr/bin/env bash
# Where a cache hit's CPU goes, the gateway beside the parsing hyper server (warm's
# "hyper, parses + serialises"): user and system time per request (from /proc), and, when
# perf can attach, system calls and context switches per request. Runs the release gateway
# in front of the simulator and the baseline, warms one 5-MsgSeq query, and measures each
# with wrk (-t2 -c64, 5 s), alternating, for ROUNDS rounds. Needs wrk (Debian package);
# perf (linux-perf) is optional.
#     benches/warm-split.sh [ROUNDS]
#     PIN=1 benches/warm-split.sh    # both servers on CPU 0, wrk on CPU 1 (taskset): no
#                                    # cache line moves between the servers' threads' cores
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
rounds=${1:-3}
command -v wrk >/dev/null || { echo "warm-split: wrk is not installed (apt-get install wrk)"; exit 1; }
cargo build --release --bins >/dev/null
server_pin=() wrk_pin=()
if [[ -n ${PIN:-} ]]; then server_pin=(taskset -c 0) wrk_pin=(taskset -c 1); fi
dir=$(mktemp -d)
start_simulator
port=$(free_port)
write_gateway_config "$dir/gateway.toml" "$port"
RUST_LOG=warn "${server_pin[@]}" "$bench_bin" serve --config "$dir/gateway.toml" >/dev/null 2>&1 &
gw=$!
"${server_pin[@]}" target/release/receipt-loadgen --serve-baseline 0 --body-bytes 327 --baseline-kind parsing >"$dir/baseline.addr" &
hy=$!
trap 'kill $sim $gw $hy 2>/dev/null; rm -rf "$dir"' EXIT
write_post_lua "$dir/post.lua"
path="$bench_path?sdkappid=1400000000"
wait_for_http "http://127.0.0.1:$port/" || true
for _ in $(seq 50); do [[ -s $dir/baseline.addr ]] && break; sleep 0.1; done
baseline=$(head -1 "$dir/baseline.addr")
curl -s -o /dev/null -XPOST "http://127.0.0.1:$port$path" -d "$bench_body"
perf_ok=
if command -v perf >/dev/null && perf stat -e context-switches -p "$gw" -- sleep 0.1 >/dev/null 2>&1; then perf_ok=1; fi
ticks=$(getconf CLK_TCK)
for round in $(seq "$rounds"); do
  for who in gateway hyper; do
    if [[ $who == gateway ]]; then pid=$gw url="http://127.0.0.1:$port$path"; else pid=$hy url="http://$baseline$path"; fi
    read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    if [[ -n $perf_ok ]]; then
      perf stat -x, -e context-switches,raw_syscalls:sys_enter -p "$pid" -o "$dir/perf" -- sleep 4.5 &
      perf_pid=$!
    fi
    out=$("${wrk_pin[@]}" wrk -t2 -c64 -d5s -s "$dir/post.lua" "$url")
    [[ -n $perf_ok ]] && { wait "$perf_pid" || true; }
    read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    n=$(echo "$out" | awk '/requests in/{print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    python3 - "$round" "$who" "$rps" "$n" "$u0" "$u1" "$s0" "$s1" "$ticks" "${perf_ok:+$dir/perf}" <<'EOF'
import sys
rnd, who, rps, n, u0, u1, s0, s1, ticks, perf = sys.argv[1:]
n, ticks, rps = int(n), int(ticks), float(rps)
user = (int(u1) - int(u0)) / ticks * 1e6 / n
system = (int(s1) - int(s0)) / ticks * 1e6 / n
line = f"round {rnd} {who:8} {rps:9.0f} req/s  user {user:5.1f}  sys {system:5.1f} us/req"
if perf:
    counts = {}
    for row in open(perf):
        cols = row.strip().split(",")
        if len(cols) > 2 and cols[0][:1].isdigit():
            counts[cols[2].split(":")[-1]] = float(cols[0])
    # perf counted 4.5 s of wrk's 5: per request at wrk's rate.
    line += "  " + "  ".join(f"{k} {v / (rps * 4.5):.2f}/req" for k, v in counts.items())
print(line)
EOF
  done
done
