//! [`handle`]: one data request from its head to its answer, metrics and log line.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Version, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::callback::{self, CALLBACK_PATH};
use super::detail::{DetailAnswer, DetailQuery, DetailRequest};
use super::receipts::{self, Answer, Query};
use super::respond::{X_REQUEST_ID, answer_response, cached_response, error_response};
use super::{AppParam, AppRuntime, Gateway};
use crate::cache::Freshness;
use crate::clients::{self, Client, ClientSlot, Rejection};
use crate::config::ErrorStatus;
use crate::error::{Blame, GatewayError};
use crate::http::read_body;
use crate::tencent::domain::AppId;
use crate::tencent::wire::{DETAIL_PATH, InvalidBody, RECEIPT_PATH, ReceiptRequest};

/// The longest deadline a caller may ask for.
const MAX_DEADLINE: Duration = Duration::from_secs(60);

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
    // The head is held here once and lent down the pipeline: each async step taking the
    // whole request would keep its own copy in its future.
    let (head, body) = req.into_parts();
    let method = head.method.clone();
    // The routes' own names need no copy; anything else is logged as sent.
    let path: std::borrow::Cow<'static, str> = match head.uri.path() {
        RECEIPT_PATH => RECEIPT_PATH.into(),
        DETAIL_PATH => DETAIL_PATH.into(),
        CALLBACK_PATH => CALLBACK_PATH.into(),
        other => other.to_owned().into(),
    };
    let request_id = request_id(&head.headers);
    // Only the request log line shows it.
    let traceparent = if tracing::enabled!(tracing::Level::INFO) {
        head.headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).filter(|t| t.len() <= 128).map(str::to_owned)
    } else {
        None
    };
    let trace = Trace { request_id: Some(request_id.clone()), ..Trace::default() };
    let mut pending = Unanswered { gw: &gw, request_id: &request_id, path: &path, trace, done: false };
    let bad_host = host(&head);
    // A request HTTP itself refuses (RFC 9112 3.2) is answered in HTTP's terms.
    let http_error = bad_host.is_err();
    let outcome = match (bad_host, gw.drain.enter()) {
        (Err(e), _) => Err(e),
        (Ok(()), None) => Err(GatewayError::Draining),
        (Ok(()), Some(_in_flight)) => route(&head, body, &gw, arrived, &mut pending.trace).await,
    };
    pending.done = true;
    let mut trace = std::mem::take(&mut pending.trace);
    drop(pending);
    // `status` is the outcome, which metrics and the log line record: for an error, the
    // table's status even when it is sent as Tencent's HTTP 200 (docs/design.md#errors).
    let (mut response, status) = match outcome {
        Ok(response) => {
            let status = response.status();
            (response, status)
        }
        Err(e) => {
            trace.blame = Some(e.blame());
            if matches!(e, GatewayError::Overloaded { .. }) {
                trace.rejected = Some(Rejection::Deadline);
            }
            let mode = match &trace.client {
                // Only the two Tencent routes answer as Tencent does. Tencent's webhooks
                // (/callback), any other path and a bad Host get HTTP's statuses.
                _ if http_error || !(path == RECEIPT_PATH || path == DETAIL_PATH) => ErrorStatus::Http,
                Some(client) => client.error_status,
                // Found before the caller was identified: whoever the header names.
                None => gw.clients.current().error_status(&head.headers),
            };
            (error_response(&e, mode), e.status())
        }
    };
    response.headers_mut().insert(X_REQUEST_ID, request_id.clone());
    let cause = trace.blame.map_or("none", Blame::label);
    let client = trace.client.as_ref().map_or(clients::DEFAULT, |c| c.id.as_str());
    if let Some(reason) = trace.rejected {
        gw.metrics.client_rejected.with_label_values(&[client, reason.label()]).inc();
    }
    let status = status.as_u16();
    // The app's label was formatted once at start-up; no allocation per request.
    let app = trace.app.and_then(|a| gw.apps.get(&a));
    let app_label = app.map_or("none", |a| a.receipts.metrics.app_label.as_str());
    let elapsed = arrived.elapsed();
    // Callbacks are Tencent's, not callers' requests: receipt_gateway_callbacks_total
    // counts them.
    if path != CALLBACK_PATH {
        match app {
            Some(app) if status == 200 && cause == "none" && client == clients::DEFAULT => {
                app.receipts.metrics.answered_default.inc();
            }
            _ => gw.metrics.requests.with_label_values(&[app_label, client, status_label(status), cause]).inc(),
        }
        match app {
            Some(app) => app.receipts.metrics.request_duration.observe(elapsed.as_secs_f64()),
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
            self.trace.app.and_then(|a| self.gw.apps.get(&a)).map_or("none", |a| a.receipts.metrics.app_label.as_str());
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

/// An HTTP/1.x request's `Host`: exactly one, naming a host and an optional port (RFC
/// 9112, 3.2: a server answers 400 to an HTTP/1.1 request without one, and to any with
/// several or an invalid one). An HTTP/1.0 request may leave it out; h2 names the
/// authority in `:authority`, which hyper has checked.
fn host(head: &Parts) -> Result<(), GatewayError> {
    if head.version == Version::HTTP_2 || head.version == Version::HTTP_3 {
        return Ok(());
    }
    let mut hosts = head.headers.get_all(header::HOST).iter();
    let why = match (hosts.next(), hosts.next()) {
        (None, _) if head.version == Version::HTTP_10 || head.version == Version::HTTP_09 => return Ok(()),
        (None, _) => "is missing",
        (Some(_), Some(_)) => "is repeated",
        (Some(host), None) if is_authority(host.as_bytes()) => return Ok(()),
        (Some(_), None) => "is not a valid host[:port]",
    };
    Err(GatewayError::BadRequest(format!("the Host header {why}")))
}

/// `host[:port]` (RFC 3986, 3.2.2–3.2.3): a registered name or IPv4 address, or an IP
/// literal in brackets; no user information; a port of digits. Checked in place: parsing
/// it as an `http::uri::Authority` would copy it, an allocation on every request.
fn is_authority(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|&b| b == b':') {
        // A colon inside an IPv6 literal is not the port's.
        Some(i) if !value[i..].contains(&b']') => (&value[..i], Some(&value[i + 1..])),
        _ => (value, None),
    };
    let port_ok = port.is_none_or(|p| {
        p.len() <= 5
            && p.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(p).is_ok_and(|p| p.is_empty() || p.parse::<u16>().is_ok())
    });
    let host_ok = match host {
        [b'[', literal @ .., b']'] => {
            !literal.is_empty() && literal.iter().all(|b| b.is_ascii_hexdigit() || b":.".contains(b))
        }
        _ => !host.is_empty() && host.iter().all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(b)),
    };
    host_ok && port_ok
}

/// W3C trace context, logged as sent.
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let random = rand::random::<u128>();
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[(random >> (124 - 4 * i) & 0xf) as usize];
    }
    // 32 hex digits are always a valid header value. Held by one shared allocation, so
    // the copies for the log, the query and the response header are reference counts.
    HeaderValue::from_maybe_shared(Bytes::from_owner(id)).unwrap_or(HeaderValue::from_static("unknown"))
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
    head: &Parts,
    body: Incoming,
    gw: &Gateway,
    arrived: Instant,
    trace: &mut Trace,
) -> Result<Response<Full<Bytes>>, GatewayError> {
    match head.uri.path() {
        RECEIPT_PATH => receipt(head, body, gw, arrived, trace).await.map(answer_response),
        // The other routes' futures are boxed, so that a receipt request's does not carry
        // their state (the detail API's and the callback's: 1.8 and 2.7 KB).
        DETAIL_PATH => Box::pin(detail(head, body, gw, arrived, trace)).await.map(|answer| {
            trace.x_cache = Some(answer.x_cache.as_str());
            cached_response(answer.body, answer.x_cache, answer.age)
        }),
        CALLBACK_PATH => {
            let mut taken = callback::Taken::default();
            let deadline = arrived + gw.config.request_timeout;
            let answered = Box::pin(callback::handle(head, body, gw, deadline, &mut taken)).await;
            trace.app = taken.app;
            trace.group = taken.group;
            trace.items = taken.items;
            answered
        }
        _ => Err(GatewayError::NotFound),
    }
}

/// `get_group_msg_receipt` (docs/design.md#receipt-api).
async fn receipt(
    head: &Parts,
    body: Incoming,
    gw: &Gateway,
    arrived: Instant,
    trace: &mut Trace,
) -> Result<Answer, GatewayError> {
    let (app, client, deadline, freshness) = admit(head, gw, arrived, trace)?;
    let body = read_body(&head.headers, body, gw.config.max_body_bytes, deadline).await?;
    let parsed = ReceiptRequest::parse(&body, gw.config.max_request_seqs).map_err(|e| match e {
        InvalidBody::NotJson(_) => GatewayError::NotJson(e.to_string()),
        _ => GatewayError::BadRequest(e.to_string()),
    })?;
    if tracing::enabled!(tracing::Level::INFO) {
        trace.group = Some(parsed.group.to_string());
    }
    trace.items = parsed.seqs.len();
    let request_id = trace.request_id();
    let query = Query { request_id, group: parsed.group, seqs: parsed.seqs, freshness, arrived, deadline, client };
    let answer = receipts::answer(&app.receipts, query).await?;
    trace.x_cache = Some(answer.x_cache.as_str());
    Ok(answer)
}

/// `get_group_msg_receipt_detail` (docs/design.md#detail-api).
async fn detail(
    head: &Parts,
    body: Incoming,
    gw: &Gateway,
    arrived: Instant,
    trace: &mut Trace,
) -> Result<DetailAnswer, GatewayError> {
    let (app, client, deadline, freshness) = admit(head, gw, arrived, trace)?;
    let body = read_body(&head.headers, body, gw.config.max_body_bytes, deadline).await?;
    let parsed = DetailRequest::parse(&body)?;
    if tracing::enabled!(tracing::Level::INFO) {
        trace.group = Some(parsed.group.to_string());
    }
    trace.items = 1;
    let query = DetailQuery { freshness, arrived, deadline, client };
    let request_id = trace.request_id();
    app.detail.answer(parsed, query, request_id).await
}

/// A data request past [`admit`]: its app, client, deadline and `Cache-Control`.
type Admitted<'a> = (&'a Arc<AppRuntime>, ClientSlot, Instant, Freshness);

/// What both data APIs check before reading the body: method, app, client (its token
/// and quota), deadline and `Cache-Control`.
fn admit<'a>(head: &Parts, gw: &'a Gateway, arrived: Instant, trace: &mut Trace) -> Result<Admitted<'a>, GatewayError> {
    if head.method != Method::POST {
        return Err(GatewayError::MethodNotAllowed);
    }
    let raw = head.uri.query().unwrap_or("").split('&').find_map(|pair| pair.strip_prefix("sdkappid="));
    let app = gw.app(raw, AppParam::Query)?;
    trace.app = Some(app.id);
    let client = gw.clients.current().identify(&head.headers).map_err(|(client, e)| {
        trace.client = Some(client);
        trace.rejected = Some(Rejection::Auth);
        e
    })?;
    let (slot, admitted) = (client.slot, client.admit(arrived));
    trace.client = Some(client);
    admitted.inspect_err(|_| trace.rejected = Some(Rejection::Quota))?;
    let deadline = arrived + deadline(&head.headers, gw.config.request_timeout)?;
    Ok((app, slot, deadline, freshness(&head.headers)))
}

/// The caller's deadline: `X-Request-Timeout-Ms`, else Envoy's expected timeout, else
/// the configured default; at most [`MAX_DEADLINE`].
fn deadline(headers: &HeaderMap, default: Duration) -> Result<Duration, GatewayError> {
    // Names given as text would be parsed on every request.
    const NAMES: [http::HeaderName; 2] = [
        http::HeaderName::from_static("x-request-timeout-ms"),
        http::HeaderName::from_static("x-envoy-expected-rq-timeout-ms"),
    ];
    for name in &NAMES {
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

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

    fn head(version: Version, hosts: &[&'static str]) -> Parts {
        let mut request = Request::post("/").version(version);
        for host in hosts {
            request = request.header(header::HOST, *host);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn http1_requests_name_one_valid_host() {
        for good in
            ["gateway", "gateway:8080", "10.0.0.1:80", "[::1]:8080", "[::1]", "gw.prod.svc.cluster.local", "gw:"]
        {
            assert!(host(&head(Version::HTTP_11, &[good])).is_ok(), "{good}");
        }
        let why = |version, hosts: &[&'static str]| host(&head(version, hosts)).unwrap_err().to_string();
        assert!(why(Version::HTTP_11, &[]).contains("Host header is missing"));
        assert!(why(Version::HTTP_11, &["a", "a"]).contains("Host header is repeated"));
        for bad in [
            "",
            "user@gateway",
            "gateway:port",
            "gateway:99999",
            "gateway:+80",
            "a:1:2",
            "gate way",
            "gateway/path",
            "gateway?x",
            "[::1",
        ] {
            assert!(why(Version::HTTP_11, &[bad]).contains("Host header is not a valid"), "{bad:?}");
        }
        // HTTP/1.0 may leave it out, but not send a bad one; h2 uses :authority.
        assert!(host(&head(Version::HTTP_10, &[])).is_ok());
        assert!(host(&head(Version::HTTP_10, &["a", "b"])).is_err());
        assert!(host(&head(Version::HTTP_2, &[])).is_ok());
        let e = host(&head(Version::HTTP_11, &[])).unwrap_err();
        assert_eq!((e.status(), e.code().0), (StatusCode::BAD_REQUEST, 10004));
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
        let r =
            error_response(&GatewayError::Overloaded { retry_after: Duration::from_millis(2100) }, ErrorStatus::Http);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }
}
