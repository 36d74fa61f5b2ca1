//! The command line, and each scenario's defaults (issue 3's targets) merged with the flags
//! given. Every knob is an `Option` here so that a flag overrides a scenario's default and
//! `--scenario all` applies the same override to every scenario.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use receipt_gateway::simulator::MAX_READS_PER_SECOND;

use crate::Result;

#[derive(Parser, Debug)]
#[command(
    name = "receipt-loadgen",
    about = "Benchmark of receipt-gateway: drives the release gateway (a subprocess) in front of an \
             in-process Tencent simulator and reports throughput, latency, upstream calls and memory"
)]
pub struct Args {
    /// Which scenario to run; `all` runs warm, under, over, memory, clients and callbacks in
    /// sequence (with `--replicas` above 1: under, over and cold).
    #[arg(long, value_enum, default_value_t = ScenarioName::All)]
    pub scenario: ScenarioName,
    /// Gateways in the fleet. Above 1, every scenario runs twice: one gateway as usual, then
    /// this many sharing a private `redis-server` (`budget.backend` and `fleet.backend` =
    /// "redis"), requests spread round-robin over them; the two are reported side by side.
    /// (`warm`, `memory`, `clients` and `callbacks` measure one gateway and take no replicas.)
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// The `redis-server` binary the fleet shares (with `--replicas` above 1).
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// Milliseconds added to every round trip between the fleet's replicas and Redis (half
    /// each way, by a TCP proxy in front of the private `redis-server`), as with a managed
    /// Redis further away; 0 = none (with `--replicas` above 1).
    #[arg(long, default_value_t = 0)]
    pub redis_delay_ms: u64,
    /// The gateway binary [default: `receipt-gateway` next to this binary].
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// HTTP/1.1 keep-alive connections (= the most requests in flight).
    #[arg(long)]
    pub connections: Option<usize>,
    /// How many groups requests are spread over.
    #[arg(long)]
    pub groups: Option<usize>,
    /// Distinct MsgSeqs per request.
    #[arg(long)]
    pub seqs_per_request: Option<usize>,
    /// Each request picks its MsgSeqs from the group's latest L messages (1..=L).
    #[arg(long)]
    pub latest: Option<usize>,
    /// How requests are spread over groups.
    #[arg(long, value_enum)]
    pub distribution: Option<Distribution>,
    /// The exponent s of the Zipf distribution (weight of group i is 1/i^s).
    #[arg(long, default_value_t = 1.0)]
    pub zipf_exponent: f64,
    /// Requests per second, open loop (latency counted from the scheduled send time);
    /// 0 = closed loop, as fast as `--connections` workers go. (`warm` picks its own
    /// rates: full speed, then half of it; `memory` fills as fast as it can; `clients`
    /// derives its callers' rates from `--per-second`.)
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured seconds (after the warm-up).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds of load before measuring.
    #[arg(long)]
    pub warmup: Option<f64>,
    /// The gateway's `cache.ttl_ms`.
    #[arg(long)]
    pub ttl_ms: Option<u64>,
    /// The gateway's `cache.stale_ms`.
    #[arg(long)]
    pub stale_ms: Option<u64>,
    /// The gateway's `cache.max_entries`.
    #[arg(long)]
    pub max_entries: Option<u64>,
    /// The gateway's `cache.callback_ttl_ms` (the `callbacks` scenario's second phase).
    #[arg(long)]
    pub callback_ttl_ms: Option<u64>,
    /// How fast the simulator's members read (`callbacks`): one callback per read.
    #[arg(long, default_value_t = 200.0)]
    pub reads_per_second: f64,
    /// Callbacks per second sent straight to `/callback`, open loop (`callbacks`, its
    /// ingest phase).
    #[arg(long, default_value_t = 5000.0)]
    pub callback_rate: f64,
    /// Every request's deadline, sent as `X-Request-Timeout-Ms` (the client gives up one
    /// second later and counts the request as hung).
    #[arg(long)]
    pub deadline_ms: Option<u64>,
    /// The gateway's `batch.window_ms`: how long a batch waits for more MsgSeqs.
    #[arg(long)]
    pub window_ms: Option<u64>,
    /// The gateway's `budget.per_second`.
    #[arg(long)]
    pub per_second: Option<u32>,
    /// The simulator's calls allowed per rolling second.
    #[arg(long)]
    pub sim_limit: Option<u32>,
    /// MsgSeqs per upstream call: the simulator's limit and the gateway's `batch.max_seqs`.
    #[arg(long)]
    pub max_seqs: Option<usize>,
    /// Latency the simulator adds to every answer, in milliseconds.
    #[arg(long)]
    pub sim_latency_ms: Option<u64>,
    /// `RUST_LOG` for the gateway. Request logging is at `info`; the default `warn` leaves
    /// it out of the measurement (pass `info` to measure its cost).
    #[arg(long, default_value = "warn")]
    pub gateway_log: String,
    /// Seed of the request mix (each connection derives its own).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the temporary directory (config and gateway log) after a clean run.
    #[arg(long)]
    pub keep_temp: bool,
    /// `warm`: measure one server alone instead of all of them side by side.
    #[arg(long, value_enum)]
    pub peer: Option<PeerName>,
    /// `warm`: alternating rounds over the servers (each round measures every one of them
    /// with wrk and with this load generator's client).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// `warm`: the threads of the load generator's client, each running a single-threaded
    /// runtime of its own (the simulator runs on another runtime).
    #[arg(long, default_value_t = 2)]
    pub client_threads: usize,
    /// Internal: serve the trivial baseline on this port (0 = any) and print its address.
    #[arg(long, hide = true)]
    pub serve_baseline: Option<u16>,
    /// Internal: the fixed baseline's body size in bytes.
    #[arg(long, hide = true, default_value_t = 200)]
    pub body_bytes: usize,
    /// Internal: what the baseline answers.
    #[arg(long, hide = true, value_enum, default_value_t = BaselineKind::Fixed)]
    pub baseline_kind: BaselineKind,
}

/// The servers the `warm` scenario compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum PeerName {
    /// The release gateway, every answer from its cache.
    Gateway,
    /// nginx as a caching proxy (`proxy_cache`) in front of the same simulator.
    Nginx,
    /// A trivial hyper server that parses the request and serialises the answer.
    Hyper,
    /// A trivial hyper server that answers a fixed body of the same size.
    HyperFixed,
}

/// What the trivial hyper baseline does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BaselineKind {
    /// Reads the body and answers a fixed body of `--body-bytes`.
    Fixed,
    /// Parses the request JSON and serialises the simulator's answer for it.
    Parsing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScenarioName {
    All,
    /// Everything from cache: the gateway beside nginx `proxy_cache` and trivial hyper
    /// servers (wrk and this client, alternating rounds), p99 at half the gateway's rate,
    /// and the cost of request logging beside nginx's `access_log`.
    Warm,
    /// 2,000 req/s over 100 groups: the budget suffices.
    Under,
    /// 2,000 req/s over 1,000 groups: the budget is the bottleneck.
    Over,
    /// 1,000,000 cached items: resident memory.
    Memory,
    /// 600 req/s over 20 groups from an empty cache: upstream calls in the first second.
    Cold,
    /// Two callers on one budget, every request an uncached group: weighted shares (3 : 1)
    /// when both flood, then an interactive caller's latency beside a bulk flood.
    Clients,
    /// Members reading at a steady rate: upstream calls and staleness with a TTL only,
    /// then with the reads' callbacks reaching the gateway; then `/callback` throughput.
    Callbacks,
    /// 750 req/s over 50 groups, deadlines 250/1000/2000 ms, a budget of 180/s: upstream
    /// holds every call for 3 s; how long until the gateway is back to its steady calls
    /// and answers, and whether any answer came after its deadline meanwhile.
    Hang,
    /// The mix given by the flags (defaults as `under`), reported without a verdict.
    Custom,
}

impl ScenarioName {
    /// Whether the scenario can run against a fleet: `warm` compares one gateway with the
    /// baseline, `memory` reads one gateway's resident set, `clients` judges one
    /// gateway's fair share and `callbacks` one gateway's callbacks.
    pub fn takes_replicas(self) -> bool {
        !matches!(self, ScenarioName::Warm | ScenarioName::Memory | ScenarioName::Clients | ScenarioName::Callbacks)
    }
}

impl ScenarioName {
    pub fn label(self) -> &'static str {
        match self {
            ScenarioName::All => "all",
            ScenarioName::Warm => "warm",
            ScenarioName::Under => "under",
            ScenarioName::Over => "over",
            ScenarioName::Memory => "memory",
            ScenarioName::Cold => "cold",
            ScenarioName::Clients => "clients",
            ScenarioName::Callbacks => "callbacks",
            ScenarioName::Hang => "hang",
            ScenarioName::Custom => "custom",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Distribution {
    Uniform,
    Zipf,
}

/// A scenario's defaults: the figures of issue 3's targets.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub groups: usize,
    pub seqs_per_request: usize,
    pub latest: usize,
    pub rate: f64,
    pub connections: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub ttl_ms: u64,
    pub stale_ms: u64,
    pub max_entries: u64,
    pub callback_ttl_ms: u64,
    pub deadline_ms: u64,
    pub window_ms: u64,
    pub per_second: u32,
    pub sim_limit: u32,
    pub max_seqs: usize,
}

/// Tencent's limits and the gateway's shipped defaults; scenarios change what they test.
const BASE: Defaults = Defaults {
    groups: 100,
    seqs_per_request: 5,
    latest: 50,
    rate: 2000.0,
    // Open loop: enough connections that the client never queues at 2,000 req/s even
    // when answers take half a second (HTTP/1.1 carries one request per connection).
    connections: 1024,
    duration_s: 20.0,
    warmup_s: 5.0,
    ttl_ms: 1000,
    stale_ms: 60_000,
    max_entries: 1_000_000,
    callback_ttl_ms: 10_000,
    deadline_ms: 1000,
    window_ms: 2,
    per_second: 200,
    sim_limit: 200,
    max_seqs: 50,
};

impl Defaults {
    pub fn of(scenario: ScenarioName) -> Defaults {
        match scenario {
            ScenarioName::Warm => {
                Defaults { rate: 0.0, connections: 64, duration_s: 10.0, warmup_s: 2.0, ttl_ms: 600_000, ..BASE }
            }
            ScenarioName::Over => Defaults { groups: 1000, ..BASE },
            ScenarioName::Memory => Defaults {
                groups: 20_000,
                seqs_per_request: 50,
                rate: 0.0,
                connections: 64,
                ttl_ms: 600_000,
                stale_ms: 600_000,
                max_entries: 2_000_000,
                per_second: 20_000,
                sim_limit: 20_000,
                ..BASE
            },
            // No warm-up: what an empty cache costs is the measurement. One second is what
            // the verdict looks at; a longer `--duration` is reported too.
            ScenarioName::Cold => Defaults { groups: 20, rate: 600.0, warmup_s: 0.0, duration_s: 1.0, ..BASE },
            // Two phases of 2 s + 20 s each (two of the 10 s windows the shares are judged
            // on), about 50 s in all with the gateways' starts and stops. The connections
            // are split between the two callers of a phase.
            ScenarioName::Clients => Defaults { warmup_s: 2.0, ..BASE },
            // Each request asks for all five messages of its group (the working set is
            // fixed: 500 messages), so every message is asked about every 50 ms. Two phases
            // of 3 s + 12 s, then the ingest phase: about 45 s in all.
            ScenarioName::Callbacks => Defaults { latest: 5, warmup_s: 3.0, duration_s: 12.0, ..BASE },
            // 3 s of warm-up, the hang module's steady state and hang, then 20 s after the
            // release (`--duration`).
            ScenarioName::Hang => Defaults { groups: 50, rate: 750.0, per_second: 180, warmup_s: 3.0, ..BASE },
            ScenarioName::All | ScenarioName::Under | ScenarioName::Custom => BASE,
        }
    }
}

/// What one scenario runs with, after the flags were applied to its defaults.
#[derive(Clone, Debug)]
pub struct Settings {
    pub mix: MixSettings,
    pub load: LoadSettings,
    pub gateway: GatewaySettings,
    pub sim: SimSettings,
    pub callbacks: CallbackSettings,
    pub warm: WarmSettings,
}

/// What the `warm` scenario adds.
#[derive(Clone, Debug)]
pub struct WarmSettings {
    /// One server alone (`--peer`), or all of them side by side.
    pub peer: Option<PeerName>,
    pub rounds: usize,
    pub client_threads: usize,
}

/// What the `callbacks` scenario adds.
#[derive(Clone, Debug)]
pub struct CallbackSettings {
    /// The members' pace: reads (and callbacks) per second.
    pub reads_per_second: f64,
    /// The ingest phase's offered rate of callbacks straight to `/callback`.
    pub ingest_rate: f64,
}

#[derive(Clone, Debug)]
pub struct MixSettings {
    pub groups: usize,
    pub seqs_per_request: usize,
    pub latest: usize,
    pub distribution: Distribution,
    pub zipf_exponent: f64,
    pub seed: u64,
}

#[derive(Clone, Debug)]
pub struct LoadSettings {
    /// Requests per second; `None` is a closed loop.
    pub rate: Option<f64>,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub deadline: Duration,
}

#[derive(Clone, Debug)]
pub struct GatewaySettings {
    pub ttl_ms: u64,
    pub stale_ms: u64,
    pub max_entries: u64,
    pub callback_ttl_ms: u64,
    pub window_ms: u64,
    pub per_second: u32,
    pub max_seqs: usize,
    pub request_timeout_ms: u64,
    /// `apps.callbacks` with `apps.callback_token_env`: the app's callbacks reach the
    /// gateway, signed (the `callbacks` scenario's second phase and its ingest phase).
    pub callbacks: CallbackAuth,
    /// The `[[clients]]` of the config (none but in the `clients` scenario).
    pub clients: Vec<ClientSpec>,
    pub log_level: String,
    pub log_format: LogFormat,
    pub keep_temp: bool,
}

/// How the gateway writes its log (to a file in its temporary directory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// tracing's default text lines.
    Text,
    /// One JSON object a line (`RECEIPT_GATEWAY_LOG_FORMAT=json`), as in production.
    Json,
}

/// Whether the app's callbacks reach the gateway (docs/design.md#cache), and are then signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallbackAuth {
    /// `apps.callbacks = false`, no token: fetched items are fresh for `ttl_ms`.
    Off,
    /// `apps.callbacks = true` and `callback_token_env`: `/callback` checks `Sign`.
    Signed,
}

/// One `[[clients]]` entry: a caller the gateway knows by its `x-client-id` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientSpec {
    /// Also the `client` label of the gateway's metrics.
    pub id: &'static str,
    /// Its share of the upstream budget when contended.
    pub weight: u32,
}

#[derive(Clone, Debug)]
pub struct SimSettings {
    pub limit: u32,
    pub max_seqs: usize,
    pub latency: Duration,
}

impl Args {
    /// `defaults` overridden by every flag given, checked for sense.
    pub fn settings(&self, d: &Defaults) -> Result<Settings> {
        let max_seqs = self.max_seqs.unwrap_or(d.max_seqs);
        let deadline_ms = self.deadline_ms.unwrap_or(d.deadline_ms);
        let mix = MixSettings {
            groups: self.groups.unwrap_or(d.groups),
            seqs_per_request: self.seqs_per_request.unwrap_or(d.seqs_per_request),
            latest: self.latest.unwrap_or(d.latest),
            distribution: self.distribution.unwrap_or(Distribution::Uniform),
            zipf_exponent: self.zipf_exponent,
            seed: self.seed,
        };
        let rate = self.rate.unwrap_or(d.rate);
        let load = LoadSettings {
            rate: (rate > 0.0).then_some(rate),
            connections: self.connections.unwrap_or(d.connections),
            warmup: seconds("--warmup", self.warmup.unwrap_or(d.warmup_s))?,
            duration: seconds("--duration", self.duration.unwrap_or(d.duration_s))?,
            deadline: Duration::from_millis(deadline_ms),
        };
        let gateway = GatewaySettings {
            ttl_ms: self.ttl_ms.unwrap_or(d.ttl_ms),
            stale_ms: self.stale_ms.unwrap_or(d.stale_ms),
            max_entries: self.max_entries.unwrap_or(d.max_entries),
            callback_ttl_ms: self.callback_ttl_ms.unwrap_or(d.callback_ttl_ms),
            window_ms: self.window_ms.unwrap_or(d.window_ms),
            per_second: self.per_second.unwrap_or(d.per_second),
            max_seqs,
            request_timeout_ms: deadline_ms,
            callbacks: CallbackAuth::Off,
            clients: Vec::new(),
            log_level: self.gateway_log.clone(),
            log_format: LogFormat::Text,
            keep_temp: self.keep_temp,
        };
        let sim = SimSettings {
            limit: self.sim_limit.unwrap_or(d.sim_limit),
            max_seqs,
            latency: Duration::from_millis(self.sim_latency_ms.unwrap_or(0)),
        };
        let callbacks = CallbackSettings { reads_per_second: self.reads_per_second, ingest_rate: self.callback_rate };
        let warm = WarmSettings { peer: self.peer, rounds: self.rounds, client_threads: self.client_threads };
        let settings = Settings { mix, load, gateway, sim, callbacks, warm };
        settings.check(rate)?;
        Ok(settings)
    }
}

impl Settings {
    fn check(&self, rate: f64) -> Result<()> {
        let m = &self.mix;
        let problem = if m.groups == 0 {
            "--groups must be at least 1"
        } else if m.seqs_per_request == 0 || m.seqs_per_request > m.latest {
            "--seqs-per-request must be between 1 and --latest"
        } else if !(m.zipf_exponent.is_finite() && m.zipf_exponent >= 0.0) {
            "--zipf-exponent must be a non-negative number"
        } else if !rate.is_finite() || rate < 0.0 {
            "--rate must be a non-negative number"
        } else if self.load.connections == 0 {
            "--connections must be at least 1"
        } else if self.load.deadline.is_zero() {
            "--deadline-ms must be at least 1"
        } else if self.gateway.max_seqs == 0 || self.sim.limit == 0 || self.gateway.per_second == 0 {
            "--max-seqs, --sim-limit and --per-second must be at least 1"
        } else if !(self.callbacks.reads_per_second > 0.0 && self.callbacks.reads_per_second <= MAX_READS_PER_SECOND) {
            "--reads-per-second must be above 0 and at most 100000"
        } else if !(self.callbacks.ingest_rate.is_finite() && self.callbacks.ingest_rate > 0.0) {
            "--callback-rate must be a number above 0"
        } else if self.warm.rounds == 0 || self.warm.client_threads == 0 {
            "--rounds and --client-threads must be at least 1"
        } else {
            return Ok(());
        };
        Err(problem.into())
    }
}

fn seconds(flag: &str, value: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("{flag} must be a non-negative number of seconds").into())
}
