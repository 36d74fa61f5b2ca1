//! The HTTP side of the load: one pooled hyper-util client (HTTP/1.1 keep-alive), a
//! [`Target`] that knows where to send a receipt query ([`Targets`] when a fleet of
//! gateways shares the load, round-robin; sent as one caller with [`Targets::with_client_id`]),
//! and what came back ([`Outcome`], and the body with [`Target::send_keeping_body`]).
//! [`post_json`] posts anything else (the `callbacks` scenario's callbacks).
//! Every request is bounded by the caller's deadline plus one second, so nothing hangs the
//! benchmark: a request that runs out of that is reported as hung.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::Result;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The receipt route, with the one app the benchmark configures.
const RECEIPT_PATH_AND_QUERY: &str = "/v4/group_open_http_svc/get_group_msg_receipt?sdkappid=1400000000";

/// The gateway's default `server.client_id_header` (docs/design.md#receipt-api), which the
/// benchmark keeps.
const CLIENT_ID_HEADER: &str = "x-client-id";

/// How long past its deadline a request may take before it counts as hung.
pub const HUNG_AFTER_DEADLINE: Duration = Duration::from_secs(1);

/// Admin calls (`/readyz`, `/metrics`) are small and local.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A client that keeps up to `connections` idle connections for reuse. The drivers never
/// have more than `connections` requests in flight, so that is also about how many
/// connections it opens.
pub fn http_client(connections: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// Where receipt queries go, and with which deadline.
pub struct Target {
    uri: Uri,
    deadline: Duration,
    deadline_header: String,
    /// Who is calling; without it the gateway counts the request as its `default` client.
    client_id: Option<HeaderValue>,
}

/// The gateways a load goes to (one, or a fleet): request `n` goes to gateway `n % len`,
/// so numbered requests are spread round-robin and evenly. The pooled client keeps its
/// connections per gateway, so they are spread alike.
pub struct Targets {
    /// Never empty.
    targets: Vec<Target>,
    deadline: Duration,
}

impl Targets {
    pub fn new(addrs: &[SocketAddr], deadline: Duration) -> Result<Targets> {
        if addrs.is_empty() {
            return Err("no gateway to send requests to".into());
        }
        let targets = addrs.iter().map(|&addr| Target::new(addr, deadline)).collect::<Result<Vec<_>>>()?;
        Ok(Targets { targets, deadline })
    }

    pub fn one(addr: SocketAddr, deadline: Duration) -> Result<Targets> {
        Targets::new(&[addr], deadline)
    }

    /// The same targets, every request sent as the configured client `id`.
    pub fn with_client_id(mut self, id: &str) -> Result<Targets> {
        let id = HeaderValue::from_str(id).map_err(|e| format!("client id {id:?}: {e}"))?;
        for target in &mut self.targets {
            target.client_id = Some(id.clone());
        }
        Ok(self)
    }

    /// The target of request number `n`.
    pub fn pick(&self, n: u64) -> &Target {
        &self.targets[round_robin(n, self.targets.len())]
    }

    pub fn deadline(&self) -> Duration {
        self.deadline
    }
}

/// The index request `n` goes to among `len` targets (`new` makes sure there is one).
fn round_robin(n: u64, len: usize) -> usize {
    // Below `len`, so it fits a usize.
    (n % len.max(1) as u64) as usize
}

/// What one request came to.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Answered(Answer),
    /// No whole answer within the deadline plus a second.
    Hung,
    /// A transport error (refused, reset, closed mid-answer).
    Failed,
}

#[derive(Clone, Copy, Debug)]
pub struct Answer {
    pub status: u16,
    pub x_cache: XCache,
    pub retry_after: bool,
    pub body_bytes: usize,
}

/// What an answer came to: the status of the gateway's error table, which
/// `X-Gateway-Status` carries on every gateway-made error (sent as HTTP 200 by default, as
/// Tencent sends its own: docs/design.md#errors), else the status sent (the baseline's,
/// a success's).
pub fn outcome(status: u16, headers: &http::HeaderMap) -> u16 {
    let table = headers.get("x-gateway-status").and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
    table.unwrap_or(status)
}

/// The gateway's `X-Cache` values (docs/design.md#receipt-api), or none (errors, the baseline).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum XCache {
    Hit,
    Miss,
    Partial,
    Stale,
    Other,
    Absent,
}

impl XCache {
    pub fn from_header(value: Option<&[u8]>) -> XCache {
        match value {
            None => XCache::Absent,
            Some(b"HIT") => XCache::Hit,
            Some(b"MISS") => XCache::Miss,
            Some(b"PARTIAL") => XCache::Partial,
            Some(b"STALE") => XCache::Stale,
            Some(_) => XCache::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            XCache::Hit => "HIT",
            XCache::Miss => "MISS",
            XCache::Partial => "PARTIAL",
            XCache::Stale => "STALE",
            XCache::Other => "other",
            XCache::Absent => "none",
        }
    }
}

impl Target {
    pub fn new(addr: SocketAddr, deadline: Duration) -> Result<Target> {
        let uri = format!("http://{addr}{RECEIPT_PATH_AND_QUERY}").parse::<Uri>()?;
        Ok(Target { uri, deadline, deadline_header: deadline.as_millis().to_string(), client_id: None })
    }

    /// Sends one query and reads the whole answer.
    pub async fn send(&self, client: &HttpClient, body: Bytes) -> Outcome {
        self.send_keeping_body(client, body).await.0
    }

    /// Sends one query; the outcome and, when answered, the answer's body.
    pub async fn send_keeping_body(&self, client: &HttpClient, body: Bytes) -> (Outcome, Option<Bytes>) {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("x-request-timeout-ms", self.deadline_header.as_str());
        if let Some(id) = &self.client_id {
            request = request.header(CLIENT_ID_HEADER, id.clone());
        }
        match request.body(Full::new(body)) {
            Ok(request) => exchange(client, request, self.deadline + HUNG_AFTER_DEADLINE).await,
            // Every part was validated when the target was built.
            Err(_) => (Outcome::Failed, None),
        }
    }
}

/// `POST uri` with a JSON body, bounded by `within` (then it is [`Outcome::Hung`]).
pub async fn post_json(client: &HttpClient, uri: Uri, body: Bytes, within: Duration) -> Outcome {
    let request = Request::builder().method(Method::POST).uri(uri).header(CONTENT_TYPE, "application/json");
    match request.body(Full::new(body)) {
        Ok(request) => exchange(client, request, within).await.0,
        Err(_) => Outcome::Failed,
    }
}

/// Sends `request` and reads the whole answer within `within`.
async fn exchange(client: &HttpClient, request: Request<Full<Bytes>>, within: Duration) -> (Outcome, Option<Bytes>) {
    let exchange = async {
        let response = client.request(request).await.ok()?;
        let headers = response.headers();
        let status = outcome(response.status().as_u16(), headers);
        let x_cache = XCache::from_header(headers.get("x-cache").map(|v| v.as_bytes()));
        let retry_after = headers.contains_key(RETRY_AFTER);
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((Answer { status, x_cache, retry_after, body_bytes: body.len() }, body))
    };
    match tokio::time::timeout(within, exchange).await {
        Err(_) => (Outcome::Hung, None),
        Ok(None) => (Outcome::Failed, None),
        Ok(Some((answer, body))) => (Outcome::Answered(answer), Some(body)),
    }
}

/// `GET url`: the status and the whole body, within a few seconds.
pub async fn get(client: &HttpClient, url: &str) -> Result<(u16, Bytes)> {
    let request = Request::get(url).body(Full::new(Bytes::new()))?;
    let exchange = async {
        let response = client.request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, crate::Error>((status, body))
    };
    match tokio::time::timeout(ADMIN_TIMEOUT, exchange).await {
        Ok(result) => result.map_err(|e| format!("GET {url}: {e}").into()),
        Err(_) => Err(format!("GET {url}: no answer within {ADMIN_TIMEOUT:?}").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_error_sent_as_200_counts_as_its_table_status() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(outcome(200, &headers), 200);
        headers.insert("x-gateway-status", HeaderValue::from_static("429"));
        assert_eq!((outcome(200, &headers), outcome(429, &headers)), (429, 429));
    }

    #[test]
    fn numbered_requests_are_spread_round_robin_and_evenly() {
        let mut counts = [0usize; 3];
        for n in 0..3000 {
            counts[round_robin(n, 3)] += 1;
        }
        assert_eq!(counts, [1000, 1000, 1000]);
        assert_eq!((0..6).map(|n| round_robin(n, 3)).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2]);
        assert!((0..10).all(|n| round_robin(n, 1) == 0));
    }

    #[test]
    fn targets_need_a_gateway_and_pick_each_in_turn() {
        let deadline = Duration::from_millis(700);
        assert!(Targets::new(&[], deadline).is_err());
        let addrs: Vec<SocketAddr> = (1..=3).map(|port| SocketAddr::from(([127, 0, 0, 1], port))).collect();
        let targets = Targets::new(&addrs, deadline).expect("targets");
        let ports: Vec<Option<u16>> = (0..4).map(|n| targets.pick(n).uri.port_u16()).collect();
        assert_eq!(ports, [Some(1), Some(2), Some(3), Some(1)]);
        assert_eq!(targets.deadline(), deadline);
        assert!(targets.pick(0).client_id.is_none());
    }

    #[test]
    fn a_client_id_goes_to_every_target_and_must_be_a_header_value() {
        let addrs: Vec<SocketAddr> = (1..=2).map(|port| SocketAddr::from(([127, 0, 0, 1], port))).collect();
        let targets =
            Targets::new(&addrs, Duration::from_secs(1)).and_then(|t| t.with_client_id("bulk")).expect("targets");
        assert!((0..2).all(|n| targets.pick(n).client_id.as_ref().is_some_and(|id| id == "bulk")));
        let bad = Targets::one(addrs[0], Duration::from_secs(1)).and_then(|t| t.with_client_id("line\nbreak"));
        assert!(bad.is_err());
    }
}
