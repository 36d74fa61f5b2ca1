//! One app's signed, regional HTTPS client for Tencent (docs/design.md#upstream-calls, #signing).
//!
//! It owns the app's [`Signer`], which of its two domains each call goes to
//! ([`endpoints`]), and the classification of every answer into what the caller must do
//! next. It makes exactly one HTTP call per [`Upstream::get_receipts`] (or
//! [`Upstream::get_detail`], for the detail API's client): retries, splits and budget
//! are the caller's (`fetch`, `detail`), so that every attempt is paid for. Each call
//! carries the instant the budget recorded it as sent ([`SENT_AT_HEADER`]) and
//! `User-Agent: receipt-gateway/<version>`.
//!
//! Layout: this module (the client and the classification of answers), [`connect`] (the
//! pool's connections: proxy, TLS roots, warm-up), [`endpoints`] (primary and backup
//! domain, failover), [`signer`] (the cached UserSig), [`retry`] (backoff and what each
//! failure calls for, for every API), and [`fetch`] (running one dispatched receipt batch
//! to its end).
//!
//! May import: `engine` (batches, the queue's permits), `budget`, `cache`, `fleet`,
//! `config`, `telemetry`, `tencent`. Imported by `service` and `lib.rs` only.
//!
//! Invariant: every attempt, retry and split is paid with a token from the budget, and a
//! batch runs in a task of its own, so no caller can cancel a call others wait on.

pub mod connect;
pub mod endpoints;
pub mod fetch;
pub mod retry;
pub mod signer;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};
use prometheus::{Histogram, IntCounter, IntCounterVec};
use tokio::time::Instant;

use crate::config::{AppConfig, UpstreamConfig};
use crate::engine::batch::Served;
use crate::telemetry::metrics::{API_DETAIL, API_RECEIPT, Metrics};
use crate::tencent::code::ErrorCode;
use crate::tencent::domain::{AppId, GroupId, MsgSeq, Receipt};
use crate::tencent::wire::{DETAIL_PATH, RECEIPT_PATH, ReceiptRequest, ReceiptResponse, SENT_AT_HEADER};
pub use crate::upstream::connect::HttpClient;
use crate::upstream::connect::Pool;
use crate::upstream::endpoints::{Endpoints, Reach, Which};
use crate::upstream::signer::Signer;

/// Sent on every upstream call.
pub const USER_AGENT: &str = concat!("receipt-gateway/", env!("CARGO_PKG_VERSION"));

/// Tencent's answers are small; this bounds what a broken upstream can make us buffer.
const MAX_REPLY_BYTES: usize = 4 << 20;

/// What one upstream call came to, and so what the caller should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success: one item per requested MsgSeq (per-item codes such as 10062 included).
    Items(Vec<(MsgSeq, Receipt)>),
    /// An answer about the whole group (10007, 10010, 10015): pass it to every caller.
    Group { code: ErrorCode, info: String },
    /// 10004 for the call: split a merged call to find the offending MsgSeqs.
    InvalidParameter { info: String },
    /// Tencent asks us to slow down: lower the rate and retry within the deadline.
    Throttled { code: ErrorCode },
    /// Transient: retry with backoff within the deadline.
    Retryable { reason: String },
    /// No answer at all (timeout, transport failure): retry like `Retryable`, but the
    /// duration says nothing about how fast Tencent answers. `elsewhere` is the app's
    /// other domain when this one could not even be connected to: the retry goes there
    /// at once (docs/design.md#domains-and-failover).
    NoAnswer { reason: String, elsewhere: Option<Which> },
    /// 70001: sign anew and retry once.
    UserSigExpired,
    /// 70050: too many signature failures; do not retry signing for a minute.
    SigningLocked,
    /// Anything else: not retried, reported as an upstream failure.
    Final { code: ErrorCode, info: String },
}

/// Maps an ErrorCode to what to do about it (docs/design.md#upstream-calls, #budget-and-dispatch).
pub fn classify(code: ErrorCode, info: String) -> Outcome {
    match code {
        ErrorCode::NO_PERMISSION | ErrorCode::GROUP_NOT_FOUND | ErrorCode::GROUP_INVALID => {
            Outcome::Group { code, info }
        }
        ErrorCode::INVALID_PARAMETER => Outcome::InvalidParameter { info },
        ErrorCode::RATE_LIMITED
        | ErrorCode::THROTTLED_60011
        | ErrorCode::THROTTLED_60018
        | ErrorCode::THROTTLED_60019
        | ErrorCode::FREQUENCY_LIMIT => Outcome::Throttled { code },
        ErrorCode::INTERNAL | ErrorCode::TIMEOUT | ErrorCode::TRANSIENT_70169 | ErrorCode::TRANSIENT_70500 => {
            Outcome::Retryable { reason: format!("ErrorCode {code}: {info}") }
        }
        ErrorCode::USERSIG_EXPIRED => Outcome::UserSigExpired,
        ErrorCode::SIGNING_LOCKED => Outcome::SigningLocked,
        _ => Outcome::Final { code, info },
    }
}

/// What one detail call came to: Tencent's answer to pass through (success, or an
/// answer about the group or the request), or what to do about a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Passed {
    Answer(Bytes),
    Failed(Outcome),
}

/// A signed client for one app and API. Clones share the pool, the signer and the
/// app's domains.
#[derive(Clone)]
pub struct Upstream {
    app: AppId,
    /// For the log line: the configured region, or `endpoint` when only an endpoint is set.
    region: &'static str,
    signer: Arc<Signer>,
    /// The app's primary and backup domain, shared by both APIs.
    endpoints: Arc<Endpoints>,
    /// The API's path, after the domain's base URL.
    path: &'static str,
    timeout: Duration,
    pool: Pool,
    /// Which API this client calls (`api` label, log lines).
    api: &'static str,
    /// `receipt_gateway_upstream_calls_total` for this app and API; results are labels.
    calls: IntCounterVec,
    app_label: String,
    duration: Histogram,
}

impl Upstream {
    /// The pooled client, which the callback tee shares.
    pub fn client(&self) -> &HttpClient {
        &self.pool.client
    }

    /// The receipt API's client for `app`.
    pub fn new(app: &AppConfig, upstream: &UpstreamConfig, pool: Pool, metrics: &Metrics) -> Self {
        let label = app.id.to_string();
        Self {
            app: app.id,
            region: app.region.map_or("endpoint", |r| r.name()),
            signer: Arc::new(Signer::new(app, metrics.usersig_expiry.with_label_values(&[label.as_str()]))),
            endpoints: Arc::new(Endpoints::new(app, upstream, &metrics.upstream_endpoint_active)),
            path: RECEIPT_PATH,
            timeout: upstream.timeout,
            pool,
            api: API_RECEIPT,
            calls: metrics.upstream_calls.clone(),
            duration: metrics.upstream_duration.with_label_values(&[label.as_str(), API_RECEIPT]),
            app_label: label,
        }
    }

    /// The detail API's client of the same app: the same signer, pool and domains.
    pub fn for_detail(&self, metrics: &Metrics) -> Self {
        Self {
            path: DETAIL_PATH,
            api: API_DETAIL,
            duration: metrics.upstream_duration.with_label_values(&[self.app_label.as_str(), API_DETAIL]),
            ..self.clone()
        }
    }

    /// Opens a connection to the app's domain in use, before any call needs it
    /// (docs/design.md#upstream-connections); a failure counts as one to reach it.
    pub async fn warm(&self) -> Result<(), String> {
        let which = self.endpoints.active();
        let base = self.endpoints.base(which);
        let warmed = tokio::time::timeout(self.timeout, self.pool.warm(base)).await;
        let result = warmed.unwrap_or_else(|_| Err(format!("no connection within {} ms", self.timeout.as_millis())));
        if result.is_err() {
            self.endpoints.report(which, Reach::Unreachable);
        }
        result.map_err(|e| format!("{base}: {e}"))
    }

    /// The app's signer: the fetch loop renews after 70001 and locks out after 70050.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    fn calls_with(&self, result: &str) -> IntCounter {
        self.calls.with_label_values(&[self.app_label.as_str(), self.api, result])
    }

    /// One signed call for `seqs` of `group`. Never retries.
    /// `served` holds the request ids of the callers it serves, for the log line; `sent`
    /// is when the budget recorded the call as sent ([`Budget::before_send`]).
    ///
    /// [`Budget::before_send`]: crate::budget::Budget::before_send
    /// `retry_on` is the domain an attempt that could not connect asked its retry to go
    /// to ([`Attempts::retry_on`](retry::Attempts::retry_on)).
    pub async fn get_receipts(
        &self,
        group: &GroupId,
        seqs: &[MsgSeq],
        served: &Served,
        sent: Instant,
        retry_on: Option<Which>,
    ) -> Outcome {
        let started = Instant::now();
        let which = self.endpoints.pick(retry_on);
        let (outcome, label) = self.call(group, seqs, sent, which).await;
        self.observe(started, &label, seqs.len(), served, which);
        outcome
    }

    /// One signed detail call with `body` (Tencent's own shape), sent at `sent`. Never
    /// retries.
    pub async fn get_detail(&self, body: Vec<u8>, served: &Served, sent: Instant, retry_on: Option<Which>) -> Passed {
        let started = Instant::now();
        let which = self.endpoints.pick(retry_on);
        let (passed, label) = match self.exchange(body, sent, which).await {
            Err((outcome, label)) => (Passed::Failed(outcome), label),
            Ok(bytes) => match serde_json::from_slice::<ReceiptResponse>(&bytes) {
                Err(e) => (
                    Passed::Failed(Outcome::Retryable { reason: format!("unreadable answer: {e}") }),
                    "transport".into(),
                ),
                Ok(reply) if reply.error_code.is_ok() && reply.action_status == "OK" => {
                    (Passed::Answer(bytes), "ok".into())
                }
                Ok(reply) => {
                    let code = if reply.error_code.is_ok() { ErrorCode::NONE } else { reply.error_code };
                    match classify(code, reply.error_info) {
                        // About the group or the request: Tencent's answer is the caller's.
                        Outcome::Group { .. } | Outcome::InvalidParameter { .. } => {
                            (Passed::Answer(bytes), code.to_string())
                        }
                        other => (Passed::Failed(other), code.to_string()),
                    }
                }
            },
        };
        self.observe(started, &label, 1, served, which);
        passed
    }

    /// Counts and logs one call.
    fn observe(&self, started: Instant, label: &str, seqs: usize, served: &Served, which: Which) {
        let elapsed = started.elapsed();
        self.duration.observe(elapsed.as_secs_f64());
        self.calls_with(label).inc();
        tracing::info!(
            sdkappid = %self.app,
            region = self.region,
            api = self.api,
            endpoint = self.endpoints.base(which),
            domain = which.label(),
            seqs,
            result = %label,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            request_ids = %served.lock().unwrap_or_else(|p| p.into_inner()),
            "upstream call"
        );
    }

    async fn call(&self, group: &GroupId, seqs: &[MsgSeq], sent: Instant, which: Which) -> (Outcome, String) {
        let body = ReceiptRequest { group: group.clone(), seqs: seqs.to_vec() }.to_body();
        let bytes = match self.exchange(body, sent, which).await {
            Ok(bytes) => bytes,
            Err(failed) => return failed,
        };
        let reply: ReceiptResponse = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                // Counted with transport failures: the bytes arrived, but not an answer.
                return (Outcome::Retryable { reason: format!("unreadable answer: {e}") }, "transport".into());
            }
        };
        if !reply.error_code.is_ok() || reply.action_status != "OK" {
            let code = if reply.error_code.is_ok() { ErrorCode::NONE } else { reply.error_code };
            return (classify(code, reply.error_info), code.to_string());
        }
        let items = reply.items.unwrap_or_default();
        (Outcome::Items(items.iter().map(|i| (MsgSeq(i.seq), i.receipt())).collect()), "ok".into())
    }

    /// One signed POST of `body` to `which` domain, stamped `sent`: the answer's bytes on
    /// HTTP success, else what failed and its label. What it told about the domain's
    /// reach goes to [`Endpoints::report`].
    async fn exchange(&self, body: Vec<u8>, sent: Instant, which: Which) -> Result<Bytes, (Outcome, String)> {
        let uri = format!(
            "{}{}?sdkappid={}&identifier={}&usersig={}&random={}&contenttype=json",
            self.endpoints.base(which),
            self.path,
            self.app,
            percent_encode(self.signer.identifier()),
            self.signer.usersig().expose(),
            rand::random::<u32>(),
        );
        let request = match Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, USER_AGENT)
            .header(SENT_AT_HEADER, unix_micros(sent))
            .body(Full::new(Bytes::from(body)))
        {
            Ok(r) => r,
            Err(e) => {
                let info = format!("bad request URI: {e}");
                return Err((Outcome::Final { code: ErrorCode::NONE, info }, "transport".into()));
            }
        };
        // The head first: a timeout before it is a failure to reach the domain, one
        // after it is not (the domain answered).
        let deadline = Instant::now() + self.timeout;
        let head = match tokio::time::timeout_at(deadline, self.pool.client.request(request)).await {
            Err(_) => {
                self.endpoints.report(which, Reach::Unreachable);
                let reason = format!("no answer within {} ms", self.timeout.as_millis());
                return Err((Outcome::NoAnswer { reason, elsewhere: None }, "timeout".into()));
            }
            Ok(Err(e)) if e.is_connect() => {
                self.endpoints.report(which, Reach::Unreachable);
                let reason = format!("cannot connect to {}: {}", self.endpoints.base(which), error_chain(&e));
                let elsewhere = self.endpoints.other(which);
                return Err((Outcome::NoAnswer { reason, elsewhere }, "transport".into()));
            }
            Ok(Err(e)) => {
                return Err((Outcome::NoAnswer { reason: error_chain(&e), elsewhere: None }, "transport".into()));
            }
            Ok(Ok(head)) => head,
        };
        self.endpoints.report(which, Reach::Answered);
        let status = head.status();
        let body = Limited::new(head.into_body(), MAX_REPLY_BYTES).collect();
        let bytes = match tokio::time::timeout_at(deadline, body).await {
            Err(_) => {
                let reason = format!("no answer within {} ms", self.timeout.as_millis());
                return Err((Outcome::NoAnswer { reason, elsewhere: None }, "timeout".into()));
            }
            Ok(Err(e)) => {
                return Err((Outcome::NoAnswer { reason: e.to_string(), elsewhere: None }, "transport".into()));
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        if !status.is_success() {
            let label = format!("http_{}", status.as_u16());
            if status.is_server_error() {
                return Err((Outcome::Retryable { reason: format!("HTTP {status}") }, label));
            }
            return Err((Outcome::Final { code: ErrorCode::NONE, info: format!("HTTP {status}") }, label));
        }
        Ok(bytes)
    }
}

/// The first delay, and the longest, between tries to open a connection that could not be
/// opened at start.
const WARM_RETRY_FIRST: Duration = Duration::from_secs(1);
const WARM_RETRY_MAX: Duration = Duration::from_secs(30);

/// Opens one connection to each app's domain in use (TLS, and the proxy's tunnel, included)
/// before callers need it; `warmed` turns true once each has had its first try, each
/// bounded by `upstream.timeout_ms`, so start-up waits no longer than that
/// (docs/design.md#upstream-connections). One that failed is logged once, and tried again
/// in the background, with backoff, until it opens.
pub async fn warm_up(upstreams: Vec<Upstream>, warmed: tokio::sync::watch::Sender<bool>) {
    let mut first = tokio::task::JoinSet::new();
    for upstream in upstreams {
        first.spawn(async move { (upstream.warm().await, upstream) });
    }
    let mut failed = Vec::new();
    while let Some(Ok((result, upstream))) = first.join_next().await {
        match result {
            Ok(()) => tracing::info!(sdkappid = %upstream.app, "upstream connection opened"),
            Err(error) => {
                tracing::warn!(
                    sdkappid = %upstream.app,
                    %error,
                    "upstream connection could not be opened at start; calls will open their own, and it is \
                     tried again in the background"
                );
                failed.push(upstream);
            }
        }
    }
    warmed.send_replace(true);
    let mut again = tokio::task::JoinSet::new();
    for upstream in failed {
        again.spawn(async move {
            let mut delay = WARM_RETRY_FIRST;
            loop {
                tokio::time::sleep(delay).await;
                if upstream.warm().await.is_ok() {
                    return tracing::info!(sdkappid = %upstream.app, "upstream connection opened");
                }
                delay = (delay * 2).min(WARM_RETRY_MAX);
            }
        });
    }
    while again.join_next().await.is_some() {}
}

/// The full cause chain of a client error, which hyper hides behind "client error".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `at` in microseconds since the Unix epoch, on the clock [`SENT_AT_HEADER`] describes:
/// the monotonic clock, anchored to Unix time the first time this runs.
fn unix_micros(at: Instant) -> u64 {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    let &(anchor, anchor_us) = ANCHOR.get_or_init(|| {
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        (Instant::now(), u64::try_from(unix.as_micros()).unwrap_or(u64::MAX))
    });
    // `at` may precede the anchor (the first call's own send instant); rounded down either
    // way, so that instants a whole number of µs apart have stamps exactly that far apart.
    let nanos = match at.checked_duration_since(anchor) {
        Some(after) => after.as_nanos() as i128,
        None => -(anchor.saturating_duration_since(at).as_nanos() as i128),
    };
    u64::try_from(i128::from(anchor_us) + nanos.div_euclid(1000)).unwrap_or(0)
}

/// Percent-encodes a query value (identifiers are usually plain, but need not be).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified_as_the_spec_says() {
        let class = |c| classify(ErrorCode(c), String::new());
        for c in [10007, 10010, 10015] {
            assert!(matches!(class(c), Outcome::Group { .. }), "{c}");
        }
        for c in [60007, 60011, 60018, 60019, 10006] {
            assert!(matches!(class(c), Outcome::Throttled { .. }), "{c}");
        }
        for c in [10002, 60008, 70169, 70500] {
            assert!(matches!(class(c), Outcome::Retryable { .. }), "{c}");
        }
        for c in [10003, 60006, 60010, 70009, 70016, 70020] {
            assert!(matches!(class(c), Outcome::Final { .. }), "{c}");
        }
        assert_eq!(class(10004), Outcome::InvalidParameter { info: String::new() });
        assert_eq!(class(70001), Outcome::UserSigExpired);
        assert_eq!(class(70050), Outcome::SigningLocked);
    }

    #[test]
    fn sent_stamps_follow_the_monotonic_clock_in_microseconds() {
        let now = Instant::now();
        let stamp = unix_micros(now);
        assert_eq!(unix_micros(now + Duration::from_millis(1500)), stamp + 1_500_000);
        assert_eq!(unix_micros(now - Duration::from_millis(2)), stamp - 2_000);
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
        assert!(unix.abs_diff(stamp) < 60_000_000, "anchored to Unix time: {stamp} vs {unix}");
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(percent_encode("admin"), "admin");
        assert_eq!(percent_encode("a b&c=d"), "a%20b%26c%3Dd");
    }
}
