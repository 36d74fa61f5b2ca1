//! The scenarios of issue 3's targets. Each starts its own simulator and gateway (so one
//! scenario's cache and budget never leak into the next), drives load, prints a labelled
//! block of figures and a one-line verdict against its targets.
//!
//! With `--replicas N` above 1, each scenario runs twice in the same way: against one
//! gateway (no Redis, the block as without the flag), then against N gateways sharing a
//! private redis-server (a fresh key prefix each time), requests spread round-robin over
//! them. Both blocks are followed by a side-by-side comparison and a verdict each: the
//! single gateway's against issue 3's targets, the fleet's against the fleet's.
//!
//! The `warm` scenario (issue 10: the hit path beside nginx and trivial hyper servers)
//! lives in [`warm`], the `clients` scenario (issue 8's fair share between callers) in
//! [`fair_share`], the `callbacks` scenario (issue 9: what callbacks save, how fast
//! `/callback` is) in [`callbacks`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::Result;
use crate::cli::{Args, Defaults, Distribution, LoadSettings, ScenarioName, Settings};
use crate::client::{HttpClient, Targets, XCache, http_client};
use crate::drive::{self, Load, Schedule};
use crate::gateway::{self, Gateway, Memory, SharedTier, Snapshot};
use crate::mix::Mix;
use crate::record::{Percentiles, Recorder, ms};
use crate::redis_server::RedisServer;
use crate::upstream::{Upstream, UpstreamStats};

#[path = "callbacks.rs"]
mod callbacks;
#[path = "fair_share.rs"]
mod fair_share;
#[path = "hang.rs"]
mod hang;
#[path = "warm.rs"]
mod warm;

/// How long the memory scenario waits for moka's lagging entry count to catch up.
const ENTRIES_SETTLE_WITHIN: Duration = Duration::from_secs(15);

/// The cold scenario looks at the first second after the first request.
const COLD_WINDOW: Duration = Duration::from_secs(1);

pub async fn run(args: &Args) -> Result<()> {
    let planned = plan(args)?;
    let bin = gateway::binary(args.gateway_bin.as_deref())?;
    println!("receipt-loadgen: gateway {} (RUST_LOG={})", bin.display(), args.gateway_log);
    if args.gateway_log == "warn" {
        println!("  request logging is at info and left out of these figures; --gateway-log info measures it");
    }
    println!("  client and simulator share this process; the gateway and the baseline run in their own");
    // Killed when dropped: at the end, or when a scenario bails out.
    let redis = match args.replicas {
        0 | 1 => None,
        _ => {
            let mut redis = RedisServer::start(&args.redis_server, args.keep_temp).await?;
            if args.redis_delay_ms > 0 {
                redis.delay(Duration::from_millis(args.redis_delay_ms)).await?;
            }
            Some(redis)
        }
    };
    let fleet = redis.as_ref().map(|redis| Fleet { replicas: args.replicas, redis });
    if let Some(fleet) = &fleet {
        println!(
            "  --replicas {n}: each scenario runs against one gateway, then against {n} sharing redis-server on {} \
             (budget.backend and fleet.backend \"redis\", a fresh key_prefix each), requests round-robin over them",
            fleet.redis.socket().display(),
            n = fleet.replicas
        );
    }
    let ctx = Ctx { bin, fleet };
    let mut verdicts = Vec::new();
    for (scenario, settings) in planned {
        println!("\n=== {} ===", scenario.label());
        print_settings(scenario, &settings);
        let single = |verdict| vec![(scenario.label().to_owned(), verdict)];
        let outcome = match scenario {
            ScenarioName::Warm => single(warm::warm(&ctx.bin, &settings).await?),
            ScenarioName::Under => under(&ctx, &settings).await?,
            ScenarioName::Over => over(&ctx, &settings).await?,
            ScenarioName::Memory => single(memory(&ctx.bin, &settings).await?),
            ScenarioName::Cold => cold(&ctx, &settings).await?,
            ScenarioName::Clients => fair_share::clients(&ctx.bin, &settings).await?,
            ScenarioName::Callbacks => callbacks::callbacks(&ctx.bin, &settings).await?,
            ScenarioName::Hang => hang_runs(&ctx, &settings).await?,
            ScenarioName::Custom | ScenarioName::All => custom(&ctx, scenario, &settings).await?,
        };
        for (label, verdict) in outcome {
            verdict.print(&label);
            verdicts.push((label, verdict));
        }
    }
    if verdicts.len() > 1 {
        println!("\n=== summary ===");
        for (label, verdict) in &verdicts {
            verdict.print(label);
        }
    }
    Ok(())
}

/// The scenarios to run with their settings, every one checked before anything runs.
fn plan(args: &Args) -> Result<Vec<(ScenarioName, Settings)>> {
    let scenarios = scenarios(args.scenario, args.replicas)?;
    if args.peer.is_some() && scenarios != [ScenarioName::Warm] {
        return Err("--peer applies to --scenario warm".into());
    }
    scenarios
        .into_iter()
        .map(|scenario| {
            let mut settings = args.settings(&Defaults::of(scenario))?;
            if scenario == ScenarioName::Cold {
                cold_start(&mut settings.load);
            }
            Ok((scenario, settings))
        })
        .collect()
}

/// What `--scenario` runs: `all` is warm, under, over, memory, clients and callbacks for
/// one gateway; a fleet runs the scenarios that take replicas.
fn scenarios(scenario: ScenarioName, replicas: usize) -> Result<Vec<ScenarioName>> {
    let fleet = match replicas {
        0 => return Err("--replicas must be at least 1".into()),
        n => n > 1,
    };
    Ok(match scenario {
        ScenarioName::All if fleet => vec![ScenarioName::Under, ScenarioName::Over, ScenarioName::Cold],
        ScenarioName::All => vec![
            ScenarioName::Warm,
            ScenarioName::Under,
            ScenarioName::Over,
            ScenarioName::Memory,
            ScenarioName::Clients,
            ScenarioName::Callbacks,
        ],
        one if fleet && !one.takes_replicas() => {
            let what = "measures one gateway; --replicas applies to under, over, cold and custom";
            return Err(format!("--scenario {} {what}", one.label()).into());
        }
        one => vec![one],
    })
}

/// A cold start has no warm-up whatever `--warmup` says, and is driven for at least the
/// second it is judged on.
fn cold_start(load: &mut LoadSettings) {
    load.warmup = Duration::ZERO;
    load.duration = load.duration.max(COLD_WINDOW);
}

/// Where a scenario's gateways come from.
struct Ctx<'a> {
    bin: PathBuf,
    /// With `--replicas` above 1.
    fleet: Option<Fleet<'a>>,
}

struct Fleet<'a> {
    replicas: usize,
    redis: &'a RedisServer,
}

impl Ctx<'_> {
    /// The label of a scenario's fleet run (its verdict and the summary).
    fn fleet_label(&self, scenario: ScenarioName) -> String {
        let replicas = self.fleet.as_ref().map_or(1, |f| f.replicas);
        format!("{} --replicas {replicas}", scenario.label())
    }
}

fn print_settings(scenario: ScenarioName, s: &Settings) {
    let (m, l, g) = (&s.mix, &s.load, &s.gateway);
    match scenario {
        ScenarioName::Memory => {
            println!("fill: {} groups x their latest {} MsgSeqs, {} connections", m.groups, m.latest, l.connections);
        }
        ScenarioName::Clients => fair_share::print_load(s),
        ScenarioName::Callbacks => callbacks::print_load(s),
        ScenarioName::Warm => warm::print_load(s),
        ScenarioName::Hang => hang::print_load(s),
        _ => print_load(s),
    }
    println!(
        "gateway: ttl_ms {}, stale_ms {}, max_entries {}, per_second {}, max_seqs {}; simulator: limit {}/s, latency {} ms",
        g.ttl_ms,
        g.stale_ms,
        g.max_entries,
        g.per_second,
        g.max_seqs,
        s.sim.limit,
        s.sim.latency.as_millis()
    );
    if scenario == ScenarioName::Cold {
        println!(
            "cold: from an empty cache, no warm-up; judged on the upstream calls in the first {:.0} s after the \
             first request",
            COLD_WINDOW.as_secs_f64()
        );
    }
}

fn print_load(s: &Settings) {
    let (m, l) = (&s.mix, &s.load);
    let distribution = match m.distribution {
        Distribution::Uniform => "uniform".to_owned(),
        Distribution::Zipf => format!("zipf s={}", m.zipf_exponent),
    };
    let rate = l.rate.map_or_else(|| "closed loop".to_owned(), |r| format!("open loop {r:.0} req/s"));
    println!(
        "load: {rate}, {} connections, {} groups ({distribution}), {} of the latest {} MsgSeqs per request, \
         deadline {} ms, {:.0} s warm-up + {:.0} s measured",
        l.connections,
        m.groups,
        m.seqs_per_request,
        m.latest,
        l.deadline.as_millis(),
        l.warmup.as_secs_f64(),
        l.duration.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------------------

/// 2,000 req/s over 100 groups: the budget suffices, so nearly everything is 200. A fleet
/// may spend at most a quarter more calls than one gateway.
async fn under(ctx: &Ctx<'_>, s: &Settings) -> Result<Vec<(String, Verdict)>> {
    let (mut single, fleet) = single_and_fleet(ctx, ScenarioName::Under, s).await?;
    let (ok, p99) = ok_and_p99(&mut single);
    let mut verdicts = vec![(
        ScenarioName::Under.label().to_owned(),
        Verdict::new(vec![
            Check::new(
                "upstream <= 110 calls/s",
                format!("{:.1}/s", single.upstream.per_second),
                single.upstream.per_second <= 110.0,
            ),
            ok_check(ok),
            p99_check(p99),
        ]),
    )];
    if let Some(mut fleet) = fleet {
        let (one, all) = (single.upstream.per_second, fleet.upstream.per_second);
        let (ok, p99) = ok_and_p99(&mut fleet);
        let calls = Check::new(
            "fleet calls/s <= 1.25 x single",
            format!("{all:.1} / {one:.1} = {}", ratio(all, one)),
            all <= 1.25 * one,
        );
        verdicts.push((ctx.fleet_label(ScenarioName::Under), Verdict::new(vec![calls, ok_check(ok), p99_check(p99)])));
    }
    Ok(verdicts)
}

/// The share of requests answered 200 and the p99 latency.
fn ok_and_p99(run: &mut Run) -> (f64, Option<Duration>) {
    (share(run.recorder.status(200), run.recorder.sent()), run.recorder.percentiles().map(|p| p.p99))
}

fn ok_check(ok: f64) -> Check {
    Check::new(">= 99.9 % answered 200", format!("{:.3} %", ok * 100.0), ok >= 0.999)
}

fn p99_check(p99: Option<Duration>) -> Check {
    Check::new("p99 < 50 ms", p99.map_or("-".into(), ms), p99 < Some(Duration::from_millis(50)))
}

/// 2,000 req/s over 1,000 groups: the budget is the bottleneck and must be spent fully,
/// never overspent, and nobody may wait past their deadline. A fleet must answer about as
/// many 200s as one gateway, within the same one budget.
async fn over(ctx: &Ctx<'_>, s: &Settings) -> Result<Vec<(String, Verdict)>> {
    let (single, fleet) = single_and_fleet(ctx, ScenarioName::Over, s).await?;
    let mut verdicts = vec![(ScenarioName::Over.label().to_owned(), over_verdict(&single))];
    if let Some(fleet) = fleet {
        let ok = |run: &Run| share(run.recorder.status(200), run.recorder.sent());
        let (one, all) = (ok(&single), ok(&fleet));
        let r = &fleet.recorder;
        let checks = vec![
            Check::new(
                "share of 200 >= 0.9 x single's",
                format!("{:.1} % / {:.1} % = {}", all * 100.0, one * 100.0, ratio(all, one)),
                all >= 0.9 * one,
            ),
            rolling_check(&fleet.upstream),
            rate_limited_check(fleet.rate_limited_total),
            Check::new("no 504", format!("{} (hung: {})", r.status(504), r.hung), r.status(504) == 0),
            in_time_check(r),
        ];
        verdicts.push((ctx.fleet_label(ScenarioName::Over), Verdict::new(checks)));
    }
    Ok(verdicts)
}

fn rolling_check(u: &UpstreamStats) -> Check {
    let (low, high) = (u.min_rolling.unwrap_or(0), u.max_rolling);
    Check::new("190..=200 calls in every rolling second", format!("min {low}, max {high}"), low >= 190 && high <= 200)
}

fn rate_limited_check(rate_limited: usize) -> Check {
    Check::new("no 60007", format!("{rate_limited} since start"), rate_limited == 0)
}

/// One gateway over the limit: issue 3's targets.
fn over_verdict(run: &Run) -> Verdict {
    Verdict::new(vec![
        rolling_check(&run.upstream),
        rate_limited_check(run.rate_limited_total),
        in_time_check(&run.recorder),
    ])
}

/// Every request answered 200, or 429 with `Retry-After`, before its deadline (by the
/// client's clock, allowing [`CLIENT_SLACK`](crate::record::CLIENT_SLACK)).
fn in_time_check(r: &Recorder) -> Check {
    let failures = format!(
        "{} (504: {}, hung: {}, transport: {}, 429 w/o Retry-After: {}, late: {}, other: {})",
        r.failures(),
        r.status(504),
        r.hung,
        r.failed,
        r.without_retry_after,
        r.late,
        r.answered() - r.status(200) - r.status(429) - r.status(504)
    );
    Check::new("every request 200/429+Retry-After in time (+10 ms for the client)", failures, r.failures() == 0)
}

/// Fills 1,000,000 items and reads the gateway's resident memory.
async fn memory(bin: &Path, s: &Settings) -> Result<Verdict> {
    let bench = Bench::start(bin, s, None).await?;
    let before = bench.gateway.memory()?;
    let started = Instant::now();
    let filled = bench.fill().await;
    let took = started.elapsed();
    let items = (s.mix.groups * s.mix.latest) as f64;
    println!(
        "filled {} groups x {} MsgSeqs in {:.1} s ({:.0} req/s, {} upstream calls): {}",
        s.mix.groups,
        s.mix.latest,
        took.as_secs_f64(),
        filled.sent() as f64 / took.as_secs_f64(),
        bench.upstream.call_count(),
        status_line(&filled)
    );
    let entries = bench.settled_entries(items).await?;
    let after = bench.gateway.memory()?;
    println!("cache entries (gauge): {entries:.0}");
    println!(
        "gateway memory: VmRSS {:.1} MiB before, {:.1} MiB after (peak {:.1} MiB); {:.0} bytes per item",
        before.rss_mib(),
        after.rss_mib(),
        after.hwm_mib(),
        (after.rss_kib.saturating_sub(before.rss_kib) * 1024) as f64 / entries.max(1.0)
    );
    bench.stop().await;
    Ok(Verdict::new(vec![
        Check::new(format!(">= {items:.0} items cached"), format!("{entries:.0}"), entries >= items),
        Check::new("VmRSS <= 256 MiB", format!("{:.1} MiB", after.rss_mib()), after.rss_mib() <= 256.0),
    ]))
}

/// 600 req/s over 20 groups from an empty cache: how many upstream calls the first second
/// takes per group, for one gateway and for the fleet (its shared tier flushed).
async fn cold(ctx: &Ctx<'_>, s: &Settings) -> Result<Vec<(String, Verdict)>> {
    let (single, fleet) = single_and_fleet(ctx, ScenarioName::Cold, s).await?;
    let groups = s.mix.groups;
    let mut verdicts = vec![(ScenarioName::Cold.label().to_owned(), Verdict::new(vec![cold_check(&single, groups)]))];
    if let Some(fleet) = fleet {
        verdicts.push((ctx.fleet_label(ScenarioName::Cold), Verdict::new(vec![cold_check(&fleet, groups)])));
    }
    Ok(verdicts)
}

fn cold_check(run: &Run, groups: usize) -> Check {
    let first = FirstSecond::of(run, groups);
    Check::new("<= 3 calls per group in the first second", first.summary(), first.per_group() <= 3.0)
}

/// An upstream hang under steady load: one gateway, then with `--replicas` the fleet.
async fn hang_runs(ctx: &Ctx<'_>, s: &Settings) -> Result<Vec<(String, Verdict)>> {
    println!("\n-- one gateway");
    let mut verdicts = vec![(ScenarioName::Hang.label().to_owned(), hang::hang(&ctx.bin, s, None).await?)];
    if let Some(fleet) = &ctx.fleet {
        fleet.redis.flush().await?;
        let tier = fleet.redis.tier(format!("loadgen-{}-hang", std::process::id()), fleet.replicas);
        println!("\n-- fleet of {} gateways on one Redis budget", fleet.replicas);
        verdicts.push((ctx.fleet_label(ScenarioName::Hang), hang::hang(&ctx.bin, s, Some(&tier)).await?));
    }
    Ok(verdicts)
}

/// The mix the flags describe, reported without targets.
async fn custom(ctx: &Ctx<'_>, scenario: ScenarioName, s: &Settings) -> Result<Vec<(String, Verdict)>> {
    let (_, fleet) = single_and_fleet(ctx, scenario, s).await?;
    let mut verdicts = vec![(scenario.label().to_owned(), Verdict::new(Vec::new()))];
    if fleet.is_some() {
        verdicts.push((ctx.fleet_label(scenario), Verdict::new(Vec::new())));
    }
    Ok(verdicts)
}

/// The scenario's load measured against one gateway and, with `--replicas` above 1, once
/// more against the fleet (an empty shared tier under a fresh key prefix); each block
/// printed as it ends, then both side by side.
async fn single_and_fleet(ctx: &Ctx<'_>, scenario: ScenarioName, s: &Settings) -> Result<(Run, Option<Run>)> {
    let Some(fleet) = &ctx.fleet else {
        return Ok((measured_run(&ctx.bin, scenario, s, None).await?, None));
    };
    println!("\n-- one gateway");
    let mut single = measured_run(&ctx.bin, scenario, s, None).await?;
    let key_prefix = format!("loadgen-{}-{}", std::process::id(), scenario.label());
    fleet.redis.flush().await?;
    let tier = fleet.redis.tier(key_prefix, fleet.replicas);
    println!(
        "\n-- fleet of {} gateways: budget.backend and fleet.backend \"redis\", key_prefix {}, budget per_second {} \
         for the fleet (fallback {} each), requests round-robin",
        fleet.replicas,
        tier.key_prefix,
        s.gateway.per_second,
        gateway::fallback_per_second(s.gateway.per_second, fleet.replicas)
    );
    let mut all = measured_run(&ctx.bin, scenario, s, Some(&tier)).await?;
    // A figure for a look, not one the verdicts need: a failure to read it is only reported.
    match fleet.redis.key_count().await {
        Ok(keys) => println!("redis: {keys} keys after the run"),
        Err(e) => println!("redis: cannot count the keys after the run: {e}"),
    }
    print_comparison(scenario, s, &mut single, &mut all, fleet.replicas);
    Ok((single, Some(all)))
}

/// A fresh bench (one gateway, or a fleet on `shared`), the scenario's load measured once
/// and printed.
async fn measured_run(bin: &Path, scenario: ScenarioName, s: &Settings, shared: Option<&SharedTier>) -> Result<Run> {
    let bench = Bench::start(bin, s, shared).await?;
    let mut run = bench.measure(s.load.rate, &s.load).await?;
    run.print();
    if scenario == ScenarioName::Cold {
        println!("first second after the first request: {}", FirstSecond::of(&run, s.mix.groups).summary());
    }
    bench.stop().await;
    Ok(run)
}

// ---------------------------------------------------------------------------------------
// One simulator + one gateway, and measured runs against them
// ---------------------------------------------------------------------------------------

struct Bench {
    upstream: Upstream,
    gateway: Gateway,
    /// The fleet's other gateways (none for one gateway).
    replicas: Vec<Gateway>,
    admin: HttpClient,
    load: Load,
}

impl Bench {
    /// A simulator and one gateway, or with `shared` a fleet of `shared.replicas` on it.
    async fn start(bin: &Path, s: &Settings, shared: Option<&SharedTier>) -> Result<Bench> {
        let upstream = Upstream::start(&s.sim).await?;
        let admin = http_client(2);
        let gateway = Gateway::start(bin, &s.gateway, upstream.url(), shared, &admin).await?;
        let mut replicas = Vec::new();
        for _ in 1..shared.map_or(1, |tier| tier.replicas) {
            // Should one fail to start, the ones already running are killed when dropped.
            replicas.push(Gateway::start(bin, &s.gateway, upstream.url(), shared, &admin).await?);
        }
        let addrs: Vec<SocketAddr> = std::iter::once(&gateway).chain(&replicas).map(|g| g.data).collect();
        let load = Load {
            client: http_client(s.load.connections),
            targets: Arc::new(Targets::new(&addrs, s.load.deadline)?),
            mix: Arc::new(Mix::new(&s.mix)),
            connections: s.load.connections,
            seed: s.mix.seed,
        };
        Ok(Bench { upstream, gateway, replicas, admin, load })
    }

    /// Every gateway of the bench, the first one first.
    fn gateways(&self) -> impl Iterator<Item = &Gateway> {
        std::iter::once(&self.gateway).chain(&self.replicas)
    }

    async fn fill(&self) -> Recorder {
        drive::fill(&self.load).await
    }

    /// The `/metrics` figures of every gateway, added up.
    async fn metrics(&self) -> Result<Snapshot> {
        let mut snapshots = Vec::new();
        for gateway in self.gateways() {
            snapshots.push(gateway.metrics(&self.admin).await?);
        }
        Ok(Snapshot::sum(snapshots))
    }

    /// Drives the mix and reads the simulator's ledger and the gateways' counters for
    /// the measured interval.
    async fn measure(&self, rate: Option<f64>, s: &LoadSettings) -> Result<Run> {
        let schedule = Schedule::starting_now(s.warmup, s.duration);
        let counters = async {
            tokio::time::sleep_until(schedule.measure_from.into()).await;
            let before = self.metrics().await;
            tokio::time::sleep_until(schedule.end.into()).await;
            let after = self.metrics().await;
            (before, after)
        };
        let (recorder, (before, after)) = tokio::join!(drive::run(&self.load, rate, schedule), counters);
        let first_second = recorder
            .first_sent
            .map(|first| self.upstream.calls_by_group(first, first + COLD_WINDOW))
            .unwrap_or_default();
        Ok(Run {
            recorder,
            measured: schedule.measured(),
            upstream: self.upstream.stats(schedule.measure_from, schedule.end),
            rate_limited_total: self.upstream.rate_limited_total(),
            first_second,
            items: after?.items_since(&before?),
            memory: self.gateways().map(Gateway::memory).collect::<Result<_>>()?,
        })
    }

    /// `receipt_gateway_cache_entries` once it reaches `expected`, or its last value.
    async fn settled_entries(&self, expected: f64) -> Result<f64> {
        let started = Instant::now();
        loop {
            let entries = self.metrics().await?.cache_entries.unwrap_or(0.0);
            if entries >= expected || started.elapsed() > ENTRIES_SETTLE_WITHIN {
                return Ok(entries);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stops every gateway (all at once: each may take its shutdown grace).
    async fn stop(self) {
        let mut stopping = JoinSet::new();
        for gateway in std::iter::once(self.gateway).chain(self.replicas) {
            stopping.spawn(gateway.stop());
        }
        while stopping.join_next().await.is_some() {}
    }
}

/// What one measured run saw, from the client, the simulator and the gateways.
struct Run {
    recorder: Recorder,
    measured: Duration,
    upstream: UpstreamStats,
    /// 60007 answers since the simulator started (warm-up included).
    rate_limited_total: usize,
    /// Upstream calls by group in the first second after the first measured request.
    first_second: BTreeMap<String, usize>,
    items: BTreeMap<String, f64>,
    /// Of each gateway, the first one first.
    memory: Vec<Memory>,
}

impl Run {
    fn print(&mut self) {
        print_client(&mut self.recorder, self.measured);
        let u = &self.upstream;
        let min = u.min_rolling.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let mut codes: Vec<String> = u.codes.iter().map(|(code, n)| format!("{code}={n}")).collect();
        if codes.is_empty() {
            codes.push("-".into());
        }
        println!(
            "upstream: {} calls = {:.1}/s; rolling second max {}, min {min}; 60007: {}; {:.1} distinct MsgSeqs/call; codes {}",
            u.calls,
            u.per_second,
            u.max_rolling,
            u.rate_limited,
            u.mean_seqs,
            codes.join(" ")
        );
        println!("items: {}", item_shares(&self.items));
        match self.memory.as_slice() {
            [one] => println!("gateway: VmRSS {:.1} MiB (peak {:.1} MiB)", one.rss_mib(), one.hwm_mib()),
            fleet => {
                let each = |mib: fn(&Memory) -> f64| fleet.iter().map(|m| format!("{:.1}", mib(m))).collect::<Vec<_>>();
                println!(
                    "gateways: VmRSS {} MiB (peaks {} MiB)",
                    each(Memory::rss_mib).join(" / "),
                    each(Memory::hwm_mib).join(" / ")
                );
            }
        }
    }
}

/// What the cold scenario is judged on: upstream calls in the first second after the
/// first request, per group of the mix.
struct FirstSecond {
    calls: usize,
    groups: usize,
    groups_called: usize,
    most_for_one_group: usize,
}

impl FirstSecond {
    fn of(run: &Run, groups: usize) -> FirstSecond {
        let per_group = &run.first_second;
        FirstSecond {
            calls: per_group.values().sum(),
            groups,
            groups_called: per_group.len(),
            most_for_one_group: per_group.values().copied().max().unwrap_or(0),
        }
    }

    fn per_group(&self) -> f64 {
        self.calls as f64 / self.groups.max(1) as f64
    }

    fn summary(&self) -> String {
        format!(
            "{} upstream calls / {} groups = {:.2} calls per group ({} groups called, at most {} for one)",
            self.calls,
            self.groups,
            self.per_group(),
            self.groups_called,
            self.most_for_one_group
        )
    }
}

// ---------------------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------------------

fn print_client(r: &mut Recorder, measured: Duration) {
    let seconds = measured.as_secs_f64();
    println!(
        "answered: {} of {} sent = {:.0} req/s ({:.0} req/s with 200)",
        r.answered(),
        r.sent(),
        r.answered() as f64 / seconds,
        r.status(200) as f64 / seconds
    );
    println!("status: {}", status_line(r));
    let x_cache: Vec<String> = r.x_cache.iter().map(|(x, n)| format!("{}={n}", x.label())).collect();
    println!("X-Cache: {}", x_cache.join(" "));
    if let Some(p) = r.percentiles() {
        println!("latency: p50 {}, p99 {}, p99.9 {}, max {}", ms(p.p50), ms(p.p99), ms(p.p999), ms(p.max));
    }
    if let Some(queued) = r.queued_p99().filter(|q| *q > Duration::from_millis(1)) {
        println!(
            "  note: p99 of requests were sent up to {} late: all connections busy or client short of CPU",
            ms(queued)
        );
    }
}

/// One gateway and the fleet side by side: what the shared tier changes.
fn print_comparison(scenario: ScenarioName, s: &Settings, single: &mut Run, fleet: &mut Run, replicas: usize) {
    let fleet_head = format!("fleet of {replicas}");
    println!("\n-- one gateway vs the {fleet_head}");
    // A line per figure; the note says how the two compare where that means something.
    let row = |what: &str, one: String, all: String, note: String| {
        println!("{}", format!("{what:<40} {one:>14} {all:>14}  {note}").trim_end());
    };
    row("", "one gateway".into(), fleet_head, String::new());
    let (one, all) = (single.upstream.per_second, fleet.upstream.per_second);
    row("upstream calls/s", format!("{one:.1}"), format!("{all:.1}"), format!("fleet/single {}", ratio(all, one)));
    let seqs = |run: &Run| format!("{:.1}", run.upstream.mean_seqs);
    row("distinct MsgSeqs per call", seqs(single), seqs(fleet), String::new());
    let ok = |run: &Run| share(run.recorder.status(200), run.recorder.sent());
    let (ok_one, ok_all) = (ok(single), ok(fleet));
    row(
        "answered 200",
        format!("{:.3} %", ok_one * 100.0),
        format!("{:.3} %", ok_all * 100.0),
        format!("fleet/single {}", ratio(ok_all, ok_one)),
    );
    let (p_one, p_all) = (single.recorder.percentiles(), fleet.recorder.percentiles());
    let at = |p: &Option<Percentiles>, pick: fn(&Percentiles) -> Duration| p.as_ref().map(pick);
    row("latency p50", or_dash(at(&p_one, |p| p.p50)), or_dash(at(&p_all, |p| p.p50)), String::new());
    row("latency p99", or_dash(at(&p_one, |p| p.p99)), or_dash(at(&p_all, |p| p.p99)), String::new());
    let n504 = |run: &Run| run.recorder.status(504).to_string();
    row("504", n504(single), n504(fleet), String::new());
    let rolling = |run: &Run| {
        let min = run.upstream.min_rolling.map_or_else(|| "-".to_owned(), |n| n.to_string());
        format!("{min} / {}", run.upstream.max_rolling)
    };
    row("calls in a rolling second, min / max", rolling(single), rolling(fleet), String::new());
    // A MISS is answered by an upstream call; in the fleet it also passes the shared tier.
    let (m_one, m_all) = (single.recorder.percentiles_of(XCache::Miss), fleet.recorder.percentiles_of(XCache::Miss));
    for (what, pick) in [("p50", (|p: &Percentiles| p.p50) as fn(&Percentiles) -> Duration), ("p99", |p| p.p99)] {
        let (one, all) = (at(&m_one, pick), at(&m_all, pick));
        let added = match (one, all) {
            (Some(one), Some(all)) => format!("added by the shared tier: {}", ms_delta(one, all)),
            _ => String::new(),
        };
        row(&format!("latency of X-Cache: MISS, {what}"), or_dash(one), or_dash(all), added);
    }
    if scenario == ScenarioName::Cold {
        let first = |run: &Run| format!("{:.2}", FirstSecond::of(run, s.mix.groups).per_group());
        row("first second: calls per group", first(single), first(fleet), String::new());
    }
}

/// `a / b` to two decimals, `-` when `b` is zero.
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 { format!("{:.2}", a / b) } else { "-".to_owned() }
}

fn or_dash(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), ms)
}

/// `+1.20 ms` or `-0.35 ms`: how much later `b` is than `a`.
fn ms_delta(a: Duration, b: Duration) -> String {
    if b >= a { format!("+{}", ms(b - a)) } else { format!("-{}", ms(a - b)) }
}

fn status_line(r: &Recorder) -> String {
    let mut parts: Vec<String> = r.statuses.iter().map(|(status, n)| format!("{status}={n}")).collect();
    if r.status(429) > 0 {
        parts.push(format!("(429 without Retry-After: {})", r.without_retry_after));
    }
    parts.push(format!("late={} hung={} transport-errors={}", r.late, r.hung, r.failed));
    parts.join(" ")
}

fn item_shares(items: &BTreeMap<String, f64>) -> String {
    let total: f64 = items.values().sum();
    let parts: Vec<String> = ["hit", "coalesced", "fetched", "stale", "failed"]
        .iter()
        .map(|source| {
            let n = items.get(*source).copied().unwrap_or(0.0);
            format!("{source} {:.1} %", 100.0 * n / total.max(1.0))
        })
        .collect();
    format!("{} (of {total:.0})", parts.join(", "))
}

fn share(n: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { n as f64 / of as f64 }
}

// ---------------------------------------------------------------------------------------
// Verdicts
// ---------------------------------------------------------------------------------------

/// A scenario's targets and whether the run met them.
struct Verdict {
    checks: Vec<Check>,
}

struct Check {
    target: String,
    measured: String,
    met: bool,
}

impl Check {
    fn new(target: impl Into<String>, measured: String, met: bool) -> Check {
        Check { target: target.into(), measured, met }
    }
}

impl Verdict {
    fn new(checks: Vec<Check>) -> Verdict {
        Verdict { checks }
    }

    /// One line: overall result, then each target with what was measured.
    fn print(&self, scenario: &str) {
        if self.checks.is_empty() {
            println!("verdict {scenario}: no targets (custom mix)");
            return;
        }
        let met = self.checks.iter().filter(|c| c.met).count();
        let overall = if met == self.checks.len() { "PASS" } else { "MISS" };
        let details: Vec<String> = self
            .checks
            .iter()
            .map(|c| format!("[{}] {}: {}", if c.met { "ok" } else { "MISSED" }, c.target, c.measured))
            .collect();
        println!("verdict {scenario}: {overall} ({met}/{}) {}", self.checks.len(), details.join("; "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_todays_six_for_one_gateway_and_the_fleet_scenarios_for_a_fleet() {
        use ScenarioName::*;
        assert_eq!(scenarios(All, 1).ok(), Some(vec![Warm, Under, Over, Memory, Clients, Callbacks]));
        assert_eq!(scenarios(All, 3).ok(), Some(vec![Under, Over, Cold]));
        assert_eq!(scenarios(Cold, 1).ok(), Some(vec![Cold]));
        assert_eq!(scenarios(Custom, 2).ok(), Some(vec![Custom]));
        assert!(scenarios(Warm, 3).is_err());
        assert!(scenarios(Memory, 2).is_err());
        assert!(scenarios(Clients, 3).is_err());
        assert!(scenarios(Callbacks, 2).is_err());
        assert!(scenarios(Under, 0).is_err());
    }

    #[test]
    fn a_cold_start_has_no_warm_up_and_lasts_the_judged_second() {
        let mut load = LoadSettings {
            rate: Some(600.0),
            connections: 8,
            warmup: Duration::from_secs(5),
            duration: Duration::from_millis(300),
            deadline: Duration::from_secs(1),
        };
        cold_start(&mut load);
        assert_eq!((load.warmup, load.duration), (Duration::ZERO, COLD_WINDOW));
        load.duration = Duration::from_secs(20);
        cold_start(&mut load);
        assert_eq!(load.duration, Duration::from_secs(20));
    }

    #[test]
    fn comparisons_print_ratios_and_signed_differences() {
        assert_eq!(ratio(125.0, 100.0), "1.25");
        assert_eq!(ratio(3.0, 0.0), "-");
        assert_eq!(ms_delta(Duration::from_millis(2), Duration::from_millis(5)), "+3.00 ms");
        assert_eq!(ms_delta(Duration::from_millis(5), Duration::from_millis(2)), "-3.00 ms");
    }
}
