//! The `clients` scenario (issue 8): callers sharing one upstream budget
//! (docs/design.md#budget-and-dispatch, #callers).
//!
//! Two phases, each on a fresh simulator and gateway that knows its callers as
//! `[[clients]]`. Every caller sends its own `x-client-id` on its own connections, an open
//! loop at a fixed rate, and every request asks for a group nobody asked for before
//! (`clients-<client>-<n>`): each needs an upstream call of its own, and nothing is served
//! from cache or rides on another caller's call.
//!
//! - **shares**: `bulk` (weight 3) and `backfill` (weight 1) each ask for three times the
//!   whole budget. Their calls must split 3 : 1 ± 10 % in every 10 s window, the budget
//!   must be spent (≥ 97 %) and never overspent in any rolling second.
//! - **isolation**: `interactive` asks for a tenth of the budget beside a `bulk` flood of
//!   ten times that (weights 1 and 1). It must get no 429 and a p99 latency under 20 ms.
//!
//! Upstream calls are attributed to callers twice: by the gateway's
//! `receipt_gateway_budget_calls_total{client}`, read at the window boundaries (the judge;
//! `-` when the gateway has no such series), and by the simulator's ledger, which cannot
//! know the caller but knows the group, and every group here is one caller's.
//!
//! The gateway's budget wait (`receipt_gateway_budget_wait_seconds`) is not per client, so
//! the interactive caller's queue wait is bounded by its own latency as the client sees
//! it, which also holds `batch.window_ms` and the upstream call.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::{Bench, Check, Verdict, or_dash, ratio, share, status_line};
use crate::Result;
use crate::cli::{ClientSpec, Settings};
use crate::client::{Targets, http_client};
use crate::drive::{self, Load, Schedule};
use crate::gateway::Snapshot;
use crate::mix::Mix;
use crate::record::{Recorder, ms};
use crate::upstream::UpstreamStats;

/// The shares are judged per window of this length (the last, shorter one is reported
/// only, unless it is the only one).
const WINDOW: Duration = Duration::from_secs(10);

/// Each flooding caller of the shares phase asks for this many times the whole budget.
const FLOOD: f64 = 3.0;

/// The interactive caller's rate, as a share of the budget (one call per request).
const INTERACTIVE_SHARE: f64 = 0.1;

/// The isolation phase's bulk flood, in multiples of the interactive caller's rate: 50,
/// five times the whole budget (the 20 req/s against 1,000 on a budget of 200),
/// so that the flood's queue is long from its first second.
const BULK_OVER_INTERACTIVE: f64 = 50.0;

/// How far each window's split may stray from the ratio of the weights.
const SPLIT_TOLERANCE: f64 = 0.10;

/// Of `budget.per_second`, what the shares phase must spend.
const SPENT_AT_LEAST: f64 = 0.97;

/// The interactive caller's p99 latency target: the bound of its budget wait.
const INTERACTIVE_P99: Duration = Duration::from_millis(20);

/// One caller of a phase.
#[derive(Clone, Copy)]
struct Caller {
    spec: ClientSpec,
    /// Requests per second, open loop.
    rate: f64,
    connections: usize,
}

impl Caller {
    /// Enough connections that the caller never queues on its own side while answers take
    /// up to the deadline plus the hung margin, within its part of `--connections`.
    fn new(spec: ClientSpec, rate: f64, s: &Settings, callers: usize) -> Caller {
        let longest = s.load.deadline.as_secs_f64() + 1.0;
        let needed = (rate * longest).ceil().max(1.0) as usize;
        Caller { spec, rate, connections: needed.min((s.load.connections / callers).max(1)) }
    }

    /// Every group this caller asks for begins so (a prefix of no other caller's).
    fn group_prefix(&self) -> String {
        format!("clients-{}-", self.spec.id)
    }
}

struct Phase {
    name: &'static str,
    callers: Vec<Caller>,
    /// What a reader of the figures should know, printed under the phase's heading.
    note: Option<String>,
}

fn shares_phase(s: &Settings) -> Phase {
    let rate = FLOOD * f64::from(s.gateway.per_second);
    let specs = [ClientSpec { id: "bulk", weight: 3 }, ClientSpec { id: "backfill", weight: 1 }];
    let callers = specs.iter().map(|&spec| Caller::new(spec, rate, s, specs.len())).collect();
    Phase { name: "shares", callers, note: None }
}

fn isolation_phase(s: &Settings) -> Phase {
    let interactive = INTERACTIVE_SHARE * f64::from(s.gateway.per_second);
    let callers = vec![
        Caller::new(ClientSpec { id: "interactive", weight: 1 }, interactive, s, 2),
        Caller::new(ClientSpec { id: "bulk", weight: 1 }, BULK_OVER_INTERACTIVE * interactive, s, 2),
    ];
    let note = format!(
        "latency runs from the scheduled send to the whole answer: it holds batch.window_ms ({} ms) and the \
         upstream call (simulator latency {} ms), so it bounds the budget wait, which the gateway measures for all \
         callers together (receipt_gateway_budget_wait_seconds)",
        s.gateway.window_ms,
        s.sim.latency.as_millis()
    );
    Phase { name: "isolation", callers, note: Some(note) }
}

/// The load line of the scenario's settings block.
pub(super) fn print_load(s: &Settings) {
    let (m, l) = (&s.mix, &s.load);
    println!(
        "load: two phases, each {:.0} s warm-up + {:.0} s measured on a fresh gateway; every request a group nobody \
         asked for before, {} of the latest {} MsgSeqs, deadline {} ms; callers' rates follow per_second; \
         batch.window_ms {}",
        l.warmup.as_secs_f64(),
        l.duration.as_secs_f64(),
        m.seqs_per_request,
        m.latest,
        l.deadline.as_millis(),
        s.gateway.window_ms
    );
}

/// Both phases, each printed as it ends, and a verdict each.
pub(super) async fn clients(bin: &Path, s: &Settings) -> Result<Vec<(String, Verdict)>> {
    let shares = shares_phase(s);
    let mut run = PhaseRun::measure(bin, s, &shares).await?;
    run.print(s);
    let mut verdicts = vec![("clients shares".to_owned(), shares_verdict(&run, s))];

    let mut run = PhaseRun::measure(bin, s, &isolation_phase(s)).await?;
    run.print(s);
    verdicts.push(("clients isolation".to_owned(), isolation_verdict(&mut run)));
    Ok(verdicts)
}

/// What one phase saw.
struct PhaseRun {
    callers: Vec<CallerRun>,
    /// The simulator's view of the measured interval.
    upstream: UpstreamStats,
    /// Calls of the measured interval whose group is no caller's (none expected).
    unattributed: usize,
    windows: Vec<Window>,
    measured: Duration,
}

struct CallerRun {
    caller: Caller,
    recorder: Recorder,
    /// `receipt_gateway_budget_calls_total` over the measured interval.
    budget_calls: Option<f64>,
    /// The simulator's calls for this caller's groups over the measured interval.
    sim_calls: usize,
    /// `receipt_gateway_requests_total` of this client by status, over the measured
    /// interval: whether the gateway knew the caller by its header.
    requests: BTreeMap<String, f64>,
}

/// Upstream calls per caller (in the phase's order) between two metric samples.
struct Window {
    /// Seconds into the measured interval.
    from_s: f64,
    to_s: f64,
    /// Judged: a whole [`WINDOW`], or the only window of a shorter run.
    judged: bool,
    budget_calls: Vec<Option<f64>>,
    sim_calls: Vec<usize>,
}

impl PhaseRun {
    /// A fresh simulator and gateway with the phase's callers, driven together; the
    /// gateway's counters read at every window boundary.
    async fn measure(bin: &Path, s: &Settings, phase: &Phase) -> Result<PhaseRun> {
        let mut settings = s.clone();
        settings.gateway.clients = phase.callers.iter().map(|c| c.spec).collect();
        println!("\n-- {}: {}", phase.name, describe(&phase.callers));
        if let Some(note) = &phase.note {
            println!("  note: {note}");
        }
        let bench = Bench::start(bin, &settings, None).await?;
        let mut loads = Vec::new();
        for (i, caller) in phase.callers.iter().enumerate() {
            let targets = Targets::one(bench.gateway.data, s.load.deadline)?.with_client_id(caller.spec.id)?;
            loads.push(Load {
                client: http_client(caller.connections),
                targets: Arc::new(targets),
                mix: Arc::new(Mix::fresh(caller.group_prefix(), &s.mix)),
                connections: caller.connections,
                seed: s.mix.seed.wrapping_add(i as u64),
            });
        }
        let schedule = Schedule::starting_now(s.load.warmup, s.load.duration);
        let bounds = window_bounds(&schedule);
        let samples = async {
            let mut samples = Vec::new();
            for &at in &bounds {
                tokio::time::sleep_until(at.into()).await;
                samples.push(bench.metrics().await);
            }
            samples
        };
        let (recorders, samples) = tokio::join!(drive_all(&loads, &phase.callers, schedule), samples);
        let samples = samples.into_iter().collect::<Result<Vec<Snapshot>>>()?;
        let run = PhaseRun::collect(&bench, phase, recorders, &samples, &bounds, schedule);
        bench.stop().await;
        Ok(run)
    }

    fn collect(
        bench: &Bench,
        phase: &Phase,
        recorders: Vec<Recorder>,
        samples: &[Snapshot],
        bounds: &[Instant],
        schedule: Schedule,
    ) -> PhaseRun {
        let prefixes: Vec<String> = phase.callers.iter().map(Caller::group_prefix).collect();
        let sim_calls = |from: Instant, to: Instant| attribute(&bench.upstream.calls_by_group(from, to), &prefixes);
        let full_windows = bounds.windows(2).filter(|w| w[1] - w[0] >= WINDOW).count();
        let windows = bounds
            .windows(2)
            .zip(samples.windows(2))
            .map(|(at, snap)| Window {
                from_s: (at[0] - schedule.measure_from).as_secs_f64(),
                to_s: (at[1] - schedule.measure_from).as_secs_f64(),
                judged: at[1] - at[0] >= WINDOW || full_windows == 0,
                budget_calls: phase.callers.iter().map(|c| snap[1].budget_calls_since(&snap[0], c.spec.id)).collect(),
                sim_calls: sim_calls(at[0], at[1]).0,
            })
            .collect();
        let (first, last) = (&samples[0], &samples[samples.len() - 1]);
        let (whole, unattributed) = sim_calls(schedule.measure_from, schedule.end);
        let callers = phase
            .callers
            .iter()
            .zip(recorders)
            .zip(whole)
            .map(|((&caller, recorder), sim_calls)| CallerRun {
                caller,
                recorder,
                budget_calls: last.budget_calls_since(first, caller.spec.id),
                sim_calls,
                requests: last.requests_since(first, caller.spec.id),
            })
            .collect();
        PhaseRun {
            callers,
            upstream: bench.upstream.stats(schedule.measure_from, schedule.end),
            unattributed,
            windows,
            measured: schedule.measured(),
        }
    }

    fn print(&mut self, s: &Settings) {
        let seconds = self.measured.as_secs_f64();
        for run in &mut self.callers {
            run.print(seconds);
        }
        let u = &self.upstream;
        println!(
            "upstream (simulator): {} calls = {:.1}/s ({:.1} % of per_second {}); rolling second max {}, min {}; \
             60007: {}; calls for no caller's group: {}",
            u.calls,
            u.per_second,
            100.0 * u.per_second / f64::from(s.gateway.per_second),
            s.gateway.per_second,
            u.max_rolling,
            u.min_rolling.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            u.rate_limited,
            self.unattributed
        );
        let ids: Vec<&str> = self.callers.iter().map(|c| c.caller.spec.id).collect();
        println!("upstream calls per window ({}; budget_calls_total, then the simulator's ledger):", ids.join(" : "));
        for w in &self.windows {
            let by_metric: Vec<String> = w.budget_calls.iter().map(|n| count_or_dash(*n)).collect();
            let by_sim: Vec<String> = w.sim_calls.iter().map(usize::to_string).collect();
            println!(
                "  {:>12}{}: {} = {}; simulator {} = {}",
                format!("{:.1}-{:.1} s", w.from_s, w.to_s),
                if w.judged { "" } else { " (not judged)" },
                by_metric.join(" : "),
                first_over_second(&w.budget_calls).map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
                by_sim.join(" : "),
                ratio_of_counts(&w.sim_calls)
            );
        }
    }
}

impl CallerRun {
    fn print(&mut self, seconds: f64) {
        let (c, r) = (&self.caller, &mut self.recorder);
        println!(
            "{} (weight {}): open loop {:.0} req/s on {} connections",
            c.spec.id, c.spec.weight, c.rate, c.connections
        );
        println!(
            "  answered: {} of {} sent; 200: {:.1} req/s; 429: {} ({:.2} %)",
            r.answered(),
            r.sent(),
            r.status(200) as f64 / seconds,
            r.status(429),
            100.0 * share(r.status(429), r.sent())
        );
        println!("  status: {}", status_line(r));
        let all = r.percentiles();
        let ok = r.percentiles_of_status(200);
        println!(
            "  latency: p50 {}, p99 {}, max {}; of the 200s: p50 {}, p99 {}",
            or_dash(all.as_ref().map(|p| p.p50)),
            or_dash(all.as_ref().map(|p| p.p99)),
            or_dash(all.as_ref().map(|p| p.max)),
            or_dash(ok.as_ref().map(|p| p.p50)),
            or_dash(ok.as_ref().map(|p| p.p99))
        );
        println!(
            "  upstream calls: {} ({}/s) by receipt_gateway_budget_calls_total, {} ({:.1}/s) by the simulator's ledger \
             (this caller's groups)",
            count_or_dash(self.budget_calls),
            self.budget_calls.map_or_else(|| "-".to_owned(), |n| format!("{:.1}", n / seconds)),
            self.sim_calls,
            self.sim_calls as f64 / seconds
        );
        let requests: Vec<String> = self.requests.iter().map(|(status, n)| format!("{status}={n:.0}")).collect();
        let requests = if requests.is_empty() { "none under this client".to_owned() } else { requests.join(" ") };
        // The client counts the requests scheduled in the measured interval, the gateway
        // those answered in it: the two differ by how much the queue grew meanwhile.
        println!("  gateway's receipt_gateway_requests_total, answered in the measured interval: {requests}");
        if let Some(queued) = r.queued_p99().filter(|q| *q > Duration::from_millis(1)) {
            println!(
                "  note: p99 of requests were sent up to {} late: connections busy or client short of CPU",
                ms(queued)
            );
        }
    }
}

/// Every caller's open loop on the same schedule, their recorders in the callers' order.
async fn drive_all(loads: &[Load], callers: &[Caller], schedule: Schedule) -> Vec<Recorder> {
    let mut running = JoinSet::new();
    for (i, (load, caller)) in loads.iter().zip(callers).enumerate() {
        let (load, rate) = (load.clone(), caller.rate);
        running.spawn(async move { (i, drive::open_loop(&load, rate, schedule).await) });
    }
    let mut recorders: Vec<Option<Recorder>> = callers.iter().map(|_| None).collect();
    while let Some(done) = running.join_next().await {
        match done {
            Ok((i, recorder)) => recorders[i] = Some(recorder),
            Err(e) => eprintln!("  a caller's load failed: {e}"),
        }
    }
    // A caller whose load failed reports nothing sent (and misses its targets).
    recorders.into_iter().map(Option::unwrap_or_default).collect()
}

/// The window boundaries of the measured interval: every [`WINDOW`] from its start, and
/// its end.
fn window_bounds(schedule: &Schedule) -> Vec<Instant> {
    let whole = (schedule.measured().as_secs_f64() / WINDOW.as_secs_f64()).floor() as u32;
    let mut bounds: Vec<Instant> = (0..=whole).map(|k| schedule.measure_from + WINDOW * k).collect();
    if bounds.last().is_some_and(|&last| last < schedule.end) {
        bounds.push(schedule.end);
    }
    bounds
}

/// Calls per caller, by the group prefix each caller's groups begin with, and the calls
/// of no caller's group.
fn attribute(by_group: &BTreeMap<String, usize>, prefixes: &[String]) -> (Vec<usize>, usize) {
    let mut calls = vec![0; prefixes.len()];
    let mut none = 0;
    for (group, &n) in by_group {
        match prefixes.iter().position(|p| group.starts_with(p.as_str())) {
            Some(i) => calls[i] += n,
            None => none += n,
        }
    }
    (calls, none)
}

fn describe(callers: &[Caller]) -> String {
    let each: Vec<String> =
        callers.iter().map(|c| format!("{} (weight {}) at {:.0} req/s", c.spec.id, c.spec.weight, c.rate)).collect();
    each.join(" beside ")
}

fn count_or_dash(n: Option<f64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| format!("{n:.0}"))
}

/// The first caller's calls over the second's, when both are known and the second's are
/// not zero.
fn first_over_second(calls: &[Option<f64>]) -> Option<f64> {
    match calls {
        [Some(a), Some(b), ..] if *b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn ratio_of_counts(calls: &[usize]) -> String {
    match calls {
        [a, b, ..] => ratio(*a as f64, *b as f64),
        _ => "-".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Verdicts
// ---------------------------------------------------------------------------------------

/// The split in every judged window, the budget spent and never overspent.
fn shares_verdict(run: &PhaseRun, s: &Settings) -> Verdict {
    let per_second = f64::from(s.gateway.per_second);
    let u = &run.upstream;
    Verdict::new(vec![
        split_check(run),
        Check::new(
            format!(">= {:.0} % of per_second spent", SPENT_AT_LEAST * 100.0),
            format!("{:.1}/s = {:.1} %", u.per_second, 100.0 * u.per_second / per_second),
            u.per_second >= SPENT_AT_LEAST * per_second,
        ),
        Check::new(
            format!("<= {} calls in every rolling second", s.gateway.per_second),
            format!("max {}", u.max_rolling),
            u.max_rolling <= s.gateway.per_second as usize,
        ),
    ])
}

/// The first two callers' calls in the ratio of their weights, within the tolerance, in
/// every judged window: by the gateway's counter, or by the simulator's ledger when the
/// gateway has none (said so in the figure).
fn split_check(run: &PhaseRun) -> Check {
    let [a, b, ..] = run.callers.as_slice() else {
        return Check::new("calls split by weight", "fewer than two callers".into(), false);
    };
    let want = f64::from(a.caller.spec.weight) / f64::from(b.caller.spec.weight);
    let target = format!(
        "calls {} : {} = {} : {} +- {:.0} % in every {:.0} s window",
        a.caller.spec.id,
        b.caller.spec.id,
        a.caller.spec.weight,
        b.caller.spec.weight,
        SPLIT_TOLERANCE * 100.0,
        WINDOW.as_secs_f64()
    );
    let judged: Vec<&Window> = run.windows.iter().filter(|w| w.judged).collect();
    let by_metric: Option<Vec<Option<f64>>> = judged
        .iter()
        .map(|w| w.budget_calls.iter().all(Option::is_some).then(|| first_over_second(&w.budget_calls)))
        .collect();
    let (source, ratios) = match by_metric {
        Some(ratios) => ("budget_calls_total", ratios),
        None => {
            let by_sim = judged.iter().map(|w| match w.sim_calls.as_slice() {
                [x, y, ..] if *y > 0 => Some(*x as f64 / *y as f64),
                _ => None,
            });
            ("simulator's ledger: the gateway has no budget_calls_total", by_sim.collect())
        }
    };
    let within = |r: &Option<f64>| r.is_some_and(|r| (r / want - 1.0).abs() <= SPLIT_TOLERANCE);
    let shown: Vec<String> = ratios.iter().map(|r| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"))).collect();
    let met = !ratios.is_empty() && ratios.iter().all(within);
    Check::new(target, format!("{} ({source})", shown.join(", ")), met)
}

/// The interactive caller (the first): no 429, and a p99 under the target.
fn isolation_verdict(run: &mut PhaseRun) -> Verdict {
    let Some(interactive) = run.callers.first_mut() else {
        return Verdict::new(vec![Check::new("an interactive caller", "none".into(), false)]);
    };
    let (id, r) = (interactive.caller.spec.id, &mut interactive.recorder);
    let rejected = r.status(429);
    let unanswered = r.hung + r.failed;
    let p99 = r.percentiles().map(|p| p.p99);
    let p99_shown = match unanswered {
        0 => or_dash(p99),
        n => format!("{} (and {n} hung or failed)", or_dash(p99)),
    };
    Verdict::new(vec![
        Check::new(
            format!("{id}: 0 % 429"),
            format!("{rejected} of {} ({:.2} %)", r.sent(), 100.0 * share(rejected, r.sent())),
            rejected == 0 && r.sent() > 0,
        ),
        Check::new(
            format!("{id}: p99 latency < {} ms (bounds its queue wait)", INTERACTIVE_P99.as_millis()),
            p99_shown,
            p99 < Some(INTERACTIVE_P99) && unanswered == 0,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_whole_ten_seconds_then_the_rest() {
        let schedule = Schedule::starting_now(Duration::from_secs(2), Duration::from_secs(25));
        let offsets: Vec<Duration> = window_bounds(&schedule).iter().map(|&b| b - schedule.measure_from).collect();
        assert_eq!(offsets, [0, 10, 20, 25].map(Duration::from_secs));
        let exact = Schedule::starting_now(Duration::ZERO, Duration::from_secs(20));
        assert_eq!(window_bounds(&exact).len(), 3);
        let short = Schedule::starting_now(Duration::ZERO, Duration::from_secs(4));
        assert_eq!(window_bounds(&short).len(), 2);
    }

    #[test]
    fn calls_are_attributed_by_the_callers_group_prefixes() {
        let by_group: BTreeMap<String, usize> =
            [("clients-bulk-1", 2), ("clients-bulk-2", 1), ("clients-backfill-1", 1), ("loadgen-3", 4)]
                .into_iter()
                .map(|(g, n)| (g.to_owned(), n))
                .collect();
        let prefixes = ["clients-bulk-".to_owned(), "clients-backfill-".to_owned()];
        assert_eq!(attribute(&by_group, &prefixes), (vec![3, 1], 4));
    }

    #[test]
    fn callers_get_the_connections_their_rate_needs_within_their_part() {
        let args = <crate::cli::Args as clap::Parser>::parse_from(["receipt-loadgen"]);
        let s = args.settings(&crate::cli::Defaults::of(crate::cli::ScenarioName::Clients)).expect("settings");
        let isolation = isolation_phase(&s);
        let rates: Vec<(f64, usize)> = isolation.callers.iter().map(|c| (c.rate, c.connections)).collect();
        assert_eq!(rates, [(20.0, 40), (1000.0, 512)]);
        let shares = shares_phase(&s);
        assert!(shares.callers.iter().all(|c| c.rate == 600.0 && c.connections == 512));
        assert_eq!(shares.callers.iter().map(|c| c.spec.weight).collect::<Vec<_>>(), [3, 1]);
    }

    #[test]
    fn the_split_is_the_first_callers_calls_over_the_seconds() {
        assert_eq!(first_over_second(&[Some(300.0), Some(100.0)]), Some(3.0));
        assert_eq!(first_over_second(&[Some(300.0), Some(0.0)]), None);
        assert_eq!(first_over_second(&[None, Some(1.0)]), None);
        assert_eq!(ratio_of_counts(&[150, 50]), "3.00");
    }
}
