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
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clients::{self, Client, ClientSlot, Rejection};
use crate::config::ServerConfig;
use crate::error::{Blame, GatewayError};
use crate::reload::ClientsCell;
use crate::service::app::AppRuntime;
use crate::service::callback::{self, CALLBACK_PATH};
use crate::service::detail::{DetailAnswer, DetailQuery, DetailRequest};
use crate::service::receipts::{self, Answer, Freshness, Query, XCache};
use crate::shutdown::Drain;
use crate::telemetry::metrics::Metrics;
use crate::tencent::domain::AppId;
use crate::tencent::wire::{DETAIL_PATH, RECEIPT_PATH, ReceiptRequest, ReceiptResponse};

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
    /// How long an HTTP/1.1 connection may go without completing a request head while
    /// none of its requests is being answered.
    pub header_timeout: Duration,
    /// `receipt_gateway_connections_open{port}`.
    pub open: prometheus::IntGauge,
    /// `receipt_gateway_connections_refused_total{port,reason="limit"}`.
    pub over_limit: prometheus::IntCounter,
    /// `receipt_gateway_connections_refused_total{port,reason="silent"}`.
    pub silent: prometheus::IntCounter,
    /// `receipt_gateway_connections_refused_total{port,reason="resets"}`: closed for
    /// resetting too many accepted requests.
    pub reset_flood: prometheus::IntCounter,
}

/// The configured apps by sdkappid (looked up on every request; the keys are the
/// configuration's, so foldhash's speed costs no safety).
pub type Apps = HashMap<AppId, Arc<AppRuntime>, foldhash::fast::RandomState>;

/// What every data request shares.
pub struct Gateway {
    pub apps: Apps,
    /// Swapped whole by a configuration reload.
    pub clients: ClientsCell,
    pub config: ServerConfig,
    pub metrics: Metrics,
    pub drain: Arc<Drain>,
}

/// Serves HTTP/1.1 and h2c on `listener` with `handle` until `stop` names a deadline,
/// then closes connections gracefully, giving them until that deadline. At most
/// `limits.max_connections` are open at once (more are closed at once), one that sends
/// nothing within `limits.first_bytes` is closed, and an HTTP/1.1 one that completes no
/// request head within `limits.header_timeout` while none of its requests is being
/// answered is closed (see [`watchdog`]).
///
/// The protocol is told from the first bytes (peeked, so the connection's own parser
/// reads them), and each connection is served by hyper's own HTTP/1.1 or HTTP/2 server:
/// no per-request timer, no rewinding reader.
pub async fn serve<H, F>(listener: TcpListener, handle: H, limits: Limits, mut stop: watch::Receiver<Option<Instant>>)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    // No header_read_timeout: hyper arms a timer for every request with it; the
    // watchdog keeps that guard with one timer per connection.
    let h1 = http1::Builder::new();
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    // A mesh sidecar multiplexes many callers over few connections, and a request may
    // wait for budget for its whole deadline: allow more streams than hyper's 200.
    h2.timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_EVERY)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_send_buf_size(MAX_H2_SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let closers = Closers::default();
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
        let service = counting(handle.clone());
        let (h1, h2) = (h1.clone(), h2.clone());
        closers.register(&service.progress);
        let limits = limits.clone();
        tokio::spawn(async move {
            let _slot = slot;
            limits.open.inc();
            let progress = service.progress.clone();
            let ended = match first_bytes(&stream, limits.first_bytes).await {
                None => {
                    limits.silent.inc();
                    Ok(())
                }
                Some(Protocol::Http2) => {
                    let conn = h2.serve_connection(TokioIo::new(stream), service);
                    Drive::new(conn, &progress, &limits).await
                }
                Some(Protocol::Http1) => {
                    // The watchdog runs beside the connection, not in its task: a timer
                    // polled on each of the connection's wake-ups would cost every request.
                    let dog = tokio::spawn(expire(progress.clone(), limits.header_timeout));
                    let _dog = AbortOnDrop(dog);
                    let conn = h1.serve_connection(TokioIo::new(stream), service);
                    Drive::new(conn, &progress, &limits).await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            limits.open.dec();
        });
    };
    drop(listener);
    closers.close_all();
    // Every connection was told to finish (graceful shutdown): wait until all have.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout_at(deadline, slots.acquire_many(all)).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace period");
    }
}

/// What a connection is told from outside its task, as bits of [`Progress::signals`].
const STOP: u8 = 1;
/// Its allowance of resets is spent.
const FLOODED: u8 = 2;
/// Its watchdog saw no request head in time.
const EXPIRED: u8 = 4;

/// Serves `conn` until it ends. Told to stop, or flooded with resets (see [`Resets`]),
/// it finishes gracefully (HTTP/1.1: after the answer being written; h2: GOAWAY, then
/// the streams it accepted); expired (see [`watchdog`]), it is dropped at once.
///
/// The signals are one atomic load per wake-up: futures for them (a timer, channels)
/// would be polled on every wake-up of the connection, which costs each request.
struct Drive<'a, C> {
    conn: std::pin::Pin<Box<C>>,
    progress: &'a Progress,
    limits: &'a Limits,
    /// The waker last given to `progress`, so it is handed over only when it changes.
    registered: Option<std::task::Waker>,
    closing: bool,
}

impl<'a, C: GracefulConnection> Drive<'a, C> {
    fn new(conn: C, progress: &'a Progress, limits: &'a Limits) -> Self {
        Self { conn: Box::pin(conn), progress, limits, registered: None, closing: false }
    }
}

impl<C: GracefulConnection> Future for Drive<'_, C> {
    type Output = Result<(), C::Error>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        // Registered before the signals are read: one raised after the read wakes us.
        if !this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *this.progress.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
            this.registered = Some(cx.waker().clone());
        }
        let signals = this.progress.signals.load(Ordering::Acquire);
        if signals & EXPIRED != 0 {
            tracing::debug!("closed an HTTP/1.1 connection that went without a request head too long");
            return std::task::Poll::Ready(Ok(()));
        }
        if signals & (STOP | FLOODED) != 0 && !this.closing {
            if signals & FLOODED != 0 {
                tracing::info!("closing a connection that reset too many accepted requests (GOAWAY)");
                this.limits.reset_flood.inc();
            }
            this.conn.as_mut().graceful_shutdown();
            this.closing = true;
        }
        this.conn.as_mut().poll(cx)
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tells the connection of `progress` it expired once its [`watchdog`] returns.
async fn expire(progress: Arc<Progress>, timeout: Duration) {
    watchdog(&progress, timeout).await;
    progress.signal(EXPIRED);
}

/// The open connections, to tell them to stop. Registered by the accept loop (so none
/// is missed by a shutdown that starts while it is being spawned); a connection that
/// ended is forgotten now and then.
#[derive(Default, Clone)]
struct Closers(Arc<std::sync::Mutex<Vec<std::sync::Weak<Progress>>>>);

impl Closers {
    fn register(&self, progress: &Arc<Progress>) {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Amortised, and bounded by twice the connections open.
        if open.len() >= 64 && open.len().is_power_of_two() {
            open.retain(|p| p.strong_count() > 0);
        }
        open.push(Arc::downgrade(progress));
    }

    fn close_all(&self) {
        let open = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for progress in open.iter().filter_map(std::sync::Weak::upgrade) {
            progress.signal(STOP);
        }
    }
}

/// The protocol a connection speaks, told from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// h2 with prior knowledge (h2c): the connection starts with the preface.
    Http2,
}

/// The HTTP/2 connection preface (RFC 9113, 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What `peeked`, the first bytes of a connection, say: HTTP/2 once the whole preface is
/// there, HTTP/1.1 once they cannot be its start and hold a line's end or as many bytes,
/// else `None` (wait for more).
fn protocol(peeked: &[u8]) -> Option<Protocol> {
    if H2_PREFACE.starts_with(peeked) {
        // A prefix of the preface (it holds a "\r\n" of its own): wait for all of it.
        return (peeked.len() == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let enough = peeked.len() >= H2_PREFACE.len() || peeked.windows(2).any(|w| w == b"\r\n");
    enough.then_some(Protocol::Http1)
}

/// Waits until the peer has sent enough first bytes to tell its protocol, at most
/// `timeout`; `None` for a silent peer or one that closed. Peeked, not read: the
/// connection's parser sees them.
async fn first_bytes(stream: &tokio::net::TcpStream, timeout: Duration) -> Option<Protocol> {
    let wait = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => match protocol(&buf[..n]) {
                    Some(protocol) => return Some(protocol),
                    // Some bytes, not yet enough: wait for more without spinning.
                    None => tokio::time::sleep(Duration::from_millis(5)).await,
                },
            }
        }
    };
    tokio::time::timeout(timeout, wait).await.ok().flatten()
}

/// What a connection's service has seen of it: for the HTTP/1.1 [`watchdog`], and the
/// rapid-reset guard ([`Resets`]).
struct Progress {
    /// Request heads completed (each one is a call of the service).
    heads: AtomicU64,
    /// Requests being answered.
    answering: AtomicUsize,
    resets: Resets,
    /// What the connection was told ([`STOP`], [`FLOODED`], [`EXPIRED`]), and how to
    /// wake it to see it.
    signals: AtomicU8,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

impl Progress {
    fn signal(&self, signal: u8) {
        self.signals.fetch_or(signal, Ordering::Release);
        if let Some(waker) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            waker.wake_by_ref();
        }
    }
}

/// Resets of accepted requests a connection may make in a burst, and how many more it
/// earns per second: past them it is closed with GOAWAY (h2's own guard only counts
/// streams reset before they are accepted). Every request it lets be answered earns one
/// back too, so a mesh sidecar whose callers give up on a few of many requests is never
/// closed, and a client that mostly resets is.
const RESET_BURST: f64 = 100.0;
const RESETS_PER_SECOND: f64 = 10.0;

/// A connection's allowance of requests abandoned before their answer (a token bucket).
struct Resets {
    bucket: std::sync::Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    since: Instant,
    /// Requests abandoned, and answered, as of the last reset.
    dropped: u64,
    answered: u64,
    /// The tokens ran out.
    flooded: bool,
}

impl Resets {
    fn new() -> Self {
        let bucket = Bucket { tokens: RESET_BURST, since: Instant::now(), dropped: 0, answered: 0, flooded: false };
        Self { bucket: std::sync::Mutex::new(bucket) }
    }

    /// One more request abandoned before its answer; `finished` requests of the
    /// connection have ended so far, answered or abandoned (this one included). True
    /// (once) when that spent the allowance.
    fn reset(&self, finished: u64) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        b.dropped += 1;
        let answered = finished.saturating_sub(b.dropped).max(b.answered);
        let earned =
            now.saturating_duration_since(b.since).as_secs_f64() * RESETS_PER_SECOND + (answered - b.answered) as f64;
        let tokens = (b.tokens + earned).min(RESET_BURST);
        (b.tokens, b.since, b.answered) = (tokens - 1.0, now, answered);
        let newly = tokens < 1.0 && !b.flooded;
        b.flooded |= newly;
        newly
    }
}

/// A connection's service: `handle`, with each request counted into [`Progress`].
#[derive(Clone)]
struct Counting<H> {
    handle: H,
    progress: Arc<Progress>,
}

fn counting<H>(handle: H) -> Counting<H> {
    let progress = Progress {
        heads: AtomicU64::new(0),
        answering: AtomicUsize::new(0),
        resets: Resets::new(),
        signals: AtomicU8::new(0),
        waker: std::sync::Mutex::new(None),
    };
    Counting { handle, progress: Arc::new(progress) }
}

impl<H, F> hyper::service::Service<Request<Incoming>> for Counting<H>
where
    H: Fn(Request<Incoming>) -> F,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Answered<F>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let answering = Answering::start(&self.progress);
        Answered { answer: (self.handle)(req), answering }
    }
}

pin_project_lite::pin_project! {
    /// A request's answer being made; dropped before it is done, the request counts
    /// against the connection's reset allowance.
    struct Answered<F> {
        #[pin]
        answer: F,
        answering: Answering,
    }
}

impl<F: Future> Future for Answered<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.project();
        let answered = std::task::ready!(this.answer.poll(cx));
        this.answering.done = true;
        std::task::Poll::Ready(answered)
    }
}

/// One request being answered, from its head to its response.
struct Answering {
    progress: Arc<Progress>,
    done: bool,
}

impl Answering {
    fn start(progress: &Arc<Progress>) -> Self {
        progress.heads.fetch_add(1, Ordering::Relaxed);
        progress.answering.fetch_add(1, Ordering::Relaxed);
        Self { progress: progress.clone(), done: false }
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        let answering = self.progress.answering.fetch_sub(1, Ordering::Relaxed) - 1;
        if !self.done {
            let finished = self.progress.heads.load(Ordering::Relaxed).saturating_sub(answering as u64);
            if self.progress.resets.reset(finished) {
                self.progress.signal(FLOODED);
            }
        }
    }
}

/// Returns once an HTTP/1.1 connection has gone `timeout` (to within a third of it)
/// without completing a request head while none of its requests was being answered:
/// a slow sender of headers (slowloris), an idle keep-alive connection, or a peer that
/// stopped reading its answer. One timer per connection, none per request (hyper's own
/// header-read timeout arms one per request).
async fn watchdog(progress: &Progress, timeout: Duration) {
    let tick = timeout / 3;
    let mut ticks = tokio::time::interval_at(Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = progress.heads.load(Ordering::Relaxed);
    // Since when nothing was seen to happen (a late tick makes it later, never sooner).
    let mut quiet_since = Instant::now();
    loop {
        ticks.tick().await;
        let now = Instant::now();
        let heads = progress.heads.load(Ordering::Relaxed);
        if heads != seen || progress.answering.load(Ordering::Relaxed) > 0 {
            seen = heads;
            quiet_since = now;
        } else if now.saturating_duration_since(quiet_since) >= timeout {
            return;
        }
    }
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
    let outcome = match gw.drain.enter() {
        None => Err(GatewayError::Draining),
        Some(_in_flight) => route(&head, body, &gw, arrived, &mut pending.trace).await,
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
        match app {
            Some(app) if status == 200 && cause == "none" && client == clients::DEFAULT => {
                app.metrics.answered_default.inc();
            }
            _ => gw.metrics.requests.with_label_values(&[app_label, client, status_label(status), cause]).inc(),
        }
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

/// W3C trace context, logged as sent.
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// `X-Cache` (SPEC 2.1); a name given as text would be parsed and allocated per answer.
const X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

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

/// `get_group_msg_receipt` (SPEC 2.1).
async fn receipt(
    head: &Parts,
    body: Incoming,
    gw: &Gateway,
    arrived: Instant,
    trace: &mut Trace,
) -> Result<Answer, GatewayError> {
    let (app, client, deadline, freshness) = admit(head, gw, arrived, trace)?;
    let body = read_body(&head.headers, body, gw.config.max_body_bytes, deadline).await?;
    let parsed = ReceiptRequest::parse(&body, gw.config.max_request_seqs)
        .map_err(|e| GatewayError::BadRequest(e.to_string()))?;
    if tracing::enabled!(tracing::Level::INFO) {
        trace.group = Some(parsed.group.to_string());
    }
    trace.items = parsed.seqs.len();
    let request_id = trace.request_id();
    let query = Query { request_id, group: parsed.group, seqs: parsed.seqs, freshness, arrived, deadline, client };
    let answer = receipts::answer(app, query).await?;
    trace.x_cache = Some(answer.x_cache.as_str());
    Ok(answer)
}

/// `get_group_msg_receipt_detail` (SPEC 2.2).
async fn detail(
    head: &Parts,
    body: Incoming,
    gw: &Gateway,
    arrived: Instant,
    trace: &mut Trace,
) -> Result<DetailAnswer, GatewayError> {
    let (app, client, deadline, freshness) = admit(head, gw, arrived, trace)?;
    let body = read_body(&head.headers, body, gw.config.max_body_bytes, deadline).await?;
    let parsed = DetailRequest::parse(&body).map_err(GatewayError::BadRequest)?;
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
    let app = select_app(gw, head.uri.query())?;
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

/// Reads the body, refusing more than `max` bytes and giving up at the deadline.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    max: usize,
    deadline: Instant,
) -> Result<Bytes, GatewayError> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(GatewayError::BodyTooLarge(max));
    }
    let mut gathered = std::pin::pin!(gather(body, max));
    // A small body has usually arrived with the headers: no timer for it.
    if let Some(gathered) = futures_util::FutureExt::now_or_never(&mut gathered) {
        return gathered;
    }
    // The timer only for a body still on its way, boxed so that the usual request's
    // future does not carry it.
    let timer = Box::pin(tokio::time::sleep_until(deadline));
    tokio::select! {
        biased;
        gathered = gathered => gathered,
        () = timer => Err(GatewayError::BodyTimeout),
    }
}

/// The body's data, refusing more than `max` bytes. A body in one frame (the usual
/// small one) is passed on as it is, without a copy or a list of frames.
async fn gather(mut body: Incoming, max: usize) -> Result<Bytes, GatewayError> {
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| GatewayError::BadRequest(format!("could not read the request body: {e}")))?;
        // Trailers carry nothing the APIs read.
        let Ok(data) = frame.into_data() else { continue };
        let held = joined.as_ref().map_or_else(|| first.as_ref().map_or(0, Bytes::len), |j| j.len());
        if held + data.len() > max {
            return Err(GatewayError::BodyTooLarge(max));
        }
        match (&first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(one), None) => {
                let mut both = bytes::BytesMut::with_capacity(one.len() + data.len());
                both.extend_from_slice(one);
                both.extend_from_slice(&data);
                joined = Some(both);
            }
            (Some(_), Some(more)) => more.extend_from_slice(&data),
        }
    }
    Ok(joined.map(bytes::BytesMut::freeze).or(first).unwrap_or_default())
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

/// An answer with `X-Cache` and `Age`, its headers cloned from [`ANSWER_HEADERS`].
fn cached_response(body: Bytes, x_cache: XCache, age: u64) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    let kind = XCache::ALL.iter().position(|&x| x == x_cache);
    let young = usize::try_from(age).ok().filter(|&a| a < TEMPLATE_AGES);
    let template = kind.zip(young).and_then(|(kind, age)| ANSWER_HEADERS.get(kind * TEMPLATE_AGES + age));
    *response.headers_mut() = match template {
        Some(template) => template.clone(),
        None => answer_headers(x_cache, HeaderValue::from(age)),
    };
    response
}

/// Ages (whole seconds) with headers of their own in [`ANSWER_HEADERS`]: every fresh
/// answer at the default TTL; an older one's are made for it.
const TEMPLATE_AGES: usize = 10;

/// Their values, static: a clone of a formatted one would count references, on a cache
/// line every core writes.
const AGES: [&str; TEMPLATE_AGES] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// An answer's headers for every `X-Cache` (in [`XCache::ALL`]'s order) and age under
/// [`TEMPLATE_AGES`], made once: cloning a map costs an answer a third of building one
/// (hashing each name, growing the map; callgrind, `benches/callgrind.sh`).
static ANSWER_HEADERS: std::sync::LazyLock<Vec<HeaderMap>> = std::sync::LazyLock::new(|| {
    let each_age = |x_cache| AGES.map(|age| answer_headers(x_cache, HeaderValue::from_static(age)));
    XCache::ALL.into_iter().flat_map(each_age).collect()
});

/// An answer's headers, with an `X-Request-Id` placeholder that [`handle`] replaces in
/// place for every answer (an insert into a clone without room would grow it).
fn answer_headers(x_cache: XCache, age: HeaderValue) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(4);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(X_CACHE, HeaderValue::from_static(x_cache.as_str()));
    headers.insert(header::AGE, age);
    headers.insert(X_REQUEST_ID, HeaderValue::from_static("unknown"));
    headers
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
    fn an_answer_has_its_own_x_cache_and_age_and_room_for_its_request_id() {
        for x_cache in XCache::ALL {
            for age in [0, 1, 9, 10, 11, 86_400] {
                let mut response = cached_response(Bytes::from_static(b"{}"), x_cache, age);
                let h = response.headers();
                assert_eq!(h.get(X_CACHE).unwrap(), x_cache.as_str(), "{x_cache:?} at {age} s");
                assert_eq!(h.get(header::AGE).unwrap(), age.to_string().as_str(), "{x_cache:?} at {age} s");
                assert_eq!(h.get(header::CONTENT_TYPE).unwrap(), "application/json");
                let (room, len) = (h.capacity(), h.len());
                // What `handle` does to every answer: the id replaces the placeholder.
                response.headers_mut().insert(X_REQUEST_ID, HeaderValue::from_static("id-1"));
                let h = response.headers();
                assert_eq!(h.get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(), ["id-1"]);
                assert_eq!((h.len(), h.capacity()), (len, room), "no growth");
            }
        }
    }

    #[test]
    fn the_protocol_is_told_from_the_first_bytes() {
        assert_eq!(protocol(H2_PREFACE), Some(Protocol::Http2));
        // The preface holds a line's end of its own: a part of it is not HTTP/1.1 yet.
        assert_eq!(protocol(&H2_PREFACE[..16]), None);
        assert_eq!(protocol(b"PRI"), None);
        assert_eq!(protocol(b"POST /v4/x HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(protocol(b"GET / HT"), None);
        assert_eq!(protocol(&[b'x'; 24]), Some(Protocol::Http1));
        assert_eq!(protocol(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"), Some(Protocol::Http1), "not the preface");
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_waits_while_requests_are_answered_or_heads_arrive() {
        let timeout = Duration::from_secs(30);
        let progress = counting(()).progress;
        let started = Instant::now();
        // Quiet from the start: returns a timeout later, to within a third of it.
        watchdog(&progress, timeout).await;
        assert_eq!(started.elapsed(), timeout);

        let answering = Answering::start(&progress);
        let started = Instant::now();
        let dog = watchdog(&progress, timeout);
        tokio::pin!(dog);
        // Answering for three timeouts: never closed.
        assert!(tokio::time::timeout(3 * timeout, &mut dog).await.is_err());
        drop(answering);
        dog.await;
        let quiet_for = started.elapsed() - 3 * timeout;
        assert!(quiet_for >= timeout && quiet_for <= timeout + timeout / 3, "{quiet_for:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn resets_past_the_allowance_flood_the_connection_and_answers_earn_it_back() {
        let resets = Resets::new();
        // 100 abandoned, 400 answered among them: never out of tokens.
        for dropped in 1..=RESET_BURST as u64 {
            assert!(!resets.reset(dropped * 5), "answers earn resets back");
        }
        // Then only resets: the burst (less the one still spent), and out (said once).
        let finished = RESET_BURST as u64 * 5;
        for more in 1..RESET_BURST as u64 {
            assert!(!resets.reset(finished + more), "a burst is allowed");
        }
        assert!(resets.reset(finished + RESET_BURST as u64), "past it");
        assert!(!resets.reset(finished + RESET_BURST as u64 + 1), "said once");
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
