//! The `warm` scenario's own client, built so that it is not what a run measures:
//!
//! - each worker owns one HTTP/1.1 connection (hyper's `client::conn::http1`
//!   `SendRequest`), driven in the worker's own task: no pool, no connection task to hand
//!   answers across;
//! - every request body is generated before the run ([`Requests`] holds them, workers take
//!   them in turn) and every header value is built once;
//! - one watchdog per worker instead of a timer per request: the worker notes when its
//!   request went out, the watchdog looks every [`WATCH_EVERY`] and gives the connection
//!   up when a request is older than its deadline plus a second (counted as hung);
//! - it runs on threads of its own ([`ClientRuntime`]: a single-threaded runtime each),
//!   so the simulator's runtime and this client do not share worker threads.
//!
//! [`closed_loop`] is the most a server answers with `connections` in flight;
//! [`open_loop`] holds a rate (latency counted from each request's scheduled time, as
//! in [`drive`](crate::drive)). Both record into the same [`Recorder`] as the rest of the
//! benchmark. A connection that fails is reopened; its request counts as failed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::Result;
use crate::client::{Answer, HUNG_AFTER_DEADLINE, Outcome, XCache, outcome};
use crate::drive::{self, Schedule, wait_for_turn};
use crate::record::{Recorder, Sample};

/// How often a worker's watchdog looks at its request in flight.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// A worker whose connection cannot be opened waits this long before it tries again.
const RECONNECT_AFTER: Duration = Duration::from_millis(10);

const REQUEST_TIMEOUT: HeaderName = HeaderName::from_static("x-request-timeout-ms");
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The client's threads, each running a single-threaded tokio runtime of its own (as
/// wrk runs an event loop per thread): a worker stays on the thread it was given, its
/// connection's wake-ups never cross threads, and there is no work stealing to pay for.
/// The threads stop when this is dropped.
pub struct ClientRuntime {
    /// Never empty.
    threads: Vec<ClientThread>,
}

struct ClientThread {
    handle: Handle,
    /// Dropped (or sent) to stop the thread.
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClientRuntime {
    pub fn new(threads: usize) -> Result<ClientRuntime> {
        let mut client = ClientRuntime { threads: Vec::new() };
        for n in 0..threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the client's runtime: {e}"))?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("loadgen-client-{n}"))
                // Tasks spawned through the handle run while this thread is in `block_on`.
                .spawn(move || runtime.block_on(async move { drop(stopped.await) }))
                .map_err(|e| format!("cannot start a client thread: {e}"))?;
            client.threads.push(ClientThread { handle, stop: Some(stop), thread: Some(thread) });
        }
        Ok(client)
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// The runtime worker `n` runs on (workers are dealt out in turn).
    fn handle(&self, n: usize) -> &Handle {
        &self.threads[n % self.threads.len()].handle
    }
}

impl Drop for ClientRuntime {
    fn drop(&mut self) {
        for thread in &mut self.threads {
            drop(thread.stop.take());
        }
        // Each thread ends as soon as its `block_on` sees the stop (its runtime, dropped
        // there, cancels what is left): joining waits for nothing long.
        for thread in &mut self.threads {
            if let Some(thread) = thread.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Everything requests are made of, built before the run.
pub struct Requests {
    addr: SocketAddr,
    /// Origin form: the path and the query.
    uri: Uri,
    host: HeaderValue,
    deadline_ms: HeaderValue,
    /// Never empty.
    bodies: Vec<Bytes>,
    /// A request older than this is hung.
    hung_after: Duration,
    deadline: Duration,
}

impl Requests {
    /// POSTs of `bodies` (in turn) to `path_and_query` on `addr`, each with `deadline` as
    /// `X-Request-Timeout-Ms`.
    pub fn new(addr: SocketAddr, path_and_query: &str, bodies: Vec<Bytes>, deadline: Duration) -> Result<Requests> {
        if bodies.is_empty() {
            return Err("no request bodies".into());
        }
        Ok(Requests {
            addr,
            uri: path_and_query.parse()?,
            host: HeaderValue::from_str(&addr.to_string())?,
            deadline_ms: HeaderValue::from_str(&deadline.as_millis().to_string())?,
            bodies,
            hung_after: deadline + HUNG_AFTER_DEADLINE,
            deadline,
        })
    }

    /// Request number `n`: every part is shared with the prepared ones (reference counts).
    fn request(&self, n: usize) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.bodies[n % self.bodies.len()].clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, JSON);
        headers.insert(REQUEST_TIMEOUT, self.deadline_ms.clone());
        request
    }
}

/// `connections` workers on `client`'s threads, each sending its next request as soon as
/// the last was answered.
pub async fn closed_loop(
    client: &ClientRuntime,
    requests: Arc<Requests>,
    connections: usize,
    schedule: Schedule,
) -> Recorder {
    run_workers(client, requests, connections, schedule, Pace::Closed).await
}

/// Requests at `rate` a second whatever the answers do, on `connections` workers on
/// `client`'s threads.
pub async fn open_loop(
    client: &ClientRuntime,
    requests: Arc<Requests>,
    connections: usize,
    rate: f64,
    schedule: Schedule,
) -> Recorder {
    let pace = Pace::Open { rate, next_ticket: Arc::new(AtomicU64::new(0)) };
    run_workers(client, requests, connections, schedule, pace).await
}

/// When a worker sends.
#[derive(Clone)]
enum Pace {
    Closed,
    /// Ticket `n` is due at `start + n / rate`.
    Open {
        rate: f64,
        next_ticket: Arc<AtomicU64>,
    },
}

/// Spawns the workers on the client's threads; their records are merged here, on the
/// caller's runtime, after the run.
async fn run_workers(
    client: &ClientRuntime,
    requests: Arc<Requests>,
    connections: usize,
    schedule: Schedule,
    pace: Pace,
) -> Recorder {
    let mut workers = JoinSet::new();
    for worker in 0..connections {
        let mut w = Worker { requests: requests.clone(), schedule, pace: pace.clone(), next_body: worker };
        workers.spawn_on(async move { w.run().await }, client.handle(worker));
    }
    drive::merge_workers(workers).await
}

struct Worker {
    requests: Arc<Requests>,
    schedule: Schedule,
    pace: Pace,
    /// Which of the prepared bodies goes next (workers start apart and take them in turn).
    next_body: usize,
}

/// How one connection's life ended.
enum Ended {
    /// The run is over.
    Done,
    /// A transport error or the server closed the connection; the request in flight (sent
    /// at that instant, scheduled at the second) failed.
    Failed(Option<(Instant, Instant)>),
    /// The watchdog gave up on the request sent at that instant (scheduled at the second).
    Hung(Instant, Instant),
}

impl Worker {
    async fn run(&mut self) -> Recorder {
        let mut recorder = Recorder::default();
        let in_flight = InFlight::new(self.schedule.start);
        let hung_after = self.requests.hung_after;
        while Instant::now() < self.schedule.end {
            let Ok((mut sender, connection)) = connect(self.requests.addr).await else {
                tokio::time::sleep(RECONNECT_AFTER).await;
                continue;
            };
            let mut connection = std::pin::pin!(connection);
            // The connection is driven here, in the worker's task, beside its requests.
            let ended = tokio::select! {
                biased;
                ended = self.exchanges(&mut sender, &in_flight, &mut recorder) => ended,
                _ = &mut connection => Ended::Failed(in_flight.since()),
                since = in_flight.watch(hung_after) => Ended::Hung(since.0, since.1),
            };
            in_flight.clear();
            let (outcome, (sent, at)) = match ended {
                Ended::Done => break,
                Ended::Failed(None) => continue,
                Ended::Failed(Some(times)) => (Outcome::Failed, times),
                Ended::Hung(sent, at) => (Outcome::Hung, (sent, at)),
            };
            if self.schedule.is_measured(at) {
                let took = sent.elapsed();
                let sample = Sample { outcome, sent, latency: took, service: took, queued: Duration::ZERO };
                recorder.record(sample, self.requests.deadline);
            }
        }
        recorder
    }

    /// Requests on one connection until the run ends or the connection fails.
    async fn exchanges(
        &mut self,
        sender: &mut SendRequest<Full<Bytes>>,
        in_flight: &InFlight,
        recorder: &mut Recorder,
    ) -> Ended {
        loop {
            let Some(at) = self.next_turn().await else { return Ended::Done };
            let request = self.requests.request(self.next_body);
            self.next_body += 1;
            let sent = Instant::now();
            in_flight.set(sent, at);
            let Some(answer) = exchange(sender, request).await else {
                return Ended::Failed(Some((sent, at)));
            };
            in_flight.clear();
            if self.schedule.is_measured(at) {
                let done = Instant::now();
                let sample = Sample {
                    outcome: Outcome::Answered(answer),
                    sent,
                    latency: done.duration_since(at.min(sent)),
                    service: done - sent,
                    queued: sent.saturating_duration_since(at),
                };
                recorder.record(sample, self.requests.deadline);
            }
        }
    }

    /// When the next request is due (now, in a closed loop), or `None` when the run is
    /// over.
    async fn next_turn(&self) -> Option<Instant> {
        match &self.pace {
            Pace::Closed => Some(Instant::now()).filter(|&now| now < self.schedule.end),
            Pace::Open { rate, next_ticket } => {
                let ticket = next_ticket.fetch_add(1, Ordering::Relaxed);
                let at = self.schedule.start + Duration::from_secs_f64(ticket as f64 / rate);
                if at >= self.schedule.end {
                    return None;
                }
                wait_for_turn(at).await;
                Some(at)
            }
        }
    }
}

/// A worker's request in flight, for its watchdog: when it was sent and when it was due,
/// in microseconds after the run's start (plus one: zero means none).
struct InFlight {
    start: Instant,
    sent: AtomicU64,
    due: AtomicU64,
}

impl InFlight {
    fn new(start: Instant) -> InFlight {
        InFlight { start, sent: AtomicU64::new(0), due: AtomicU64::new(0) }
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_micros()).unwrap_or(u64::MAX - 1) + 1
    }

    fn set(&self, sent: Instant, due: Instant) {
        // The worker and its watchdog share a task: nothing to order beyond the value.
        self.due.store(self.micros(due), Ordering::Relaxed);
        self.sent.store(self.micros(sent), Ordering::Relaxed);
    }

    fn clear(&self) {
        self.sent.store(0, Ordering::Relaxed);
    }

    /// (sent, due) of the request in flight.
    fn since(&self) -> Option<(Instant, Instant)> {
        let at = |micros: u64| self.start + Duration::from_micros(micros - 1);
        match self.sent.load(Ordering::Relaxed) {
            0 => None,
            sent => Some((at(sent), at(self.due.load(Ordering::Relaxed).max(1)))),
        }
    }

    /// Resolves when the request in flight is older than `after`: (sent, due).
    async fn watch(&self, after: Duration) -> (Instant, Instant) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some((sent, due)) = self.since().filter(|(sent, _)| sent.elapsed() > after) {
                return (sent, due);
            }
        }
    }
}

async fn connect(
    addr: SocketAddr,
) -> Result<(SendRequest<Full<Bytes>>, http1::Connection<TokioIo<TcpStream>, Full<Bytes>>)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(http1::handshake(TokioIo::new(stream)).await?)
}

/// Sends `request` and reads the whole answer (counting its bytes, keeping none).
async fn exchange(sender: &mut SendRequest<Full<Bytes>>, request: Request<Full<Bytes>>) -> Option<Answer> {
    sender.ready().await.ok()?;
    let response = sender.send_request(request).await.ok()?;
    let status = outcome(response.status().as_u16(), response.headers());
    let x_cache = XCache::from_header(response.headers().get(X_CACHE).map(|v| v.as_bytes()));
    let retry_after = response.headers().contains_key(RETRY_AFTER);
    let mut body = response.into_body();
    let mut body_bytes = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.ok()?.data_ref() {
            body_bytes += data.len();
        }
    }
    Some(Answer { status, x_cache, retry_after, body_bytes })
}

/// What one request `n` of `requests` is answered, body kept: to check a server's answer
/// before it is measured.
pub async fn probe(requests: &Requests, n: usize, within: Duration) -> Result<(u16, XCache, Bytes)> {
    let exchange = async {
        let (mut sender, connection) = connect(requests.addr).await?;
        let connection = tokio::spawn(connection);
        sender.ready().await?;
        let response = sender.send_request(requests.request(n)).await?;
        let status = outcome(response.status().as_u16(), response.headers());
        let x_cache = XCache::from_header(response.headers().get(X_CACHE).map(|v| v.as_bytes()));
        let body = response.into_body().collect().await?.to_bytes();
        connection.abort();
        Ok::<_, crate::Error>((status, x_cache, body))
    };
    match tokio::time::timeout(within, exchange).await {
        Ok(answer) => answer.map_err(|e| format!("POST to {}: {e}", requests.addr).into()),
        Err(_) => Err(format!("POST to {}: no answer within {within:?}", requests.addr).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests() -> Requests {
        let bodies = vec![Bytes::from_static(b"a"), Bytes::from_static(b"bb")];
        Requests::new(SocketAddr::from(([127, 0, 0, 1], 8080)), "/p?q=1", bodies, Duration::from_millis(700))
            .expect("requests")
    }

    #[test]
    fn requests_take_the_prepared_bodies_in_turn_with_the_prepared_headers() {
        let r = requests();
        let sizes: Vec<u64> =
            (0..3).map(|n| hyper::body::Body::size_hint(r.request(n).body()).exact().unwrap_or(0)).collect();
        assert_eq!(sizes, [1, 2, 1]);
        let request = r.request(0);
        assert_eq!((request.method(), request.uri().to_string().as_str()), (&Method::POST, "/p?q=1"));
        assert_eq!(request.headers().get(HOST).map(|v| v.as_bytes()), Some(&b"127.0.0.1:8080"[..]));
        assert_eq!(request.headers().get(REQUEST_TIMEOUT).map(|v| v.as_bytes()), Some(&b"700"[..]));
        assert_eq!(r.hung_after, Duration::from_millis(1700));
        assert!(Requests::new(r.addr, "/", Vec::new(), Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_request_in_flight_is_remembered_until_cleared() {
        let start = Instant::now();
        let in_flight = InFlight::new(start);
        assert!(in_flight.since().is_none());
        let (sent, due) = (start + Duration::from_millis(5), start + Duration::from_millis(3));
        in_flight.set(sent, due);
        assert_eq!(in_flight.since(), Some((sent, due)));
        in_flight.clear();
        assert!(in_flight.since().is_none());
        in_flight.set(start, start);
        assert_eq!(in_flight.since(), Some((start, start)), "at the start itself is not none");
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_fires_once_a_request_is_older_than_allowed() {
        let start = Instant::now();
        let in_flight = InFlight::new(start);
        in_flight.set(start, start);
        // With paused time, the watchdog's interval auto-advances; std's clock does not,
        // so the request is "old" only if `after` is zero.
        let fired = tokio::time::timeout(Duration::from_secs(1), in_flight.watch(Duration::ZERO)).await;
        assert_eq!(fired.ok(), Some((start, start)));
    }
}
