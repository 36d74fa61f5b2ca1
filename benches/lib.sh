# What the benches/warm-*.sh benchmarks share; sourced from the repository's root, not run.
# Each of them runs the release gateway in front of the simulator and measures one cached
# 5-MsgSeq POST with wrk.

bench_bin=target/release/receipt-gateway
bench_path=/v4/group_open_http_svc/get_group_msg_receipt
bench_body='{"GroupId":"g-warm","MsgSeqList":[{"MsgSeq":1},{"MsgSeq":2},{"MsgSeq":3},{"MsgSeq":4},{"MsgSeq":5}]}'

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts the simulator on a free port: sets sim_port and sim (its pid).
start_simulator() {
  sim_port=$(free_port)
  export TENCENT_IM_SECRET_KEY=warm-benchmark-secret-key
  "$bench_bin" simulate --listen "127.0.0.1:$sim_port" --app 1400000000:administrator >/dev/null 2>&1 &
  sim=$!
}

# write_gateway_config FILE PORT [MORE]: a gateway on PORT in front of the simulator, with
# a long TTL (every measured request a hit) and MORE (TOML) appended.
write_gateway_config() {
  cat >"$1" <<CONFIG
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:0"
# The table's statuses, so that wrk's and curl's non-2xx see the gateway's errors (by
# default they are sent as HTTP 200, as Tencent sends its own: docs/design.md#errors).
error_status = "http"
[cache]
ttl_ms = 600000
[[apps]]
sdkappid = 1400000000
region = "singapore"
identifier = "administrator"
endpoint = "http://127.0.0.1:$sim_port"
${3:-}
CONFIG
}

# write_post_lua FILE [NAME VALUE]...: wrk's script posting bench_body with these headers.
write_post_lua() {
  local file=$1
  shift
  printf 'wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\n' "'$bench_body'" >"$file"
  while (($# >= 2)); do
    printf 'wrk.headers["%s"] = "%s"\n' "$1" "$2" >>"$file"
    shift 2
  done
}

# Waits up to 5 s for URL to answer.
wait_for_http() {
  for _ in $(seq 50); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
  return 1
}

# A process's utime + stime so far, in clock ticks.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# cpu_us_per_request TICKS_BEFORE TICKS_AFTER REQUESTS
cpu_us_per_request() { python3 -c "print(round(($2-$1)/$(getconf CLK_TCK)*1e6/$3, 2))"; }
