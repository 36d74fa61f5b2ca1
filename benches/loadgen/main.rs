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
//! The `warm` scenario (issue 10) puts the gateway's hit path beside the servers a team
//! would compare it with, all in front of the same simulator: nginx as a caching proxy
//! (`proxy_cache`, started from a generated config when nginx is installed, or installed
//! with apt-get when this runs as root), and two trivial hyper servers (this binary again,
//! in their own processes) — one that parses each request and serialises its answer, one
//! that answers a fixed body of the same size. It measures them in alternating rounds
//! with `wrk` and with its own client (a connection per worker, bodies generated before
//! the run, on its own runtime threads), reports each server's CPU time per request, says
//! when its own client is the bottleneck instead of printing ratios it cannot trust, and
//! compares request logging at `info` with nginx's `access_log`. `--peer` runs one server
//! alone.
//!
//! Each scenario ends with a verdict against its issue's targets; missed targets are
//! reported, not an error (the exit status is non-zero only when the benchmark could not
//! be set up).
//!
//! Run: `cargo build --release --bins && target/release/receipt-loadgen --scenario all`
//! (the warm path beside nginx: `... --scenario warm`, as root to install nginx and wrk)
//! (a fleet of three: `... --scenario all --replicas 3`)

#![forbid(unsafe_code)]

mod baseline;
mod cli;
mod client;
mod conn;
mod drive;
mod gateway;
mod latency_proxy;
mod mix;
mod nginx;
mod record;
mod redis_server;
mod scenarios;
mod tools;
mod upstream;
mod wrk;

use std::process::ExitCode;

use clap::Parser;

/// The gateway's allocator, for the same reasons (many small buffers a request, freed on
/// other threads): the client allocates per request, and the hyper baselines (this binary
/// too) must not be slowed by an allocator the gateway does not use.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    if let Some(port) = args.serve_baseline {
        return baseline::serve_forever(port, args.baseline_kind, args.body_bytes);
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
