//! The data API (SPEC 2.1, 4): the accept loop (HTTP/1.1 and h2c on one port), routing,
//! request parsing, and responses. A request passes, in this order:
//! drain check → route → app → client (who, its token, its quota) → deadline and
//! `Cache-Control` → body (size-capped, within the deadline) → validation →
//! [`receipts::answer`] → response, metrics, one log line. `/callback` is routed to
//! [`callback::handle`] (Tencent's webhooks, no client, no budget).
//! Errors become HTTP in exactly one place, [`error_response`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::api::{DETAIL_PATH, RECEIPT_PATH, ReceiptRequest, ReceiptResponse};
use crate::app::AppRuntime;
use crate::callback::{self, CALLBACK_PATH};
use crate::clients::{self, Client, Rejection};
use crate::config::ServerConfig;
use crate::detail::{DetailAnswer, DetailQuery, DetailRequest};
use crate::domain::AppId;
use crate::error::{Blame, GatewayError};
use crate::metrics::Metrics;
use crate::receipts::{self, Answer, Freshness, Query, XCache};
use crate::reload::ClientsCell;
use crate::shutdown::Drain;

/// The longest deadline a caller may ask for.
const MAX_DEADLINE: Duration = Duration::from_secs(60);

/// Concurrent HTTP/2 streams per connection (nginx allows 128, Envoy 100 by default; a
/// mesh sidecar multiplexes many callers, so a little more).
const MAX_H2_STREAMS: u32 = 256;
/// Response bytes buffered per HTTP/2 stream for a peer that does not read (hyper's
/// default is 400 KiB; an answer of 1,000 items is about 60 KiB).
const MAX_H2_SEND_BUFFER: usize = 64 * 1024;
/// Resets of accepted streams a connection may have pending before it is closed with
/// GOAWAY (the rapid-reset guard).
const MAX_PENDING_RESETS: usize = 20;
/// Connections the admin port keeps open at once: enough for probes and scrapers, and
/// apart from the data port's, so `/healthz` answers while the data port is full.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// The h2 keep-alive: a ping this often on an idle connection, closed if unanswered.
const H2_PING_EVERY: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// How many connections a port keeps, and its connection metrics.
#[derive(Clone)]
pub struct Limits {
    pub max_connections: usize,
    /// How long a new connection may take to send its first bytes (the HTTP/1.1 request
    /// line or the h2 preface); a silent one is closed then.
    pub first_bytes: Duration,
    /// `receipt_gateway_connections_open{port}`.
    pub open: prometheus::IntGauge,
    /// `receipt_gateway_connections_refused_total{port,reason="limit"}`.
    pub over_limit: prometheus::IntCounter,
    /// `receipt_gateway_connections_refused_total{port,reason="silent"}`.
    pub silent: prometheus::IntCounter,
}

/// What every data request shares.
pub struct Gateway {
    pub apps: HashMap<AppId, Arc<AppRuntime>>,
    /// Swapped whole by a configuration reload.
    pub clients: ClientsCell,
    pub config: ServerConfig,
    pub metrics: Metrics,
    pub drain: Arc<Drain>,
}

/// Serves HTTP/1.1 and h2c on `listener` with `handle` until `stop` names a deadline,
/// then closes connections gracefully, giving them until that deadline. At most
/// `limits.max_connections` are open at once (more are closed at once), and one that
/// sends nothing within `limits.first_bytes` is closed.
pub async fn serve<H, F>(listener: TcpListener, handle: H, limits: Limits, mut stop: watch::Receiver<Option<Instant>>)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer the slowloris guard (header_read_timeout) does nothing.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    // A mesh sidecar multiplexes many callers over few connections, and a request may
    // wait for budget for its whole deadline: allow more streams than hyper's 200.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_EVERY)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_send_buf_size(MAX_H2_SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let deadline = loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            stopped = stop.wait_for(Option::is_some) => {
                // A dropped sender means nobody will say when: close at once.
                break stopped.ok().and_then(|d| *d).unwrap_or_else(Instant::now);
            }
        };
        let (stream, _) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: closed at once (dropping it), counted, and the accept loop goes on.
            limits.over_limit.inc();
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _slot = slot;
            limits.open.inc();
            if first_bytes(&stream, limits.first_bytes).await {
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service_fn(handle));
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            } else {
                limits.silent.inc();
            }
            limits.open.dec();
        });
    };
    drop(listener);
    if tokio::time::timeout_at(deadline, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace period");
    }
}

/// Waits until the peer has sent its first bytes (a request line's end or the h2
/// preface's length), at most `timeout`; false for a silent peer or one that closed.
/// Peeked, not read: the connection's parser sees them.
async fn first_bytes(stream: &tokio::net::TcpStream, timeout: Duration) -> bool {
    /// The h2 preface's length; an HTTP/1.1 request line ends in `\r\n` sooner or later.
    const ENOUGH: usize = 24;
    let wait = async {
        let mut buf = [0u8; ENOUGH];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n >= ENOUGH || buf[..n].windows(2).any(|w| w == b"\r\n") => return true,
                // Some bytes, not yet enough: wait for more without spinning.
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.unwrap_or(false)
}

/// What the request log line and metrics need, filled in as the request goes.
#[derive(Default)]
struct Trace {
    app: Option<AppId>,
    group: Option<String>,
    items: usize,
    x_cache: Option<&'static str>,
    /// Who caused the error answered, if one was.
    blame: Option<Blame>,
    /// Who called, once known.
    client: Option<Arc<Client>>,
    /// Why the caller was turned away, if it was.
    rejected: Option<Rejection>,
    /// The request's id.
    request_id: Option<HeaderValue>,
}

impl Trace {
    /// The request's id as text ("" if it has none).
    fn request_id(&self) -> &str {
        self.request_id.as_ref().and_then(|id| id.to_str().ok()).unwrap_or("")
    }
}

/// Answers one data request; never fails (errors are answers).
pub async fn handle(req: Request<Incoming>, gw: Arc<Gateway>) -> Result<Response<Full<Bytes>>, Infallible> {
    let arrived = Instant::now();
    let method = req.method().clone();
    // The routes' own names need no copy; anything else is logged as sent.
    let path: std::borrow::Cow<'static, str> = match req.uri().path() {
        RECEIPT_PATH => RECEIPT_PATH.into(),
        DETAIL_PATH => DETAIL_PATH.into(),
        CALLBACK_PATH => CALLBACK_PATH.into(),
        other => other.to_owned().into(),
    };
    let request_id = request_id(req.headers());
    let traceparent = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).filter(|t| t.len() <= 128);
    let traceparent = traceparent.map(str::to_owned);
    let trace = Trace { request_id: Some(request_id.clone()), ..Trace::default() };
    let mut pending = Unanswered { gw: &gw, request_id: &request_id, path: &path, trace, done: false };
    let outcome = match gw.drain.enter() {
        None => Err(GatewayError::Draining),
        Some(_in_flight) => route(req, &gw, arrived, &mut pending.trace).await,
    };
    pending.done = true;
    let mut trace = std::mem::take(&mut pending.trace);
    drop(pending);
    let mut response = match outcome {
        Ok(response) => response,
        Err(e) => {
            trace.blame = Some(e.blame());
            if matches!(e, GatewayError::Overloaded { .. }) {
                trace.rejected = Some(Rejection::Deadline);
            }
            error_response(&e)
        }
    };
    response.headers_mut().insert(X_REQUEST_ID, request_id.clone());
    let cause = trace.blame.map_or("none", Blame::label);
    let client = trace.client.as_ref().map_or(clients::DEFAULT, |c| c.id.as_str());
    if let Some(reason) = trace.rejected {
        gw.metrics.client_rejected.with_label_values(&[client, reason.label()]).inc();
    }
    let status = response.status().as_u16();
    // The app's label was formatted once at start-up; no allocation per request.
    let app = trace.app.and_then(|a| gw.apps.get(&a));
    let app_label = app.map_or("none", |a| a.metrics.app_label.as_str());
    let elapsed = arrived.elapsed();
    // Callbacks are Tencent's, not callers' requests: receipt_gateway_callbacks_total
    // counts them.
    if path != CALLBACK_PATH {
        gw.metrics.requests.with_label_values(&[app_label, client, status_label(status), cause]).inc();
        match app {
            Some(app) => app.metrics.request_duration.observe(elapsed.as_secs_f64()),
            None => gw.metrics.request_duration.with_label_values(&[app_label]).observe(elapsed.as_secs_f64()),
        }
    }
    tracing::info!(
        method = %method,
        path = %path,
        request_id = request_id.to_str().unwrap_or(""),
        traceparent = traceparent.as_deref().unwrap_or(""),
        sdkappid = %app_label,
        client,
        group_id = trace.group.as_deref().unwrap_or(""),
        items = trace.items,
        x_cache = trace.x_cache.unwrap_or(""),
        status,
        cause,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    Ok(response)
}

/// A request being answered: if its future is dropped first (the caller closed the
/// connection or reset the stream), counted as `receipt_gateway_requests_total{status="499"}`
/// (nginx's "client closed request") and logged once.
struct Unanswered<'a> {
    gw: &'a Gateway,
    request_id: &'a HeaderValue,
    path: &'a str,
    trace: Trace,
    done: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.done || self.path == CALLBACK_PATH {
            return;
        }
        let app_label =
            self.trace.app.and_then(|a| self.gw.apps.get(&a)).map_or("none", |a| a.metrics.app_label.as_str());
        let client = self.trace.client.as_ref().map_or(clients::DEFAULT, |c| c.id.as_str());
        self.gw.metrics.requests.with_label_values(&[app_label, client, "499", Blame::Caller.label()]).inc();
        tracing::info!(
            request_id = self.request_id.to_str().unwrap_or(""),
            path = self.path,
            sdkappid = app_label,
            client,
            "caller went away before its answer"
        );
    }
}

/// The request id header (SPEC 2.1, 6.3).
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The caller's `x-request-id` when it is a sane one (1–128 visible ASCII characters),
/// else a new random one (32 hex digits).
fn request_id(headers: &HeaderMap) -> HeaderValue {
    let sane = |v: &&HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
    };
    if let Some(id) = headers.get(&X_REQUEST_ID).filter(sane) {
        return id.clone();
    }
    let id = format!("{:032x}", rand::random::<u128>());
    // 32 hex digits are always a valid header value.
    HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Static labels for the statuses the gateway answers with (no allocation per request).
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        499 => "499",
        413 => "413",
        429 => "429",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => "other",
    }
}

async fn route(
    req: Request<Incoming>,
    gw: &Gateway,
    arrived: Instant,
    trace: &mut Trace,
) -> Result<Response<Full<Bytes>>, GatewayError> {
    match req.uri().path() {
        RECEIPT_PATH => receipt(req, gw, arrived, trace).await.map(answer_response),
        DETAIL_PATH => detail(req, gw, arrived, trace).await.map(|answer| {
            trace.x_cache = Some(answer.x_cache.as_str());
            cached_response(answer.body, answer.x_cache, answer.age)
        }),
        CALLBACK_PATH => {
            let mut taken = callback::Taken::default();
            let deadline = arrived + gw.config.request_timeout;
            let answered = callback::handle(req, gw, deadline, &mut taken).await;
            trace.app = taken.app;
            trace.group = taken.group;
            trace.items = taken.items;
            answered
        }
        _ => Err(GatewayError::NotFound),
    }
}

/// `get_group_msg_receipt` (SPEC 2.1).
async fn receipt(
    req: Request<Incoming>,
    gw: &Gateway,
    arrived: Instant,
    trace: &mut Trace,
) -> Result<Answer, GatewayError> {
    let (app, client, deadline, freshness) = admit(&req, gw, arrived, trace)?;
    let body = read_body(req, gw.config.max_body_bytes, deadline).await?;
    let parsed = ReceiptRequest::parse(&body, gw.config.max_request_seqs)
        .map_err(|e| GatewayError::BadRequest(e.to_string()))?;
    if tracing::enabled!(tracing::Level::INFO) {
        trace.group = Some(parsed.group.to_string());
    }
    trace.items = parsed.seqs.len();
    let request_id = trace.request_id().to_owned();
    let query =
        Query { request_id, group: parsed.group, seqs: parsed.seqs, freshness, arrived, deadline, client: client.slot };
    let answer = receipts::answer(app, query).await?;
    trace.x_cache = Some(answer.x_cache.as_str());
    Ok(answer)
}

/// `get_group_msg_receipt_detail` (SPEC 2.2).
async fn detail(
    req: Request<Incoming>,
    gw: &Gateway,
    arrived: Instant,
    trace: &mut Trace,
) -> Result<DetailAnswer, GatewayError> {
    let (app, client, deadline, freshness) = admit(&req, gw, arrived, trace)?;
    let body = read_body(req, gw.config.max_body_bytes, deadline).await?;
    let parsed = DetailRequest::parse(&body).map_err(GatewayError::BadRequest)?;
    if tracing::enabled!(tracing::Level::INFO) {
        trace.group = Some(parsed.group.to_string());
    }
    trace.items = 1;
    let query = DetailQuery { freshness, arrived, deadline, client: client.slot };
    let request_id = trace.request_id();
    app.detail.answer(parsed, query, request_id).await
}

/// A data request past [`admit`]: its app, client, deadline and `Cache-Control`.
type Admitted<'a> = (&'a Arc<AppRuntime>, Arc<Client>, Instant, Freshness);

/// What both data APIs check before reading the body: method, app, client (its token
/// and quota), deadline and `Cache-Control`.
fn admit<'a>(
    req: &Request<Incoming>,
    gw: &'a Gateway,
    arrived: Instant,
    trace: &mut Trace,
) -> Result<Admitted<'a>, GatewayError> {
    if req.method() != Method::POST {
        return Err(GatewayError::MethodNotAllowed);
    }
    let app = select_app(gw, req.uri().query())?;
    trace.app = Some(app.id);
    let client = gw.clients.current().identify(req.headers()).map_err(|(client, e)| {
        trace.client = Some(client);
        trace.rejected = Some(Rejection::Auth);
        e
    })?;
    trace.client = Some(client.clone());
    client.admit(arrived).inspect_err(|_| trace.rejected = Some(Rejection::Quota))?;
    let deadline = arrived + deadline(req.headers(), gw.config.request_timeout)?;
    Ok((app, client, deadline, freshness(req.headers())))
}

/// Picks the app from `sdkappid`, which may be left out when only one is configured.
/// The caller's `identifier` and `usersig` are deliberately never read.
fn select_app<'a>(gw: &'a Gateway, query: Option<&str>) -> Result<&'a Arc<AppRuntime>, GatewayError> {
    let raw = query.unwrap_or("").split('&').find_map(|pair| pair.strip_prefix("sdkappid="));
    match raw {
        None if gw.apps.len() == 1 => gw.apps.values().next().ok_or(GatewayError::NotFound),
        None => Err(GatewayError::UnknownApp("sdkappid is required: several apps are configured".into())),
        Some(raw) => {
            let id =
                raw.parse::<u64>().map_err(|_| GatewayError::UnknownApp("sdkappid must be a decimal number".into()))?;
            gw.apps
                .get(&AppId(id))
                .ok_or_else(|| GatewayError::UnknownApp(format!("sdkappid {id} is not configured on this gateway")))
        }
    }
}

/// The caller's deadline: `X-Request-Timeout-Ms`, else Envoy's expected timeout, else
/// the configured default; at most [`MAX_DEADLINE`].
fn deadline(headers: &HeaderMap, default: Duration) -> Result<Duration, GatewayError> {
    for name in ["x-request-timeout-ms", "x-envoy-expected-rq-timeout-ms"] {
        if let Some(value) = headers.get(name) {
            let ms =
                value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()).ok_or_else(|| {
                    GatewayError::BadRequest(format!("{name} must be a whole number of milliseconds"))
                })?;
            return Ok(Duration::from_millis(ms).min(MAX_DEADLINE));
        }
    }
    Ok(default)
}

/// `Cache-Control: no-cache` or `max-age=N` (no-cache wins when both are given).
fn freshness(headers: &HeaderMap) -> Freshness {
    let mut freshness = Freshness::Default;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',').map(str::trim) {
            if directive.eq_ignore_ascii_case("no-cache") {
                return Freshness::NoCache;
            }
            if let Some(n) = directive.strip_prefix("max-age=").and_then(|n| n.parse::<u64>().ok()) {
                freshness = Freshness::MaxAge(Duration::from_secs(n));
            }
        }
    }
    freshness
}

/// Reads the body, refusing more than `max` bytes and giving up at the deadline.
pub(crate) async fn read_body(req: Request<Incoming>, max: usize, deadline: Instant) -> Result<Bytes, GatewayError> {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(GatewayError::BodyTooLarge(max));
    }
    let mut collect = std::pin::pin!(Limited::new(req.into_body(), max).collect());
    // A small body has usually arrived with the headers: no timer for it.
    let collected = match futures_util::FutureExt::now_or_never(&mut collect) {
        Some(collected) => collected,
        None => match tokio::time::timeout_at(deadline, collect).await {
            Err(_) => {
                return Err(GatewayError::BodyTimeout);
            }
            Ok(collected) => collected,
        },
    };
    match collected {
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(GatewayError::BodyTooLarge(max)),
        Err(e) => Err(GatewayError::BadRequest(format!("could not read the request body: {e}"))),
        Ok(body) => Ok(body.to_bytes()),
    }
}

pub(crate) fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn answer_response(answer: Answer) -> Response<Full<Bytes>> {
    cached_response(Bytes::from(answer.body.to_bytes()), answer.x_cache, answer.age)
}

/// An answer with `X-Cache` and `Age`.
fn cached_response(body: Bytes, x_cache: XCache, age: u64) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("x-cache", HeaderValue::from_static(x_cache.as_str()));
    headers.insert(header::AGE, HeaderValue::from(age));
    response
}

/// The one place a gateway error becomes HTTP: status, Tencent body, `Retry-After`.
pub fn error_response(e: &GatewayError) -> Response<Full<Bytes>> {
    let mut response = json(e.status(), ReceiptResponse::fail(e.code(), e.to_string()).to_bytes());
    if let Some(secs) = e.retry_after() {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn deadlines_come_from_headers_in_order() {
        let d = Duration::from_secs(2);
        assert_eq!(deadline(&headers(&[]), d).unwrap(), d);
        assert_eq!(
            deadline(&headers(&[("x-envoy-expected-rq-timeout-ms", "300")]), d).unwrap(),
            Duration::from_millis(300)
        );
        let both = headers(&[("x-request-timeout-ms", "100"), ("x-envoy-expected-rq-timeout-ms", "300")]);
        assert_eq!(deadline(&both, d).unwrap(), Duration::from_millis(100));
        assert_eq!(deadline(&headers(&[("x-request-timeout-ms", "999999999")]), d).unwrap(), MAX_DEADLINE);
        let bad = deadline(&headers(&[("x-request-timeout-ms", "soon")]), d).unwrap_err();
        assert!(bad.to_string().contains("x-request-timeout-ms"));
    }

    #[test]
    fn cache_control_is_understood() {
        assert_eq!(freshness(&headers(&[])), Freshness::Default);
        assert_eq!(freshness(&headers(&[("cache-control", "no-cache")])), Freshness::NoCache);
        assert_eq!(freshness(&headers(&[("cache-control", "max-age=5")])), Freshness::MaxAge(Duration::from_secs(5)));
        assert_eq!(freshness(&headers(&[("cache-control", "max-age=5, No-Cache")])), Freshness::NoCache);
    }

    #[test]
    fn errors_carry_retry_after_and_tencent_shape() {
        let r = error_response(&GatewayError::Overloaded { retry_after: Duration::from_millis(2100) });
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }
}
