//! The `warm` scenario (issues 3 and 10): the gateway's hit path beside what a team would
//! otherwise run, measured so that neither the client nor the order of runs decides.
//!
//! One simulator; every server in front of it started once and kept running
//! ([`peers`]): the gateway (its cache filled), nginx as a caching proxy (its cache filled
//! with every request body of the run), a trivial hyper server that parses each request
//! and serialises the simulator's answer, one that answers a fixed body of the same size,
//! and for the logging comparison a second gateway logging every request at `info` (JSON
//! to a file) and a second nginx with `access_log` on. Each one's answer is checked before
//! anything is measured: 200, `OK`, five items, as large as the gateway's.
//!
//! Then, for `--rounds` rounds, every server in turn (A B C … A B C …), each measured
//! twice: with wrk (`-t2 -c64 -d4s`, one fixed 5-MsgSeq POST: the targets' figures) and
//! with this benchmark's own client ([`conn`](crate::conn): a connection per worker,
//! bodies generated before the run, its own runtime threads), for requests/s, latency
//! and the server's CPU time per request (`/proc/<pid>/stat`, utime + stime, over the
//! measured interval; nginx's summed over its workers). A CPU figure cannot be inflated by
//! a slow client, so it stands beside every rate.
//!
//! Before the rounds, the own client is tested for being the bottleneck: the fixed-body
//! server is driven with the configured connections and threads, with twice the
//! connections and with one thread more. If either is faster than the configured
//! client by more than [`CLIENT_BOUND_TOLERANCE`], the own client's ratios are not
//! printed ([`client_bound`]).
//!
//! After the rounds: an open loop at half of the gateway's highest rate just measured,
//! judged on its p99 (and the fixed-body server at the same rate, for what this client
//! and machine allow). The medians of the rounds make the side-by-side table, the ratios
//! and the verdict against issue 10's targets.
//!
//! With `--peer NAME` one server is measured alone (no ratios, no verdict but that its
//! answers are what they should be).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{Check, Verdict, ratio};
use crate::Result;
use crate::cli::{PeerName, Settings};
use crate::client::XCache;
use crate::conn::{self, ClientRuntime};
use crate::drive::Schedule;
use crate::record::{Percentiles, Recorder, ms};
use crate::tools;
use crate::wrk::{self, WrkResult};

#[path = "warm_peers.rs"]
mod peers;

use peers::{Peers, Running};

/// wrk's threads (the targets are set with `wrk -t2`).
const WRK_THREADS: usize = 2;
/// Each round's measured seconds, for wrk and for the own client alike (`-d4s`).
const ROUND: Duration = Duration::from_secs(4);
/// The own client's warm-up before each round's measurement (connections opened, caches
/// and branch predictors warm); wrk has none, its connections open within milliseconds.
const ROUND_WARMUP: Duration = Duration::from_secs(1);
/// The client-bound test's runs: warm-up and measured.
const CHECK_WARMUP: Duration = Duration::from_secs(1);
const CHECK_MEASURED: Duration = Duration::from_secs(3);
/// A variant of the client that makes the fixed-body server faster by more than this
/// says the configured client was the bottleneck (below it: noise between runs).
const CLIENT_BOUND_TOLERANCE: f64 = 0.05;

/// Issue 10's targets.
const VS_NGINX: f64 = 1.0;
const VS_PARSING_HYPER: f64 = 0.85;
const P99_AT_HALF: Duration = Duration::from_millis(2);
const LOGGING_VS_NGINX: f64 = 0.8;

/// The servers of a run, in the order each round measures them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Server {
    Gateway,
    Nginx,
    Hyper,
    HyperFixed,
    /// The gateway with `RUST_LOG=info`, JSON lines to a file.
    GatewayLogging,
    /// nginx with `access_log` on, to a file.
    NginxLogging,
}

impl Server {
    fn label(self) -> &'static str {
        match self {
            Server::Gateway => "receipt-gateway, warm cache",
            Server::Nginx => "nginx proxy_cache hit",
            Server::Hyper => "hyper, parses + serialises",
            Server::HyperFixed => "hyper, fixed body",
            Server::GatewayLogging => "receipt-gateway, info log (JSON file)",
            Server::NginxLogging => "nginx proxy_cache, access_log on",
        }
    }

    /// The `X-Cache` every answer must carry: HIT from a cache, none from the hyper
    /// servers.
    fn expected_x_cache(self) -> XCache {
        match self {
            Server::Hyper | Server::HyperFixed => XCache::Absent,
            _ => XCache::Hit,
        }
    }
}

/// The servers `--peer` asks for: one alone, or all of them.
fn servers(peer: Option<PeerName>) -> Vec<Server> {
    match peer {
        None => vec![
            Server::Gateway,
            Server::Nginx,
            Server::Hyper,
            Server::HyperFixed,
            Server::GatewayLogging,
            Server::NginxLogging,
        ],
        Some(PeerName::Gateway) => vec![Server::Gateway],
        Some(PeerName::Nginx) => vec![Server::Nginx],
        Some(PeerName::Hyper) => vec![Server::Hyper],
        Some(PeerName::HyperFixed) => vec![Server::HyperFixed],
    }
}

pub(super) fn print_load(s: &Settings) {
    let who = s.warm.peer.map_or("every server".to_owned(), |p| format!("--peer {p:?} alone"));
    println!(
        "load: {who}, {} rounds; each round wrk -t{WRK_THREADS} -c{c} -d{}s (one 5-MsgSeq POST) and this client \
         ({c} connections on {} threads, {} request bodies, {:.0} s warm-up + {} s); then an open loop at half the \
         gateway's rate, {:.0} s warm-up + {:.0} s",
        s.warm.rounds,
        ROUND.as_secs(),
        s.warm.client_threads,
        peers::BODY_POOL,
        ROUND_WARMUP.as_secs_f64(),
        ROUND.as_secs(),
        s.load.warmup.as_secs_f64(),
        s.load.duration.as_secs_f64(),
        c = s.load.connections,
    );
}

pub(super) async fn warm(bin: &Path, s: &Settings) -> Result<Verdict> {
    let wanted = servers(s.warm.peer);
    let wrk = match tools::find_or_install(tools::WRK) {
        Ok(path) => Some(path),
        Err(why) => {
            println!("wrk: skipped, {why}; the rounds use this client alone and the targets go unjudged");
            None
        }
    };
    let peers = Peers::start(bin, s, &wanted).await?;
    let client = ClientRuntime::new(s.warm.client_threads)?;
    let bench = Bench { peers: &peers, client: &client, wrk: wrk.as_deref(), s };

    let bound = match peers.get(Server::HyperFixed) {
        Some(fixed) if s.warm.peer.is_none() => Some(bench.client_bound_test(fixed).await?),
        _ => None,
    };
    let mut samples = Samples::default();
    for round in 1..=s.warm.rounds {
        println!("\n-- round {round} of {}", s.warm.rounds);
        for (server, running) in peers.running() {
            let (wrk, own) = bench.round(server, running).await?;
            println!("{}", round_line(server, wrk.as_ref(), &own));
            samples.push(server, wrk, own);
        }
    }
    let half = match peers.get(Server::Gateway) {
        Some(gateway) => Some(bench.half_rate(gateway, &samples).await?),
        None => None,
    };
    let verdict = report(&samples, bound.as_ref(), half.as_ref(), &bench);
    peers.print_log_growth();
    peers.stop().await;
    Ok(verdict)
}

/// What every measurement of the run shares.
struct Bench<'a> {
    peers: &'a Peers,
    client: &'a ClientRuntime,
    wrk: Option<&'a Path>,
    s: &'a Settings,
}

/// How the own client drives a server.
#[derive(Clone, Copy)]
struct Drive<'a> {
    client: &'a ClientRuntime,
    connections: usize,
    /// An open loop at this rate; `None` is a closed loop.
    rate: Option<f64>,
    warmup: Duration,
    measured: Duration,
}

impl Drive<'_> {
    fn closed(client: &ClientRuntime, connections: usize, warmup: Duration, measured: Duration) -> Drive<'_> {
        Drive { client, connections, rate: None, warmup, measured }
    }
}

/// One wrk run: its figures and the server's CPU time per request.
struct WrkSample {
    result: WrkResult,
    cpu_us: Option<f64>,
}

/// One run of the own client.
struct OwnSample {
    recorder: Recorder,
    measured: Duration,
    cpu_us: Option<f64>,
    latency: Option<Percentiles>,
    /// How late the open loop's requests went out (p99).
    queued_p99: Option<Duration>,
}

impl OwnSample {
    fn per_second(&self) -> f64 {
        self.recorder.answered() as f64 / self.measured.as_secs_f64()
    }
}

impl Bench<'_> {
    /// One server's turn in a round: wrk, then the own client.
    async fn round(&self, server: Server, running: &Running) -> Result<(Option<WrkSample>, OwnSample)> {
        let wrk = match self.wrk {
            Some(bin) => match self.wrk_run(bin, running).await {
                Ok(sample) => Some(sample),
                Err(e) => {
                    println!("  wrk against {}: {e}", server.label());
                    None
                }
            },
            None => None,
        };
        let drive = Drive::closed(self.client, self.s.load.connections, ROUND_WARMUP, ROUND);
        let own = self.own(running, drive).await?;
        Ok((wrk, own))
    }

    async fn wrk_run(&self, bin: &Path, running: &Running) -> std::result::Result<WrkSample, String> {
        let url = format!("http://{}{}", running.addr(), self.peers.path_and_query());
        let run = wrk::Run {
            threads: WRK_THREADS,
            connections: self.s.load.connections,
            seconds: ROUND.as_secs(),
            script: self.peers.wrk_script(),
            url: &url,
        };
        let before = running.cpu_time();
        let result = wrk::run(bin, &run).await?;
        let after = running.cpu_time();
        let cpu_us = cpu_per_request(before.ok(), after.ok(), result.requests);
        Ok(WrkSample { result, cpu_us })
    }

    /// The own client against `running` as `drive` says, with the server's CPU time over
    /// the measured interval.
    async fn own(&self, running: &Running, drive: Drive<'_>) -> Result<OwnSample> {
        let Drive { client, connections, rate, warmup, measured } = drive;
        let requests = self.peers.requests_to(running.addr())?;
        let schedule = Schedule::starting_now(warmup, measured);
        let requests = Arc::new(requests);
        let work = async {
            match rate {
                None => conn::closed_loop(client, requests, connections, schedule).await,
                Some(rate) => conn::open_loop(client, requests, connections, rate, schedule).await,
            }
        };
        let cpu = async {
            tokio::time::sleep_until(schedule.measure_from.into()).await;
            let before = running.cpu_time();
            tokio::time::sleep_until(schedule.end.into()).await;
            (before, running.cpu_time())
        };
        let (mut recorder, (before, after)) = tokio::join!(work, cpu);
        let cpu_us = cpu_per_request(before.ok(), after.ok(), recorder.answered());
        let (latency, queued_p99) = (recorder.percentiles(), recorder.queued_p99());
        Ok(OwnSample { recorder, measured: schedule.measured(), cpu_us, latency, queued_p99 })
    }

    /// The fixed-body server with the configured client, twice the connections, one
    /// thread more, and the configured client again.
    async fn client_bound_test(&self, fixed: &Running) -> Result<ClientBound> {
        let (c, t) = (self.s.load.connections, self.client.threads());
        println!(
            "\n-- is this client the bottleneck? The fixed-body server with this client as configured, with twice \
             the connections, with one thread more, and as configured again; {:.0} s warm-up + {:.0} s each",
            CHECK_WARMUP.as_secs_f64(),
            CHECK_MEASURED.as_secs_f64()
        );
        let more_threads = ClientRuntime::new(t + 1)?;
        let runs: [(String, &ClientRuntime, usize); 4] = [
            (format!("{c} connections, {t} threads"), self.client, c),
            (format!("{} connections, {t} threads", 2 * c), self.client, 2 * c),
            (format!("{c} connections, {} threads", t + 1), &more_threads, c),
            (format!("{c} connections, {t} threads again"), self.client, c),
        ];
        let mut rates = Vec::new();
        for (label, client, connections) in runs {
            let run = self.own(fixed, Drive::closed(client, connections, CHECK_WARMUP, CHECK_MEASURED)).await?;
            println!("{label:<32} {:>9.0} req/s, server CPU {}", run.per_second(), us(run.cpu_us));
            rates.push((label, run.per_second()));
        }
        let normal = [rates[0].1, rates[3].1];
        let verdict = client_bound(&normal, &rates[1..3], CLIENT_BOUND_TOLERANCE);
        match &verdict {
            Some(why) => println!("=> client-bound: {why}; this client's ratios are not printed"),
            None => println!(
                "=> not client-bound: neither variant is more than {:.0} % faster",
                CLIENT_BOUND_TOLERANCE * 100.0
            ),
        }
        Ok(ClientBound { why: verdict })
    }

    /// An open loop at half the gateway's highest median rate, then the fixed-body server
    /// at the same rate.
    async fn half_rate(&self, gateway: &Running, samples: &Samples) -> Result<HalfRate> {
        let max = samples
            .median_wrk(Server::Gateway)
            .into_iter()
            .chain(samples.median_own(Server::Gateway))
            .fold(0.0, f64::max);
        let rate = (max / 2.0).max(1.0);
        let (warmup, measured) = (self.s.load.warmup, self.s.load.duration);
        println!(
            "\n-- open loop at half the gateway's highest rate ({rate:.0} req/s of {max:.0}), {} connections, \
             {:.0} s warm-up + {:.0} s",
            self.s.load.connections,
            warmup.as_secs_f64(),
            measured.as_secs_f64()
        );
        let drive = Drive { rate: Some(rate), ..Drive::closed(self.client, self.s.load.connections, warmup, measured) };
        let run = self.own(gateway, drive).await?;
        println!("{}", open_line(Server::Gateway, &run));
        let mut fixed_p99 = None;
        if let Some(fixed) = self.peers.get(Server::HyperFixed) {
            let base = self.own(fixed, drive).await?;
            println!("{}", open_line(Server::HyperFixed, &base));
            fixed_p99 = base.latency.as_ref().map(|p| p.p99);
        }
        let p99 = run.latency.as_ref().map(|p| p.p99);
        Ok(HalfRate { rate, p99, fixed_p99, all_hits: expected_answers(Server::Gateway, &run.recorder) })
    }
}

/// What the client-bound test found: why the own client is the bottleneck, if it is.
struct ClientBound {
    why: Option<String>,
}

struct HalfRate {
    rate: f64,
    p99: Option<Duration>,
    fixed_p99: Option<Duration>,
    all_hits: bool,
}

/// Whether a variant of the client (more connections, more threads) made the server
/// faster than the best of the configured client's runs by more than `tolerance`: then
/// the configured client, not the server, set the pace.
fn client_bound(normal: &[f64], variants: &[(String, f64)], tolerance: f64) -> Option<String> {
    let best = normal.iter().copied().fold(0.0, f64::max);
    let faster: Vec<String> = variants
        .iter()
        .filter(|(_, rate)| *rate > best * (1.0 + tolerance))
        .map(|(label, rate)| {
            format!("{label} reached {rate:.0} req/s, {:+.1} % over {best:.0}", (rate / best - 1.0) * 100.0)
        })
        .collect();
    (!faster.is_empty()).then(|| faster.join("; "))
}

/// `cpu` per request in microseconds, when both readings are there.
fn cpu_per_request(before: Option<Duration>, after: Option<Duration>, requests: u64) -> Option<f64> {
    let cpu = after?.checked_sub(before?)?;
    (requests > 0).then(|| cpu.as_secs_f64() * 1e6 / requests as f64)
}

/// Every answer 200 with the server's `X-Cache`, none failed.
fn expected_answers(server: Server, r: &Recorder) -> bool {
    r.answered() > 0
        && r.failures() == 0
        && r.status(200) == r.answered()
        && r.x_cache.keys().all(|&x| x == server.expected_x_cache())
}

// ---------------------------------------------------------------------------------------
// The rounds' figures
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Samples {
    by_server: Vec<(Server, Vec<WrkSample>, Vec<OwnSample>)>,
}

impl Samples {
    fn push(&mut self, server: Server, wrk: Option<WrkSample>, own: OwnSample) {
        let at = match self.by_server.iter().position(|(s, _, _)| *s == server) {
            Some(at) => at,
            None => {
                self.by_server.push((server, Vec::new(), Vec::new()));
                self.by_server.len() - 1
            }
        };
        let (_, wrks, owns) = &mut self.by_server[at];
        wrks.extend(wrk);
        owns.push(own);
    }

    fn of(&self, server: Server) -> Option<(&[WrkSample], &[OwnSample])> {
        self.by_server.iter().find(|(s, _, _)| *s == server).map(|(_, w, o)| (w.as_slice(), o.as_slice()))
    }

    fn median_wrk(&self, server: Server) -> Option<f64> {
        median(self.of(server)?.0.iter().map(|w| w.result.per_second()).collect())
    }

    fn median_own(&self, server: Server) -> Option<f64> {
        median(self.of(server)?.1.iter().map(OwnSample::per_second).collect())
    }

    /// Every wrk and own-client answer of `server` as it should be.
    fn answers_ok(&self, server: Server) -> bool {
        self.of(server).is_some_and(|(wrks, owns)| {
            wrks.iter().all(|w| w.result.non_2xx == 0 && w.result.socket_errors == 0)
                && owns.iter().all(|o| expected_answers(server, &o.recorder))
        })
    }
}

/// The median (the mean of the middle two for an even count); `None` for no values.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

fn us(cpu_us: Option<f64>) -> String {
    cpu_us.map_or_else(|| "-".to_owned(), |us| format!("{us:.1} us/req"))
}

fn round_line(server: Server, wrk: Option<&WrkSample>, own: &OwnSample) -> String {
    let mut line = format!("{:<38}", server.label());
    match wrk {
        Some(w) => {
            let r = &w.result;
            let _ = write!(
                line,
                " wrk {:>7.0} req/s, p99 {}, CPU {}{}",
                r.per_second(),
                ms(r.p99),
                us(w.cpu_us),
                if r.non_2xx + r.socket_errors > 0 {
                    format!(" (non-2xx {}, socket errors {})", r.non_2xx, r.socket_errors)
                } else {
                    String::new()
                }
            );
        }
        None => line.push_str(" wrk -"),
    }
    let p99 = own.latency.as_ref().map_or_else(|| "-".to_owned(), |p| ms(p.p99));
    let _ = write!(line, " | client {:>7.0} req/s, p99 {p99}, CPU {}", own.per_second(), us(own.cpu_us));
    if !expected_answers(server, &own.recorder) {
        let _ = write!(line, " (answers: {})", super::status_line(&own.recorder));
    }
    line
}

fn open_line(server: Server, run: &OwnSample) -> String {
    let answered = run.per_second();
    let p = run.latency.as_ref();
    let queued = run.queued_p99;
    let mut line = format!(
        "{:<38} {answered:>7.0} req/s answered, p50 {}, p99 {}, p99.9 {}, CPU {}",
        server.label(),
        p.map_or("-".into(), |p| ms(p.p50)),
        p.map_or("-".into(), |p| ms(p.p99)),
        p.map_or("-".into(), |p| ms(p.p999)),
        us(run.cpu_us)
    );
    if let Some(q) = queued.filter(|q| *q > Duration::from_millis(1)) {
        let _ = write!(
            line,
            " (p99 of requests sent up to {} late: every connection busy, or this client short of CPU)",
            ms(q)
        );
    }
    line
}

// ---------------------------------------------------------------------------------------
// The table, the ratios and the verdict
// ---------------------------------------------------------------------------------------

fn report(samples: &Samples, bound: Option<&ClientBound>, half: Option<&HalfRate>, bench: &Bench<'_>) -> Verdict {
    let s = bench.s;
    println!(
        "\n-- side by side: medians of {} rounds (wrk -t{WRK_THREADS} -c{c} -d{}s; this client: {c} connections on \
         {} threads); CPU = the server's utime + stime per request",
        s.warm.rounds,
        ROUND.as_secs(),
        bench.client.threads(),
        c = s.load.connections
    );
    println!(
        "{:<38} {:>10} {:>12} {:>10} {:>12} {:>12} {:>10}",
        "server", "wrk req/s", "CPU us/req", "wrk p99", "client req/s", "CPU us/req", "client p99"
    );
    for (server, wrks, owns) in &samples.by_server {
        let wrk_cpu = median(wrks.iter().filter_map(|w| w.cpu_us).collect());
        let own_cpu = median(owns.iter().filter_map(|o| o.cpu_us).collect());
        let wrk_p99 = median(wrks.iter().map(|w| w.result.p99.as_secs_f64()).collect());
        let own_p99 = median(owns.iter().filter_map(|o| o.latency.as_ref()).map(|p| p.p99.as_secs_f64()).collect());
        let num = |v: Option<f64>, digits: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"));
        let lat = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| ms(Duration::from_secs_f64(v)));
        println!(
            "{:<38} {:>10} {:>12} {:>10} {:>12} {:>12} {:>10}",
            server.label(),
            num(samples.median_wrk(*server), 0),
            num(wrk_cpu, 1),
            lat(wrk_p99),
            num(samples.median_own(*server), 0),
            num(own_cpu, 1),
            lat(own_p99)
        );
    }
    if let (Some(own), Some(wrk)) = (samples.median_own(Server::HyperFixed), samples.median_wrk(Server::HyperFixed)) {
        println!(
            "this client against the fixed-body server: {:.0} % of wrk's rate (wrk sets the targets' figures; this \
             client's CPU per request is its own cost on the shared cores)",
            100.0 * own / wrk
        );
    }
    if let Some(half) = half {
        println!(
            "p99 at half the gateway's rate ({:.0} req/s, this client, open loop): {} (fixed-body hyper at the same rate: \
             {})",
            half.rate,
            half.p99.map_or("-".into(), ms),
            half.fixed_p99.map_or("-".into(), ms)
        );
    }
    if s.warm.peer.is_some() {
        let only: Vec<Check> = samples
            .by_server
            .iter()
            .map(|(server, _, _)| {
                Check::new(
                    format!("{}: every answer 200, X-Cache {}", server.label(), server.expected_x_cache().label()),
                    answers_summary(samples, *server),
                    samples.answers_ok(*server),
                )
            })
            .collect();
        return Verdict::new(only);
    }
    let trusted = bound.is_some_and(|b| b.why.is_none());
    print_ratios("wrk", |server| samples.median_wrk(server), true);
    print_ratios("this client", |server| samples.median_own(server), trusted);
    print_cpu_ratios(samples);
    verdict(samples, bound, half)
}

/// The ratio lines for one client; refused when the client cannot be trusted.
fn print_ratios(client: &str, rate: impl Fn(Server) -> Option<f64>, trusted: bool) {
    if !trusted {
        println!("ratios ({client}): not printed, the client is the bottleneck (see the test above)");
        return;
    }
    let pair = |a: Server, b: Server| match (rate(a), rate(b)) {
        (Some(a), Some(b)) => ratio(a, b),
        _ => "-".to_owned(),
    };
    println!(
        "ratios ({client}): gateway / nginx {} (target >= {VS_NGINX:.1}), gateway / parsing hyper {} (>= \
         {VS_PARSING_HYPER}), gateway / fixed-body hyper {}; with request logging: gateway info / nginx access_log {} \
         (>= {LOGGING_VS_NGINX})",
        pair(Server::Gateway, Server::Nginx),
        pair(Server::Gateway, Server::Hyper),
        pair(Server::Gateway, Server::HyperFixed),
        pair(Server::GatewayLogging, Server::NginxLogging)
    );
}

/// CPU per request, gateway over nginx (wrk runs): the figure a slow client cannot move.
fn print_cpu_ratios(samples: &Samples) {
    let cpu = |server: Server| {
        let (wrks, _) = samples.of(server)?;
        median(wrks.iter().filter_map(|w| w.cpu_us).collect())
    };
    let pair = |a: Server, b: Server| match (cpu(a), cpu(b)) {
        (Some(a), Some(b)) => format!("{a:.1} / {b:.1} us = {}", ratio(a, b)),
        _ => "-".to_owned(),
    };
    println!(
        "CPU per request (wrk): gateway / nginx {}; gateway / parsing hyper {}; with logging {}",
        pair(Server::Gateway, Server::Nginx),
        pair(Server::Gateway, Server::Hyper),
        pair(Server::GatewayLogging, Server::NginxLogging)
    );
}

fn answers_summary(samples: &Samples, server: Server) -> String {
    let Some((wrks, owns)) = samples.of(server) else { return "-".into() };
    let non_2xx: u64 = wrks.iter().map(|w| w.result.non_2xx + w.result.socket_errors).sum();
    let answered: u64 = owns.iter().map(|o| o.recorder.answered()).sum();
    let expected: u64 =
        owns.iter().map(|o| o.recorder.x_cache.get(&server.expected_x_cache()).copied().unwrap_or(0)).sum();
    let failures: u64 = owns.iter().map(|o| o.recorder.failures()).sum();
    format!(
        "wrk non-2xx/errors {non_2xx}; client {expected} of {answered} X-Cache {}, {failures} not 200 in time",
        server.expected_x_cache().label()
    )
}

/// Issue 10's targets, judged on wrk's medians (the targets' client), plus the premises:
/// every answer as it should be, and this client not the bottleneck.
fn verdict(samples: &Samples, bound: Option<&ClientBound>, half: Option<&HalfRate>) -> Verdict {
    let wrk_ratio = |a: Server, b: Server| Some(samples.median_wrk(a)? / samples.median_wrk(b)?);
    let target = |what: String, r: Option<f64>, at_least: f64| {
        Check::new(
            what,
            r.map_or_else(|| "- (no figures: wrk or a server missing)".to_owned(), |r| format!("{r:.2}")),
            r.is_some_and(|r| r >= at_least),
        )
    };
    let mut checks = vec![
        target(
            format!("wrk: gateway >= {VS_NGINX:.1} x nginx proxy_cache"),
            wrk_ratio(Server::Gateway, Server::Nginx),
            VS_NGINX,
        ),
        target(
            format!("wrk: gateway >= {VS_PARSING_HYPER} x parsing hyper"),
            wrk_ratio(Server::Gateway, Server::Hyper),
            VS_PARSING_HYPER,
        ),
    ];
    let (p99, rate) = half.map_or((None, 0.0), |h| (h.p99, h.rate));
    checks.push(Check::new(
        format!("p99 < {} ms at half the gateway's rate ({rate:.0} req/s)", P99_AT_HALF.as_millis()),
        p99.map_or("-".into(), ms),
        p99.is_some_and(|p| p < P99_AT_HALF) && half.is_some_and(|h| h.all_hits),
    ));
    checks.push(target(
        format!("wrk, logging at info (JSON file): gateway >= {LOGGING_VS_NGINX} x nginx with access_log"),
        wrk_ratio(Server::GatewayLogging, Server::NginxLogging),
        LOGGING_VS_NGINX,
    ));
    let servers: Vec<Server> = samples.by_server.iter().map(|(s, _, _)| *s).collect();
    let wrong: Vec<&str> = servers.iter().filter(|s| !samples.answers_ok(**s)).map(|s| s.label()).collect();
    checks.push(Check::new(
        "every answer 200 (HIT from the caches)",
        if wrong.is_empty() { "all".to_owned() } else { format!("not: {}", wrong.join(", ")) },
        wrong.is_empty(),
    ));
    let why = bound.and_then(|b| b.why.clone());
    checks.push(Check::new(
        "this client not the bottleneck",
        why.clone().map_or_else(
            || "more connections or threads gain nothing".to_owned(),
            |why| format!("client-bound: {why}"),
        ),
        bound.is_some() && why.is_none(),
    ));
    Verdict::new(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_bound_when_more_connections_or_threads_beat_its_best_run_by_more_than_the_tolerance() {
        let variants = |a: f64, b: f64| vec![("128 connections".to_owned(), a), ("3 threads".to_owned(), b)];
        assert_eq!(client_bound(&[100_000.0, 98_000.0], &variants(104_000.0, 101_000.0), 0.05), None);
        let why = client_bound(&[100_000.0, 98_000.0], &variants(104_000.0, 112_000.0), 0.05).expect("bound");
        assert!(why.starts_with("3 threads reached 112000 req/s, +12.0 % over 100000"), "{why}");
        let both = client_bound(&[90_000.0, 100_000.0], &variants(120_000.0, 111_000.0), 0.05).expect("bound");
        assert!(both.contains("128 connections") && both.contains("3 threads"), "{both}");
        assert_eq!(
            client_bound(&[90_000.0, 100_000.0], &variants(104_000.0, 80_000.0), 0.05),
            None,
            "the better of the configured runs is the reference"
        );
    }

    #[test]
    fn medians_take_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn cpu_per_request_needs_both_readings_and_a_request() {
        let (a, b) = (Some(Duration::from_millis(100)), Some(Duration::from_millis(300)));
        assert_eq!(cpu_per_request(a, b, 10_000), Some(20.0));
        assert_eq!(cpu_per_request(None, b, 10_000), None);
        assert_eq!(cpu_per_request(a, b, 0), None);
        assert_eq!(cpu_per_request(b, a, 10), None, "a clock that went back");
    }

    #[test]
    fn peer_runs_one_server_and_the_side_by_side_run_all_six_gateway_first() {
        assert_eq!(servers(Some(PeerName::Nginx)), [Server::Nginx]);
        assert_eq!(servers(Some(PeerName::HyperFixed)), [Server::HyperFixed]);
        let all = servers(None);
        assert_eq!(all.len(), 6);
        assert_eq!(all[0], Server::Gateway);
        assert!(all.contains(&Server::GatewayLogging) && all.contains(&Server::NginxLogging));
    }

    #[test]
    fn caches_must_answer_hit_and_the_hyper_servers_no_x_cache() {
        assert_eq!(Server::NginxLogging.expected_x_cache(), XCache::Hit);
        assert_eq!(Server::Gateway.expected_x_cache(), XCache::Hit);
        assert_eq!(Server::Hyper.expected_x_cache(), XCache::Absent);
        assert!(!expected_answers(Server::Gateway, &Recorder::default()), "no answer proves nothing");
    }
}
