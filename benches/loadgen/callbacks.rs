//! The `callbacks` scenario (issue 9): what Tencent's read-receipt callbacks save, and how
//! fast the gateway takes them (docs/design.md#callbacks, #cache, #simulator).
//!
//! Two phases run the same load, each on a fresh simulator and gateway: an open loop of
//! receipt queries over a fixed working set (groups asked in turn, by default each request
//! for all five MsgSeqs of its group, so every message is asked about every 50 ms),
//! while the simulator's members read those messages at a steady pace (`play_group` for
//! every one of them up front) and each read is sent as a signed callback.
//!
//! - **ttl only**: `apps.callbacks = false`; the callbacks go to a sink in this process
//!   that answers 200, so upstream counts move as in phase two but the gateway learns of a
//!   read only when its `cache.ttl_ms` runs out and it asks again.
//! - **callbacks**: `apps.callbacks = true` with `callback_token_env`; the callbacks go to
//!   the gateway's `POST /callback`, and its items are fresh for `cache.callback_ttl_ms`.
//!
//! Each phase reports upstream calls/s (the simulator's ledger over the measured
//! interval) and staleness ([`staleness`]: from a read's application in the simulator to
//! the first answer showing it, both on this process's clock). The verdict holds the
//! callbacks phase to a fifth of the TTL phase's calls and a p99 staleness under 100 ms.
//! The issue counts from the read's *callback*; the simulator applies the read before it
//! sends the callback, so counting from the application is the stricter figure. It also
//! holds the wait for the next request about the message (up to the ask interval); the
//! lower bound printed beside it does not.
//!
//! A third phase, [`ingest`], drives `/callback` directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::index;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use receipt_gateway::simulator::{CallbackPlayer, PlayedRead};
use receipt_gateway::tencent::code::ErrorCode;
use receipt_gateway::tencent::usersig::SecretKey;
use receipt_gateway::tencent::webhook::CALLBACK_PATH;
use receipt_gateway::tencent::wire::ReceiptResponse;

use super::{Check, Verdict, or_dash, print_client, ratio};
use crate::Result;
use crate::cli::{CallbackAuth, Settings};
use crate::client::{HttpClient, Outcome, Target, http_client};
use crate::drive::{Schedule, wait_for_turn};
use crate::gateway::{Gateway, Snapshot};
use crate::mix;
use crate::record::{Recorder, Sample, ms};
use crate::upstream::{CALLBACK_TOKEN, Reserved, Upstream, UpstreamStats};

#[path = "callback_ingest.rs"]
mod ingest;
#[path = "staleness.rs"]
mod staleness;

use staleness::{Key, Read, Seen, Staleness};

/// The groups of the working set are `callbacks-<n>`.
const GROUP_PREFIX: &str = "callbacks-";

/// The callbacks phase may spend at most this fraction of the TTL phase's upstream calls.
const CALLS_AT_MOST: f64 = 1.0 / 5.0;

/// The callbacks phase's p99 staleness target.
const STALENESS_P99: Duration = Duration::from_millis(100);

/// Reads applied later than `cache.ttl_ms` plus this before the load ends are not
/// judged: the answer that shows them may not have come by then.
const JUDGE_MARGIN: Duration = Duration::from_secs(1);

/// The two read-load phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    TtlOnly,
    Callbacks,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::TtlOnly => "ttl only",
            Phase::Callbacks => "callbacks",
        }
    }

    fn auth(self) -> CallbackAuth {
        match self {
            Phase::TtlOnly => CallbackAuth::Off,
            Phase::Callbacks => CallbackAuth::Signed,
        }
    }

    fn describe(self, s: &Settings) -> String {
        match self {
            Phase::TtlOnly => format!(
                "apps.callbacks = false, cache.ttl_ms {}; the members' callbacks go to a sink that answers 200, so \
                 the gateway learns of a read only by asking upstream again",
                s.gateway.ttl_ms
            ),
            Phase::Callbacks => format!(
                "apps.callbacks = true with callback_token_env, cache.callback_ttl_ms {}; the members' callbacks \
                 (signed) go to the gateway's POST {CALLBACK_PATH}",
                s.gateway.callback_ttl_ms
            ),
        }
    }
}

/// The load line of the scenario's settings block.
pub(super) fn print_load(s: &Settings) {
    let (m, l) = (&s.mix, &s.load);
    let rate = l.rate.unwrap_or(0.0);
    println!(
        "load: two phases, each {:.0} s warm-up + {:.0} s measured on a fresh gateway: open loop {rate:.0} req/s, {} \
         connections, {} groups in turn, {} of each group's {} messages per request (every message asked about \
         every {}), deadline {} ms; members reading {:.0} reads/s over those {} messages; then /callback ingest at \
         {:.0}/s",
        l.warmup.as_secs_f64(),
        l.duration.as_secs_f64(),
        l.connections,
        m.groups,
        m.seqs_per_request,
        m.latest,
        ask_interval(s).map_or_else(|| "-".to_owned(), ms),
        l.deadline.as_millis(),
        s.callbacks.reads_per_second,
        m.groups * m.latest,
        s.callbacks.ingest_rate
    );
}

/// How often each message is asked about: groups are asked in turn, each request for
/// `seqs_per_request` of its group's `latest` messages.
fn ask_interval(s: &Settings) -> Option<Duration> {
    let rate = s.load.rate?;
    let per_message = rate / s.mix.groups as f64 * s.mix.seqs_per_request as f64 / s.mix.latest as f64;
    Duration::try_from_secs_f64(1.0 / per_message).ok()
}

/// The three phases, each printed as it ends, and the verdicts.
pub(super) async fn callbacks(bin: &Path, s: &Settings) -> Result<Vec<(String, Verdict)>> {
    if s.load.rate.is_none() {
        return Err("--scenario callbacks needs an open loop: --rate above 0".into());
    }
    let ttl = PhaseRun::measure(bin, s, Phase::TtlOnly).await?;
    let fed = PhaseRun::measure(bin, s, Phase::Callbacks).await?;
    print_comparison(&ttl, &fed);
    let mut verdicts = vec![("callbacks".to_owned(), verdict(&ttl.figures(), &fed.figures()))];
    verdicts.push(("callbacks ingest".to_owned(), ingest::ingest(bin, s).await?));
    Ok(verdicts)
}

/// What one phase saw.
struct PhaseRun {
    phase: Phase,
    recorder: Recorder,
    measured: Duration,
    upstream: UpstreamStats,
    staleness: Staleness,
    /// Reads applied in the measured interval.
    reads_played: usize,
    /// Reads applied less than this before the end of the load are not judged.
    judged_margin: Duration,
    /// The player's callbacks over the measured interval: (answered 2xx, failed).
    deliveries: (usize, usize),
    /// `receipt_gateway_callbacks_total` over the measured interval.
    callbacks_total: BTreeMap<(String, String), f64>,
    /// Answers of 200 that carried no counts (a FAIL, or a body that did not parse).
    without_counts: usize,
}

impl PhaseRun {
    async fn measure(bin: &Path, s: &Settings, phase: Phase) -> Result<PhaseRun> {
        println!("\n-- {}: {}", phase.label(), phase.describe(s));
        let reserved = Reserved::bind().await?;
        let sink = match phase {
            Phase::TtlOnly => Some(Sink::start().await?),
            Phase::Callbacks => None,
        };
        let admin = http_client(2);
        let gateway_settings = crate::cli::GatewaySettings { callbacks: phase.auth(), ..s.gateway.clone() };
        let gateway = Gateway::start(bin, &gateway_settings, reserved.url(), None, &admin).await?;
        let callback_url = match &sink {
            Some(sink) => sink.url(),
            None => format!("http://{}{CALLBACK_PATH}", gateway.data),
        };
        let player = CallbackPlayer::new(&callback_url, s.callbacks.reads_per_second)
            .map_err(|e| format!("the member player: {e}"))?
            .with_token(SecretKey::new(CALLBACK_TOKEN));
        let upstream = Upstream::serve(reserved, &s.sim, Some(player));
        for group in 0..s.mix.groups {
            upstream.play_group(&group_id(group), 1..=s.mix.latest as u64);
        }
        let load = Arc::new(ReadLoad::new(gateway.data, s)?);
        let schedule = Schedule::starting_now(s.load.warmup, s.load.duration);
        let samples = async {
            tokio::time::sleep_until(schedule.measure_from.into()).await;
            let before = (gateway.metrics(&admin).await, upstream.callbacks());
            tokio::time::sleep_until(schedule.end.into()).await;
            let after = (gateway.metrics(&admin).await, upstream.callbacks());
            (before, after)
        };
        let ((recorder, observed), ((before, delivered_before), (after, delivered_after))) =
            tokio::join!(load.run(schedule), samples);
        let judged_margin = Duration::from_millis(s.gateway.ttl_ms) + JUDGE_MARGIN;
        let (seen, without_counts) = items(&observed);
        let all_reads = upstream.reads();
        let reads = judged_reads(&all_reads, schedule.measure_from, schedule.end.checked_sub(judged_margin));
        let mut run = PhaseRun {
            phase,
            recorder,
            measured: schedule.measured(),
            upstream: upstream.stats(schedule.measure_from, schedule.end),
            staleness: Staleness::measure(&reads, &seen),
            reads_played: judged_reads(&all_reads, schedule.measure_from, Some(schedule.end)).len(),
            judged_margin,
            deliveries: (
                delivered_after.0.saturating_sub(delivered_before.0),
                delivered_after.1.saturating_sub(delivered_before.1),
            ),
            callbacks_total: callbacks_between(before, after),
            without_counts,
        };
        gateway.stop().await;
        drop((upstream, sink));
        run.print();
        Ok(run)
    }

    fn figures(&self) -> Figures {
        Figures {
            calls_per_second: self.upstream.per_second,
            p99: self.staleness.shown_after(0.99),
            reads: self.staleness.reads(),
        }
    }

    fn print(&mut self) {
        print_client(&mut self.recorder, self.measured);
        let u = &self.upstream;
        println!(
            "upstream: {} calls = {:.1}/s; rolling second max {}, min {}; 60007: {}; {:.1} distinct MsgSeqs/call",
            u.calls,
            u.per_second,
            u.max_rolling,
            u.min_rolling.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            u.rate_limited,
            u.mean_seqs
        );
        let to = match self.phase {
            Phase::TtlOnly => "the sink",
            Phase::Callbacks => "the gateway",
        };
        let (delivered, failed) = self.deliveries;
        println!(
            "reads: {} applied in the measured interval ({:.1}/s); callbacks to {to}: {delivered} delivered, {failed} \
             failed",
            self.reads_played,
            self.reads_played as f64 / self.measured.as_secs_f64()
        );
        println!(
            "gateway: receipt_gateway_callbacks_total over the measured interval: {}",
            callback_counts(&self.callbacks_total)
        );
        let st = &self.staleness;
        let shown = |q| st.shown_after(q).map_or_else(|| "not shown".to_owned(), ms);
        println!(
            "staleness, from a read's application in the simulator to the first answer showing its count: p50 {}, p99 \
             {}, max {} over {} reads (those applied up to {:.0} s before the load ended); never shown: {}",
            shown(0.5),
            shown(0.99),
            shown(1.0),
            st.reads(),
            self.judged_margin.as_secs_f64(),
            st.never_shown
        );
        let old = |q| or_dash(st.old_until(q));
        println!(
            "  its lower bound, free of the wait for the next request: a request sent after the read still got the old \
             count up to p50 {}, p99 {}, max {} after it",
            old(0.5),
            old(0.99),
            old(1.0)
        );
        println!(
            "  answers with a lower count than one answered before they were sent: {}; 200 answers without counts: {}",
            st.went_back, self.without_counts
        );
    }
}

/// The two phases side by side.
fn print_comparison(ttl: &PhaseRun, fed: &PhaseRun) {
    println!("\n-- ttl only vs callbacks");
    let row = |what: &str, a: String, b: String, note: String| {
        println!("{}", format!("{what:<44} {a:>12} {b:>12}  {note}").trim_end());
    };
    row("", "ttl only".into(), "callbacks".into(), String::new());
    let (a, b) = (ttl.upstream.per_second, fed.upstream.per_second);
    row("upstream calls/s", format!("{a:.1}"), format!("{b:.1}"), format!("callbacks/ttl {}", ratio(b, a)));
    let shown = |run: &PhaseRun, q| run.staleness.shown_after(q).map_or_else(|| "not shown".to_owned(), ms);
    row("staleness p50 (read applied -> answer)", shown(ttl, 0.5), shown(fed, 0.5), String::new());
    row("staleness p99", shown(ttl, 0.99), shown(fed, 0.99), String::new());
    let old = |run: &PhaseRun| or_dash(run.staleness.old_until(0.99));
    row("old count still answered after a read, p99", old(ttl), old(fed), String::new());
    let never = |run: &PhaseRun| format!("{} / {}", run.staleness.never_shown, run.staleness.reads());
    row("reads never shown / judged", never(ttl), never(fed), String::new());
}

fn callback_counts(counts: &BTreeMap<(String, String), f64>) -> String {
    let parts: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n > 0.0)
        .map(|((command, result), n)| format!("{command}/{result}={n:.0}"))
        .collect();
    if parts.is_empty() { "none".to_owned() } else { parts.join(" ") }
}

/// The callbacks counted between two samples; an unreadable sample is reported as no
/// figure (the counts are for a look, the verdict does not need them).
fn callbacks_between(before: Result<Snapshot>, after: Result<Snapshot>) -> BTreeMap<(String, String), f64> {
    match (before, after) {
        (Ok(before), Ok(after)) => after.callbacks_since(&before),
        (Err(e), _) | (_, Err(e)) => {
            println!("  cannot read the gateway's /metrics: {e}");
            BTreeMap::new()
        }
    }
}

fn group_id(group: usize) -> String {
    format!("{GROUP_PREFIX}{group}")
}

/// The reads applied in `[from, to)` (none when `to` is `None`) on messages of the
/// working set, as keys.
fn judged_reads(reads: &[PlayedRead], from: Instant, to: Option<Instant>) -> Vec<Read> {
    let Some(to) = to else { return Vec::new() };
    reads
        .iter()
        .filter_map(|r| {
            let at = r.at.into_std();
            let group = r.group.strip_prefix(GROUP_PREFIX)?.parse::<u32>().ok()?;
            (at >= from && at < to).then_some(Read { key: (group, r.seq), at, read: r.read })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The read load: an open loop that keeps every answer's counts
// ---------------------------------------------------------------------------------------

/// An open loop over the working set: request `n` asks for group `n % groups`.
struct ReadLoad {
    client: HttpClient,
    target: Target,
    /// The deadline `target` sends, for the recorder.
    deadline: Duration,
    groups: usize,
    latest: usize,
    per_request: usize,
    rate: f64,
    connections: usize,
    seed: u64,
}

/// One answer of 200 from the measured interval, its body kept to be read afterwards
/// (reading it on the request's path would cost the client time it needs to keep up).
struct Observed {
    group: u32,
    sent: Instant,
    received: Instant,
    body: Bytes,
}

impl ReadLoad {
    fn new(addr: SocketAddr, s: &Settings) -> Result<ReadLoad> {
        Ok(ReadLoad {
            client: http_client(s.load.connections),
            target: Target::new(addr, s.load.deadline)?,
            deadline: s.load.deadline,
            groups: s.mix.groups,
            latest: s.mix.latest,
            per_request: s.mix.seqs_per_request,
            rate: s.load.rate.unwrap_or(1.0),
            connections: s.load.connections,
            seed: s.mix.seed,
        })
    }

    /// Every worker on one numbered schedule, as [`crate::drive::open_loop`] does;
    /// latency counted from the scheduled send time.
    async fn run(self: &Arc<Self>, schedule: Schedule) -> (Recorder, Vec<Observed>) {
        let next_ticket = Arc::new(AtomicU64::new(0));
        let mut workers = JoinSet::new();
        for worker in 0..self.connections {
            let (load, next_ticket) = (self.clone(), next_ticket.clone());
            workers.spawn(async move { load.worker(worker, &next_ticket, schedule).await });
        }
        let (mut recorder, mut observed) = (Recorder::default(), Vec::new());
        while let Some(done) = workers.join_next().await {
            match done {
                Ok((r, o)) => {
                    recorder.merge(r);
                    observed.extend(o);
                }
                Err(e) => eprintln!("  a load worker failed: {e}"),
            }
        }
        (recorder, observed)
    }

    async fn worker(&self, worker: usize, next_ticket: &AtomicU64, schedule: Schedule) -> (Recorder, Vec<Observed>) {
        let mut rng =
            SmallRng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(worker as u64));
        let (mut recorder, mut observed) = (Recorder::default(), Vec::new());
        loop {
            let ticket = next_ticket.fetch_add(1, Ordering::Relaxed);
            let at = schedule.start + Duration::from_secs_f64(ticket as f64 / self.rate);
            if at >= schedule.end {
                return (recorder, observed);
            }
            // Below `groups`, which is a usize.
            let group = (ticket % self.groups.max(1) as u64) as usize;
            // `Settings::check` guarantees per_request <= latest, so `sample` cannot panic.
            let seqs = index::sample(&mut rng, self.latest, self.per_request).into_iter().map(|i| i as u64 + 1);
            let body = mix::body(format_args!("{GROUP_PREFIX}{group}"), seqs);
            wait_for_turn(at).await;
            let sent = Instant::now();
            let (outcome, answer) = self.target.send_keeping_body(&self.client, body).await;
            let received = Instant::now();
            if at < schedule.measure_from {
                continue;
            }
            let sample = Sample {
                outcome,
                sent,
                latency: received.duration_since(at.min(sent)),
                service: received - sent,
                queued: sent.saturating_duration_since(at),
            };
            recorder.record(sample, self.deadline);
            if let (Outcome::Answered(a), Some(body), Ok(group)) = (outcome, answer, u32::try_from(group))
                && a.status == 200
            {
                observed.push(Observed { group, sent, received, body });
            }
        }
    }
}

/// Every item with a count in the observed answers, and how many answers had none.
fn items(observed: &[Observed]) -> (Vec<Seen>, usize) {
    let mut seen = Vec::with_capacity(observed.len() * 5);
    let mut without = 0;
    for o in observed {
        let items = serde_json::from_slice::<ReceiptResponse>(&o.body)
            .ok()
            .filter(|r| r.error_code == ErrorCode::OK)
            .and_then(|r| r.items);
        let Some(items) = items else {
            without += 1;
            continue;
        };
        for item in items.iter().filter(|i| i.code == ErrorCode::OK) {
            if let Some(read) = item.read {
                let key: Key = (o.group, item.seq);
                seen.push(Seen { key, sent: o.sent, received: o.received, read });
            }
        }
    }
    (seen, without)
}

// ---------------------------------------------------------------------------------------
// The sink: where the TTL phase's callbacks go
// ---------------------------------------------------------------------------------------

/// An HTTP server in this process that answers every request with Tencent's `OK`, as a
/// company's own callback handler would. Stops when dropped.
struct Sink {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Sink {
    async fn start() -> Result<Sink> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.map_err(|e| format!("cannot bind the sink: {e}"))?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            // Owned here, so the connections end with the task.
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    Some(_) = connections.join_next() => {}
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let service = service_fn(acknowledge);
                            connections.spawn(async move {
                                // A client closing its connection is the normal end.
                                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                            });
                        }
                        // Usually out of file descriptors: back off instead of spinning.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                }
            }
        });
        Ok(Sink { addr, task })
    }

    fn url(&self) -> String {
        format!("http://{}{CALLBACK_PATH}", self.addr)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn acknowledge(req: Request<Incoming>) -> std::result::Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let _ = req.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from(ReceiptResponse::ok_empty().to_bytes())));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

// ---------------------------------------------------------------------------------------
// The verdict
// ---------------------------------------------------------------------------------------

/// What the verdict looks at in one phase.
#[derive(Clone, Copy, Debug)]
struct Figures {
    calls_per_second: f64,
    /// `None`: the p99 read was never shown (or no read was judged).
    p99: Option<Duration>,
    reads: usize,
}

/// The callbacks phase against the TTL phase: at most a fifth of its upstream calls, and
/// a p99 staleness under the target.
fn verdict(ttl: &Figures, fed: &Figures) -> Verdict {
    let (a, b) = (ttl.calls_per_second, fed.calls_per_second);
    let calls = Check::new(
        "upstream calls/s with callbacks <= 1/5 of TTL only",
        format!("{b:.1} / {a:.1} = {}", ratio(b, a)),
        a > 0.0 && b <= a * CALLS_AT_MOST,
    );
    let p99 = match (fed.reads, fed.p99) {
        (0, _) => "no read judged".to_owned(),
        (n, Some(p99)) => format!("{} over {n} reads", ms(p99)),
        (n, None) => format!("not shown by the end of the load (over {n} reads)"),
    };
    let staleness = Check::new(
        format!(
            "p99 staleness with callbacks < {} ms (from the read's application in the simulator, which precedes its \
             callback: stricter than from the callback)",
            STALENESS_P99.as_millis()
        ),
        p99,
        fed.reads > 0 && fed.p99.is_some_and(|p| p < STALENESS_P99),
    );
    Verdict::new(vec![calls, staleness])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(calls_per_second: f64, p99_ms: Option<u64>, reads: usize) -> Figures {
        Figures { calls_per_second, p99: p99_ms.map(Duration::from_millis), reads }
    }

    fn met(v: &Verdict) -> Vec<bool> {
        v.checks.iter().map(|c| c.met).collect()
    }

    #[test]
    fn the_verdict_wants_a_fifth_of_the_calls_and_a_p99_under_100_ms() {
        let ttl = figures(100.0, Some(900), 2000);
        assert_eq!(met(&verdict(&ttl, &figures(20.0, Some(99), 2000))), [true, true]);
        assert_eq!(met(&verdict(&ttl, &figures(20.1, Some(40), 2000))), [false, true]);
        assert_eq!(met(&verdict(&ttl, &figures(3.0, Some(100), 2000))), [true, false]);
    }

    #[test]
    fn no_reads_no_ttl_calls_or_reads_never_shown_miss_the_targets() {
        let fed = figures(0.0, Some(10), 2000);
        assert_eq!(met(&verdict(&figures(0.0, Some(900), 2000), &fed)), [false, true]);
        let ttl = figures(100.0, Some(900), 2000);
        assert_eq!(met(&verdict(&ttl, &figures(1.0, None, 2000))), [true, false]);
        assert_eq!(met(&verdict(&ttl, &figures(1.0, Some(10), 0))), [true, false]);
    }

    #[test]
    fn every_message_is_asked_about_at_an_even_interval() {
        let args = <crate::cli::Args as clap::Parser>::parse_from(["receipt-loadgen", "--scenario", "callbacks"]);
        let s = args.settings(&crate::cli::Defaults::of(crate::cli::ScenarioName::Callbacks)).expect("settings");
        assert_eq!((s.mix.groups, s.mix.seqs_per_request, s.mix.latest), (100, 5, 5));
        assert_eq!(ask_interval(&s), Some(Duration::from_millis(50)));
        let wider = crate::cli::MixSettings { latest: 10, ..s.mix.clone() };
        assert_eq!(ask_interval(&Settings { mix: wider, ..s }), Some(Duration::from_millis(100)));
    }

    #[test]
    fn only_reads_of_the_working_set_inside_the_window_are_judged() {
        let t0 = tokio::time::Instant::now();
        let read = |group: &str, at_ms: u64| PlayedRead {
            app: receipt_gateway::tencent::domain::AppId(1),
            group: group.to_owned(),
            seq: 2,
            member: "m".into(),
            read: 3,
            unread: 4,
            at: t0 + Duration::from_millis(at_ms),
        };
        let reads = [read("callbacks-7", 50), read("callbacks-7", 150), read("other-1", 150), read("callbacks-7", 250)];
        let from = t0.into_std() + Duration::from_millis(100);
        let judged = judged_reads(&reads, from, Some(from + Duration::from_millis(100)));
        assert_eq!(judged.len(), 1);
        assert_eq!((judged[0].key, judged[0].read), ((7, 2), 3));
        assert!(judged_reads(&reads, from, None).is_empty());
    }

    #[test]
    fn answers_give_their_items_with_counts_and_the_rest_are_counted() {
        let now = Instant::now();
        let answer = |body: &'static str| Observed { group: 4, sent: now, received: now, body: Bytes::from(body) };
        let observed = [
            answer(
                r#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":"","GroupMsgReceiptList":[
                {"Code":0,"MsgSeq":1,"ReadNum":5,"UnreadNum":2},{"Code":10062,"MsgSeq":2}]}"#,
            ),
            answer(r#"{"ActionStatus":"FAIL","ErrorCode":10010,"ErrorInfo":"gone"}"#),
            answer("not json"),
        ];
        let (seen, without) = items(&observed);
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].key, seen[0].read), ((4, 1), 5));
        assert_eq!(without, 2);
    }
}
