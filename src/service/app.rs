//! One configured app at run time: everything the request path and its batches share,
//! built from the app's configuration in one place.

use std::sync::Arc;

use prometheus::Histogram;

use crate::budget::Budget;
use crate::cache::{KeptBy, ReceiptCache};
use crate::clients::Clients;
use crate::config::{AppConfig, Config, Forward};
use crate::engine::Engine;
use crate::engine::batch::{BatchPolicy, Neighbourhood};
use crate::engine::queue::Share;
use crate::fleet::{Agreed, Fleet, FleetCounters, SharedTier};
use crate::redis_tier::RedisTier;
use crate::service::detail::{self, Detail};
use crate::service::receipts::Receipts;
use crate::telemetry::metrics::{API_DETAIL, API_RECEIPT, Metrics};
use crate::tencent::domain::{AppId, Region};
use crate::tencent::usersig::SecretKey;
use crate::upstream::Upstream;
use crate::upstream::connect::Pool;
use crate::upstream::fetch::Fetcher;

pub struct AppRuntime {
    pub id: AppId,
    pub region: Option<Region>,
    /// The receipt API as requests use it.
    pub receipts: Receipts,
    /// What runs the receipt API's dispatched batches.
    pub fetcher: Arc<Fetcher>,
    /// `receipt_gateway_budget_wait_seconds` for this app's receipt API.
    pub budget_wait: Histogram,
    /// The detail API, with its own budget and queue.
    pub detail: Arc<Detail>,
    /// How `/callback` treats this app's webhooks.
    pub callbacks: CallbackSettings,
}

/// An app's webhook settings.
pub struct CallbackSettings {
    /// With a token, `/callback` checks `Sign`.
    pub token: Option<SecretKey>,
    /// The company's callback handler the gateway tees callbacks to.
    pub forward: Option<Forward>,
}

impl AppRuntime {
    /// Gives each client its share of this app's budget (at start, and on reload).
    pub fn share_budget(&self, clients: &Clients, metrics: &Metrics) {
        let app = self.id.to_string();
        let shares = |api: &str| {
            clients
                .shares()
                .into_iter()
                .map(|(client, weight)| Share {
                    weight,
                    calls: Some(metrics.budget_calls.with_label_values(&[app.as_str(), api, client])),
                })
                .collect()
        };
        self.receipts.engine.set_shares(shares(API_RECEIPT));
        self.detail.engine.set_shares(shares(API_DETAIL));
    }

    /// Builds `app`'s budget, engine and signed client from the gateway's `config`.
    pub fn new(
        app: &AppConfig,
        config: &Config,
        cache: &ReceiptCache,
        metrics: &Metrics,
        pool: Pool,
        fleet: Option<&Arc<Fleet>>,
        redis: Option<&Arc<RedisTier>>,
    ) -> Result<Self, redis::RedisError> {
        let label = app.id.to_string();
        let labels = [label.as_str(), API_RECEIPT];
        let budget = Budget::new(
            &config.budget,
            format!("{}:{API_RECEIPT}", app.id),
            metrics.effective_rate.with_label_values(&labels),
            metrics.budget_backend_up.clone(),
            redis,
        )?;
        let policy = batch_policy(config, fleet.is_some());
        let upstream = Upstream::new(app, &config.upstream, pool, metrics);
        let detail_labels = [label.as_str(), API_DETAIL];
        let detail = Detail::new(
            upstream.for_detail(metrics),
            Engine::new(policy),
            Budget::new(
                &config.budget,
                format!("{}:{API_DETAIL}", app.id),
                metrics.effective_rate.with_label_values(&detail_labels),
                metrics.budget_backend_up.clone(),
                redis,
            )?,
            metrics.budget_wait.with_label_values(&detail_labels),
            cache.keyed(detail::MAX_ANSWERS),
            config.upstream.max_retries,
        );
        let kept_by = if app.callbacks { KeptBy::Callbacks } else { KeptBy::Polling };
        let fleet = fleet.map(|fleet| {
            let counters = FleetCounters {
                shared_hit: metrics.fleet_items.with_label_values(&[label.as_str(), "shared_hit"]),
                shared_wait: metrics.fleet_items.with_label_values(&[label.as_str(), "shared_wait"]),
                miss: metrics.fleet_items.with_label_values(&[label.as_str(), "miss"]),
            };
            Arc::new(SharedTier::new(fleet.clone(), counters, fleet_lifetimes(config, &policy, kept_by)))
        });
        let engine = Arc::new(Engine::new(policy));
        let budget = Arc::new(budget);
        let fetcher = Fetcher {
            id: app.id,
            upstream,
            engine: engine.clone(),
            budget: budget.clone(),
            cache: cache.clone(),
            kept_by,
            max_retries: config.upstream.max_retries,
            batch_size: metrics.batch_size.with_label_values(&[label.as_str()]),
            fleet: fleet.clone(),
        };
        let receipts =
            Receipts { id: app.id, cache: cache.clone(), engine, budget, fleet, metrics: metrics.for_app(app.id) };
        Ok(Self {
            id: app.id,
            region: app.region,
            receipts,
            fetcher: Arc::new(fetcher),
            budget_wait: metrics.budget_wait.with_label_values(&labels),
            detail: Arc::new(detail),
            callbacks: CallbackSettings { token: app.callback_token.clone(), forward: app.callback_forward.clone() },
        })
    }

    /// Applies a reloaded `config`'s TTLs, batch and budget settings
    /// (docs/configuration.md#command-line; the caller checked that nothing else changed). The
    /// cache is shared by every app: [`ReceiptCache::set_lifetimes`] is the caller's, once.
    pub fn reload(&self, config: &Config) {
        let policy = batch_policy(config, self.receipts.fleet.is_some());
        self.receipts.engine.set_policy(policy);
        if let Some(tier) = &self.receipts.fleet {
            tier.set_lifetimes(fleet_lifetimes(config, &policy, self.fetcher.kept_by));
        }
        self.receipts.budget.set_rates(config.budget.per_second, config.budget.fallback_per_second);
        self.detail.engine.set_policy(policy);
        self.detail.budget.set_rates(config.budget.per_second, config.budget.fallback_per_second);
    }
}

/// How batches are formed, from `config`.
fn batch_policy(config: &Config, fleet: bool) -> BatchPolicy {
    BatchPolicy {
        window: config.batch.window,
        max_seqs: config.batch.max_seqs,
        ttl: config.cache.ttl,
        upstream_timeout: config.upstream.timeout,
        // With the fleet tier, Redis knows what the fleet holds: the call's neighbourhood
        // is filled there, just before it leaves.
        neighbourhood: if fleet { Neighbourhood::Fleet } else { Neighbourhood::Here },
    }
}

/// What every replica must agree on, from `config`.
fn fleet_lifetimes(config: &Config, policy: &BatchPolicy, kept_by: KeptBy) -> Agreed {
    Agreed {
        ttl: config.cache.ttl,
        negative_ttl: config.cache.negative_ttl,
        stale: config.cache.stale,
        claim: config.upstream.timeout + config.batch.window,
        cohort_memory: policy.cohort_memory(),
        neighbourhood: config.batch.max_seqs,
        callback_ttl: config.cache.callback_ttl,
        fetched: kept_by,
    }
}
