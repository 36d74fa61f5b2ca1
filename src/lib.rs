//! `receipt-gateway`: the one door to Tencent Cloud Chat's group read-receipt API
//! (`get_group_msg_receipt`) for every internal service of a company.
//!
//! Tencent allows 200 calls per second per app, one budget for everyone. The gateway
//! speaks Tencent's own request and response format, answers from a short per-message
//! cache, never asks twice at once for the same message, merges concurrent callers'
//! misses for a group into one call, spends the budget as one fair, deadline-ordered queue,
//! signs with a cached UserSig and routes to the app's region. Tencent's read-receipt
//! callbacks keep the cache current without calls, and the sibling detail API ("who has
//! read") goes through the same door with a budget of its own.
//!
//! # Layout
//!
//! One folder per stage, in the order a data request meets them; imports point down this
//! list, never up (`service` alone sees every stage). The design is told in full in
//! `docs/design.md`.
//!
//! 1. [`http`] accepts HTTP/1.1 and h2c on one port, bounds what each connection may hold,
//!    and reads bodies within a size and a deadline. It knows no receipts.
//! 2. [`service`] routes the request, picks the app (`sdkappid`) and the caller
//!    ([`clients`]: token, quota, weight), reads the deadline and `Cache-Control`, and
//!    validates the body into [`tencent`]'s types. Errors ([`error`], which says who caused
//!    each) become HTTP there, in one place.
//! 3. [`service::receipts`] answers what the [`cache`] holds fresh; with the [`fleet`] tier,
//!    a miss first asks Redis what the other replicas hold or are fetching.
//! 4. [`engine`] takes the misses: admission refuses at once (429, or stale items) a
//!    caller its queue cannot serve before the deadline; the in-flight table joins each
//!    miss to the batch that carries it, or adds it to its group's open batch.
//! 5. [`engine::dispatcher`] takes one token at a time from the [`budget`] and spends it on
//!    the client the fair share picks, on that client's most urgent batch, topped up with
//!    the group's cohort.
//! 6. [`upstream`] runs the dispatched batch in its own task: one signed regional call
//!    (to the app's primary domain, or its backup while the primary cannot be reached;
//!    through the egress proxy when there is one, over connections opened at start),
//!    retries and 10004 splits each paid with a token, answers stored in the [`cache`]
//!    (and shared through the [`fleet`]), waiters woken.
//! 7. back in [`service::receipts`], each caller's answer is assembled in its order with
//!    `X-Cache` and `Age`, or falls back to stale items, or becomes an error.
//!
//! `/callback` ([`service::callback`]) writes Tencent's read receipts into the cache and
//! spends no budget; the detail API ([`service::detail`]) caches whole answers and goes
//! through an engine and budget of its own. Around it: [`config`], [`telemetry`] (metrics,
//! log lines), [`redis_tier`] (the one Redis connection the [`fleet`] and the [`budget`]
//! share: TLS and ACL, Sentinel, Cluster), [`reload`], [`shutdown`], and, behind the
//! default `simulator` feature, the Tencent stand-in used by the demo, the tests and the
//! benchmarks.
//!
//! [`run`] is what the demo and the tests call, and [`run_reloading`] (the same, with
//! [`reload`] watching the file) what `main` calls: they take bound listeners and a
//! shutdown future, so tests bind port 0 and decide when it stops.

#![forbid(unsafe_code)]

pub mod budget;
pub mod cache;
pub mod clients;
pub mod config;
pub mod engine;
pub mod error;
pub mod fleet;
pub mod http;
pub mod redis_tier;
pub mod reload;
pub mod service;
pub mod shutdown;
#[cfg(feature = "simulator")]
pub mod simulator;
pub mod telemetry;
pub mod tencent;
pub mod upstream;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cache::{ReadLog, ReceiptCache};
use crate::clients::Clients;
use crate::clients::ClientsCell;
use crate::config::{BudgetBackend, Config, FleetBackend};
use crate::engine::batch::BatchPolicy;
use crate::fleet::Fleet;
use crate::redis_tier::RedisTier;
use crate::service::app::AppRuntime;
use crate::shutdown::Drain;
use crate::telemetry::metrics::Metrics;
use crate::tencent::domain::{GroupId, MsgSeq};

/// The two ports, bound by the caller (so tests can bind port 0).
pub struct Listeners {
    pub data: TcpListener,
    pub admin: TcpListener,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("TLS client setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("[redis]: {0}")]
    Redis(#[from] redis::RedisError),
}

/// How long the admin port's connections get to close after draining.
const ADMIN_CLOSE: Duration = Duration::from_secs(1);
/// Bounds on how often a replica shares its reads with the fleet.
const READS_EVERY_MIN: Duration = Duration::from_millis(50);
const READS_EVERY_MAX: Duration = Duration::from_secs(1);
/// How often the cache's deferred maintenance runs and its gauge is refreshed.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// Runs the gateway until `shutdown` resolves, then drains (see [`shutdown`]).
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_reloading(config, None, listeners, shutdown).await
}

/// [`run`], reloading the configuration from `path` on SIGHUP and when the file changes
/// ([`reload`]).
pub async fn run_reloading(
    config: Config,
    path: Option<PathBuf>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let metrics = Metrics::new()?;
    let mut cache = ReceiptCache::new(&config.cache);
    let pool = upstream::connect::Pool::new(&config.upstream)?;
    let mut tasks = JoinSet::new();
    // One Redis connection for the fleet tier and the budget, opened now (within
    // redis.connect_timeout_ms) so the first requests find it ready.
    let uses_redis =
        matches!(config.fleet, FleetBackend::Redis(_)) || matches!(config.budget.backend, BudgetBackend::Redis { .. });
    let redis = match uses_redis {
        false => None,
        true => Some(Arc::new(RedisTier::new(
            &config.redis,
            metrics.redis_call_duration.clone(),
            metrics.redis_failovers.clone(),
        )?)),
    };
    let fleet = match (&config.fleet, &redis) {
        (FleetBackend::Redis(redis_config), Some(tier)) => {
            Some(Arc::new(Fleet::new(redis_config, tier.clone(), metrics.fleet_backend_up.clone())))
        }
        _ => None,
    };
    if let Some(tier) = &redis {
        tier.preload(budget::redis_scripts());
        tier.open().await;
        tasks.spawn(tier.clone().maintain());
    }
    if let Some(fleet) = &fleet {
        let log = Arc::new(ReadLog::default());
        cache = cache.with_read_log(log.clone());
        tasks.spawn(fleet.clone().subscribe(cache.clone()));
        // Reads are shared four times a TTL, and kept as long as a read counts.
        let every = (config.cache.ttl / 4).clamp(READS_EVERY_MIN, READS_EVERY_MAX);
        let keep = BatchPolicy::cohort_memory_for(config.cache.ttl) + config.cache.ttl;
        tasks.spawn(fleet.clone().share_reads(log, every, keep));
    }
    let mut apps = service::Apps::default();
    for app_config in &config.apps {
        let app = Arc::new(AppRuntime::new(
            app_config,
            &config,
            &cache,
            &metrics,
            pool.clone(),
            fleet.as_ref(),
            redis.as_ref(),
        )?);
        let (fetcher, dropped) = (app.fetcher.clone(), app.clone());
        let send = move |batch| {
            // Batch tasks end on their own: every attempt is bounded by the upstream
            // timeout and every retry by the batch's deadline.
            tokio::spawn(crate::upstream::fetch::run(fetcher.clone(), batch));
        };
        // A batch dropped unsent gives its fleet claims up, so that a caller on another
        // replica need not wait for them to expire.
        let dropped = move |group: GroupId, seqs: Vec<MsgSeq>| {
            crate::service::receipts::give_up(&dropped.receipts, &group, &seqs)
        };
        tasks.spawn(crate::engine::dispatcher::run(
            app.receipts.engine.clone(),
            app.receipts.budget.clone(),
            app.budget_wait.clone(),
            send,
            dropped,
        ));
        // The detail API's queue holds only single-call permits: no batch is ever sent.
        let detail = app.detail.clone();
        tasks.spawn(crate::engine::dispatcher::run(
            detail.engine.clone(),
            detail.budget.clone(),
            detail.budget_wait.clone(),
            |_| {},
            |_, _| {},
        ));
        tracing::info!(
            sdkappid = %app.id,
            region = ?app.region,
            endpoint = %app_config.endpoint,
            backup_endpoint = app_config.backup_endpoint.as_deref().unwrap_or("none"),
            "app configured"
        );
        apps.insert(app.id, app);
    }
    tasks.spawn(housekeeping(cache.clone(), metrics.clone()));
    log_egress(&config.upstream);
    let (warmed, warmed_rx) = watch::channel(false);
    let upstreams = apps.values().map(|app| app.fetcher.upstream.clone()).collect();
    tasks.spawn(upstream::warm_up(upstreams, warmed));

    let clients = Clients::new(&config);
    for app in apps.values() {
        app.share_budget(&clients, &metrics);
    }
    let drain = Drain::new(metrics.inflight.clone());
    let gateway = Arc::new(service::Gateway {
        apps,
        clients: ClientsCell::new(clients),
        config: config.server.clone(),
        metrics: metrics.clone(),
        drain: drain.clone(),
    });
    if let Some(path) = path {
        tasks.spawn(reload::watch(path, reload::hangups(), config.clone(), gateway.clone(), metrics.clone()));
    }
    let s = &config.server;
    let limits = |metrics, max_connections, header_timeout| http::Limits {
        max_connections,
        first_bytes: s.first_bytes_timeout,
        header_timeout,
        metrics,
    };
    let data_limits = limits(metrics.connections("data"), s.max_connections, s.header_timeout);
    let admin_header_timeout = s.header_timeout.min(http::ADMIN_HEADER_TIMEOUT);
    let admin_limits = limits(metrics.connections("admin"), http::ADMIN_MAX_CONNECTIONS, admin_header_timeout);
    let admin = Arc::new(crate::service::admin::Admin { metrics, cache, drain: drain.clone(), warmed: warmed_rx });
    let (stop_data, data_stopped) = watch::channel(None);
    let (stop_admin, admin_stopped) = watch::channel(None);
    let data_server = tokio::spawn(http::serve(
        listeners.data,
        move |req| service::handle(req, gateway.clone()),
        data_limits,
        data_stopped,
    ));
    let admin_server = tokio::spawn(http::serve(
        listeners.admin,
        move |req| crate::service::admin::handle(req, admin.clone()),
        admin_limits,
        admin_stopped,
    ));

    shutdown.await;
    let grace = config.server.shutdown_grace;
    let end = Instant::now() + grace;
    tracing::info!(grace_ms = grace.as_millis() as u64, "draining");
    drain.start();
    if tokio::time::timeout_at(end, drain.idle()).await.is_err() {
        tracing::warn!("requests still in flight when the grace period ended");
    }
    // One grace period in all: connections get what draining left of it.
    let _ = stop_data.send(Some(end));
    let _ = data_server.await;
    let _ = stop_admin.send(Some(Instant::now() + ADMIN_CLOSE));
    let _ = admin_server.await;
    tasks.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Says once how upstream calls leave: the proxy (never its credentials) and extra roots.
fn log_egress(upstream: &config::UpstreamConfig) {
    tracing::info!(
        proxy = %upstream.egress.describe(),
        ca_file = %upstream.ca_file.as_ref().map_or("none".into(), |p| p.display().to_string()),
        extra_roots = upstream.extra_roots.len(),
        "upstream egress"
    );
}

/// Keeps moka's bookkeeping current and the cache gauge fresh, idle or not.
async fn housekeeping(cache: ReceiptCache, metrics: Metrics) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    loop {
        tick.tick().await;
        cache.run_pending_tasks().await;
        metrics.cache_entries.set(cache.entry_count() as i64);
    }
}
