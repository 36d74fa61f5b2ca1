//! The configuration file as written (docs/configuration.md#the-file): every section's keys with
//! their defaults, in one place. Unknown keys are an error. `super` validates these into the typed
//! [`Config`](super::Config).

use std::path::PathBuf;

use serde::Deserialize;

use crate::tencent::domain::Region;

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) cache: RawCache,
    pub(super) batch: RawBatch,
    pub(super) upstream: RawUpstream,
    pub(super) budget: RawBudget,
    pub(super) fleet: RawFleet,
    pub(super) redis: RawRedis,
    pub(super) apps: Vec<RawApp>,
    pub(super) clients: Vec<RawClient>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    pub(super) listen: String,
    pub(super) admin_listen: String,
    pub(super) request_timeout_ms: u64,
    pub(super) max_body_bytes: u64,
    pub(super) max_request_seqs: u64,
    pub(super) shutdown_grace_ms: u64,
    pub(super) client_id_header: String,
    pub(super) require_client_auth: bool,
    pub(super) error_status: String,
    pub(super) max_connections: u64,
    pub(super) first_bytes_timeout_ms: u64,
    pub(super) header_timeout_ms: u64,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "0.0.0.0:9090".into(),
            request_timeout_ms: 2000,
            max_body_bytes: 65536,
            max_request_seqs: 1000,
            shutdown_grace_ms: 20000,
            client_id_header: "x-client-id".into(),
            require_client_auth: false,
            error_status: "tencent".into(),
            max_connections: 10_000,
            first_bytes_timeout_ms: 10_000,
            header_timeout_ms: 30_000,
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCache {
    pub(super) ttl_ms: u64,
    pub(super) stale_ms: u64,
    pub(super) negative_ttl_ms: u64,
    pub(super) callback_ttl_ms: u64,
    pub(super) max_entries: u64,
}

impl Default for RawCache {
    fn default() -> Self {
        Self { ttl_ms: 1000, stale_ms: 60000, negative_ttl_ms: 1000, callback_ttl_ms: 10000, max_entries: 1_000_000 }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawBatch {
    pub(super) window_ms: u64,
    pub(super) max_seqs: u64,
}

impl Default for RawBatch {
    fn default() -> Self {
        Self { window_ms: 2, max_seqs: 50 }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    pub(super) timeout_ms: u64,
    pub(super) max_retries: u32,
    pub(super) failover_after: u64,
    pub(super) primary_retry_s: u64,
    pub(super) proxy: Option<String>,
    pub(super) proxy_auth_env: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            timeout_ms: 3000,
            max_retries: 2,
            failover_after: 3,
            primary_retry_s: 30,
            proxy: None,
            proxy_auth_env: None,
            ca_file: None,
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawBudget {
    pub(super) per_second: u64,
    pub(super) backend: String,
    pub(super) fallback_per_second: u64,
}

impl Default for RawBudget {
    fn default() -> Self {
        Self { per_second: 200, backend: "local".into(), fallback_per_second: 50 }
    }
}

/// Whether replicas share items, fetches, batches and cohorts (docs/design.md#fleet-tier).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawFleet {
    pub(super) backend: String,
}

impl Default for RawFleet {
    fn default() -> Self {
        Self { backend: "none".into() }
    }
}

/// The connection to the fleet's shared tier, used by `budget.backend` and `fleet.backend = "redis"`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRedis {
    pub(super) url: Option<String>,
    pub(super) key_prefix: String,
    pub(super) username: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) sentinels: Option<Vec<String>>,
    pub(super) sentinel_master: Option<String>,
    pub(super) cluster_nodes: Option<Vec<String>>,
    pub(super) connect_timeout_ms: u64,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "receipt-gateway".into(),
            username: None,
            password_env: None,
            ca_file: None,
            sentinels: None,
            sentinel_master: None,
            cluster_nodes: None,
            connect_timeout_ms: 500,
        }
    }
}

/// `redis.url` when neither sentinels nor cluster nodes are configured.
pub(super) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApp {
    pub(super) sdkappid: Option<u64>,
    pub(super) region: Option<Region>,
    pub(super) identifier: Option<String>,
    pub(super) secret_key_env: Option<String>,
    pub(super) secret_key_file: Option<PathBuf>,
    pub(super) endpoint: Option<String>,
    pub(super) backup_endpoint: Option<String>,
    #[serde(default = "default_usersig_ttl")]
    pub(super) usersig_ttl_s: u64,
    #[serde(default)]
    pub(super) callbacks: bool,
    pub(super) callback_token_env: Option<String>,
    pub(super) callback_forward_url: Option<String>,
    #[serde(default = "default_forward_timeout")]
    pub(super) callback_forward_timeout_ms: u64,
}

fn default_usersig_ttl() -> u64 {
    86400
}

fn default_forward_timeout() -> u64 {
    2000
}

/// One calling service (docs/design.md#callers).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub(super) id: Option<String>,
    pub(super) token_env: Option<String>,
    pub(super) requests_per_second: Option<u64>,
    #[serde(default = "default_weight")]
    pub(super) weight: u64,
    pub(super) error_status: Option<String>,
}

fn default_weight() -> u64 {
    1
}
