//! The `[redis]` section (docs/configuration.md#redis): where the fleet tier and the shared
//! budget find Redis — one server or endpoint, Sentinel, or a Cluster — and the ACL user,
//! the password (from the environment, never printed) and the CA that reach it.

use std::time::Duration;

use super::file::{self, RawRedis};
use super::{ConfigError, MINUTE_MS, SecretSource, invalid, millis};

/// The fleet's shared tier (`[redis]`, docs/configuration.md#redis): where
/// `budget.backend = "redis"` keeps its state, and how to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Which Redis deployment, and its addresses.
    pub topology: RedisTopology,
    /// Every key the gateway writes starts with it, so several fleets can share a Redis.
    pub key_prefix: String,
    /// The ACL user (`redis.username`).
    pub username: Option<String>,
    /// Read from `redis.password_env` at start; never printed.
    pub password: Option<RedisPassword>,
    /// PEM roots for TLS (`redis.ca_file`), read at start; default: the web PKI.
    pub ca_pem: Option<Vec<u8>>,
    /// How long opening a connection may take (`redis.connect_timeout_ms`).
    pub connect_timeout: Duration,
}

/// How the gateway reaches Redis: exactly one of the three.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTopology {
    /// One server or a managed service's single endpoint: `redis://`, `rediss://`, `unix://`.
    Url(String),
    /// Sentinels (`host:port`, or `redis://` / `rediss://` URLs: TLS for the sentinels and the
    /// master alike) that name the master of `master`.
    Sentinel { sentinels: Vec<String>, master: String },
    /// A Redis Cluster's seed nodes (`host:port` or URLs).
    Cluster(Vec<String>),
}

/// The Redis password: compared, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisPassword(String);

impl RedisPassword {
    /// The password itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RedisPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Debug for RedisTopology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(url) => write!(f, "Url({})", redact_url(url)),
            Self::Sentinel { sentinels, master } => {
                let sentinels: Vec<String> = sentinels.iter().map(|s| redact_url(s)).collect();
                write!(f, "Sentinel {{ sentinels: {sentinels:?}, master: {master:?} }}")
            }
            Self::Cluster(nodes) => {
                let nodes: Vec<String> = nodes.iter().map(|s| redact_url(s)).collect();
                write!(f, "Cluster({nodes:?})")
            }
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("topology", &self.topology)
            .field("key_prefix", &self.key_prefix)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| format!("{} bytes", p.len())))
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl RedisConfig {
    /// Where Redis is, fit to print: a password inside a URL is replaced by `***`.
    pub fn describe(&self) -> String {
        format!("{:?}", self.topology)
    }
}

/// `url` with the password of its userinfo (`scheme://user:password@host`) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let masked = if userinfo.contains(':') || !user.is_empty() { format!("{user}:***") } else { String::new() };
            format!("{scheme}://{masked}@{}", &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

impl RawRedis {
    pub(super) fn validate(self, secrets: &dyn SecretSource) -> Result<RedisConfig, ConfigError> {
        const SCHEMES: [&str; 4] = ["redis://", "rediss://", "redis+unix://", "unix://"];
        let topology = match (self.url, self.sentinels, self.cluster_nodes) {
            (url, None, None) => {
                let url = url.unwrap_or_else(|| file::DEFAULT_REDIS_URL.into());
                if !SCHEMES.iter().any(|scheme| url.starts_with(scheme)) {
                    return Err(invalid("redis.url", "must be a redis://, rediss:// or unix:// URL"));
                }
                RedisTopology::Url(url)
            }
            (None, Some(sentinels), None) => {
                let master = self.sentinel_master.clone().filter(|m| !m.is_empty()).ok_or_else(|| {
                    invalid("redis.sentinel_master", "is required with redis.sentinels (the master's name)")
                })?;
                nodes("redis.sentinels", &sentinels)?;
                RedisTopology::Sentinel { sentinels, master }
            }
            (None, None, Some(cluster)) => {
                nodes("redis.cluster_nodes", &cluster)?;
                RedisTopology::Cluster(cluster)
            }
            _ => {
                return Err(invalid(
                    "redis.url",
                    "give exactly one of redis.url, redis.sentinels (with redis.sentinel_master) or redis.cluster_nodes",
                ));
            }
        };
        if self.sentinel_master.is_some() && !matches!(topology, RedisTopology::Sentinel { .. }) {
            return Err(invalid("redis.sentinel_master", "is only used with redis.sentinels"));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}']) {
            return Err(invalid("redis.key_prefix", "must be non-empty and free of { and } (they make hash tags)"));
        }
        let password = match self.password_env {
            None => None,
            Some(var) => {
                let password = secrets
                    .env(&var)
                    .ok_or_else(|| invalid("redis.password_env", format!("environment variable {var} is not set")))?;
                if password.is_empty() {
                    return Err(invalid("redis.password_env", format!("environment variable {var} is empty")));
                }
                Some(RedisPassword(password))
            }
        };
        if self.username.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("redis.username", "must not be empty"));
        }
        let ca_pem = match self.ca_file {
            None => None,
            Some(path) => {
                let pem = secrets
                    .file(&path)
                    .map_err(|e| invalid("redis.ca_file", format!("cannot read {}: {e}", path.display())))?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(invalid("redis.ca_file", format!("{} holds no PEM certificate", path.display())));
                }
                Some(pem.into_bytes())
            }
        };
        let connect_timeout = millis("redis.connect_timeout_ms", self.connect_timeout_ms, 1, MINUTE_MS)?;
        Ok(RedisConfig {
            topology,
            key_prefix: self.key_prefix,
            username: self.username,
            password,
            ca_pem,
            connect_timeout,
        })
    }
}

/// Checks a list of Redis nodes: non-empty, each `host:port` or a `redis://` / `rediss://` URL.
fn nodes(key: &str, nodes: &[String]) -> Result<(), ConfigError> {
    if nodes.is_empty() {
        return Err(invalid(key, "must list at least one node"));
    }
    for node in nodes {
        let url = node.starts_with("redis://") || node.starts_with("rediss://");
        let host_port =
            node.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !url && !host_port {
            return Err(invalid(
                key,
                format!("{:?} is neither host:port nor a redis:// or rediss:// URL", redact_url(node)),
            ));
        }
    }
    Ok(())
}
