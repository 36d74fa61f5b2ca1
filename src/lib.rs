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
//! A data request passes through these modules, in this order:
//!
//! 1. [`server`] — accepts HTTP/1.1 and h2c on one port, told apart by the first bytes
//!    (at most `max_connections`, silent ones closed after the first-bytes timeout,
//!    HTTP/1.1 ones without a request head in time closed by a per-connection watchdog,
//!    h2 streams, buffers and resets of accepted requests bounded),
//!    takes or makes the request id, routes, picks the app ([`app`]) by `sdkappid` and
//!    the caller ([`clients`]: its token, its quota), reads the deadline and
//!    `Cache-Control`, reads the body within limits (408 when it does not arrive) and
//!    validates it into [`api::ReceiptRequest`] (typed with [`domain`]).
//! 2. [`receipts`] — answers the query: one lookup of the group's page in the [`cache`]
//!    serves the fresh items at once (and notes that they were read, which is what
//!    makes them part of the group's cohort; an answer wholly from cache takes the page
//!    the thread last found, while no write came since); the misses go to the app's [`engine`],
//!    which keeps the in-flight table and the queue under one lock.
//! 3. [`inflight`] — first takes out the misses a batch answered since the caller's
//!    lookup; then [`admission`] decides, from how much of the queue is ahead of the
//!    batches the caller would wait for, whether they can be answered before its
//!    deadline. If not, the caller gets 429 (or stale items) at once, and its misses ride
//!    along in a background batch for spare budget or the group's next caller.
//! 4. [`inflight`] — puts each admitted miss in flight exactly once: it joins the
//!    [`batch`] that already carries it or is added to its group's open batch.
//! 5. [`dispatch`] — the dispatcher takes one token at a time from the [`budget`]
//!    (governor, or GCRA in Redis, at the AIMD effective rate) and spends it on the
//!    client the weighted fair share picks, on that client's most urgent ready entry
//!    (callers' batches and retry permits by earliest deadline; background batches only
//!    when no caller waits; a batch whose callers all went away leaves unpaid), topped
//!    up from the group's cache page with the cohort: read lately, due to expire within
//!    half a TTL.
//! 6. [`fetch`] — runs the dispatched batch in its own task: one signed regional call via
//!    [`upstream`] (UserSig from the [`signer`], built with [`usersig`]; the [`budget`]'s
//!    send-time check spreads calls a busy machine bunched), retries and
//!    10004 splits each paid with a permit from the queue, answers stored in the
//!    [`cache`], keys released, waiters woken. Tencent's codes are [`code::ErrorCode`]s.
//! 7. back in [`receipts`] — every waiter reads the shared outcome; the answer is
//!    assembled in the caller's order with `X-Cache` and `Age`, or falls back to stale
//!    items, or becomes a [`error::GatewayError`] (which says who caused it), which
//!    [`server`] turns into HTTP in one place (a caller gone before that is a 499).
//!
//! Beside it, on the same port, two routes [`server`] hands off after routing:
//!
//! - [`callback`] — `POST /callback`, Tencent's webhooks: `Sign` checked, read receipts
//!   written into the [`cache`] as kept current by callbacks (and, with the [`fleet`]
//!   tier, into Redis and every replica's cache), `Alert.RequestOverLimit` lowering the
//!   [`budget`]'s effective rate, and the tee to the company's own handler. No budget,
//!   no upstream call.
//! - [`detail`] — `get_group_msg_receipt_detail`: cache by the whole request, identical
//!   requests joined in flight, admission by the client's share of the detail API's own
//!   queue ([`engine`] and [`dispatch`] with one token per call, its own [`budget`]),
//!   then one signed call via [`upstream`] per attempt, Tencent's body passed through.
//!
//! Around it: [`config`] (the TOML schema and validation), [`reload`] (SIGHUP and file
//! changes apply new clients), [`metrics`] (the Prometheus families), [`admin`]
//! (`/metrics`, `/healthz`, `/readyz`), [`shutdown`] (draining on SIGTERM),
//! [`simulator`] (a faithful Tencent stand-in for tests, demo and benchmarks) and
//! [`demo`].
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
use crate::config::{Config, FleetBackend};
use crate::engine::batch::BatchPolicy;
use crate::fleet::Fleet;
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
    #[error("redis.url: {0}")]
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
    let client = upstream::http_client()?;
    let mut tasks = JoinSet::new();
    let fleet = match &config.fleet {
        FleetBackend::None => None,
        FleetBackend::Redis(redis) => Some(Arc::new(Fleet::new(redis, metrics.fleet_backend_up.clone())?)),
    };
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
        let app = Arc::new(AppRuntime::new(app_config, &config, &cache, &metrics, client.clone(), fleet.as_ref())?);
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
        tracing::info!(sdkappid = %app.id, region = ?app.region, endpoint = %app_config.endpoint, "app configured");
        apps.insert(app.id, app);
    }
    tasks.spawn(housekeeping(cache.clone(), metrics.clone()));

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
    let limits = |metrics, max_connections| http::Limits {
        max_connections,
        first_bytes: s.first_bytes_timeout,
        header_timeout: s.header_timeout,
        metrics,
    };
    let data_limits = limits(metrics.connections("data"), s.max_connections);
    let admin_limits = limits(metrics.connections("admin"), http::ADMIN_MAX_CONNECTIONS);
    let admin = Arc::new(crate::service::admin::Admin { metrics, cache, drain: drain.clone() });
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

/// Keeps moka's bookkeeping current and the cache gauge fresh, idle or not.
async fn housekeeping(cache: ReceiptCache, metrics: Metrics) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    loop {
        tick.tick().await;
        cache.run_pending_tasks().await;
        metrics.cache_entries.set(cache.entry_count() as i64);
    }
}
