//! Reloading the configuration (docs/configuration.md#command-line): on SIGHUP, or when the file's
//! content changes (a Kubernetes ConfigMap update reaches a mounted file without a signal), the
//! file is read and validated again and applied without dropping a request.
//!
//! What a reload applies:
//! - the clients — ids, tokens, quotas, weights, `error_status` — with
//!   `server.client_id_header`, `server.require_client_auth` and `server.error_status`;
//!   each client keeps its place in the engines' fair share and its quota window;
//! - the cache lifetimes (`ttl_ms`, `stale_ms`, `negative_ttl_ms`), to every item from
//!   then on (a page is kept by them from its group's next fill);
//! - `[batch]` (batches opened from then on) and `budget.per_second` /
//!   `fallback_per_second` (from the next token).
//!
//! A reload that changes anything else is refused as a whole and the running
//! configuration stays: the listen addresses and the app list (docs/configuration.md#command-line),
//! and what the gateway builds once at start — `cache.max_entries`, `budget.backend`, `[upstream]`,
//! `[fleet]`, `[redis]` and the other server keys. An invalid file is logged with the reason and
//! changes nothing. Each attempt counts in `receipt_gateway_config_reloads_total{result}`.
//!
//! Tokens are read from the environment, which a running process cannot see change: a
//! rotated token (a Kubernetes Secret) takes a restart (see `deploy/README.md`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::config::Config;
use crate::service::Gateway;
use crate::telemetry::metrics::Metrics;

/// How often the file is read to see whether its content changed.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// What one reload attempt came to (the `result` label).
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    Applied,
    /// The file did not validate.
    Invalid(String),
    /// It changed what needs a restart: these keys.
    Refused(Vec<&'static str>),
}

/// SIGHUP, caught from now on (before the gateway serves, so that a signal sent as soon
/// as it answers is a reload, not the default action's exit).
pub fn hangups() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: reloads only when the file changes");
            None
        }
    }
}

/// Reloads `path` on each of `hangup` and whenever its content changes, forever; owned
/// and aborted by the gateway's task set.
pub async fn watch(
    path: PathBuf,
    mut hangup: Option<Signal>,
    mut running: Config,
    gateway: Arc<Gateway>,
    metrics: Metrics,
) {
    let mut seen = digest(&path).await;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.tick().await;
    loop {
        let signalled = tokio::select! {
            Some(()) = async { hangup.as_mut()?.recv().await } => true,
            _ = tick.tick() => false,
        };
        let now = digest(&path).await;
        if !signalled && now == seen {
            continue;
        }
        seen = now;
        let outcome = match Config::load(&path) {
            Err(e) => Reloaded::Invalid(e.to_string()),
            Ok(new) => apply(&gateway, &metrics, &mut running, new),
        };
        report(&outcome, &path, signalled, &metrics);
    }
}

/// Applies `new` over `running` if it changes only what a reload may change.
pub fn apply(gateway: &Gateway, metrics: &Metrics, running: &mut Config, new: Config) -> Reloaded {
    let refused = restart_only_changes(running, &new);
    if !refused.is_empty() {
        return Reloaded::Refused(refused);
    }
    // Every app shares the one cache.
    if let Some(app) = gateway.apps.values().next() {
        app.receipts.cache.set_lifetimes(&new.cache);
    }
    let clients = gateway.clients.current().reload(&new);
    // The engines learn the new shares first, so a request of a new client finds its
    // slot (an unknown slot counts as weight 1 meanwhile).
    for app in gateway.apps.values() {
        app.share_budget(&clients, metrics);
        app.reload(&new);
    }
    gateway.clients.replace(clients);
    *running = new;
    Reloaded::Applied
}

fn report(outcome: &Reloaded, path: &std::path::Path, signalled: bool, metrics: &Metrics) {
    let file = path.display();
    let result = match outcome {
        Reloaded::Applied => {
            tracing::info!(%file, signalled, "configuration reloaded: clients, cache lifetimes, batch and budget applied");
            "ok"
        }
        Reloaded::Invalid(reason) => {
            tracing::warn!(%file, %reason, "configuration reload failed: the running configuration stays");
            "invalid"
        }
        Reloaded::Refused(keys) => {
            tracing::warn!(
                %file,
                changed = %keys.join(", "),
                "configuration reload refused: these need a restart; the running configuration stays"
            );
            "refused"
        }
    };
    metrics.config_reloads.with_label_values(&[result]).inc();
}

/// The sections a reload may not change that `new` changes.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let same = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    let mut changed = Vec::new();
    if running.server.listen != new.server.listen || running.server.admin_listen != new.server.admin_listen {
        changed.push("server.listen / server.admin_listen");
    }
    let (mut a, mut b) = (running.server.clone(), new.server.clone());
    for s in [&mut a, &mut b] {
        // Compared above, or applied by a reload.
        s.listen = running.server.listen;
        s.admin_listen = running.server.admin_listen;
        s.client_id_header = running.server.client_id_header.clone();
        s.require_client_auth = running.server.require_client_auth;
        s.error_status = running.server.error_status;
    }
    let sections: [(&'static str, &dyn std::fmt::Debug, &dyn std::fmt::Debug); 7] = [
        ("apps", &running.apps, &new.apps),
        ("server (other than the clients' keys)", &a, &b),
        ("cache.max_entries", &running.cache.max_entries, &new.cache.max_entries),
        ("budget.backend", &running.budget.backend, &new.budget.backend),
        ("upstream", &running.upstream, &new.upstream),
        ("fleet", &running.fleet, &new.fleet),
        ("redis", &running.redis, &new.redis),
    ];
    for (name, old, new) in sections {
        if !same(old, new) {
            changed.push(name);
        }
    }
    // Secrets print redacted: compared as they are (tokens need no check, a reload
    // applies whatever the clients' now are).
    let keys = |c: &Config| {
        let token = |a: &crate::config::AppConfig| a.callback_token.as_ref().map(|t| t.expose().to_owned());
        c.apps.iter().map(|a| (a.secret.expose().to_owned(), token(a))).collect::<Vec<_>>()
    };
    if keys(running) != keys(new) && !changed.contains(&"apps") {
        changed.push("apps (a secret key or callback token)");
    }
    changed
}

/// The file's content digest (None when it cannot be read: a ConfigMap mid-swap).
async fn digest(path: &std::path::Path) -> Option<[u8; 32]> {
    tokio::fs::read(path).await.ok().map(|bytes| Sha256::digest(&bytes).into())
}
