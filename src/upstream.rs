//! One app's signed, regional HTTPS client for Tencent (SPEC 5.4, 5.5).
//!
//! It owns the connection pool (rustls with the bundled web PKI roots, keep-alive), the
//! app's cached UserSig (signed once, re-signed at 80 % of `usersig_ttl_s` or when Tencent
//! says it expired), and the classification of every answer into what the caller must do
//! next. It makes exactly one HTTP call per [`Upstream::get_receipts`]: retries, splits
//! and budget are the caller's (`fetch`), so that every attempt is paid for.

use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::{Gauge, Histogram, IntCounterVec};

use crate::api::{RECEIPT_PATH, ReceiptRequest, ReceiptResponse};
use crate::config::AppConfig;
use crate::domain::{AppId, GroupId, MsgSeq, Receipt};
use crate::metrics::{API_RECEIPT, Metrics};
use crate::usersig::{self, SecretKey, UserSig};

/// Tencent's answers are small; this bounds what a broken upstream can make us buffer.
const MAX_REPLY_BYTES: usize = 4 << 20;

/// What one upstream call came to, and so what the caller should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success: one item per requested MsgSeq (per-item codes such as 10062 included).
    Items(Vec<(MsgSeq, Receipt)>),
    /// An answer about the whole group (10007, 10010, 10015): pass it to every caller.
    Group { code: i64, info: String },
    /// 10004 for the call: split a merged call to find the offending MsgSeqs.
    InvalidParameter { info: String },
    /// Tencent asks us to slow down: lower the rate and retry within the deadline.
    Throttled { code: i64 },
    /// Transient: retry with backoff within the deadline.
    Retryable { reason: String },
    /// No answer at all (timeout, transport failure): retry like `Retryable`, but the
    /// duration says nothing about how fast Tencent answers.
    NoAnswer { reason: String },
    /// 70001: sign anew and retry once.
    UserSigExpired,
    /// 70050: too many signature failures; do not retry signing for a minute.
    SigningLocked,
    /// Anything else: not retried, reported as an upstream failure.
    Final { code: i64, info: String },
}

/// Maps an ErrorCode to what to do about it (SPEC 5.4, 5.3).
pub fn classify(code: i64, info: String) -> Outcome {
    match code {
        10007 | 10010 | 10015 => Outcome::Group { code, info },
        10004 => Outcome::InvalidParameter { info },
        60007 | 60011 | 60018 | 60019 | 10006 => Outcome::Throttled { code },
        10002 | 60008 | 70169 | 70500 => Outcome::Retryable { reason: format!("ErrorCode {code}: {info}") },
        70001 => Outcome::UserSigExpired,
        70050 => Outcome::SigningLocked,
        _ => Outcome::Final { code, info },
    }
}

/// The app's UserSig and when to replace it.
struct Signed {
    sig: UserSig,
    renew_at: SystemTime,
}

/// A signed client for one app. Clones share the pool.
pub struct Upstream {
    app: AppId,
    /// For the log line: the configured region, or `endpoint` when only an endpoint is set.
    region: &'static str,
    identifier: String,
    secret: SecretKey,
    usersig_ttl: Duration,
    url: String,
    timeout: Duration,
    client: HttpClient,
    signed: RwLock<Signed>,
    calls: IntCounterVec,
    duration: Histogram,
    expiry: Gauge,
}

/// The pooled client every app's calls share.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The shared HTTP(S) client: rustls with ring and the bundled web PKI roots (so it
/// works in images without a CA bundle), h2 or HTTP/1.1 by ALPN. Plain HTTP only ever
/// reaches an `endpoint` override (tests, egress proxies).
pub fn http_client() -> Result<HttpClient, rustls::Error> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector))
}

fn unix_now() -> SystemTime {
    SystemTime::now()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Upstream {
    pub fn new(app: &AppConfig, timeout: Duration, client: HttpClient, metrics: &Metrics) -> Self {
        let label = app.id.to_string();
        let upstream = Self {
            app: app.id,
            region: app.region.map_or("endpoint", |r| r.name()),
            identifier: app.identifier.clone(),
            secret: app.secret.clone(),
            usersig_ttl: app.usersig_ttl,
            url: format!("{}{RECEIPT_PATH}", app.endpoint),
            timeout,
            client,
            signed: RwLock::new(Signed { sig: usersig::sign(app.id, &app.secret, "", 0, 0), renew_at: UNIX_EPOCH }),
            calls: metrics.upstream_calls.clone(),
            duration: metrics.upstream_duration.with_label_values(&[label.as_str(), API_RECEIPT]),
            expiry: metrics.usersig_expiry.with_label_values(&[label.as_str()]),
        };
        upstream.resign();
        upstream
    }

    /// Signs a fresh UserSig now; used at start, at 80 % of its life, and after 70001.
    pub fn resign(&self) {
        let now = unix_now();
        let sig = usersig::sign(self.app, &self.secret, &self.identifier, unix_secs(now), self.usersig_ttl.as_secs());
        let renew_at = now + self.usersig_ttl.mul_f64(0.8);
        self.expiry.set((unix_secs(now) + self.usersig_ttl.as_secs()) as f64);
        if let Ok(mut signed) = self.signed.write() {
            *signed = Signed { sig, renew_at };
        }
        tracing::info!(sdkappid = %self.app, expires_in_s = self.usersig_ttl.as_secs(), "signed a new UserSig");
    }

    fn usersig(&self) -> UserSig {
        let due = self.signed.read().map(|s| unix_now() >= s.renew_at).unwrap_or(true);
        if due {
            self.resign();
        }
        self.signed.read().map(|s| s.sig.clone()).unwrap_or_else(|p| p.into_inner().sig.clone())
    }

    /// One signed call for `seqs` of `group`. Never retries.
    pub async fn get_receipts(&self, group: &GroupId, seqs: &[MsgSeq]) -> Outcome {
        let started = Instant::now();
        let (outcome, label) = self.call(group, seqs).await;
        let elapsed = started.elapsed();
        self.duration.observe(elapsed.as_secs_f64());
        self.calls.with_label_values(&[self.app.to_string().as_str(), API_RECEIPT, label.as_str()]).inc();
        tracing::info!(
            sdkappid = %self.app,
            region = self.region,
            endpoint = %self.url,
            seqs = seqs.len(),
            result = %label,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "upstream call"
        );
        outcome
    }

    async fn call(&self, group: &GroupId, seqs: &[MsgSeq]) -> (Outcome, String) {
        let body = ReceiptRequest { group: group.clone(), seqs: seqs.to_vec() }.to_body();
        let uri = format!(
            "{}?sdkappid={}&identifier={}&usersig={}&random={}&contenttype=json",
            self.url,
            self.app,
            percent_encode(&self.identifier),
            self.usersig().expose(),
            rand::random::<u32>(),
        );
        let request = match Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
        {
            Ok(r) => r,
            Err(e) => return (Outcome::Final { code: -1, info: format!("bad request URI: {e}") }, "transport".into()),
        };
        let attempt = async {
            let response = self.client.request(request).await.map_err(|e| ("transport", error_chain(&e)))?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| ("transport", e.to_string()))?
                .to_bytes();
            Ok::<_, (&str, String)>((status, bytes))
        };
        let (status, bytes) = match tokio::time::timeout(self.timeout, attempt).await {
            Err(_) => {
                let reason = format!("no answer within {} ms", self.timeout.as_millis());
                return (Outcome::NoAnswer { reason }, "timeout".into());
            }
            Ok(Err((label, reason))) => return (Outcome::NoAnswer { reason }, label.into()),
            Ok(Ok(answer)) => answer,
        };
        if !status.is_success() {
            let label = format!("http_{}", status.as_u16());
            if status.is_server_error() {
                return (Outcome::Retryable { reason: format!("HTTP {status}") }, label);
            }
            return (Outcome::Final { code: -1, info: format!("HTTP {status}") }, label);
        }
        let reply: ReceiptResponse = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                // Counted with transport failures: the bytes arrived, but not an answer.
                return (Outcome::Retryable { reason: format!("unreadable answer: {e}") }, "transport".into());
            }
        };
        if reply.error_code != 0 || reply.action_status != "OK" {
            let code = if reply.error_code == 0 { -1 } else { reply.error_code };
            return (classify(code, reply.error_info), code.to_string());
        }
        let items = reply.items.unwrap_or_default();
        (Outcome::Items(items.iter().map(|i| (MsgSeq(i.seq), i.receipt())).collect()), "ok".into())
    }
}

/// The full cause chain of a client error, which hyper hides behind "client error".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
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
        let class = |c| classify(c, String::new());
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

    fn app(ttl_s: u64) -> AppConfig {
        AppConfig {
            id: AppId(1_400_000_000),
            region: None,
            identifier: "administrator".into(),
            secret: SecretKey::new("k"),
            endpoint: "http://127.0.0.1:9".into(),
            usersig_ttl: Duration::from_secs(ttl_s),
        }
    }

    #[test]
    fn the_usersig_is_signed_once_and_renewed_at_80_percent_of_its_life() {
        let metrics = Metrics::new().unwrap();
        let up = Upstream::new(&app(1000), Duration::from_secs(1), http_client().unwrap(), &metrics);
        let renew_at = |up: &Upstream| up.signed.read().unwrap().renew_at;
        let first = renew_at(&up);
        let until = first.duration_since(unix_now()).unwrap();
        assert!(until > Duration::from_secs(790) && until <= Duration::from_secs(800), "{until:?}");
        let sig = up.usersig();
        assert_eq!(renew_at(&up), first, "not re-signed before it is due");
        let doc = usersig::verify(
            sig.expose(),
            AppId(1_400_000_000),
            "administrator",
            &SecretKey::new("k"),
            unix_secs(unix_now()),
        );
        assert_eq!(doc.unwrap().expire, 1000);
        let expiry = metrics.usersig_expiry.with_label_values(&["1400000000"]).get();
        assert!((expiry - (unix_secs(unix_now()) + 1000) as f64).abs() <= 2.0);
        // Once due, the next call signs anew.
        up.signed.write().unwrap().renew_at = UNIX_EPOCH;
        up.usersig();
        assert!(renew_at(&up) > UNIX_EPOCH + Duration::from_secs(1_000_000));
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(percent_encode("admin"), "admin");
        assert_eq!(percent_encode("a b&c=d"), "a%20b%26c%3Dd");
    }
}
