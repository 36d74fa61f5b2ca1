//! One connection's life: driven until it ends or is told to stop ([`Drive`]), its
//! requests counted for the watchdog, the rapid-reset guard and admission
//! ([`Progress`]), and the port's open connections, to close them for shutdown or to make
//! room for a new one ([`Open`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::server::graceful::GracefulConnection;
use prometheus::IntCounter;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::Limits;
use super::sniff::Protocol;

/// What a connection is told from outside its task, as bits of [`Progress::signals`].
const STOP: u8 = 1;
/// Its allowance of resets is spent.
const FLOODED: u8 = 2;
/// It went without a request head too long ([`expire`]): dropped at once.
const EXPIRED: u8 = 4;
/// An h2 connection went without a request head too long: GOAWAY first.
const IDLE: u8 = 8;
/// Its place was given to a new connection ([`Open::evict`]): dropped at once.
const EVICTED: u8 = 16;

/// Serves `conn` until it ends. Told to stop, flooded with resets (see [`Resets`]) or
/// idle (h2, see [`expire`]), it finishes gracefully (HTTP/1.1: after the answer being
/// written; h2: GOAWAY, then the streams it accepted); expired or evicted, it is dropped
/// at once.
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
            tracing::debug!("closed a connection that went without a request head too long");
            return std::task::Poll::Ready(Ok(()));
        }
        if signals & EVICTED != 0 {
            tracing::debug!("closed a connection to make room for a new one");
            return std::task::Poll::Ready(Ok(()));
        }
        if signals & (STOP | FLOODED | IDLE) != 0 && !this.closing {
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

/// Closes the connection of `progress` once its [`watchdog`] returns, counting it in
/// `idle`. An HTTP/1.1 connection is dropped at once; an h2 one is sent GOAWAY first, so
/// a peer that is only idle learns not to send more, and is dropped if it has not closed
/// after another third of `timeout` without a request (a peer that answers no PING, or
/// is stuck in the middle of a header block, never lets GOAWAY finish: nothing may come
/// between a HEADERS frame and its CONTINUATIONs, so that one stream cannot be reset
/// either). docs/operations.md#connection-limits
pub(super) async fn expire(progress: Arc<Progress>, timeout: Duration, protocol: Protocol, idle: IntCounter) {
    watchdog(&progress, timeout).await;
    idle.inc();
    if protocol == Protocol::Http2 {
        progress.signal(IDLE);
        watchdog(&progress, timeout / 3).await;
    }
    progress.signal(EXPIRED);
}

/// The open connections of a port, oldest first: to tell them all to stop, and to pick
/// the one that makes room for a new connection when the port is full ([`Open::evict`]).
/// Registered by the accept loop, so none is missed by a shutdown that starts while it
/// is being spawned; a connection that ended is forgotten now and then. Only the accept
/// loop and shutdown take the lock, never a request.
#[derive(Default, Clone)]
pub(super) struct Open(Arc<Mutex<Table>>);

#[derive(Default)]
struct Table {
    /// Every open connection, in the order they were accepted.
    all: VecDeque<Weak<Progress>>,
    /// Those that had completed no request head when last looked at, oldest first. A
    /// connection only ever leaves that state, so the front is popped until one is
    /// still in it.
    fresh: VecDeque<Weak<Progress>>,
    /// Lengths at which the lists are next swept of ended connections: twice what the
    /// last sweep left, so sweeping costs O(1) per connection.
    sweep_all: usize,
    sweep_fresh: usize,
}

/// Lists shorter than this are never swept.
const SWEEP_FROM: usize = 64;

impl Open {
    pub(super) fn register(&self, progress: &Arc<Progress>) {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let t = &mut *table;
        if t.all.len() >= t.sweep_all.max(SWEEP_FROM) {
            t.all.retain(|p| p.strong_count() > 0);
            t.sweep_all = 2 * t.all.len();
        }
        if t.fresh.len() >= t.sweep_fresh.max(SWEEP_FROM) {
            t.fresh.retain(|p| p.upgrade().is_some_and(|p| p.heads.load(Ordering::Relaxed) == 0));
            t.sweep_fresh = 2 * t.fresh.len();
        }
        t.all.push_back(Arc::downgrade(progress));
        t.fresh.push_back(Arc::downgrade(progress));
    }

    /// Makes room for a new connection on a full port: closes the oldest connection that
    /// has completed no request head (a silent or slow opener), else the oldest that is
    /// answering none (an idle keep-alive or h2 connection), and hands over its place.
    /// `None` when every connection is answering a request: then the new one is refused.
    ///
    /// Finding the idle one looks at the connections in order, skipping the busy ones: a
    /// cost only paid when the port is full and nobody completed no head.
    pub(super) fn evict(&self) -> Option<OwnedSemaphorePermit> {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(oldest) = table.fresh.pop_front() {
            let Some(progress) = oldest.upgrade() else { continue };
            if progress.heads.load(Ordering::Relaxed) > 0 {
                continue;
            }
            if let Some(slot) = progress.evict() {
                return Some(slot);
            }
        }
        let mut i = 0;
        while let Some(weak) = table.all.get(i) {
            let Some(progress) = weak.upgrade() else {
                table.all.remove(i);
                continue;
            };
            if progress.answering.load(Ordering::Relaxed) == 0
                && let Some(slot) = progress.evict()
            {
                table.all.remove(i);
                return Some(slot);
            }
            i += 1;
        }
        None
    }

    pub(super) fn close_all(&self) {
        let open = std::mem::take(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()).all);
        for progress in open.iter().filter_map(Weak::upgrade) {
            progress.signal(STOP);
        }
    }
}

/// What a connection's service has seen of it: for the [`watchdog`], the rapid-reset
/// guard ([`Resets`]) and admission ([`Open::evict`]); and its place in the port's
/// connection limit.
pub(super) struct Progress {
    /// Request heads completed (each one is a call of the service).
    heads: AtomicU64,
    /// Requests being answered.
    answering: AtomicUsize,
    resets: Resets,
    /// What the connection was told ([`STOP`], [`FLOODED`], [`EXPIRED`], [`IDLE`],
    /// [`EVICTED`]), and how to wake it to see it.
    signals: AtomicU8,
    waker: Mutex<Option<std::task::Waker>>,
    /// Its place among the port's `max_connections`: given back when it ends, or handed
    /// to a new connection that evicts it.
    slot: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Progress {
    fn signal(&self, signal: u8) {
        self.signals.fetch_or(signal, Ordering::Release);
        if let Some(waker) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            waker.wake_by_ref();
        }
    }

    /// The connection holds `slot` until it ends or is evicted.
    pub(super) fn hold(&self, slot: OwnedSemaphorePermit) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(slot);
    }

    /// The connection ended: its place is free.
    pub(super) fn release(&self) {
        drop(self.slot.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Its place, taken from it, and it told to close; `None` if it has none (ended, or
    /// evicted already).
    fn evict(&self) -> Option<OwnedSemaphorePermit> {
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        self.signal(EVICTED);
        Some(slot)
    }

    /// Resolves once the connection is told to stop or is evicted: for the time before it
    /// is driven (while its first bytes are awaited), when [`Drive`] is not there to look.
    pub(super) async fn stopped(&self) {
        std::future::poll_fn(|cx| {
            *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
            if self.signals.load(Ordering::Acquire) & (STOP | EVICTED) != 0 {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
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
    bucket: Mutex<Bucket>,
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
        Self { bucket: Mutex::new(bucket) }
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
        waker: Mutex::new(None),
        slot: Mutex::new(None),
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

/// Returns once a connection has gone `timeout` (to within a third of it) without
/// completing a request head while none of its requests was being answered: a slow
/// sender of headers (slowloris), an idle keep-alive or h2 connection, an h2 stream whose
/// header block never ends, or a peer that stopped reading its answer. One timer per
/// connection, none per request (hyper's own header-read timeout arms one per request).
async fn watchdog(progress: &Progress, timeout: Duration) {
    let tick = (timeout / 3).max(Duration::from_millis(1));
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
    async fn an_idle_h2_connection_gets_goaway_then_is_dropped_if_it_stays() {
        let timeout = Duration::from_secs(30);
        let progress = counting(()).progress;
        let idle = IntCounter::new("idle", "idle").unwrap();
        let started = Instant::now();
        let dog = tokio::spawn(expire(progress.clone(), timeout, Protocol::Http2, idle.clone()));
        let signals = || progress.signals.load(Ordering::Acquire);
        // Quiet for the timeout (the watchdog ticks every third of it): GOAWAY, not yet
        // dropped.
        tokio::time::sleep(timeout + timeout / 6).await;
        assert_eq!(signals(), IDLE, "GOAWAY after {:?}", started.elapsed());
        assert_eq!(idle.get(), 1);
        // Still open a further third later (to within a ninth): dropped.
        dog.await.unwrap();
        assert_eq!(signals(), IDLE | EXPIRED);
        let lived = started.elapsed();
        assert!(lived >= timeout + timeout / 3 && lived <= timeout + timeout / 3 + timeout / 3, "{lived:?}");

        // HTTP/1.1: dropped at once.
        let progress = counting(()).progress;
        expire(progress.clone(), timeout, Protocol::Http1, idle.clone()).await;
        assert_eq!(progress.signals.load(Ordering::Acquire), EXPIRED);
        assert_eq!(idle.get(), 2);
    }

    /// A connection of a port with `slots`, registered in `open`.
    fn connection(open: &Open, slots: &Arc<tokio::sync::Semaphore>) -> Arc<Progress> {
        let progress = counting(()).progress;
        progress.hold(slots.clone().try_acquire_owned().unwrap());
        open.register(&progress);
        progress
    }

    #[test]
    fn a_full_port_makes_room_from_the_oldest_headless_then_the_oldest_idle_never_a_busy_one() {
        let slots = Arc::new(tokio::sync::Semaphore::new(5));
        let open = Open::default();
        let [answered, busy, ended, silent, slow] = [(); 5].map(|()| connection(&open, &slots));
        // One request answered, and idle since; one answering; one gone.
        let mut done = Answering::start(&answered);
        done.done = true;
        drop(done);
        let _answering = Answering::start(&busy);
        ended.release();
        let evicted = |p: &Progress| p.signals.load(Ordering::Acquire) & EVICTED != 0;

        // The oldest that has completed no head goes first, though older ones are idle;
        // the one that ended is passed over. Its place is handed over, not freed.
        let room = open.evict().expect("room");
        assert!(evicted(&silent) && !evicted(&answered) && !evicted(&ended));
        assert_eq!(slots.available_permits(), 1, "the ended connection's place only");
        drop(room);
        assert!(open.evict().is_some() && evicted(&slow));
        // Then the oldest idle one; never the busy one.
        assert!(open.evict().is_some() && evicted(&answered));
        assert!(open.evict().is_none(), "every connection left is answering");
        assert!(!evicted(&busy));
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
