//! The `hang` scenario (issue 23): Tencent stops answering for a few seconds under steady
//! load, then answers at once again. How long until the gateway — one, then with
//! `--replicas` a fleet on a shared Redis budget — is back to what it did before, and does
//! any answer reach its caller after the deadline meanwhile?
//!
//! The load is an open loop at `--rate` over `--groups`, each request with 5 of its
//! group's latest 50 MsgSeqs and one of the deadlines [`DEADLINES`] in turn (sent as
//! `X-Request-Timeout-Ms`), round-robin over the gateways. After a warm-up the steady
//! state is measured for [`STEADY`], then the simulator holds every call for [`HANG`]
//! (it records them and answers none until released), then the run goes on for
//! `--duration` after the release.
//!
//! Counted per [`BIN`] of the client's clock: the simulator's calls, each gateway's
//! dispatched calls (its `receipt_gateway_budget_calls_total`, read at every bin's end),
//! and the answers by what they were (fresh 200, STALE, 429, 504, other) and whether they
//! arrived more than [`CLIENT_SLACK`] after their deadline, and the client's own lag (how
//! late a 1 ms timer of its runtime fired: a late answer in a bin where the client lagged
//! as much may have waited on the client). A bin is *back* when its share
//! of fresh answers (200 and not STALE: served from cache or by a call, not refused) is
//! within [`FRESH_SLACK`] of the steady state's, and either nobody was refused in it (no
//! STALE, no 429: the gateway made every call its callers needed, fewer than in the
//! steady state while a refill is fresh) or the upstream calls of the second that ends
//! with it are at least [`BACK_AT`] of the steady calls per second. The recovery time
//! runs from the release to the end of the last bin that is not back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::task::JoinSet;

use super::{Bench, Check, Verdict};
use crate::Result;
use crate::cli::Settings;
use crate::client::{Outcome, Target, XCache};
use crate::gateway::{Gateway, SharedTier};
use crate::record::CLIENT_SLACK;

/// The deadlines of the fault-injection run, one per request in turn.
const DEADLINES: [Duration; 3] = [Duration::from_millis(250), Duration::from_millis(1000), Duration::from_millis(2000)];
/// The steady state measured before the hang.
const STEADY: Duration = Duration::from_secs(4);
/// How long the simulator holds every call.
const HANG: Duration = Duration::from_secs(3);
/// The resolution of the time series.
const BIN: Duration = Duration::from_millis(500);
/// A bin is back when its upstream calls over a second are at least this share of the
/// steady state's...
const BACK_AT: f64 = 0.8;
/// ...and its share of fresh answers at most this much below the steady state's.
const FRESH_SLACK: f64 = 0.02;
/// The target: back within this long after the release.
const TARGET: Duration = Duration::from_secs(5);

/// One answer, by the bin of its send time.
#[derive(Clone, Copy, Default)]
struct Answers {
    fresh: u64,
    stale: u64,
    refused: u64,
    timed_out: u64,
    other: u64,
    /// Answered after the deadline (by this client's clock).
    past: u64,
    /// Answered more than [`CLIENT_SLACK`] after the deadline.
    late: u64,
    /// The latest of them, past its deadline.
    worst_late: Duration,
}

impl Answers {
    fn total(&self) -> u64 {
        self.fresh + self.stale + self.refused + self.timed_out + self.other
    }

    fn fresh_share(&self) -> f64 {
        self.fresh as f64 / self.total().max(1) as f64
    }

    fn add(&mut self, o: &Answers) {
        self.fresh += o.fresh;
        self.stale += o.stale;
        self.refused += o.refused;
        self.timed_out += o.timed_out;
        self.other += o.other;
        self.past += o.past;
        self.late += o.late;
        self.worst_late = self.worst_late.max(o.worst_late);
    }
}

/// The time series of one run, bin by bin from the start of the steady state.
struct Series {
    answers: Vec<Answers>,
    /// The simulator's calls per bin.
    upstream: Vec<usize>,
    /// Per gateway, its dispatched calls per bin.
    dispatched: Vec<Vec<f64>>,
    /// Bins of the steady state; then [`HANG`]'s bins; then the rest.
    steady_bins: usize,
    hang_bins: usize,
    /// The late answers by what they were and their deadline.
    late_kinds: BTreeMap<String, u64>,
    /// Per bin, the latest this client's own 1 ms timer fired: an answer late by no
    /// more than this may have waited on the client, not the gateway.
    client_lag: Vec<Duration>,
}

pub fn print_load(s: &Settings) {
    let deadlines: Vec<String> = DEADLINES.iter().map(|d| d.as_millis().to_string()).collect();
    println!(
        "load: open loop {:.0} req/s over {} groups, {} of the latest {} MsgSeqs, deadlines {} ms in turn; {:.0} s \
         warm-up, {} s steady, {} s of upstream holding every call, {:.0} s after the release; per {} ms",
        s.load.rate.unwrap_or(0.0),
        s.mix.groups,
        s.mix.seqs_per_request,
        s.mix.latest,
        deadlines.join("/"),
        s.load.warmup.as_secs_f64(),
        STEADY.as_secs(),
        HANG.as_secs(),
        s.load.duration.as_secs_f64(),
        BIN.as_millis()
    );
}

pub async fn hang(bin: &Path, s: &Settings, shared: Option<&SharedTier>) -> Result<Verdict> {
    let bench = Bench::start(bin, s, shared).await?;
    let series = drive(&bench, s).await?;
    bench.stop().await;
    series.print();
    Ok(series.verdict())
}

/// Runs the timeline and collects the series.
async fn drive(bench: &Bench, s: &Settings) -> Result<Series> {
    let gateways: Vec<&Gateway> = bench.gateways().collect();
    let addrs: Vec<SocketAddr> = gateways.iter().map(|g| g.data).collect();
    // targets[gateway][deadline]
    let targets: Vec<Vec<Target>> = addrs
        .iter()
        .map(|&a| DEADLINES.iter().map(|&d| Target::new(a, d)).collect::<Result<Vec<_>>>())
        .collect::<Result<_>>()?;
    let targets = Arc::new(targets);
    let rate = s.load.rate.unwrap_or(750.0);
    let start = Instant::now();
    let steady_from = start + s.load.warmup;
    let hang_from = steady_from + STEADY;
    let release = hang_from + HANG;
    let end = release + s.load.duration;
    let bins = ((end - steady_from).as_secs_f64() / BIN.as_secs_f64()).ceil() as usize;

    // The load: one task per request, so a held request holds nothing else up.
    let sender = {
        let (client, mix, targets) = (bench.load.client.clone(), bench.load.mix.clone(), targets.clone());
        let mut rng = SmallRng::seed_from_u64(s.mix.seed);
        tokio::spawn(async move {
            let mut requests = JoinSet::new();
            for n in 0u64.. {
                let at = start + Duration::from_secs_f64(n as f64 / rate);
                if at >= end {
                    break;
                }
                let body = mix.next_body(&mut rng);
                crate::drive::wait_for_turn(at).await;
                let (client, targets) = (client.clone(), targets.clone());
                requests.spawn(async move {
                    let gateway = (n % targets.len() as u64) as usize;
                    let which = ((n / targets.len() as u64) % DEADLINES.len() as u64) as usize;
                    let sent = Instant::now();
                    let outcome = targets[gateway][which].send(&client, body).await;
                    (sent, DEADLINES[which], outcome, sent.elapsed())
                });
            }
            let mut answered = Vec::new();
            while let Some(done) = requests.join_next().await {
                if let Ok(done) = done {
                    answered.push(done);
                }
            }
            answered
        })
    };

    // The fault, on a timeline of its own.
    let fault = async {
        tokio::time::sleep_until(hang_from.into()).await;
        bench.upstream.hold_calls();
        tokio::time::sleep_until(release.into()).await;
        bench.upstream.release_calls();
    };
    // Each gateway's dispatched calls at every bin's end.
    let counting = async {
        let mut counts: Vec<Vec<f64>> = vec![Vec::new(); gateways.len()];
        for b in 0..=bins {
            tokio::time::sleep_until((steady_from + BIN * b as u32).into()).await;
            for (i, g) in gateways.iter().enumerate() {
                counts[i].push(dispatched(bench, g).await?);
            }
        }
        Ok::<_, crate::Error>(counts)
    };
    // The client's own delay: how late a 1 ms timer of its runtime fires, per bin. On a
    // saturated machine the client reads answers late too, and counts them late.
    let lagging = async {
        let mut lag = vec![Duration::ZERO; bins];
        loop {
            let planned = Instant::now() + Duration::from_millis(1);
            tokio::time::sleep_until(planned.into()).await;
            let now = Instant::now();
            if now >= end {
                break lag;
            }
            let Some(bin) = now.checked_duration_since(steady_from).map(|d| (d.as_nanos() / BIN.as_nanos()) as usize)
            else {
                continue;
            };
            if let Some(worst) = lag.get_mut(bin) {
                *worst = (*worst).max(now - planned);
            }
        }
    };
    let ((), counts, client_lag) = tokio::join!(fault, counting, lagging);
    let counts = counts?;
    let answered = sender.await.map_err(|e| format!("the load task failed: {e}"))?;

    let mut answers = vec![Answers::default(); bins];
    let mut late_kinds = BTreeMap::new();
    for (sent, deadline, outcome, took) in answered {
        let Some(bin) = sent.checked_duration_since(steady_from).map(|d| (d.as_nanos() / BIN.as_nanos()) as usize)
        else {
            continue;
        };
        let Some(a) = answers.get_mut(bin) else { continue };
        let kind = match outcome {
            Outcome::Answered(answer) => match (answer.status, answer.x_cache) {
                (200, XCache::Stale) => (&mut a.stale, "STALE"),
                (200, _) => (&mut a.fresh, "fresh"),
                (429, _) => (&mut a.refused, "429"),
                (504, _) => (&mut a.timed_out, "504"),
                _ => (&mut a.other, "other"),
            },
            Outcome::Hung | Outcome::Failed => (&mut a.other, "other"),
        };
        *kind.0 += 1;
        a.past += u64::from(took > deadline);
        if took > deadline + CLIENT_SLACK {
            a.late += 1;
            a.worst_late = a.worst_late.max(took - deadline);
            *late_kinds.entry(format!("{} with {} ms", kind.1, deadline.as_millis())).or_default() += 1;
        }
    }
    let upstream = (0..bins)
        .map(|b| {
            let from = steady_from + BIN * b as u32;
            bench.upstream.stats(from, from + BIN).calls
        })
        .collect();
    let dispatched = counts.iter().map(|c| c.windows(2).map(|w| w[1] - w[0]).collect()).collect();
    let steady_bins = (STEADY.as_nanos() / BIN.as_nanos()) as usize;
    let hang_bins = (HANG.as_nanos() / BIN.as_nanos()) as usize;
    Ok(Series { answers, upstream, dispatched, steady_bins, hang_bins, late_kinds, client_lag })
}

/// A gateway's `receipt_gateway_budget_calls_total` for the receipt API, all clients.
async fn dispatched(bench: &Bench, g: &Gateway) -> Result<f64> {
    let snapshot = g.metrics(&bench.admin).await?;
    Ok(snapshot.budget_calls.map_or(0.0, |calls| calls.values().sum()))
}

impl Series {
    fn after(&self) -> std::ops::Range<usize> {
        self.steady_bins + self.hang_bins..self.answers.len()
    }

    fn steady_answers(&self) -> Answers {
        let mut total = Answers::default();
        self.answers[..self.steady_bins].iter().for_each(|a| total.add(a));
        total
    }

    /// Each gateway's mean dispatched calls per bin in the steady state.
    fn steady_dispatched(&self) -> Vec<f64> {
        self.dispatched.iter().map(|d| d[..self.steady_bins].iter().sum::<f64>() / self.steady_bins as f64).collect()
    }

    fn is_back(&self, bin: usize) -> bool {
        let a = &self.answers[bin];
        let fresh = a.fresh_share() >= self.steady_answers().fresh_share() - FRESH_SLACK;
        let steady_per_bin = self.upstream[..self.steady_bins].iter().sum::<usize>() as f64 / self.steady_bins as f64;
        // Over a second: after a hang every group's items expire together, and the
        // refreshes come in pulses a TTL apart.
        let calls = self.upstream[bin.saturating_sub(1)..=bin].iter().sum::<usize>() as f64;
        let nobody_refused = a.stale == 0 && a.refused == 0;
        fresh && (nobody_refused || calls >= BACK_AT * 2.0 * steady_per_bin)
    }

    /// From the release to the end of the last bin after it that is not back.
    fn recovery(&self) -> Duration {
        let after = self.after();
        let last_bad = after.clone().rev().find(|&b| !self.is_back(b));
        last_bad.map_or(Duration::ZERO, |b| BIN * (b + 1 - after.start) as u32)
    }

    fn late(&self, bins: std::ops::Range<usize>) -> (u64, Duration) {
        let total = self.total(bins);
        (total.late, total.worst_late)
    }

    fn total(&self, bins: std::ops::Range<usize>) -> Answers {
        let mut total = Answers::default();
        self.answers[bins].iter().for_each(|a| total.add(a));
        total
    }

    fn print(&self) {
        let steady = self.steady_answers();
        let per_gateway: Vec<String> =
            self.steady_dispatched().iter().map(|d| format!("{:.0}", d / BIN.as_secs_f64())).collect();
        println!(
            "steady: {:.0} upstream calls/s (dispatched by each gateway: {}/s), {:.1} % of answers fresh",
            self.upstream[..self.steady_bins].iter().sum::<usize>() as f64 / STEADY.as_secs_f64(),
            per_gateway.join(" / "),
            100.0 * steady.fresh_share()
        );
        println!(
            "{:>6} {:>5} {:>16} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>10}  phase",
            "t (s)", "calls", "dispatched", "fresh", "stale", "429", "504", "other", "late", "client lag"
        );
        for b in 0..self.answers.len() {
            let t = (b as f64 - (self.steady_bins + self.hang_bins) as f64) * BIN.as_secs_f64();
            let a = &self.answers[b];
            let d: Vec<String> = self.dispatched.iter().map(|d| format!("{:.0}", d[b])).collect();
            let phase = if b < self.steady_bins {
                "steady"
            } else if b < self.steady_bins + self.hang_bins {
                "hang"
            } else if self.is_back(b) {
                "back"
            } else {
                "after"
            };
            println!(
                "{t:>6.1} {:>5} {:>16} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>7} ms  {phase}",
                self.upstream[b],
                d.join("/"),
                a.fresh,
                a.stale,
                a.refused,
                a.timed_out,
                a.other,
                a.late,
                self.client_lag.get(b).map_or(0, Duration::as_millis)
            );
        }
        let (late, worst) = self.late(0..self.answers.len());
        if !self.late_kinds.is_empty() {
            let kinds: Vec<String> = self.late_kinds.iter().map(|(kind, n)| format!("{kind}: {n}")).collect();
            println!("late answers: {}", kinds.join(", "));
        }
        println!(
            "recovery: back {:.1} s after the release (t = 0); answers later than deadline + {} ms: {late} (worst {} ms \
             past the deadline); after the deadline at all: {} of {}",
            self.recovery().as_secs_f64(),
            CLIENT_SLACK.as_millis(),
            worst.as_millis(),
            self.total(0..self.answers.len()).past,
            self.total(0..self.answers.len()).total()
        );
    }

    fn verdict(&self) -> Verdict {
        let recovery = self.recovery();
        let (late, worst) = self.late(0..self.answers.len());
        let timed_out: u64 = self.answers.iter().map(|a| a.timed_out).sum();
        Verdict::new(vec![
            Check::new(
                format!("back within {} s of the release", TARGET.as_secs()),
                format!("{:.1} s", recovery.as_secs_f64()),
                recovery <= TARGET,
            ),
            Check::new(
                format!("no answer later than the deadline + {} ms", CLIENT_SLACK.as_millis()),
                format!("{late} (worst {} ms past; 504: {timed_out})", worst.as_millis()),
                late == 0,
            ),
        ])
    }
}
