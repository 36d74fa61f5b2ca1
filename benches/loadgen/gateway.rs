//! The gateway under test: the release binary as a subprocess, as it runs in production.
//!
//! It gets a fresh config in a temporary directory (the simulator as its one app's
//! endpoint, the scenario's cache and budget settings, and for a fleet the [`SharedTier`]
//! its replicas share through Redis), logs there, and is stopped with
//! SIGTERM at the end (killed if it does not stop, or if the benchmark bails out early).
//! The `clients` scenario adds its callers as `[[clients]]` (docs/design.md#callers); the
//! `callbacks` scenario turns on `apps.callbacks` with a callback token ([`CallbackAuth::Signed`]);
//! the `warm` scenario's logging comparison has it log JSON ([`LogFormat::Json`]). [`Snapshot`]
//! reads the counters of `/metrics` the report needs; [`Memory`] reads the resident set and
//! [`cpu_time`] the CPU time spent, both from `/proc`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::Result;
use crate::cli::{CallbackAuth, ClientSpec, GatewaySettings, LogFormat};
use crate::client::{self, HttpClient};
use crate::upstream::{CALLBACK_TOKEN, IDENTIFIER, SDKAPPID, SECRET};

/// The variable the generated config names for the secret key.
const SECRET_ENV: &str = "LOADGEN_SECRET";
/// The variable the generated config names for the callback token (with
/// [`CallbackAuth::Signed`]); always set, harmless when unused.
const CALLBACK_TOKEN_ENV: &str = "LOADGEN_CALLBACK_TOKEN";
/// The gateway's switch to JSON log lines.
const LOG_FORMAT_ENV: &str = "RECEIPT_GATEWAY_LOG_FORMAT";
const READY_WITHIN: Duration = Duration::from_secs(15);
const STOP_WITHIN: Duration = Duration::from_secs(5);

pub struct Gateway {
    child: Child,
    pub data: SocketAddr,
    pub admin: SocketAddr,
    dir: PathBuf,
    log: PathBuf,
    keep_dir: bool,
}

/// What the replicas of a fleet share: the Redis-held budget (`budget.backend`) and the
/// shared tier (`fleet.backend`), both through `[redis]`.
#[derive(Clone, Debug)]
pub struct SharedTier {
    /// `unix://…` (the loadgen's private redis-server), or `redis://127.0.0.1:<port>` through
    /// the `--redis-delay-ms` proxy.
    pub url: String,
    /// Fresh per fleet, so no state of an earlier run is read.
    pub key_prefix: String,
    /// Gateways in the fleet: each one's `budget.fallback_per_second` is its share of
    /// `per_second` (what it may spend on its own while Redis is down).
    pub replicas: usize,
}

/// Where the fleet's Redis is: the private server's `url`, or, with the environment
/// variable `RECEIPT_LOADGEN_REDIS_CLUSTER_NODES` (`host:port,host:port,…`, a Redis Cluster
/// started by hand), `cluster_nodes` (docs/benchmarks.md#2026-12-07-a-fleet-on-a-redis-cluster).
fn redis_location(url: &str) -> String {
    match std::env::var("RECEIPT_LOADGEN_REDIS_CLUSTER_NODES") {
        Ok(nodes) if !nodes.trim().is_empty() => {
            let nodes: Vec<toml::Value> = nodes.split(',').map(|n| toml::Value::String(n.trim().to_owned())).collect();
            format!("cluster_nodes = {}", toml::Value::Array(nodes))
        }
        _ => format!("url = {}", toml::Value::String(url.to_owned())),
    }
}

/// The gateway binary: `--gateway-bin`, else `receipt-gateway` next to this binary.
pub fn binary(flag: Option<&Path>) -> Result<PathBuf> {
    let bin = match flag {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()?.with_file_name("receipt-gateway"),
    };
    if !bin.is_file() {
        let hint = "build it first: cargo build --release --bins (or name it with --gateway-bin)";
        return Err(format!("no gateway binary at {}; {hint}", bin.display()).into());
    }
    Ok(bin)
}

impl Gateway {
    /// Writes the config, starts the binary and waits until `/readyz` answers 200.
    pub async fn start(
        bin: &Path,
        s: &GatewaySettings,
        sim_url: &str,
        shared: Option<&SharedTier>,
        admin: &HttpClient,
    ) -> Result<Gateway> {
        let dir = temp_dir()?;
        // Ports must be known before the subprocess binds them: ask the OS for two free
        // ones and release them just before the spawn. Another process could take one in
        // between (a tiny race); the gateway then fails to bind and we say so below.
        let (data_port, admin_port) = free_ports()?;
        let data = SocketAddr::from(([127, 0, 0, 1], data_port.0));
        let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin_port.0));
        let config = dir.join("receipt-gateway.toml");
        fs::write(&config, config_toml(s, data, admin_addr, sim_url, shared))?;
        let log = dir.join("gateway.log");
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        drop((data_port.1, admin_port.1));
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env(SECRET_ENV, SECRET)
            .env(CALLBACK_TOKEN_ENV, CALLBACK_TOKEN)
            .env("RUST_LOG", &s.log_level);
        match s.log_format {
            LogFormat::Text => command.env_remove(LOG_FORMAT_ENV),
            LogFormat::Json => command.env(LOG_FORMAT_ENV, "json"),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut gateway = Gateway { child, data, admin: admin_addr, dir, log, keep_dir: s.keep_temp };
        gateway.wait_ready(admin).await?;
        Ok(gateway)
    }

    async fn wait_ready(&mut self, admin: &HttpClient) -> Result<()> {
        let url = format!("http://{}/readyz", self.admin);
        let started = Instant::now();
        while started.elapsed() < READY_WITHIN {
            if let Some(status) = self.child.try_wait()? {
                return Err(self.failure(&format!("the gateway exited ({status}) before it was ready")));
            }
            if let Ok((200, _)) = client::get(admin, &url).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(self.failure(&format!("the gateway was not ready within {READY_WITHIN:?}")))
    }

    /// An error with the end of the gateway's log; the directory is kept for a look.
    fn failure(&mut self, what: &str) -> crate::Error {
        self.keep_dir = true;
        format!("{what}; log {}:\n{}", self.log.display(), log_tail(&self.log)).into()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file the gateway's stdout and stderr (its log) go to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    pub async fn metrics(&self, admin: &HttpClient) -> Result<Snapshot> {
        let url = format!("http://{}/metrics", self.admin);
        // The admin port closes idle connections after a few seconds: a GET sent on a
        // pooled one at the moment it closed fails unanswered, and is sent again once.
        let (status, body) = match client::get(admin, &url).await {
            Ok(answer) => answer,
            Err(_) => client::get(admin, &url).await?,
        };
        if status != 200 {
            return Err(format!("/metrics answered {status}").into());
        }
        Ok(Snapshot::parse(&String::from_utf8_lossy(&body)))
    }

    pub fn memory(&self) -> Result<Memory> {
        Memory::of(self.pid())
    }

    /// The CPU time (user + system) the gateway has spent so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        cpu_time(self.pid())
    }

    /// SIGTERM, then a kill if it has not stopped within a few seconds.
    pub async fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let started = Instant::now();
        while started.elapsed() < STOP_WITHIN {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("  the gateway did not stop within {STOP_WITHIN:?} of SIGTERM; killing it");
        self.keep_dir = true;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Harmless if it already exited; makes sure no gateway outlives the benchmark.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.keep_dir {
            eprintln!("  gateway config and log kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The last lines of a log file (empty if it cannot be read).
pub fn log_tail(log: &Path) -> String {
    let log = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A fresh directory for one process's config, socket and log.
pub fn temp_dir() -> Result<PathBuf> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let dir = std::env::temp_dir().join(format!("receipt-loadgen-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Two distinct free ports, each with the listener that holds it until dropped.
fn free_ports() -> Result<((u16, TcpListener), (u16, TcpListener))> {
    Ok((free_port()?, free_port()?))
}

/// A free loopback port, with the listener that holds it until dropped (release it just
/// before the process that is to bind it starts).
pub fn free_port() -> Result<(u16, TcpListener)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok((listener.local_addr()?.port(), listener))
}

/// A replica's `budget.fallback_per_second`: its share of the fleet's `per_second`, what
/// it may spend on its own while Redis is down (at least one call a second).
pub fn fallback_per_second(per_second: u32, replicas: usize) -> u32 {
    (per_second / u32::try_from(replicas.max(1)).unwrap_or(u32::MAX)).max(1)
}

fn config_toml(
    s: &GatewaySettings,
    data: SocketAddr,
    admin: SocketAddr,
    sim_url: &str,
    shared: Option<&SharedTier>,
) -> String {
    let shared = shared.map_or_else(String::new, |t| {
        let fallback = fallback_per_second(s.per_second, t.replicas);
        format!(
            r#"backend = "redis"
fallback_per_second = {fallback}

[fleet]
backend = "redis"

[redis]
{where_}
key_prefix = {key_prefix}
"#,
            where_ = redis_location(&t.url),
            key_prefix = toml::Value::String(t.key_prefix.clone()),
        )
    });
    let clients: String = s.clients.iter().map(client_toml).collect();
    let callbacks = match s.callbacks {
        CallbackAuth::Off => String::new(),
        CallbackAuth::Signed => format!("callbacks = true\ncallback_token_env = \"{CALLBACK_TOKEN_ENV}\"\n"),
    };
    format!(
        r#"# Written by receipt-loadgen for one benchmark run.
[server]
listen = "{data}"
admin_listen = "{admin}"
request_timeout_ms = {timeout}
shutdown_grace_ms = 1000
# The table's statuses, so that wrk's non-2xx count sees the gateway's errors (by default
# they are sent as HTTP 200, as Tencent sends its own; this client reads X-Gateway-Status).
error_status = "http"

[cache]
ttl_ms = {ttl}
stale_ms = {stale}
callback_ttl_ms = {callback_ttl}
max_entries = {max_entries}

[batch]
window_ms = {window_ms}
max_seqs = {max_seqs}

[budget]
per_second = {per_second}
{shared}
[[apps]]
sdkappid = {SDKAPPID}
identifier = "{IDENTIFIER}"
secret_key_env = "{SECRET_ENV}"
endpoint = "{sim_url}"
{callbacks}{clients}"#,
        timeout = s.request_timeout_ms,
        ttl = s.ttl_ms,
        stale = s.stale_ms,
        callback_ttl = s.callback_ttl_ms,
        max_entries = s.max_entries,
        window_ms = s.window_ms,
        max_seqs = s.max_seqs,
        per_second = s.per_second,
    )
}

/// A `[[clients]]` entry, without token or quota: the scenario measures the shares alone.
fn client_toml(c: &ClientSpec) -> String {
    format!("\n[[clients]]\nid = {}\nweight = {}\n", toml::Value::String(c.id.to_owned()), c.weight)
}

/// The `/metrics` figures the report uses.
#[derive(Default)]
pub struct Snapshot {
    /// `receipt_gateway_items_total` summed over apps, by `source`.
    pub items: BTreeMap<String, f64>,
    pub cache_entries: Option<f64>,
    /// `receipt_gateway_budget_calls_total` of the receipt API summed over apps, by
    /// `client`; `None` when the gateway exposes no such series (a build without it, or
    /// before its first call).
    pub budget_calls: Option<BTreeMap<String, f64>>,
    /// `receipt_gateway_requests_total` summed over apps and causes, by `client` and
    /// `status`.
    pub requests: BTreeMap<(String, String), f64>,
    /// `receipt_gateway_callbacks_total` summed over apps, by `command` and `result`.
    pub callbacks: BTreeMap<(String, String), f64>,
}

/// The API label of the receipt call (docs/design.md#metrics).
const API_RECEIPT: &str = "get_group_msg_receipt";

impl Snapshot {
    fn parse(text: &str) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            if series == "receipt_gateway_cache_entries" {
                snapshot.cache_entries = Some(value);
            } else if let Some(labels) = series.strip_prefix("receipt_gateway_items_total{") {
                let source = label(labels, "source").unwrap_or("?").to_owned();
                *snapshot.items.entry(source).or_default() += value;
            } else if let Some(labels) = series.strip_prefix("receipt_gateway_budget_calls_total{") {
                let calls = snapshot.budget_calls.get_or_insert_default();
                if label(labels, "api") == Some(API_RECEIPT) {
                    *calls.entry(label(labels, "client").unwrap_or("?").to_owned()).or_default() += value;
                }
            } else if let Some(labels) = series.strip_prefix("receipt_gateway_requests_total{") {
                let client = label(labels, "client").unwrap_or("?").to_owned();
                let status = label(labels, "status").unwrap_or("?").to_owned();
                *snapshot.requests.entry((client, status)).or_default() += value;
            } else if let Some(labels) = series.strip_prefix("receipt_gateway_callbacks_total{") {
                let command = label(labels, "command").unwrap_or("?").to_owned();
                let result = label(labels, "result").unwrap_or("?").to_owned();
                *snapshot.callbacks.entry((command, result)).or_default() += value;
            }
        }
        snapshot
    }

    /// The figures of several gateways (a fleet) added up.
    pub fn sum(snapshots: impl IntoIterator<Item = Snapshot>) -> Snapshot {
        let mut total = Snapshot::default();
        for snapshot in snapshots {
            for (source, n) in snapshot.items {
                *total.items.entry(source).or_default() += n;
            }
            total.cache_entries = match (total.cache_entries, snapshot.cache_entries) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
            if let Some(calls) = snapshot.budget_calls {
                let total = total.budget_calls.get_or_insert_default();
                for (client, n) in calls {
                    *total.entry(client).or_default() += n;
                }
            }
            for (key, n) in snapshot.requests {
                *total.requests.entry(key).or_default() += n;
            }
            for (key, n) in snapshot.callbacks {
                *total.callbacks.entry(key).or_default() += n;
            }
        }
        total
    }

    /// Items by source counted between `before` and `self`.
    pub fn items_since(&self, before: &Snapshot) -> BTreeMap<String, f64> {
        let was = |source: &str| before.items.get(source).copied().unwrap_or(0.0);
        self.items.iter().map(|(source, &now)| (source.clone(), now - was(source))).collect()
    }

    /// `client`'s budget calls counted between `before` and `self`; `None` when the
    /// gateway exposes none (a client without a series yet has had none).
    pub fn budget_calls_since(&self, before: &Snapshot, client: &str) -> Option<f64> {
        let count = |calls: &BTreeMap<String, f64>| calls.get(client).copied().unwrap_or(0.0);
        let now = count(self.budget_calls.as_ref()?);
        Some(now - before.budget_calls.as_ref().map_or(0.0, count))
    }

    /// `client`'s requests answered with each HTTP status between `before` and `self`.
    pub fn requests_since(&self, before: &Snapshot, client: &str) -> BTreeMap<String, f64> {
        self.requests
            .iter()
            .filter(|((c, _), _)| c == client)
            .map(|(key, &now)| (key.1.clone(), now - before.requests.get(key).copied().unwrap_or(0.0)))
            .collect()
    }

    /// Callbacks by (command, result) counted between `before` and `self`.
    pub fn callbacks_since(&self, before: &Snapshot) -> BTreeMap<(String, String), f64> {
        let was = |key: &(String, String)| before.callbacks.get(key).copied().unwrap_or(0.0);
        self.callbacks.iter().map(|(key, &now)| (key.clone(), now - was(key))).collect()
    }
}

/// The value of `name="value"` in a Prometheus label set.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

/// The CPU time (user + system) a process has spent, from `/proc/<pid>/stat` (Linux).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let ticks = cpu_ticks(&stat).ok_or_else(|| format!("no utime/stime in {path}"))?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64))
}

/// `utime + stime` (fields 14 and 15, in clock ticks) of a `/proc/<pid>/stat` line. The
/// command name (field 2) is in parentheses and may hold spaces, so fields are counted
/// from the last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is `fields[n - 3]`.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `getconf CLK_TCK`, read once; 100 (Linux's usual value) if it cannot be read.
fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .filter(|&ticks| ticks > 0)
            .unwrap_or(100)
    })
}

/// Resident memory of a process, from `/proc/<pid>/status` (Linux).
pub struct Memory {
    pub rss_kib: u64,
    /// The peak resident set so far.
    pub hwm_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let status = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()
        };
        match (field("VmRSS:"), field("VmHWM:")) {
            (Some(rss_kib), Some(hwm_kib)) => Ok(Memory { rss_kib, hwm_kib }),
            _ => Err(format!("no VmRSS/VmHWM in {path}").into()),
        }
    }

    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub fn hwm_mib(&self) -> f64 {
        self.hwm_kib as f64 / 1024.0
    }
}

#[cfg(test)]
mod tests {
    use receipt_gateway::config::{BudgetBackend, Config, FleetBackend, RedisTopology, SecretSource};

    use super::*;

    struct LoadgenSecret;

    impl SecretSource for LoadgenSecret {
        fn env(&self, name: &str) -> Option<String> {
            match name {
                SECRET_ENV => Some(SECRET.to_owned()),
                CALLBACK_TOKEN_ENV => Some(CALLBACK_TOKEN.to_owned()),
                _ => None,
            }
        }

        fn file(&self, path: &Path) -> std::io::Result<String> {
            Err(std::io::Error::new(std::io::ErrorKind::NotFound, path.display().to_string()))
        }
    }

    fn settings() -> GatewaySettings {
        GatewaySettings {
            ttl_ms: 1000,
            stale_ms: 60_000,
            max_entries: 1_000_000,
            callback_ttl_ms: 10_000,
            window_ms: 2,
            per_second: 200,
            max_seqs: 50,
            request_timeout_ms: 1000,
            callbacks: CallbackAuth::Off,
            clients: Vec::new(),
            log_level: "warn".into(),
            log_format: LogFormat::Text,
            keep_temp: false,
        }
    }

    fn parse(shared: Option<&SharedTier>) -> Config {
        parse_with(&settings(), shared)
    }

    fn parse_with(s: &GatewaySettings, shared: Option<&SharedTier>) -> Config {
        let data = SocketAddr::from(([127, 0, 0, 1], 8080));
        let admin = SocketAddr::from(([127, 0, 0, 1], 9090));
        let text = config_toml(s, data, admin, "http://127.0.0.1:1234", shared);
        Config::parse(&text, &LoadgenSecret).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn the_clients_scenario_configures_its_callers_with_their_weights_and_the_batch_window() {
        let clients = vec![ClientSpec { id: "bulk", weight: 3 }, ClientSpec { id: "backfill", weight: 1 }];
        let config = parse_with(&GatewaySettings { clients, window_ms: 1, ..settings() }, None);
        let weights: Vec<(&str, u32)> = config.clients.iter().map(|c| (c.id.as_str(), c.weight.get())).collect();
        assert_eq!(weights, [("bulk", 3), ("backfill", 1)]);
        assert!(config.clients.iter().all(|c| c.token.is_none() && c.requests_per_second.is_none()));
        assert_eq!(config.batch.window, Duration::from_millis(1));
        assert!(parse(None).clients.is_empty());
    }

    #[test]
    fn the_callbacks_phase_turns_callbacks_on_with_the_token_and_the_callback_ttl() {
        let off = parse(None);
        assert!(off.apps.iter().all(|a| !a.callbacks && a.callback_token.is_none()));
        assert_eq!(off.cache.callback_ttl, Duration::from_secs(10));
        let on =
            parse_with(&GatewaySettings { callbacks: CallbackAuth::Signed, callback_ttl_ms: 7000, ..settings() }, None);
        let app = &on.apps[0];
        assert!(app.callbacks);
        assert!(app.callback_token.is_some(), "the token read from LOADGEN_CALLBACK_TOKEN");
        assert_eq!(on.cache.callback_ttl, Duration::from_secs(7));
    }

    #[test]
    fn cpu_time_is_utime_plus_stime_counted_past_the_command_name() {
        let stat = "4242 (receipt gate) S 1 4242 4242 0 -1 4194560 900 0 0 0 123 45 0 0 20 0 9 0 77 0 0";
        assert_eq!(cpu_ticks(stat), Some(168));
        assert_eq!(cpu_ticks("4242 (short) S 1"), None);
        assert!(cpu_time(std::process::id()).is_ok(), "this process's own stat is readable");
    }

    #[test]
    fn the_snapshot_reads_callbacks_by_command_and_result() {
        let before = Snapshot::parse(
            "receipt_gateway_callbacks_total{app=\"1\",command=\"Group.CallbackAfterReadReceipt\",result=\"ok\"} 5\n",
        );
        let after = Snapshot::parse(
            "receipt_gateway_callbacks_total{app=\"1\",command=\"Group.CallbackAfterReadReceipt\",result=\"ok\"} 12\n\
             receipt_gateway_callbacks_total{app=\"1\",command=\"Group.CallbackAfterReadReceipt\",result=\"bad_sign\"} 1\n",
        );
        let since = after.callbacks_since(&before);
        let key = |result: &str| ("Group.CallbackAfterReadReceipt".to_owned(), result.to_owned());
        assert_eq!(since.get(&key("ok")), Some(&7.0));
        assert_eq!(since.get(&key("bad_sign")), Some(&1.0));
    }

    #[test]
    fn one_gateway_keeps_its_budget_local_and_shares_nothing() {
        let config = parse(None);
        assert_eq!(config.budget.backend, BudgetBackend::Local);
        assert_eq!(config.fleet, FleetBackend::None);
        assert_eq!(config.budget.per_second.get(), 200);
    }

    #[test]
    fn a_fleet_replica_shares_budget_and_tier_through_the_private_redis() {
        let url = "unix:///tmp/receipt-loadgen-1-2/redis.sock".to_owned();
        let shared = SharedTier { url: url.clone(), key_prefix: "loadgen-1-under".into(), replicas: 3 };
        let config = parse(Some(&shared));
        assert_eq!(config.budget.backend, BudgetBackend::Redis { key_prefix: "loadgen-1-under".into() });
        let FleetBackend::Redis(redis) = &config.fleet else { panic!("the fleet tier is on") };
        assert_eq!(redis.topology, RedisTopology::Url(url));
        assert_eq!(redis.key_prefix, "loadgen-1-under");
        assert_eq!(config.budget.per_second.get(), 200, "per_second is the fleet's, as for one gateway");
        assert_eq!(config.budget.fallback_per_second.get(), 66, "a replica's share while Redis is down");
        assert_eq!(config.cache.ttl, Duration::from_millis(1000));
    }

    #[test]
    fn the_snapshot_reads_items_by_source_and_the_cache_gauge() {
        let text = "# HELP x\nreceipt_gateway_items_total{app=\"1\",source=\"hit\"} 7\n\
                    receipt_gateway_items_total{app=\"2\",source=\"hit\"} 3\n\
                    receipt_gateway_items_total{app=\"1\",source=\"fetched\"} 2\n\
                    receipt_gateway_cache_entries 1000000\n";
        let snapshot = Snapshot::parse(text);
        assert_eq!(snapshot.items.get("hit"), Some(&10.0));
        assert_eq!(snapshot.items.get("fetched"), Some(&2.0));
        assert_eq!(snapshot.cache_entries, Some(1_000_000.0));
    }

    #[test]
    fn each_replica_falls_back_to_its_share_of_the_budget() {
        assert_eq!(fallback_per_second(200, 1), 200);
        assert_eq!(fallback_per_second(200, 3), 66);
        assert_eq!(fallback_per_second(2, 3), 1);
        assert_eq!(fallback_per_second(200, 0), 200);
    }

    #[test]
    fn the_snapshot_reads_budget_calls_and_requests_by_client() {
        let before = Snapshot::parse(
            "receipt_gateway_budget_calls_total{api=\"get_group_msg_receipt\",app=\"1\",client=\"bulk\"} 10\n\
             receipt_gateway_requests_total{app=\"1\",cause=\"none\",client=\"bulk\",status=\"200\"} 4\n",
        );
        let after = Snapshot::parse(
            "receipt_gateway_budget_calls_total{api=\"get_group_msg_receipt\",app=\"1\",client=\"bulk\"} 40\n\
             receipt_gateway_budget_calls_total{api=\"get_group_msg_receipt_detail\",app=\"1\",client=\"bulk\"} 9\n\
             receipt_gateway_budget_calls_total{api=\"get_group_msg_receipt\",app=\"1\",client=\"backfill\"} 12\n\
             receipt_gateway_requests_total{app=\"1\",cause=\"none\",client=\"bulk\",status=\"200\"} 6\n\
             receipt_gateway_requests_total{app=\"1\",cause=\"gateway\",client=\"bulk\",status=\"429\"} 5\n\
             receipt_gateway_requests_total{app=\"1\",cause=\"none\",client=\"backfill\",status=\"200\"} 1\n",
        );
        assert_eq!(after.budget_calls_since(&before, "bulk"), Some(30.0), "the receipt API only");
        assert_eq!(after.budget_calls_since(&before, "backfill"), Some(12.0));
        assert_eq!(after.budget_calls_since(&before, "interactive"), Some(0.0));
        let bulk = after.requests_since(&before, "bulk");
        assert_eq!((bulk.get("200"), bulk.get("429")), (Some(&2.0), Some(&5.0)));
        let without = Snapshot::parse("receipt_gateway_cache_entries 5\n");
        assert_eq!(without.budget_calls_since(&before, "bulk"), None, "no such series: no figure");
    }

    #[test]
    fn a_fleets_snapshots_add_up() {
        let one = Snapshot::parse(
            "receipt_gateway_items_total{app=\"1\",source=\"hit\"} 7\nreceipt_gateway_cache_entries 5\n",
        );
        let two = Snapshot::parse(
            "receipt_gateway_items_total{app=\"1\",source=\"hit\"} 3\n\
                                   receipt_gateway_items_total{app=\"1\",source=\"fetched\"} 2\n",
        );
        let total = Snapshot::sum([one, two]);
        assert_eq!(total.items.get("hit"), Some(&10.0));
        assert_eq!(total.items.get("fetched"), Some(&2.0));
        assert_eq!(total.cache_entries, Some(5.0));
        assert!(Snapshot::sum([]).items.is_empty());
    }
}
