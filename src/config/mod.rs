//! The configuration file (docs/configuration.md#the-file): its TOML schema with every default in
//! one place, and `validate()`, which turns it into typed values or an error that names the key.
//!
//! Secrets are resolved here, once, from the environment variable or file the config
//! names; the file itself never holds one. A `Config` that exists is a valid one: the
//! rest of the gateway does not re-check it.
//!
//! May import: `tencent` (the domain types values are parsed into). Imported by every
//! stage that is configured.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;

use crate::tencent::domain::{AppId, Region};
use crate::tencent::usersig::SecretKey;

mod egress;
mod file;
mod redis_tier;

pub use egress::{Egress, Proxy, ProxyOrigin};
pub use redis_tier::{RedisConfig, RedisPassword, RedisTopology, redact_url};

use file::{RawApp, RawBudget, RawClient, RawConfig, RawFleet};

/// A configuration problem, naming the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Parse(String),
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

// ---- the validated configuration ----

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub cache: CacheConfig,
    pub batch: BatchConfig,
    pub upstream: UpstreamConfig,
    pub budget: BudgetConfig,
    pub fleet: FleetBackend,
    pub redis: RedisConfig,
    pub apps: Vec<AppConfig>,
    /// The configured callers (docs/design.md#callers), ids unique.
    pub clients: Vec<ClientConfig>,
}

/// One configured caller, its token resolved.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub id: String,
    /// With a token, the caller must send `Authorization: Bearer <token>`.
    pub token: Option<SecretKey>,
    /// Requests (not items) per rolling second.
    pub requests_per_second: Option<NonZeroU32>,
    /// Share of the upstream budget when it is contended.
    pub weight: NonZeroU32,
    /// How this caller's gateway-made errors are sent; `None`: `server.error_status`.
    pub error_status: Option<ErrorStatus>,
}

/// How a gateway-made error is sent on the data port (`server.error_status`, a client's
/// `error_status`; docs/design.md#errors). Metrics and logs record the table's status
/// either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorStatus {
    /// HTTP 200 with the Tencent body, as Tencent answers its own errors; the table's
    /// status in `X-Gateway-Status`.
    #[default]
    Tencent,
    /// The table's HTTP status.
    Http,
}

impl ErrorStatus {
    fn parse(key: &str, text: &str) -> Result<Self, ConfigError> {
        match text {
            "tencent" => Ok(Self::Tencent),
            "http" => Ok(Self::Http),
            other => Err(invalid(key, format!("{other:?} is neither \"tencent\" nor \"http\""))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_request_seqs: usize,
    pub shutdown_grace: Duration,
    pub client_id_header: http::HeaderName,
    /// Refuse callers without a configured client id (403).
    pub require_client_auth: bool,
    /// How gateway-made errors are sent to callers without an `error_status` of their own.
    pub error_status: ErrorStatus,
    /// Connections open at once on the data port; more are closed at once.
    pub max_connections: usize,
    /// How long a new connection (either port) may stay silent before it is closed.
    pub first_bytes_timeout: Duration,
    /// How long an HTTP/1.1 connection may go without completing a request head while
    /// none of its requests is being answered (slow headers, idle keep-alive).
    pub header_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub stale: Duration,
    pub negative_ttl: Duration,
    /// Freshness of items kept current by callbacks (docs/design.md#cache).
    pub callback_ttl: Duration,
    pub max_entries: u64,
}

#[derive(Debug, Clone)]
pub struct BatchConfig {
    pub window: Duration,
    pub max_seqs: usize,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub timeout: Duration,
    pub max_retries: u32,
    /// Consecutive failures to reach an app's primary domain before its calls go to the
    /// backup (docs/design.md#domains-and-failover).
    pub failover_after: u32,
    /// How often the primary is tried again while the backup is in use.
    pub primary_retry: Duration,
    /// The egress proxy, if any (docs/operations.md#behind-an-egress-proxy).
    pub egress: Egress,
    /// `upstream.ca_file`, for the log line and `check-config`.
    pub ca_file: Option<PathBuf>,
    /// Its PEM roots, trusted besides the bundled web PKI roots.
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

#[derive(Debug, Clone)]
pub struct BudgetConfig {
    pub per_second: NonZeroU32,
    pub backend: BudgetBackend,
    pub fallback_per_second: NonZeroU32,
}

/// What replicas share (`fleet.backend`, docs/design.md#fleet-tier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetBackend {
    /// Each replica caches, coalesces and batches on its own.
    None,
    /// Items, in-flight fetches, batches and cohorts are shared through `[redis]`.
    Redis(RedisConfig),
}

/// Where upstream call tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetBackend {
    /// One in-process limiter per (app, API): right for a single replica.
    Local,
    /// One Redis-held budget shared by every replica, in `[redis]`.
    Redis { key_prefix: String },
}

/// One configured app, secrets resolved.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub id: AppId,
    pub region: Option<Region>,
    pub identifier: String,
    pub secret: SecretKey,
    /// Scheme and authority (plus an optional path prefix) that calls go to.
    pub endpoint: String,
    /// Where calls go while the primary cannot be reached: `apps.backup_endpoint`, else
    /// the region's backup domain when `endpoint` is the region's own; none when only an
    /// `endpoint` is set (a test or private link must not fail over to the internet).
    pub backup_endpoint: Option<String>,
    pub usersig_ttl: Duration,
    /// This app's callbacks reach the gateway: fetched items are fresh for
    /// `cache.callback_ttl` (docs/design.md#cache).
    pub callbacks: bool,
    /// With a token, `/callback` verifies `Sign` (docs/design.md#callbacks).
    pub callback_token: Option<SecretKey>,
    /// The company's own callback handler, when the gateway tees callbacks to it.
    pub callback_forward: Option<Forward>,
}

/// Where callbacks are forwarded (`apps.callback_forward_url`), and how long it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub url: Uri,
    pub timeout: Duration,
}

/// A TOML error without the quoted source line, which could hold a secret someone put in
/// the file by mistake (the error is logged): where, and what.
fn without_snippet(message: &str) -> String {
    let mut lines = message.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    let quoted = |l: &&str| l.starts_with('|') || l.chars().next().is_some_and(|c| c.is_ascii_digit());
    let what = lines.rev().find(|l| !quoted(l));
    match what {
        Some(what) => format!("{first}: {what}"),
        None => first.to_owned(),
    }
}

/// Where the secrets named by a config come from; tests substitute their own.
pub trait SecretSource {
    fn env(&self, name: &str) -> Option<String>;
    fn file(&self, path: &Path) -> std::io::Result<String>;
}

/// The process environment and file system.
pub struct ProcessSecrets;

impl SecretSource for ProcessSecrets {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn file(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

impl Config {
    /// Reads and validates a file, with secrets from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, &ProcessSecrets)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str, secrets: &dyn SecretSource) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(without_snippet(&e.to_string())))?;
        raw.validate(secrets)
    }
}

/// Milliseconds within `min..=max` (every duration has a sane ceiling: far beyond it the
/// timer arithmetic of the cache and runtime stops being meaningful).
fn millis(key: &str, ms: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
    Ok(Duration::from_millis(in_range(key, ms, min, max)?))
}

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 24 * 60 * MINUTE_MS;

fn addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| invalid(key, format!("{text:?} is not an IP:port address")))
}

fn in_range(key: &str, value: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    if value < min || value > max {
        return Err(invalid(key, format!("{value} is outside {min}..={max}")));
    }
    Ok(value)
}

fn rate(key: &str, value: u64) -> Result<NonZeroU32, ConfigError> {
    let value = in_range(key, value, 1, 1_000_000)?;
    // in_range bounds it to 1..=1_000_000, which fits a NonZeroU32.
    NonZeroU32::new(value as u32).ok_or_else(|| invalid(key, "must be at least 1"))
}

impl RawConfig {
    fn validate(self, secrets: &dyn SecretSource) -> Result<Config, ConfigError> {
        let s = self.server;
        let server = ServerConfig {
            listen: addr("server.listen", &s.listen)?,
            admin_listen: addr("server.admin_listen", &s.admin_listen)?,
            request_timeout: millis("server.request_timeout_ms", s.request_timeout_ms, 1, MINUTE_MS)?,
            max_body_bytes: in_range("server.max_body_bytes", s.max_body_bytes, 64, 64 << 20)? as usize,
            max_request_seqs: in_range("server.max_request_seqs", s.max_request_seqs, 1, 100_000)? as usize,
            shutdown_grace: millis("server.shutdown_grace_ms", s.shutdown_grace_ms, 0, 10 * MINUTE_MS)?,
            client_id_header: http::HeaderName::from_bytes(s.client_id_header.as_bytes())
                .map_err(|_| invalid("server.client_id_header", "is not a valid header name"))?,
            require_client_auth: s.require_client_auth,
            error_status: ErrorStatus::parse("server.error_status", &s.error_status)?,
            max_connections: in_range("server.max_connections", s.max_connections, 1, 1_000_000)? as usize,
            first_bytes_timeout: millis("server.first_bytes_timeout_ms", s.first_bytes_timeout_ms, 1, MINUTE_MS)?,
            header_timeout: millis("server.header_timeout_ms", s.header_timeout_ms, 3, 10 * MINUTE_MS)?,
        };
        let c = self.cache;
        let cache = CacheConfig {
            ttl: millis("cache.ttl_ms", c.ttl_ms, 1, DAY_MS)?,
            stale: millis("cache.stale_ms", c.stale_ms, 0, 7 * DAY_MS)?,
            negative_ttl: millis("cache.negative_ttl_ms", c.negative_ttl_ms, 0, DAY_MS)?,
            callback_ttl: millis("cache.callback_ttl_ms", c.callback_ttl_ms, 1, DAY_MS)?,
            max_entries: in_range("cache.max_entries", c.max_entries, 1, 1 << 32)?,
        };
        let batch = BatchConfig {
            window: millis("batch.window_ms", self.batch.window_ms, 0, MINUTE_MS)?,
            max_seqs: in_range("batch.max_seqs", self.batch.max_seqs, 1, 1000)? as usize,
        };
        let u = self.upstream;
        let upstream = UpstreamConfig {
            timeout: millis("upstream.timeout_ms", u.timeout_ms, 1, 10 * MINUTE_MS)?,
            max_retries: in_range("upstream.max_retries", u.max_retries.into(), 0, 10)? as u32,
            failover_after: in_range("upstream.failover_after", u.failover_after, 1, 1000)? as u32,
            primary_retry: Duration::from_secs(in_range("upstream.primary_retry_s", u.primary_retry_s, 1, 86_400)?),
            egress: egress::resolve(u.proxy.as_deref(), u.proxy_auth_env.as_deref(), secrets)?,
            extra_roots: match &u.ca_file {
                Some(path) => egress::extra_roots(path, secrets)?,
                None => Vec::new(),
            },
            ca_file: u.ca_file,
        };
        let redis = self.redis.validate(secrets)?;
        let budget = self.budget.validate(&redis)?;
        let fleet = self.fleet.validate(&redis)?;
        if self.apps.is_empty() {
            return Err(invalid("apps", "at least one [[apps]] entry is required"));
        }
        let mut seen = HashSet::new();
        let mut apps = Vec::with_capacity(self.apps.len());
        for (i, raw) in self.apps.into_iter().enumerate() {
            let app = raw.validate(i, secrets)?;
            if !seen.insert(app.id) {
                return Err(invalid(format!("apps[{i}].sdkappid"), format!("{} is configured twice", app.id)));
            }
            apps.push(app);
        }
        let mut ids = HashSet::new();
        let mut clients = Vec::with_capacity(self.clients.len());
        for (i, raw) in self.clients.into_iter().enumerate() {
            let client = raw.validate(i, secrets)?;
            if !ids.insert(client.id.clone()) {
                return Err(invalid(format!("clients[{i}].id"), format!("{:?} is configured twice", client.id)));
            }
            clients.push(client);
        }
        Ok(Config { server, cache, batch, upstream, budget, fleet, redis, apps, clients })
    }
}

/// The longest client id: it becomes a metric label.
const MAX_CLIENT_ID_BYTES: usize = 64;

impl RawClient {
    fn validate(self, i: usize, secrets: &dyn SecretSource) -> Result<ClientConfig, ConfigError> {
        let key = |field: &str| format!("clients[{i}].{field}");
        let id = self.id.ok_or_else(|| invalid(key("id"), "is required"))?;
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if id.is_empty() || id.len() > MAX_CLIENT_ID_BYTES || !id.chars().all(valid) {
            return Err(invalid(key("id"), "must be 1 to 64 of A-Z a-z 0-9 - _ . (it is a metric label)"));
        }
        let token = match self.token_env {
            None => None,
            Some(var) => {
                let token = secrets
                    .env(&var)
                    .ok_or_else(|| invalid(key("token_env"), format!("environment variable {var} is not set")))?;
                if token.trim().is_empty() {
                    return Err(invalid(key("token_env"), format!("environment variable {var} is empty")));
                }
                Some(SecretKey::new(token.trim()))
            }
        };
        let requests_per_second = match self.requests_per_second {
            None => None,
            Some(n) => Some(rate(&key("requests_per_second"), n)?),
        };
        let weight = in_range(&key("weight"), self.weight, 1, 1000)?;
        // in_range bounds it to 1..=1000.
        let weight = NonZeroU32::new(weight as u32).ok_or_else(|| invalid(key("weight"), "must be at least 1"))?;
        let error_status = match self.error_status {
            None => None,
            Some(text) => Some(ErrorStatus::parse(&key("error_status"), &text)?),
        };
        Ok(ClientConfig { id, token, requests_per_second, weight, error_status })
    }
}

impl RawFleet {
    fn validate(self, redis: &RedisConfig) -> Result<FleetBackend, ConfigError> {
        match self.backend.as_str() {
            "none" => Ok(FleetBackend::None),
            "redis" => Ok(FleetBackend::Redis(redis.clone())),
            other => Err(invalid("fleet.backend", format!("{other:?} is neither \"none\" nor \"redis\""))),
        }
    }
}

impl RawBudget {
    fn validate(self, redis: &RedisConfig) -> Result<BudgetConfig, ConfigError> {
        let per_second = rate("budget.per_second", self.per_second)?;
        let fallback_per_second = rate("budget.fallback_per_second", self.fallback_per_second)?;
        let backend = match self.backend.as_str() {
            "local" => BudgetBackend::Local,
            "redis" => {
                if fallback_per_second > per_second {
                    return Err(invalid(
                        "budget.fallback_per_second",
                        "must not exceed budget.per_second (it is one replica's share while Redis is down)",
                    ));
                }
                BudgetBackend::Redis { key_prefix: redis.key_prefix.clone() }
            }
            other => {
                return Err(invalid("budget.backend", format!("{other:?} is neither \"local\" nor \"redis\"")));
            }
        };
        Ok(BudgetConfig { per_second, backend, fallback_per_second })
    }
}

impl RawApp {
    fn validate(self, i: usize, secrets: &dyn SecretSource) -> Result<AppConfig, ConfigError> {
        let key = |field: &str| format!("apps[{i}].{field}");
        let id = AppId(self.sdkappid.ok_or_else(|| invalid(key("sdkappid"), "is required"))?);
        let identifier = self.identifier.ok_or_else(|| invalid(key("identifier"), "is required"))?;
        if identifier.is_empty() {
            return Err(invalid(key("identifier"), "must not be empty"));
        }
        let backup = match &self.backup_endpoint {
            Some(text) => Some(parse_endpoint(text).map_err(|p| invalid(key("backup_endpoint"), p))?),
            None => None,
        };
        let (endpoint, backup_endpoint) = match (&self.endpoint, self.region) {
            (Some(endpoint), _) => (parse_endpoint(endpoint).map_err(|p| invalid(key("endpoint"), p))?, backup),
            (None, Some(region)) => (
                format!("https://{}", region.domain()),
                Some(backup.unwrap_or_else(|| format!("https://{}", region.backup_domain()))),
            ),
            (None, None) => return Err(invalid(key("region"), "is required unless endpoint is set")),
        };
        if backup_endpoint.as_ref() == Some(&endpoint) {
            return Err(invalid(key("backup_endpoint"), "must differ from the primary endpoint"));
        }
        let secret = match (self.secret_key_env, self.secret_key_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(key("secret_key_env"), "set secret_key_env or secret_key_file, not both"));
            }
            (Some(var), None) => secrets
                .env(&var)
                .ok_or_else(|| invalid(key("secret_key_env"), format!("environment variable {var} is not set")))?,
            (None, Some(path)) => secrets
                .file(&path)
                .map_err(|e| invalid(key("secret_key_file"), format!("cannot read {}: {e}", path.display())))?,
            (None, None) => secrets.env("TENCENT_IM_SECRET_KEY").ok_or_else(|| {
                invalid(key("secret_key_env"), "environment variable TENCENT_IM_SECRET_KEY is not set")
            })?,
        };
        // Files written by editors and `kubectl create secret --from-file` end in a newline
        // that is not part of the key.
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(invalid(key("secret_key_env"), "the secret key is empty"));
        }
        let usersig_ttl = in_range(&key("usersig_ttl_s"), self.usersig_ttl_s, 60, 180 * 86400)?;
        let callback_token = match self.callback_token_env {
            None => None,
            Some(var) => {
                let token = secrets.env(&var).ok_or_else(|| {
                    invalid(key("callback_token_env"), format!("environment variable {var} is not set"))
                })?;
                if token.trim().is_empty() {
                    return Err(invalid(key("callback_token_env"), format!("environment variable {var} is empty")));
                }
                Some(SecretKey::new(token.trim()))
            }
        };
        let timeout = millis(&key("callback_forward_timeout_ms"), self.callback_forward_timeout_ms, 1, MINUTE_MS)?;
        let callback_forward = match self.callback_forward_url {
            None => None,
            Some(text) => {
                let url = parse_forward_url(&text).map_err(|p| invalid(key("callback_forward_url"), p))?;
                Some(Forward { url, timeout })
            }
        };
        Ok(AppConfig {
            id,
            region: self.region,
            identifier,
            secret: SecretKey::new(secret),
            endpoint,
            backup_endpoint,
            usersig_ttl: Duration::from_secs(usersig_ttl),
            callbacks: self.callbacks,
            callback_token,
            callback_forward,
        })
    }
}

/// Accepts an `http(s)://` URL with a host and no credentials; a callback's own query
/// is appended to it when forwarded.
fn parse_forward_url(text: &str) -> Result<Uri, String> {
    let uri: Uri = text.parse().map_err(|_| format!("{text:?} is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{text:?} must start with http:// or https://"));
    }
    match uri.authority() {
        None => Err(format!("{text:?} has no host")),
        Some(authority) if authority.as_str().contains('@') => {
            Err("must not contain credentials (user:password@)".into())
        }
        Some(_) => Ok(uri),
    }
}

/// Accepts `http(s)://authority[/prefix]` and returns it without a trailing slash.
fn parse_endpoint(text: &str) -> Result<String, String> {
    let uri: Uri = text.parse().map_err(|_| format!("{text:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{text:?} must start with http:// or https://")),
    }
    match uri.authority() {
        None => return Err(format!("{text:?} has no host")),
        // Credentials would be printed by check-config and logged with every call.
        Some(authority) if authority.as_str().contains('@') => {
            return Err("must not contain credentials (user:password@)".into());
        }
        Some(_) => {}
    }
    if uri.query().is_some() {
        return Err(format!("{text:?} must not have a query"));
    }
    Ok(text.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests;
