//! One connection's life: driven until it ends or is told to stop ([`Drive`]), its
//! requests counted for the HTTP/1.1 watchdog and the rapid-reset guard ([`Progress`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::server::graceful::GracefulConnection;
use tokio::time::Instant;

use super::Limits;

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
pub(super) struct Drive<'a, C> {
    conn: std::pin::Pin<Box<C>>,
    progress: &'a Progress,
    limits: &'a Limits,
    /// The waker last given to `progress`, so it is handed over only when it changes.
    registered: Option<std::task::Waker>,
    closing: bool,
}

impl<'a, C: GracefulConnection> Drive<'a, C> {
    pub(super) fn new(conn: C, progress: &'a Progress, limits: &'a Limits) -> Self {
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
                this.limits.metrics.reset_flood.inc();
            }
            this.conn.as_mut().graceful_shutdown();
            this.closing = true;
        }
        this.conn.as_mut().poll(cx)
    }
}

/// Aborts its task when dropped.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tells the connection of `progress` it expired once its [`watchdog`] returns.
pub(super) async fn expire(progress: Arc<Progress>, timeout: Duration) {
    watchdog(&progress, timeout).await;
    progress.signal(EXPIRED);
}

/// The open connections, to tell them to stop. Registered by the accept loop (so none
/// is missed by a shutdown that starts while it is being spawned); a connection that
/// ended is forgotten now and then.
#[derive(Default, Clone)]
pub(super) struct Closers(Arc<std::sync::Mutex<Vec<std::sync::Weak<Progress>>>>);

impl Closers {
    pub(super) fn register(&self, progress: &Arc<Progress>) {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Amortised, and bounded by twice the connections open.
        if open.len() >= 64 && open.len().is_power_of_two() {
            open.retain(|p| p.strong_count() > 0);
        }
        open.push(Arc::downgrade(progress));
    }

    pub(super) fn close_all(&self) {
        let open = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for progress in open.iter().filter_map(std::sync::Weak::upgrade) {
            progress.signal(STOP);
        }
    }
}

/// What a connection's service has seen of it: for the HTTP/1.1 [`watchdog`], and the
/// rapid-reset guard ([`Resets`]).
pub(super) struct Progress {
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
    pub(super) fn new() -> Self {
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
pub(super) struct Counting<H> {
    handle: H,
    pub(super) progress: Arc<Progress>,
}

pub(super) fn counting<H>(handle: H) -> Counting<H> {
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
    pub(super) struct Answered<F> {
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
pub(super) struct Answering {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
