//! The HTTP front: accepts connections on a port and drives each with hyper's own
//! HTTP/1.1 or HTTP/2 server, told apart by the first bytes ([`sniff`]); bounds what a
//! connection may hold or cost ([`Limits`], the per-connection watchdog and the
//! rapid-reset guard in [`conn`]); reads request bodies within a size and a deadline
//! ([`body`]). What a request is for is the handler's business: this stage knows no
//! receipts, no apps and no callers.
//!
//! May import: `error` (body reading answers with a [`GatewayError`](crate::error::GatewayError)).
//! Imported by `service` (the handlers) and `lib.rs` (which binds the ports).
//!
//! Invariant: a connection never holds more than the limits say — a slot of
//! `max_connections`, the first bytes within `first_bytes`, a request head within
//! `header_timeout` and [`MAX_HEAD_BYTES`], bounded h2 streams, send buffers and resets —
//! whatever the peer does; and a full port makes room for a new connection by closing
//! one that is not answering a request (docs/operations.md#connection-limits).

mod body;
mod conn;
mod sniff;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

pub use body::{json, read_body};
use conn::{AbortOnDrop, Counting, Drive, Open, counting, expire};
use sniff::{Protocol, Sniffed, first_bytes};

use crate::telemetry::metrics::ConnectionMetrics;

/// Concurrent HTTP/2 streams per connection (nginx allows 128, Envoy 100 by default; a
/// mesh sidecar multiplexes many callers, so a little more).
const MAX_H2_STREAMS: u32 = 256;
/// Response bytes buffered per HTTP/2 stream for a peer that does not read (hyper's
/// default is 400 KiB; an answer of 1,000 items is about 60 KiB).
const MAX_H2_SEND_BUFFER: usize = 64 * 1024;
/// Resets of accepted streams a connection may have pending before it is closed with
/// GOAWAY (the rapid-reset guard).
const MAX_PENDING_RESETS: usize = 20;
/// A request head, HTTP/1.1 (request line and headers) or h2 (the decoded header list),
/// is at most this large: 431 beyond. Envoy allows 60 KiB by default, so whatever a mesh
/// forwards fits. A connection stuck mid-head holds its buffer, at most about twice this
/// (it grows by doubling; measured 133 KiB a head, docs/benchmarks.md#hostile-input).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Connections the admin port keeps open at once: enough for probes and scrapers, and
/// apart from the data port's, so `/healthz` answers while the data port is full.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// The admin port's `header_timeout` at most: probes and scrapers open a connection per
/// request or reuse one within seconds, so an idle one is closed sooner there.
pub const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// How long a connection (HTTP/1.1 or h2) may go without completing a request head
    /// while none of its requests is being answered.
    pub header_timeout: Duration,
    /// The port's connection gauges and counters.
    pub metrics: ConnectionMetrics,
}

/// Serves HTTP/1.1 and h2c on `listener` with `handle` until `stop` names a deadline,
/// then closes connections gracefully, giving them until that deadline.
///
/// At most `limits.max_connections` are open at once: a new connection past them takes
/// the place of the oldest that has completed no request head, else of the oldest idle
/// one, and is refused (closed at once) only when every connection is answering a request
/// (see `conn::Open::evict`). One that sends nothing within `limits.first_bytes` is
/// closed, and one that completes no request head within `limits.header_timeout` while
/// none of its requests is being answered is closed (see `conn::expire`).
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
    // watchdog keeps that guard with one timer per connection. The read buffer is the
    // head's bound too, so a head that never ends holds no more than it.
    let mut h1 = http1::Builder::new();
    h1.max_header_size(MAX_HEAD_BYTES).max_buf_size(MAX_HEAD_BYTES);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    // A mesh sidecar multiplexes many callers over few connections, and a request may
    // wait for budget for its whole deadline: allow more streams than hyper's 200.
    h2.timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_EVERY)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_concurrent_streams(MAX_H2_STREAMS)
        .max_send_buf_size(MAX_H2_SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let open = Open::default();
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
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => match open.evict() {
                Some(slot) => {
                    limits.metrics.evicted.inc();
                    slot
                }
                None => {
                    // Every connection is answering a request: this one is closed at
                    // once (dropping it), counted, and the accept loop goes on.
                    limits.metrics.over_limit.inc();
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = counting(handle.clone());
        service.progress.hold(slot);
        open.register(&service.progress);
        tokio::spawn(connection(stream, service, (h1.clone(), h2.clone()), limits.clone()));
    };
    drop(listener);
    open.close_all();
    // Every connection was told to finish (graceful shutdown): wait until all have.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout_at(deadline, slots.acquire_many(all)).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace period");
    }
}

/// One connection, from its first bytes to its end; its place in the limit is given
/// back when it ends.
async fn connection<H, F>(
    stream: TcpStream,
    service: Counting<H>,
    (h1, h2): (http1::Builder, http2::Builder<TokioExecutor>),
    limits: Limits,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    limits.metrics.open.inc();
    let progress = service.progress.clone();
    let sniffed = tokio::select! {
        biased;
        // Evicted (or shut down) while its first bytes are awaited.
        () = progress.stopped() => Sniffed::Closed,
        sniffed = first_bytes(&stream, limits.first_bytes) => sniffed,
    };
    let protocol = match sniffed {
        Sniffed::Spoke(protocol) => protocol,
        Sniffed::Silent => {
            limits.metrics.silent.inc();
            return end(&progress, &limits);
        }
        Sniffed::Closed => return end(&progress, &limits),
    };
    // The watchdog runs beside the connection, not in its task: a timer polled on each
    // of the connection's wake-ups would cost every request.
    let dog = expire(progress.clone(), limits.header_timeout, protocol, limits.metrics.idle.clone());
    let _dog = AbortOnDrop(tokio::spawn(dog));
    let ended = match protocol {
        Protocol::Http2 => Drive::new(h2.serve_connection(TokioIo::new(stream), service), &progress, &limits).await,
        Protocol::Http1 => Drive::new(h1.serve_connection(TokioIo::new(stream), service), &progress, &limits).await,
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    end(&progress, &limits);
}

/// The connection ended: its place in the limit and in the gauge are given back.
fn end(progress: &conn::Progress, limits: &Limits) {
    progress.release();
    limits.metrics.open.dec();
}
