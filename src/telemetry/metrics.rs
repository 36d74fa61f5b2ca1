//! The metric families of docs/design.md#metrics, registered once on the registry `run()` builds.
//!
//! Names are the contract with dashboards and alerts. Labels are bounded: an app is a
//! configured sdkappid, a client a configured id or `default`, a result an ErrorCode or
//! a fixed word — never a group id, a MsgSeq or anything a caller can invent.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::tencent::domain::AppId;

/// The API label of the receipt call.
pub const API_RECEIPT: &str = "get_group_msg_receipt";
/// The `api` label of the detail API (docs/design.md#detail-api).
pub const API_DETAIL: &str = "get_group_msg_receipt_detail";

/// Where a served item came from (`receipt_gateway_items_total{source}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Hit,
    Coalesced,
    Fetched,
    Stale,
    Failed,
}

impl Source {
    const ALL: [Source; 5] = [Source::Hit, Source::Coalesced, Source::Fetched, Source::Stale, Source::Failed];

    fn label(self) -> &'static str {
        match self {
            Source::Hit => "hit",
            Source::Coalesced => "coalesced",
            Source::Fetched => "fetched",
            Source::Stale => "stale",
            Source::Failed => "failed",
        }
    }
}

/// Every family, cheap to clone (each is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub items: IntCounterVec,
    pub upstream_calls: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub batch_size: HistogramVec,
    pub budget_wait: HistogramVec,
    pub effective_rate: GaugeVec,
    pub cache_entries: IntGauge,
    pub inflight: IntGauge,
    pub budget_backend_up: IntGauge,
    pub fleet_items: IntCounterVec,
    pub client_rejected: IntCounterVec,
    pub budget_calls: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub callbacks: IntCounterVec,
    pub connections_open: IntGaugeVec,
    pub connections_refused: IntCounterVec,
    pub fleet_backend_up: IntGauge,
    pub usersig_expiry: GaugeVec,
    pub upstream_endpoint_active: IntGaugeVec,
    /// `receipt_gateway_redis_call_duration_seconds{op}` (docs/design.md#redis-connections).
    pub redis_call_duration: HistogramVec,
    /// `receipt_gateway_redis_failovers_total`.
    pub redis_failovers: IntCounter,
}

/// Redis round trips: from 0.1 ms (a local server) to 1 s (a hung one, abandoned long before).
const REDIS_SECONDS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0];

/// Latency buckets from 0.5 ms to 10 s: cache hits land in the first few, upstream calls
/// and budget waits in the rest.
const SECONDS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Metrics {
    /// Creates and registers every family; registration only fails on a duplicate name,
    /// which a fresh registry cannot have.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };

        let build_info = IntGaugeVec::new(
            Opts::new("receipt_gateway_build_info", "Always 1; the version label says which build runs."),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        Ok(Self {
            requests: counter(
                "receipt_gateway_requests_total",
                "Data requests answered, by app, client (a configured id, or default), HTTP status (of a gateway-made error: \
                 the error table's, also when sent as 200) and who caused an error (cause: none, caller, upstream, \
                 gateway).",
                &["app", "client", "status", "cause"],
            )?,
            request_duration: histogram(
                "receipt_gateway_request_duration_seconds",
                "Time from request arrival to answer.",
                &["app"],
                SECONDS.to_vec(),
            )?,
            items: counter(
                "receipt_gateway_items_total",
                "Receipt items served, by where they came from.",
                &["app", "source"],
            )?,
            upstream_calls: counter(
                "receipt_gateway_upstream_calls_total",
                "Calls made to Tencent, by result (ok, an ErrorCode, http_<status>, transport, timeout).",
                &["app", "api", "result"],
            )?,
            upstream_duration: histogram(
                "receipt_gateway_upstream_call_duration_seconds",
                "Duration of one upstream call.",
                &["app", "api"],
                SECONDS.to_vec(),
            )?,
            batch_size: histogram(
                "receipt_gateway_upstream_batch_size",
                "Distinct MsgSeqs carried by one upstream call.",
                &["app"],
                vec![1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0],
            )?,
            budget_wait: histogram(
                "receipt_gateway_budget_wait_seconds",
                "Time a ready upstream call waited for a budget token.",
                &["app", "api"],
                SECONDS.to_vec(),
            )?,
            effective_rate: gauge(
                "receipt_gateway_budget_effective_rate",
                "Upstream calls per second currently allowed (lowered after throttling).",
                &["app", "api"],
            )?,
            cache_entries: int_gauge("receipt_gateway_cache_entries", "Receipt items held in the cache.")?,
            inflight: int_gauge("receipt_gateway_inflight_requests", "Data requests being answered now.")?,
            client_rejected: counter(
                "receipt_gateway_client_rejected_total",
                "Requests refused, by client and reason (auth, quota, deadline: the budget could not serve it in time).",
                &["client", "reason"],
            )?,
            budget_calls: counter(
                "receipt_gateway_budget_calls_total",
                "Upstream calls (retries included) spent for each client's batches, by the fair share (docs/design.md#callers).",
                &["app", "api", "client"],
            )?,
            connections_open: {
                let g = IntGaugeVec::new(
                    Opts::new("receipt_gateway_connections_open", "Connections open now, by port (data, admin)."),
                    &["port"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            connections_refused: counter(
                "receipt_gateway_connections_refused_total",
                "Connections closed by the gateway, by port and reason (limit: the port full and every connection \
                 answering a request; evicted: closed to make room for a new one on a full port; silent: nothing \
                 sent within the first-bytes timeout; idle: no request head within the header timeout; resets: \
                 closed with GOAWAY for resetting too many accepted requests).",
                &["port", "reason"],
            )?,
            callbacks: counter(
                "receipt_gateway_callbacks_total",
                "Tencent callbacks taken on /callback, by app, command (known commands, else other) and result (ok, \
                 bad_sign, bad_body, forward_error).",
                &["app", "command", "result"],
            )?,
            config_reloads: counter(
                "receipt_gateway_config_reloads_total",
                "Configuration reloads (SIGHUP, or the file changed): ok, invalid (the file did not validate), \
                 refused (it changed what needs a restart).",
                &["result"],
            )?,
            fleet_items: counter(
                "receipt_gateway_fleet_items_total",
                "Cache misses of this replica, by what the fleet tier did: shared_hit (found in Redis), \
                 shared_wait (waited for another replica's fetch), miss (fetched here).",
                &["app", "source"],
            )?,
            fleet_backend_up: int_gauge(
                "receipt_gateway_fleet_backend_up",
                "1 while the fleet tier's Redis answers (fleet.backend = \"redis\"), 0 while replicas work alone.",
            )?,
            budget_backend_up: int_gauge(
                "receipt_gateway_budget_backend_up",
                "1 while the Redis budget answers (budget.backend = \"redis\"), 0 while replicas run on their fallback.",
            )?,
            redis_call_duration: histogram(
                "receipt_gateway_redis_call_duration_seconds",
                "Redis round trips, by what they were for (op: budget, claim, take, store, callback, reads); \
                 a call abandoned for taking too long counts with the time it was given.",
                &["op"],
                REDIS_SECONDS.to_vec(),
            )?,
            redis_failovers: {
                let c = IntCounter::new(
                    "receipt_gateway_redis_failovers_total",
                    "Times the gateway followed Redis to a new master (Sentinel failover).",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            usersig_expiry: gauge(
                "receipt_gateway_usersig_expiry_timestamp_seconds",
                "Unix time at which the app's current UserSig expires.",
                &["app"],
            )?,
            upstream_endpoint_active: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "receipt_gateway_upstream_endpoint_active",
                        "1 for the Tencent domain an app's calls go to (endpoint: primary, backup), 0 for the other.",
                    ),
                    &["app", "endpoint"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            registry,
        })
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on malformed families, which registration rejects.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }

    /// A port's connection metrics (`port` = `data` or `admin`).
    pub fn connections(&self, port: &str) -> ConnectionMetrics {
        ConnectionMetrics {
            open: self.connections_open.with_label_values(&[port]),
            over_limit: self.connections_refused.with_label_values(&[port, "limit"]),
            silent: self.connections_refused.with_label_values(&[port, "silent"]),
            reset_flood: self.connections_refused.with_label_values(&[port, "resets"]),
            idle: self.connections_refused.with_label_values(&[port, "idle"]),
            evicted: self.connections_refused.with_label_values(&[port, "evicted"]),
        }
    }

    /// Handles resolved once per app, so the request path does no label hashing.
    pub fn for_app(&self, app: AppId) -> AppMetrics {
        let app_label = app.to_string();
        let items = Source::ALL.map(|s| self.items.with_label_values(&[app_label.as_str(), s.label()]));
        let request_duration = self.request_duration.with_label_values(&[app_label.as_str()]);
        let answered_default =
            self.requests.with_label_values(&[app_label.as_str(), crate::clients::DEFAULT, "200", "none"]);
        AppMetrics { items, answered_default, request_duration, app_label }
    }
}

/// One port's connection gauge and counters.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// `receipt_gateway_connections_open{port}`.
    pub open: prometheus::IntGauge,
    /// `receipt_gateway_connections_refused_total{port,reason="limit"}`: refused because
    /// the port was full and every connection was answering a request.
    pub over_limit: IntCounter,
    /// `receipt_gateway_connections_refused_total{port,reason="silent"}`.
    pub silent: IntCounter,
    /// `receipt_gateway_connections_refused_total{port,reason="resets"}`: closed for
    /// resetting too many accepted requests.
    pub reset_flood: IntCounter,
    /// `receipt_gateway_connections_refused_total{port,reason="idle"}`: closed for
    /// completing no request head within the header timeout (a slow head, an idle
    /// keep-alive or h2 connection).
    pub idle: IntCounter,
    /// `receipt_gateway_connections_refused_total{port,reason="evicted"}`: closed to make
    /// room for a new connection on a full port.
    pub evicted: IntCounter,
}

/// One app's pre-resolved item counters.
#[derive(Clone)]
pub struct AppMetrics {
    items: [IntCounter; 5],
    /// `receipt_gateway_requests_total` of the commonest answer: the default client's
    /// 200 with nothing to blame.
    pub answered_default: IntCounter,
    /// `receipt_gateway_request_duration_seconds` for this app.
    pub request_duration: Histogram,
    pub app_label: String,
}

impl AppMetrics {
    pub fn count_items(&self, source: Source, n: u64) {
        if n > 0 {
            // Discriminants follow `Source::ALL`, which built the array.
            self.items[source as usize].inc_by(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_family_is_exposed() {
        let m = Metrics::new().unwrap();
        let app = m.for_app(AppId(1));
        app.count_items(Source::Stale, 2);
        m.requests.with_label_values(&["1", "unknown", "200", "none"]).inc();
        m.request_duration.with_label_values(&["1"]).observe(0.001);
        m.upstream_calls.with_label_values(&["1", API_RECEIPT, "ok"]).inc();
        m.upstream_duration.with_label_values(&["1", API_RECEIPT]).observe(0.01);
        m.batch_size.with_label_values(&["1"]).observe(3.0);
        m.budget_wait.with_label_values(&["1", API_RECEIPT]).observe(0.0);
        m.effective_rate.with_label_values(&["1", API_RECEIPT]).set(200.0);
        m.usersig_expiry.with_label_values(&["1"]).set(1.0);
        m.budget_calls.with_label_values(&["1", API_RECEIPT, "default"]).inc();
        m.config_reloads.with_label_values(&["ok"]).inc();
        m.upstream_endpoint_active.with_label_values(&["1", "primary"]).set(1);
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "receipt_gateway_requests_total",
            "receipt_gateway_request_duration_seconds",
            "receipt_gateway_items_total{app=\"1\",source=\"stale\"} 2",
            "receipt_gateway_upstream_calls_total",
            "receipt_gateway_upstream_call_duration_seconds",
            "receipt_gateway_upstream_batch_size",
            "receipt_gateway_budget_wait_seconds",
            "receipt_gateway_budget_effective_rate",
            "receipt_gateway_cache_entries",
            "receipt_gateway_inflight_requests",
            "receipt_gateway_budget_backend_up",
            "receipt_gateway_fleet_backend_up",
            "receipt_gateway_usersig_expiry_timestamp_seconds",
            "receipt_gateway_budget_calls_total{api=\"get_group_msg_receipt\",app=\"1\",client=\"default\"} 1",
            "receipt_gateway_config_reloads_total{result=\"ok\"} 1",
            "receipt_gateway_upstream_endpoint_active{app=\"1\",endpoint=\"primary\"} 1",
            "receipt_gateway_build_info{version=",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
