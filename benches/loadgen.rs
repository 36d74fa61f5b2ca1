//! `receipt-loadgen`: the benchmark of issue 3.
//!
//! It measures the gateway as it runs in production — the release binary, in its own
//! process, over loopback HTTP/1.1 keep-alive — in front of the Tencent simulator, which
//! runs in this process so its call ledger can be read directly.
//!
//! For each scenario it starts a fresh simulator and gateway (a generated config in a
//! temporary directory), drives a request mix (groups, MsgSeqs per request, uniform or
//! Zipf over groups) either as an open loop at a fixed rate — latency counted from each
//! request's *scheduled* send time, so a stall cannot hide (no coordinated omission) — or
//! as a closed loop as fast as `--connections` workers go, and reports:
//!
//! - from the client: requests/s answered, counts by HTTP status and `X-Cache`, latency
//!   p50/p99/p99.9 (exact, every sample kept), hung and late requests;
//! - from the simulator: upstream calls/s, the most and fewest calls in any rolling
//!   second, 60007 answers, distinct MsgSeqs per call;
//! - from the gateway: the hit/coalesced/fetched/stale/failed shares of served items
//!   (`/metrics`, counted over the measured interval) and its resident memory (`/proc`).
//!
//! With `--replicas N` (N > 1) the benchmark also starts a private `redis-server` on a Unix
//! socket, and each scenario that takes replicas (under, over, cold, custom) runs twice:
//! against one gateway as above, then against N gateways sharing that Redis
//! (`budget.backend` and `fleet.backend` = "redis"), requests round-robin over them; the two
//! are printed side by side and each gets its verdict. The `cold` scenario measures the
//! upstream calls of the first second from an empty cache.
//!
//! The `clients` scenario (issue 8) puts two callers, each with its own `x-client-id`, on
//! one budget with every request for an uncached group: first two floods with weights
//! 3 : 1, judged on the split of upstream calls per 10 s window (the gateway's
//! `receipt_gateway_budget_calls_total`), then an interactive caller at a tenth of the
//! budget beside a bulk flood, judged on the interactive caller's 429s and p99 latency.
//!
//! The `callbacks` scenario (issue 9) runs the same read load over a fixed working set
//! twice while the simulator's members read those messages at a steady pace, each read
//! sent as a signed callback: first with a TTL only (the callbacks go to a sink), then
//! with the callbacks reaching the gateway's `/callback`. It prints upstream calls/s and
//! staleness (from a read's application in the simulator to the first answer showing it,
//! p50/p99) for both, then drives `/callback` directly at 5,000 callbacks/s (and with
//! `wrk`, when installed) for its throughput, latency and CPU time per callback.
//!
//! The `warm` scenario also runs a trivial hyper server (this binary again, in its own
//! process) that answers a fixed body of the gateway's answer size: the speed-of-light
//! baseline under the same load. Each scenario ends with a verdict against issue 3's
//! targets; missed targets are reported, not an error (the exit status is non-zero only
//! when the benchmark could not be set up).
//!
//! Run: `cargo build --release --bins && target/release/receipt-loadgen --scenario all`
//! (a fleet of three: `... --scenario all --replicas 3`)

#![forbid(unsafe_code)]

#[path = "loadgen/baseline.rs"]
mod baseline;
#[path = "loadgen/cli.rs"]
mod cli;
#[path = "loadgen/client.rs"]
mod client;
#[path = "loadgen/drive.rs"]
mod drive;
#[path = "loadgen/gateway.rs"]
mod gateway;
#[path = "loadgen/mix.rs"]
mod mix;
#[path = "loadgen/record.rs"]
mod record;
#[path = "loadgen/redis_server.rs"]
mod redis_server;
#[path = "loadgen/scenarios.rs"]
mod scenarios;
#[path = "loadgen/upstream.rs"]
mod upstream;

use std::process::ExitCode;

use clap::Parser;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    if let Some(port) = args.serve_baseline {
        return baseline::serve_forever(port, args.body_bytes);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("receipt-loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(scenarios::run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("receipt-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
