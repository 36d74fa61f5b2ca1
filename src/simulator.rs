//! A local stand-in for Tencent Cloud Chat's read-receipt REST APIs,
//! `get_group_msg_receipt` and `get_group_msg_receipt_detail`, and for the group members
//! whose reads Tencent pushes as callbacks.
//!
//! Integration tests, the demo, the load generator and `receipt-gateway simulate` point
//! the gateway's upstream at it. It is a real HTTP server (HTTP/1.1 and h2c on one port)
//! that plays Tencent's rules (SPEC 6.4) and keeps a ledger of every call it received,
//! so a test can prove what the gateway saved or that it kept its budget.
//!
//! What it owns: the answers of both APIs, the per-(sdkappid, API) rolling-second limit,
//! the call ledger, receipt overrides, injected faults, and the member player. What it
//! does not own: anything the gateway decides (retries, caching, signing, what a
//! callback does to the cache).
//!
//! A call passes these phases, each of which can end it (the first that applies wins):
//!
//! 1. routing — anything but `POST` [`RECEIPT_PATH`](crate::api::RECEIPT_PATH) or `POST`
//!    [`DETAIL_PATH`](crate::api::DETAIL_PATH) is HTTP 404 / 60009 and is *not*
//!    recorded; every call past this point is recorded in the ledger under its [`SimApi`];
//! 2. an injected [`Fault`] (latency only delays, the others replace the answer); the
//!    faults form one queue, played on the next calls to either API;
//! 3. `sdkappid` — missing or not a number: 60003; not configured: 60006;
//! 4. the rate limit of the app *for this API* — 60007 (each API has its own window);
//! 5. the other query parameters — 60003; the UserSig — 70001 expired, 70009 otherwise;
//!    a genuine UserSig of an account that is not the app's admin — 60010;
//! 6. the body — 10004 (not parseable; more than `max_seqs` MsgSeqs; for the detail API
//!    a `Filter` other than 0 or 1, or a `Count` outside 1..=200);
//! 7. the group — 10010 for ids starting `missing`, 10015 for `invalid`; a MsgSeq made
//!    invalid by [`Simulator::reject_seq`] — 10004;
//! 8. the answer. Receipt API: one item per requested MsgSeq in order, an override, else
//!    [`default_receipt`]. Detail API: 10062 for the whole call if the message has no
//!    receipt, 10004 for a `Cursor` it never issued, else one page of the member list
//!    that matches the receipt API's counts (see `detail`).
//!
//! The member player (see `player`), when configured, runs beside the server: it makes
//! the members of the messages asked about read them, one at a time at a fixed pace,
//! stores the new counts as overrides (so phase 8 of both APIs answers them) and
//! delivers each read as a signed `Group.CallbackAfterReadReceipt`.
//!
//! Like Tencent, it answers API errors with HTTP 200; only injected faults and unknown
//! paths produce another status. `rules` and `detail` hold the rules as pure functions,
//! `ledger` what is remembered between calls, `player` the members; this file serves
//! HTTP and runs the phases.
//!
//! Invariants a reader must keep: no lock is held across an `.await` (one short critical
//! section per call decides the answer and writes the ledger; one per played read), and
//! no input can panic a request (there is no `unwrap` on the request path).

mod detail;
mod ledger;
mod player;
mod rules;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::api::{ReceiptItem, ReceiptRequest, ReceiptResponse, SENT_AT_HEADER};
use crate::code::ErrorCode;
use crate::domain::{AppId, MsgSeq};
use crate::usersig::SecretKey;

use detail::DetailRequest;
use ledger::State;
pub use ledger::max_in_window;
use rules::{Fail, QueryParams};

pub use detail::{FinishField, MAX_DETAIL_COUNT, member_account};
pub use ledger::{CallRecord, NO_ERROR_CODE, SimApi};
pub use player::{
    CallbackPlayer, DEFAULT_DELIVERY_TIMEOUT, Deliveries, MAX_IN_FLIGHT, MAX_PLAYABLE, MAX_READS_PER_SECOND,
    PlayedRead, PlayerError,
};
pub use rules::{MAX_SEQ_WITH_RECEIPT, default_receipt};

/// Bodies are read whole; a cap keeps a broken client from filling memory.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long [`Simulator::serve`] lets open connections finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// One app the simulator knows: its admin account and the key UserSigs must be signed with.
#[derive(Clone, Debug)]
pub struct SimApp {
    pub app: AppId,
    pub identifier: String,
    pub key: SecretKey,
}

/// What the simulator is configured with; fixed for its lifetime. Start from
/// [`SimOptions::new`] and override fields with `..SimOptions::new(apps)`.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub apps: Vec<SimApp>,
    /// Calls served per rolling second per (sdkappid, API); more are answered 60007.
    /// Each API gets this many: a detail call never spends the receipt API's budget.
    pub limit_per_second: u32,
    /// The most MsgSeqs one receipt call may carry; more are answered 10004.
    pub max_seqs: usize,
    /// The member player; `None` (the default) makes no one read anything.
    pub player: Option<CallbackPlayer>,
}

impl SimOptions {
    /// Tencent's documented limit for each of the two APIs.
    pub const DEFAULT_LIMIT_PER_SECOND: u32 = 200;
    /// Tencent's documented maximum of MsgSeqs per receipt call.
    pub const DEFAULT_MAX_SEQS: usize = 50;

    /// Options with Tencent's own limits and no member player.
    pub fn new(apps: Vec<SimApp>) -> Self {
        Self { apps, limit_per_second: Self::DEFAULT_LIMIT_PER_SECOND, max_seqs: Self::DEFAULT_MAX_SEQS, player: None }
    }
}

/// A misbehaviour to play instead of (or before) the normal answer; see [`Simulator::inject`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Wait this long, then answer normally (a slow upstream).
    Latency(Duration),
    /// Answer HTTP 200 `FAIL` with this ErrorCode (e.g. 10002, 70169).
    ErrorCode(ErrorCode),
    /// Answer with this HTTP status (500 if it is not a valid status) and a small HTML
    /// body, as a failing load balancer in front of Tencent would.
    HttpStatus(u16),
    /// Close the connection without answering (a transport error).
    Drop,
}

/// A handle on a simulator: cheap to clone, shared by its server and the test driving it.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    apps: HashMap<AppId, SimApp>,
    /// The first configured app: the one [`Simulator::play_group`] delivers callbacks for.
    first_app: Option<AppId>,
    limit_per_second: usize,
    max_seqs: usize,
    player: Option<CallbackPlayer>,
    /// One lock, held briefly and never across an `.await`, so the ledger and the rate
    /// windows always agree.
    state: Mutex<State>,
    /// True while calls are held (see [`Simulator::hold_calls`]).
    gate: watch::Sender<bool>,
    /// Calls recorded and waiting at the gate now.
    held: AtomicUsize,
    /// How the player's callbacks fared; a watch so that tests can wait for them.
    deliveries: watch::Sender<Deliveries>,
}

impl Simulator {
    pub fn new(options: SimOptions) -> Self {
        let inner = Inner {
            first_app: options.apps.first().map(|a| a.app),
            apps: options.apps.into_iter().map(|a| (a.app, a)).collect(),
            limit_per_second: usize::try_from(options.limit_per_second).unwrap_or(usize::MAX),
            max_seqs: options.max_seqs,
            player: options.player,
            state: Mutex::new(State::default()),
            gate: watch::Sender::new(false),
            held: AtomicUsize::new(0),
            deliveries: watch::Sender::new(Deliveries::default()),
        };
        Self { inner: Arc::new(inner) }
    }

    /// Binds `127.0.0.1:0`, serves there on the current runtime and returns the handle,
    /// the base URL (`http://127.0.0.1:PORT`) and the guard that owns the server.
    pub async fn spawn(options: SimOptions) -> io::Result<(Simulator, String, SimServer)> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let sim = Simulator::new(options);
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            // A dropped sender means the guard is gone: stop as well.
            let _ = stopped.await;
        };
        let task = tokio::spawn(sim.clone().serve(listener, shutdown));
        let server = SimServer { addr, stop: Some(stop), task: Some(task) };
        Ok((sim, format!("http://{addr}"), server))
    }

    /// Serves (and runs the member player, when configured) until `shutdown` resolves;
    /// then stops the player, stops accepting, gives open connections a second to finish
    /// and closes whatever is left.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Without a timer hyper's header-read timeout (the slowloris guard) does nothing.
        builder.http1().timer(TokioTimer::new());
        let graceful = GracefulShutdown::new();
        // Owning the connection tasks (and the player) means they end with `serve`, even
        // if it is aborted.
        let mut connections = JoinSet::new();
        let mut player = JoinSet::new();
        if let Some(config) = self.inner.player.clone() {
            player.spawn(player::run(self.clone(), config));
        }
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        let sim = self.clone();
                        let service = service_fn(move |req| sim.clone().handle(req));
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        connections.spawn(graceful.watch(conn.into_owned()));
                    }
                    Err(error) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(%error, "simulator accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
        player.shutdown().await;
        drop(listener);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
        Ok(())
    }

    /// Makes later calls for (`group`, `seq`) report these counts (item Code 0), and the
    /// detail API list members to match. An override is an explicit wish of the test, so
    /// it wins even above [`MAX_SEQ_WITH_RECEIPT`]. The member player changes it as
    /// members read.
    pub fn set_receipt(&self, group: &str, seq: u64, read: u64, unread: u64) {
        self.state().overrides.insert((group.to_owned(), seq), (read, unread));
    }

    /// Makes every later call that carries `seq` (either API) fail as a whole with
    /// 10004, the way Tencent refuses a call with one bad parameter: for testing that a
    /// gateway isolates the caller who sent it.
    pub fn reject_seq(&self, seq: u64) {
        self.state().rejected.insert(seq);
    }

    /// Plays `fault` on each of the next `times` calls (to either API), after every fault
    /// injected before.
    pub fn inject(&self, fault: Fault, times: usize) {
        self.state().faults.extend(std::iter::repeat_n(fault, times));
    }

    /// Delays every answer by `latency` (on top of any injected [`Fault::Latency`]).
    pub fn set_latency(&self, latency: Duration) {
        self.state().base_latency = latency;
    }

    /// Names the detail API's "last page" flag `field` in later answers (the default is
    /// [`FinishField::IsFinish`], the name Tencent's reference gives it).
    pub fn set_finish_field(&self, field: FinishField) {
        self.state().finish_field = field;
    }

    /// Holds every later call after it is recorded (decided, counted against the limit)
    /// and before it is answered, until [`Self::release_calls`]: while held, "a fetch is
    /// in flight" is a fact a test can rely on rather than a window made by latency.
    pub fn hold_calls(&self) {
        self.inner.gate.send_replace(true);
    }

    /// Lets every held call (and every later one) be answered.
    pub fn release_calls(&self) {
        self.inner.gate.send_replace(false);
    }

    /// How many calls are held at the gate now.
    pub fn held_calls(&self) -> usize {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Every call that reached the receipt route, in arrival order. (Detail calls are in
    /// [`Self::detail_calls`]; [`Self::calls_to`] takes the API.)
    pub fn calls(&self) -> Vec<CallRecord> {
        self.calls_to(SimApi::Receipt)
    }

    /// How many calls reached the receipt route.
    pub fn call_count(&self) -> usize {
        self.call_count_to(SimApi::Receipt)
    }

    /// How many receipt calls were answered with this ErrorCode (0 counts OK answers).
    pub fn count_code(&self, code: ErrorCode) -> usize {
        self.count_code_to(SimApi::Receipt, code)
    }

    /// The most *served* receipt calls (all but those answered 60007, across all apps)
    /// whose arrivals fit in one window of this length. The limiter counts the same
    /// calls, so without injected faults this never exceeds the limit: to prove that a
    /// client kept its budget, check `count_code(ErrorCode(60007)) == 0` or
    /// [`Self::max_arrivals_in_any_window`].
    pub fn max_in_any_window(&self, window: Duration) -> usize {
        self.max_in_any_window_to(SimApi::Receipt, window)
    }

    /// Like [`Self::max_in_any_window`], but counting every recorded receipt call,
    /// refused ones too: what a client actually sent.
    pub fn max_arrivals_in_any_window(&self, window: Duration) -> usize {
        self.max_arrivals_in_any_window_to(SimApi::Receipt, window)
    }

    /// Every call that reached the detail route, in arrival order.
    pub fn detail_calls(&self) -> Vec<CallRecord> {
        self.calls_to(SimApi::Detail)
    }

    /// How many calls reached the detail route.
    pub fn detail_call_count(&self) -> usize {
        self.call_count_to(SimApi::Detail)
    }

    /// Every call to `api`, in arrival order.
    pub fn calls_to(&self, api: SimApi) -> Vec<CallRecord> {
        self.state().calls.iter().filter(|c| c.api == api).cloned().collect()
    }

    /// Every call to either API, in arrival order.
    pub fn all_calls(&self) -> Vec<CallRecord> {
        self.state().calls.clone()
    }

    pub fn call_count_to(&self, api: SimApi) -> usize {
        self.state().calls.iter().filter(|c| c.api == api).count()
    }

    /// How many calls to `api` were answered with this ErrorCode.
    pub fn count_code_to(&self, api: SimApi, code: ErrorCode) -> usize {
        self.state().calls.iter().filter(|c| c.api == api && c.error_code == code).count()
    }

    /// [`Self::max_in_any_window`] for `api`.
    pub fn max_in_any_window_to(&self, api: SimApi, window: Duration) -> usize {
        let times = self.state().arrivals(|c| c.api == api && c.error_code != ErrorCode::RATE_LIMITED);
        max_in_window(&times, window)
    }

    /// [`Self::max_arrivals_in_any_window`] for `api`.
    pub fn max_arrivals_in_any_window_to(&self, api: SimApi, window: Duration) -> usize {
        max_in_window(&self.state().arrivals(|c| c.api == api), window)
    }

    /// Forgets the ledger of calls (not the rate windows, overrides, faults or played
    /// reads), e.g. after warm-up.
    pub fn reset_calls(&self) {
        self.state().calls.clear();
    }

    /// Makes (`group`, each of `seqs`) playable: the member player will make their
    /// members read them, and deliver those reads for the first configured app. (The
    /// (group, seq)s the receipt API answers with a receipt become playable by
    /// themselves while a player is configured.)
    pub fn play_group(&self, group: &str, seqs: impl IntoIterator<Item = u64>) {
        let Some(app) = self.inner.first_app else { return };
        let mut state = self.state();
        for seq in seqs {
            state.playable.offer(app, group, seq);
        }
    }

    /// Every read the member player made, in order, with the instant it was applied.
    pub fn reads(&self) -> Vec<PlayedRead> {
        self.state().reads.clone()
    }

    /// Callbacks answered with a 2xx status.
    pub fn callbacks_delivered(&self) -> usize {
        self.inner.deliveries.borrow().delivered
    }

    /// Callbacks that timed out, failed to connect or got another status.
    pub fn callbacks_failed(&self) -> usize {
        self.inner.deliveries.borrow().failed
    }

    /// Waits until at least `settled` callbacks have been delivered or have failed, and
    /// says how they fared. (Pending forever if the player never gets that far: wrap it
    /// in a timeout.)
    pub async fn wait_for_callbacks(&self, settled: usize) -> Deliveries {
        let mut deliveries = self.inner.deliveries.subscribe();
        // The sender lives as long as the simulator, so this cannot end in an error.
        let _ = deliveries.wait_for(|d| d.settled() >= settled).await;
        *deliveries.borrow()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock, and the state stays consistent even
        // if something did, so a poisoned lock is simply taken over.
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Owns a server started by [`Simulator::spawn`]. Dropping it stops the server at once
/// (listener closed, open connections cut, player stopped); [`SimServer::shutdown`]
/// stops it gently.
pub struct SimServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl SimServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets open connections finish (briefly) and waits for the server.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for SimServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------
// One call, phase by phase
// ---------------------------------------------------------------------------------------

/// Returned by the service to make hyper close the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("simulated dropped connection")]
struct Dropped;

/// What the simulator decided to do with a call.
enum Outcome {
    /// HTTP 200 with this JSON body, which carries this ErrorCode.
    Answer {
        code: ErrorCode,
        body: Vec<u8>,
    },
    HttpStatus(StatusCode),
    Drop,
}

impl Outcome {
    fn fail(fail: Fail) -> Self {
        Self::Answer { code: fail.code, body: ReceiptResponse::fail(fail.code, fail.info).to_bytes() }
    }

    fn ok(body: Vec<u8>) -> Self {
        Self::Answer { code: ErrorCode::OK, body }
    }
}

/// A body as parsed, of the API the call went to.
#[derive(Clone)]
enum Body {
    Receipt(ReceiptRequest),
    Detail(DetailRequest),
}

impl Body {
    fn group(&self) -> &str {
        match self {
            Self::Receipt(r) => r.group.as_str(),
            Self::Detail(d) => d.group.as_str(),
        }
    }

    fn seqs(&self) -> Vec<u64> {
        match self {
            Self::Receipt(r) => r.seqs.iter().map(|s| s.0).collect(),
            Self::Detail(d) => vec![d.seq],
        }
    }
}

/// Everything about a call that can be worked out without the shared state. Computed
/// before taking the lock, so UserSig verification never holds other calls up.
struct Checked {
    api: SimApi,
    /// Phase 3 and, when it passed, phases 5 and 6.
    call: Result<AppCall, Fail>,
    /// The sdkappid named, for the ledger.
    named_app: Option<AppId>,
    /// The body as parsed without its limits (MsgSeqs, Count), for the ledger.
    parsed: Option<Body>,
    /// When the gateway says it sent the call ([`SENT_AT_HEADER`]), for the ledger.
    sent_at_us: Option<u64>,
}

/// A call for a configured app, and what its parameters, UserSig and body came to.
struct AppCall {
    app: AppId,
    request: Result<Body, Fail>,
}

impl Simulator {
    async fn handle(self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Dropped> {
        let api = SimApi::at_path(req.uri().path()).filter(|_| req.method() == Method::POST);
        let Some(api) = api else {
            let (method, path) = (req.method(), req.uri().path());
            tracing::debug!(%method, path, "simulator: unknown path");
            let info = format!("no API at {method} {path}");
            let body = ReceiptResponse::fail(ErrorCode::UNKNOWN_PATH, info).to_bytes();
            return Ok(json_response(StatusCode::NOT_FOUND, body));
        };
        let query = req.uri().query().unwrap_or_default().to_owned();
        let sent_at_us = req.headers().get(SENT_AT_HEADER).and_then(|v| v.to_str().ok()?.parse().ok());
        let body = read_body(req.into_body()).await;
        let checked = Checked { sent_at_us, ..self.check(api, &query, body) };
        let (outcome, delay) = self.decide(checked);
        self.pass_gate().await;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match outcome {
            Outcome::Answer { body, .. } => Ok(json_response(StatusCode::OK, body)),
            Outcome::HttpStatus(status) => Ok(fault_response(status)),
            Outcome::Drop => Err(Dropped),
        }
    }

    /// Waits while calls are held; the count stays right if the caller goes away.
    async fn pass_gate(&self) {
        struct Held<'a>(&'a AtomicUsize);
        impl Drop for Held<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let mut gate = self.inner.gate.subscribe();
        if !*gate.borrow_and_update() {
            return;
        }
        self.inner.held.fetch_add(1, Ordering::SeqCst);
        let _held = Held(&self.inner.held);
        // The sender lives as long as the simulator; if it were gone, nothing could hold.
        let _ = gate.wait_for(|holding| !holding).await;
    }

    /// Phases 3, 5 and 6, which depend only on the request and the fixed options.
    fn check(&self, api: SimApi, query: &str, body: Result<Bytes, Fail>) -> Checked {
        let params = QueryParams::parse(query);
        let body = body.and_then(|b| parse_body(api, &b));
        let parsed = body.as_ref().ok().cloned();
        let call = rules::check_app(&params, &self.inner.apps).map(|app| AppCall {
            app: app.app,
            request: rules::check_caller(&params, app, unix_now()).and_then(|()| self.check_limits(body?)),
        });
        Checked { api, call, named_app: params.sdkappid(), parsed, sent_at_us: None }
    }

    /// The body rules beyond parsing (part of phase 6).
    fn check_limits(&self, body: Body) -> Result<Body, Fail> {
        match body {
            Body::Receipt(r) => rules::check_seq_count(r, self.inner.max_seqs).map(Body::Receipt),
            Body::Detail(d) => detail::check_count(d).map(Body::Detail),
        }
    }

    /// Phases 2, 4, 7 and 8, under the lock; records the call. Returns the outcome and
    /// how long to wait before delivering it.
    fn decide(&self, checked: Checked) -> (Outcome, Duration) {
        let mut state = self.state();
        let at = Instant::now();
        let mut delay = state.base_latency;
        let outcome = match state.faults.pop_front() {
            None => self.answer(&mut state, &checked, at),
            Some(Fault::Latency(extra)) => {
                delay = delay.saturating_add(extra);
                self.answer(&mut state, &checked, at)
            }
            Some(Fault::ErrorCode(code)) => {
                preempt(&mut state, &checked, at, Outcome::fail(Fail::new(code, "simulated fault")))
            }
            Some(Fault::HttpStatus(status)) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                preempt(&mut state, &checked, at, Outcome::HttpStatus(status))
            }
            Some(Fault::Drop) => preempt(&mut state, &checked, at, Outcome::Drop),
        };
        let record = record(at, &checked, &outcome);
        tracing::debug!(
            api = record.api.path(),
            app = ?record.app,
            group = record.group.as_deref().unwrap_or(""),
            seqs = record.seqs.len(),
            error_code = record.error_code.0,
            http_status = record.http_status,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "simulator call"
        );
        state.calls.push(record);
        (outcome, delay)
    }

    /// Tencent's own answer (phases 3 to 8).
    fn answer(&self, state: &mut State, checked: &Checked, at: Instant) -> Outcome {
        let limit = self.inner.limit_per_second;
        let result = checked.call.as_ref().map_err(Fail::clone).and_then(|call| {
            if !state.admit(call.app, checked.api, at, limit) {
                let info = format!("more than {limit} calls per second to this API");
                return Err(Fail::new(ErrorCode::RATE_LIMITED, info));
            }
            let request = call.request.as_ref().map_err(Fail::clone)?;
            rules::check_group(request.group())?;
            if let Some(bad) = request.seqs().into_iter().find(|s| state.rejected.contains(s)) {
                return Err(Fail::new(ErrorCode::INVALID_PARAMETER, format!("MsgSeq {bad} is invalid")));
            }
            match request {
                Body::Receipt(r) => Ok(self.receipts(state, call.app, r)),
                Body::Detail(d) => detail_page(state, d),
            }
        });
        match result {
            Ok(body) => Outcome::ok(body),
            Err(fail) => Outcome::fail(fail),
        }
    }

    /// The receipt API's items; with a player, the (group, seq)s that have a receipt
    /// become playable.
    fn receipts(&self, state: &mut State, app: AppId, request: &ReceiptRequest) -> Vec<u8> {
        let group = request.group.as_str();
        let items: Vec<ReceiptItem> =
            request.seqs.iter().map(|&MsgSeq(seq)| ReceiptItem::new(MsgSeq(seq), state.receipt(group, seq))).collect();
        if self.inner.player.is_some() {
            for item in items.iter().filter(|i| i.code == ErrorCode::OK) {
                state.playable.offer(app, group, item.seq);
            }
        }
        ReceiptResponse::ok(items).to_bytes()
    }
}

/// The detail API's page: the members of a message, consistent with its receipt.
fn detail_page(state: &State, request: &DetailRequest) -> Result<Vec<u8>, Fail> {
    let receipt = state.receipt(request.group.as_str(), request.seq);
    if receipt.code != ErrorCode::OK {
        let info = format!("MsgSeq {} has no read receipt", request.seq);
        return Err(Fail::new(receipt.code, info));
    }
    let page = detail::page(request, receipt.read.unwrap_or(0), receipt.unread.unwrap_or(0))?;
    Ok(detail::answer_body(request, &page, state.finish_field))
}

/// A body parsed by the rules of `api`, without its limits.
fn parse_body(api: SimApi, bytes: &[u8]) -> Result<Body, Fail> {
    match api {
        SimApi::Receipt => ReceiptRequest::parse(bytes, usize::MAX)
            .map(Body::Receipt)
            .map_err(|e| Fail::new(ErrorCode::INVALID_PARAMETER, e.to_string())),
        SimApi::Detail => detail::parse(bytes).map(Body::Detail),
    }
}

/// A fault that replaces Tencent's answer (phase 2). It still spends the app's budget
/// for the API, unless it plays 60007, to keep the ledger's invariant (see [`ledger`]).
fn preempt(state: &mut State, checked: &Checked, at: Instant, outcome: Outcome) -> Outcome {
    let refused = matches!(&outcome, Outcome::Answer { code, .. } if *code == ErrorCode::RATE_LIMITED);
    if let (Ok(call), false) = (&checked.call, refused) {
        state.spend(call.app, checked.api, at);
    }
    outcome
}

fn record(at: Instant, checked: &Checked, outcome: &Outcome) -> CallRecord {
    let (error_code, http_status) = match outcome {
        Outcome::Answer { code, .. } => (*code, StatusCode::OK.as_u16()),
        Outcome::HttpStatus(status) => (NO_ERROR_CODE, status.as_u16()),
        Outcome::Drop => (NO_ERROR_CODE, 0),
    };
    let parsed = checked.parsed.as_ref();
    CallRecord {
        at,
        api: checked.api,
        app: checked.named_app,
        group: parsed.map(|b| b.group().to_owned()),
        seqs: parsed.map(Body::seqs).unwrap_or_default(),
        error_code,
        http_status,
        sent_at_us: checked.sent_at_us,
    }
}

async fn read_body(body: Incoming) -> Result<Bytes, Fail> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(Fail::new(ErrorCode::INVALID_PARAMETER, format!("body could not be read: {e}"))),
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let json = HeaderValue::from_static("application/json");
    response.headers_mut().insert(CONTENT_TYPE, json);
    response
}

fn fault_response(status: StatusCode) -> Response<Full<Bytes>> {
    let body = format!("<html><body><h1>{status}</h1>simulated fault</body></html>");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let html = HeaderValue::from_static("text/html");
    response.headers_mut().insert(CONTENT_TYPE, html);
    response
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;

    use super::*;
    use crate::api::{DETAIL_PATH, RECEIPT_PATH};
    use crate::usersig;

    const APP: AppId = AppId(1_400_000_000);
    const ADMIN: &str = "administrator";
    const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const WAIT: Duration = Duration::from_secs(2);

    type HttpClient = Client<HttpConnector, Full<Bytes>>;

    fn options() -> SimOptions {
        SimOptions::new(vec![SimApp { app: APP, identifier: ADMIN.into(), key: SecretKey::new(KEY) }])
    }

    fn client() -> HttpClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn within<T>(f: impl Future<Output = T>) -> T {
        match tokio::time::timeout(WAIT, f).await {
            Ok(value) => value,
            Err(_) => panic!("no answer within {WAIT:?}"),
        }
    }

    fn signed_query(key: &str, identifier: &str, time: u64) -> String {
        let sig = usersig::sign(APP, &SecretKey::new(key), identifier, time, 86_400);
        format!("sdkappid={APP}&identifier={identifier}&usersig={}&random=12345&contenttype=json", sig.expose())
    }

    fn good_query() -> String {
        signed_query(KEY, ADMIN, unix_now())
    }

    fn body(group: &str, seqs: &[u64]) -> String {
        let list: Vec<String> = seqs.iter().map(|s| format!(r#"{{"MsgSeq":{s}}}"#)).collect();
        format!(r#"{{"GroupId":"{group}","MsgSeqList":[{}]}}"#, list.join(","))
    }

    /// Sends one call; the answer's status and raw body.
    async fn send(
        client: &HttpClient,
        url: &str,
        method: Method,
        path_and_query: &str,
        body: String,
    ) -> Result<(StatusCode, Bytes), hyper_util::client::legacy::Error> {
        let request = Request::builder()
            .method(method)
            .uri(format!("{url}{path_and_query}"))
            .body(Full::new(Bytes::from(body)))
            .expect("a valid test request");
        let response = within(client.request(request)).await?;
        let status = response.status();
        let bytes = within(response.into_body().collect()).await.expect("a whole body").to_bytes();
        Ok((status, bytes))
    }

    /// A receipt call that must be answered with JSON.
    async fn call(client: &HttpClient, url: &str, query: &str, body: String) -> (StatusCode, ReceiptResponse) {
        let (status, bytes) =
            send(client, url, Method::POST, &format!("{RECEIPT_PATH}?{query}"), body).await.expect("an answer");
        let reply = serde_json::from_slice(&bytes).expect("a Tencent-shaped body");
        (status, reply)
    }

    async fn call_ok(client: &HttpClient, url: &str, group: &str, seqs: &[u64]) -> ReceiptResponse {
        call(client, url, &good_query(), body(group, seqs)).await.1
    }

    fn item(group: &str, seq: u64) -> ReceiptItem {
        ReceiptItem::new(MsgSeq(seq), default_receipt(group, seq))
    }

    #[tokio::test]
    async fn a_signed_call_gets_deterministic_counts_in_request_order() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");

        let (status, reply) = call(&client(), &url, &good_query(), body("g1", &[3, 1, 3, 2])).await;

        assert_eq!(status, StatusCode::OK);
        assert_eq!(reply, ReceiptResponse::ok(vec![item("g1", 3), item("g1", 1), item("g1", 3), item("g1", 2)]));
        let calls = sim.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].app, Some(APP));
        assert_eq!(calls[0].group.as_deref(), Some("g1"));
        assert_eq!(calls[0].seqs, vec![3, 1, 3, 2]);
        assert_eq!((calls[0].error_code, calls[0].http_status), (ErrorCode::OK, 200));
    }

    #[tokio::test]
    async fn overrides_change_later_answers_and_high_seqs_have_no_receipt() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let client = client();

        sim.set_receipt("g", 7, 5, 9);
        let reply = call_ok(&client, &url, "g", &[7, 1_000_000, 1_000_001]).await;

        let items = reply.items.expect("items");
        assert_eq!(items[0], ReceiptItem { code: ErrorCode::OK, seq: 7, read: Some(5), unread: Some(9) });
        assert_eq!(items[1], item("g", 1_000_000));
        assert_eq!(items[1].code, ErrorCode::OK);
        assert_eq!(items[2], ReceiptItem { code: ErrorCode::NO_RECEIPT, seq: 1_000_001, read: None, unread: None });
    }

    #[tokio::test]
    async fn missing_and_invalid_groups_fail_the_whole_call() {
        let (_sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let client = client();

        let missing = call_ok(&client, &url, "missing-1", &[1]).await;
        let invalid = call_ok(&client, &url, "invalid-1", &[1]).await;

        assert_eq!((missing.action_status.as_ref(), missing.error_code), ("FAIL", ErrorCode(10010)));
        assert_eq!((invalid.action_status.as_ref(), invalid.error_code), ("FAIL", ErrorCode(10015)));
        assert!(missing.items.is_none());
    }

    #[tokio::test]
    async fn bad_credentials_and_parameters_get_tencents_codes() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let client = client();
        let other_key = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";
        let no_random = good_query().replace("&random=12345", "");
        let cases = [
            (signed_query(other_key, ADMIN, unix_now()), 70009, "signature"),
            (signed_query(KEY, ADMIN, 1_000_000), 70001, "expired"),
            (good_query().replace("usersig=", "usersig=x"), 70009, "well-formed"),
            (signed_query(KEY, "bob", unix_now()), 60010, "admin"),
            (no_random, 60003, "random"),
            (good_query().replace("random=12345", "random=99999999999"), 60003, "random"),
            (good_query().replace("contenttype=json", "contenttype=xml"), 60003, "contenttype"),
            (good_query().replace("sdkappid=1400000000", "sdkappid=1400000001"), 60006, "1400000001"),
            (good_query().replace("sdkappid=1400000000", "sdkappid=abc"), 60003, "sdkappid"),
            ("identifier=administrator".to_owned(), 60003, "sdkappid"),
        ];

        for (query, code, info) in &cases {
            let (status, reply) = call(&client, &url, query, body("g", &[1])).await;
            assert_eq!((status, reply.error_code), (StatusCode::OK, ErrorCode(*code)), "{query}");
            assert!(reply.error_info.contains(info), "{query}: {}", reply.error_info);
        }
        assert_eq!(sim.call_count(), cases.len());
    }

    #[tokio::test]
    async fn bad_bodies_and_too_many_seqs_get_10004() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let client = client();
        let fifty_one: Vec<u64> = (1..=51).collect();

        let (_, not_json) = call(&client, &url, &good_query(), "nope".into()).await;
        let (_, too_many) = call(&client, &url, &good_query(), body("g", &fifty_one)).await;
        let fifty = call_ok(&client, &url, "g", &fifty_one[..50]).await;
        let (_, huge) = call(&client, &url, &good_query(), " ".repeat(MAX_BODY_BYTES + 1)).await;

        assert_eq!(not_json.error_code, ErrorCode(10004));
        assert_eq!(huge.error_code, ErrorCode(10004));
        assert_eq!(too_many.error_code, ErrorCode(10004));
        assert!(too_many.error_info.contains("at most 50"), "{}", too_many.error_info);
        assert_eq!(fifty.items.map(|i| i.len()), Some(50));
        // The ledger shows what was asked even when it was refused.
        assert_eq!(sim.calls()[1].seqs.len(), 51);
        assert_eq!(sim.calls()[0].group, None);
    }

    #[tokio::test]
    async fn calls_beyond_the_limit_in_a_rolling_second_get_60007() {
        let (sim, url, _server) =
            Simulator::spawn(SimOptions { limit_per_second: 5, ..options() }).await.expect("spawn");
        let client = client();

        let mut codes = Vec::new();
        for seq in 0..6 {
            codes.push(call_ok(&client, &url, "g", &[seq]).await.error_code);
        }

        assert_eq!(codes, [0, 0, 0, 0, 0, 60007].map(ErrorCode));
        assert_eq!(sim.count_code(ErrorCode::RATE_LIMITED), 1);
        assert_eq!(sim.max_in_any_window(Duration::from_secs(1)), 5);
        assert_eq!(sim.max_arrivals_in_any_window(Duration::from_secs(1)), 6);
        assert_eq!(sim.call_count(), 6);
    }

    #[tokio::test]
    async fn faulted_calls_spend_the_budget_unless_they_play_60007() {
        let (sim, url, _server) =
            Simulator::spawn(SimOptions { limit_per_second: 2, ..options() }).await.expect("spawn");
        let client = client();
        sim.inject(Fault::ErrorCode(ErrorCode::RATE_LIMITED), 1);
        sim.inject(Fault::HttpStatus(500), 1);

        let path = format!("{RECEIPT_PATH}?{}", good_query());
        for _ in 0..2 {
            send(&client, &url, Method::POST, &path, body("g", &[1])).await.expect("an answer");
        }
        let codes =
            [call_ok(&client, &url, "g", &[1]).await, call_ok(&client, &url, "g", &[1]).await].map(|r| r.error_code);

        assert_eq!(codes, [0, 60007].map(ErrorCode));
        assert_eq!(sim.max_in_any_window(Duration::from_secs(1)), 2);
    }

    #[tokio::test]
    async fn faults_are_played_in_order_and_recorded() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let client = client();
        sim.inject(Fault::ErrorCode(ErrorCode::TRANSIENT_70169), 1);
        sim.inject(Fault::HttpStatus(503), 2);
        sim.inject(Fault::Drop, 1);
        sim.inject(Fault::Latency(Duration::from_millis(150)), 1);
        let path = format!("{RECEIPT_PATH}?{}", good_query());
        let post = || send(&client, &url, Method::POST, &path, body("g", &[1]));

        let coded = post().await.expect("an answer");
        let first_503 = post().await.expect("an answer");
        let second_503 = post().await.expect("an answer");
        let dropped = post().await;
        let started = Instant::now();
        let slow = post().await.expect("an answer");
        let slow_took = started.elapsed();
        let normal = post().await.expect("an answer");

        let reply: ReceiptResponse = serde_json::from_slice(&coded.1).expect("json");
        assert_eq!((coded.0, reply.error_code), (StatusCode::OK, ErrorCode(70169)));
        assert_eq!(first_503.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(second_503.0, StatusCode::SERVICE_UNAVAILABLE);
        assert!(dropped.is_err(), "the connection should have been closed");
        assert_eq!(slow.0, StatusCode::OK);
        assert!(slow_took >= Duration::from_millis(150), "{slow_took:?}");
        let slow_reply: ReceiptResponse = serde_json::from_slice(&slow.1).expect("json");
        assert_eq!(slow_reply, ReceiptResponse::ok(vec![item("g", 1)]));
        assert_eq!(normal.0, StatusCode::OK);
        let seen: Vec<(ErrorCode, u16)> = sim.calls().iter().map(|c| (c.error_code, c.http_status)).collect();
        assert_eq!(
            seen,
            [
                (ErrorCode(70169), 200),
                (NO_ERROR_CODE, 503),
                (NO_ERROR_CODE, 503),
                (NO_ERROR_CODE, 0),
                (ErrorCode::OK, 200),
                (ErrorCode::OK, 200)
            ]
        );
    }

    #[tokio::test]
    async fn base_latency_delays_every_call() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        sim.set_latency(Duration::from_millis(100));

        let started = Instant::now();
        let reply = call_ok(&client(), &url, "g", &[1]).await;

        assert_eq!(reply.error_code, ErrorCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_not_recorded() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let client = client();

        let (status, bytes) = send(&client, &url, Method::POST, "/v4/nope", String::new()).await.expect("answer");
        let (get_status, _) = send(&client, &url, Method::GET, RECEIPT_PATH, String::new()).await.expect("answer");

        let reply: ReceiptResponse = serde_json::from_slice(&bytes).expect("json");
        assert_eq!((status, reply.error_code), (StatusCode::NOT_FOUND, ErrorCode(60009)));
        assert_eq!(get_status, StatusCode::NOT_FOUND);
        assert_eq!(sim.call_count(), 0);
    }

    #[tokio::test]
    async fn h2c_with_prior_knowledge_is_served() {
        let (_sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let h2: HttpClient = Client::builder(TokioExecutor::new()).http2_only(true).build_http();

        let reply = call_ok(&h2, &url, "g", &[1, 2]).await;

        assert_eq!(reply, ReceiptResponse::ok(vec![item("g", 1), item("g", 2)]));
    }

    #[tokio::test]
    async fn reset_forgets_calls_and_shutdown_stops_the_server() {
        let (sim, url, server) = Simulator::spawn(options()).await.expect("spawn");
        call_ok(&client(), &url, "g", &[1]).await;
        sim.reset_calls();
        assert_eq!(sim.call_count(), 0);

        within(server.shutdown()).await.expect("a clean stop");

        let fresh = client();
        let refused = send(&fresh, &url, Method::POST, RECEIPT_PATH, String::new()).await;
        assert!(refused.is_err());
    }

    // -----------------------------------------------------------------------------------
    // The detail API
    // -----------------------------------------------------------------------------------

    fn detail_body(group: &str, seq: u64, filter: u8, cursor: &str, count: u64) -> String {
        format!(r#"{{"GroupId":"{group}","MsgSeq":{seq},"Filter":{filter},"Cursor":"{cursor}","Count":{count}}}"#)
    }

    /// A detail call that must be answered with JSON.
    async fn detail(client: &HttpClient, url: &str, query: &str, body: String) -> (StatusCode, serde_json::Value) {
        let (status, bytes) =
            send(client, url, Method::POST, &format!("{DETAIL_PATH}?{query}"), body).await.expect("an answer");
        (status, serde_json::from_slice(&bytes).expect("a JSON body"))
    }

    /// Walks every page of one list; the accounts in order, and how many pages it took.
    async fn walk(
        client: &HttpClient,
        url: &str,
        group: &str,
        seq: u64,
        filter: u8,
        count: u64,
    ) -> (Vec<String>, usize) {
        let (list, field) = if filter == 0 { ("ReadList", "Read_Account") } else { ("UnreadList", "Unread_Account") };
        let (mut accounts, mut cursor, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let (_, page) = detail(client, url, &good_query(), detail_body(group, seq, filter, &cursor, count)).await;
            assert_eq!(page["ErrorCode"], 0, "{page}");
            assert_eq!((page["GroupId"].as_str(), page["MsgSeq"].as_u64()), (Some(group), Some(seq)));
            pages += 1;
            let entries = page[list].as_array().cloned().unwrap_or_default();
            assert!(entries.len() as u64 <= count, "{page}");
            accounts.extend(entries.iter().filter_map(|e| e[field].as_str()).map(str::to_owned));
            cursor = page["Cursor"].as_str().unwrap_or_default().to_owned();
            match page["IsFinish"].as_u64() {
                Some(1) => {
                    assert_eq!(cursor, "", "the last page has no next cursor");
                    return (accounts, pages);
                }
                Some(0) => assert!(!cursor.is_empty(), "{page}"),
                _ => panic!("no IsFinish in {page}"),
            }
            assert!(pages < 1000, "paging does not end");
        }
    }

    fn members(range: std::ops::Range<u64>) -> Vec<String> {
        range.map(member_account).collect()
    }

    #[tokio::test]
    async fn the_detail_lists_match_the_receipt_counts_and_page_by_cursor_to_the_end() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let client = client();
        let counts = call_ok(&client, &url, "g1", &[1]).await.items.expect("items")[0];
        let (read, unread) = (counts.read.expect("read"), counts.unread.expect("unread"));

        let (readers, read_pages) = walk(&client, &url, "g1", 1, 0, 3).await;
        let (others, unread_pages) = walk(&client, &url, "g1", 1, 1, 50).await;

        assert_eq!((read, unread), (4, 165), "pinned by rules::default_receipt");
        assert_eq!(readers, members(0..read));
        assert_eq!(others, members(read..read + unread));
        assert_eq!((read_pages, unread_pages), (2, 4));
        assert_eq!((sim.call_count(), sim.detail_call_count()), (1, 6));
        let detail_calls = sim.detail_calls();
        assert!(detail_calls.iter().all(|c| c.api == SimApi::Detail && c.seqs == [1] && c.error_code == ErrorCode::OK));
        assert_eq!(detail_calls[0].group.as_deref(), Some("g1"));
        assert_eq!(sim.all_calls().len(), 7);
    }

    #[tokio::test]
    async fn an_override_shapes_the_member_lists() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let client = client();
        sim.set_receipt("g", 2_000_000, 2, 1);

        let (readers, _) = walk(&client, &url, "g", 2_000_000, 0, 200).await;
        let (others, pages) = walk(&client, &url, "g", 2_000_000, 1, 1).await;

        assert_eq!(readers, members(0..2));
        assert_eq!((others, pages), (members(2..3), 1));
    }

    #[tokio::test]
    async fn detail_calls_have_their_own_rate_limit() {
        let (sim, url, _server) =
            Simulator::spawn(SimOptions { limit_per_second: 2, ..options() }).await.expect("spawn");
        let client = client();

        let mut receipt_codes = Vec::new();
        let mut detail_codes = Vec::new();
        for _ in 0..3 {
            receipt_codes.push(call_ok(&client, &url, "g", &[1]).await.error_code);
            let (_, page) = detail(&client, &url, &good_query(), detail_body("g", 1, 0, "", 10)).await;
            detail_codes.push(ErrorCode(page["ErrorCode"].as_i64().expect("a code")));
        }

        let expected = [0, 0, 60007].map(ErrorCode);
        assert_eq!((receipt_codes, detail_codes), (expected.to_vec(), expected.to_vec()));
        assert_eq!((sim.call_count(), sim.detail_call_count()), (3, 3));
        assert_eq!(sim.count_code(ErrorCode::RATE_LIMITED), 1);
        assert_eq!(sim.count_code_to(SimApi::Detail, ErrorCode::RATE_LIMITED), 1);
        let second = Duration::from_secs(1);
        assert_eq!(sim.max_in_any_window(second), 2);
        assert_eq!(sim.max_in_any_window_to(SimApi::Detail, second), 2);
        assert_eq!(sim.max_arrivals_in_any_window_to(SimApi::Detail, second), 3);
    }

    #[tokio::test]
    async fn detail_calls_get_tencents_codes_for_bad_input() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let client = client();
        let bad_sig = signed_query(KEY, ADMIN, 1_000_000);
        let cases = [
            (good_query(), detail_body("g", 1, 0, "", 0), 10004, "Count"),
            (good_query(), detail_body("g", 1, 0, "", 201), 10004, "Count"),
            (good_query(), detail_body("g", 1, 2, "", 10), 10004, "Filter"),
            (good_query(), detail_body("g", 1, 0, "nope", 10), 10004, "Cursor"),
            (good_query(), "{}".to_owned(), 10004, "GroupId"),
            (good_query(), detail_body("missing-1", 1, 0, "", 10), 10010, "missing-1"),
            (good_query(), detail_body("invalid-1", 1, 0, "", 10), 10015, "invalid-1"),
            (good_query(), detail_body("g", 1_000_001, 0, "", 10), 10062, "no read receipt"),
            (bad_sig, detail_body("g", 1, 0, "", 10), 70001, "expired"),
            (good_query().replace("&random=12345", ""), detail_body("g", 1, 0, "", 10), 60003, "random"),
        ];

        for (query, body, code, info) in &cases {
            let (status, reply) = detail(&client, &url, query, body.clone()).await;
            assert_eq!((status, reply["ActionStatus"].as_str()), (StatusCode::OK, Some("FAIL")), "{body}");
            assert_eq!(reply["ErrorCode"], *code, "{body}: {reply}");
            assert!(reply["ErrorInfo"].as_str().unwrap_or_default().contains(info), "{body}: {reply}");
        }
        assert_eq!((sim.detail_call_count(), sim.call_count()), (cases.len(), 0));
        // The ledger shows what was asked even when it was refused.
        assert_eq!(sim.detail_calls()[0].seqs, [1]);
    }

    #[tokio::test]
    async fn the_finish_flag_can_be_named_is_finished() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let client = client();
        sim.set_receipt("g", 1, 1, 0);

        let (_, default) = detail(&client, &url, &good_query(), detail_body("g", 1, 0, "", 10)).await;
        sim.set_finish_field(FinishField::IsFinished);
        let (_, renamed) = detail(&client, &url, &good_query(), detail_body("g", 1, 0, "", 10)).await;

        assert_eq!((default["IsFinish"].as_u64(), default.get("IsFinished")), (Some(1), None));
        assert_eq!((renamed["IsFinished"].as_u64(), renamed.get("IsFinish")), (Some(1), None));
        assert_eq!(renamed["ReadList"], serde_json::json!([{"Read_Account": "member-0"}]));
    }

    #[tokio::test]
    async fn faults_apply_to_detail_calls_too() {
        let (sim, url, _server) = Simulator::spawn(options()).await.expect("spawn");
        let client = client();
        sim.inject(Fault::HttpStatus(503), 1);
        sim.inject(Fault::ErrorCode(ErrorCode::INTERNAL), 1);
        let path = format!("{DETAIL_PATH}?{}", good_query());

        let (status, _) =
            send(&client, &url, Method::POST, &path, detail_body("g", 1, 0, "", 5)).await.expect("answer");
        let (_, coded) = detail(&client, &url, &good_query(), detail_body("g", 1, 0, "", 5)).await;
        let (_, normal) = detail(&client, &url, &good_query(), detail_body("g", 1, 0, "", 5)).await;

        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(coded["ErrorCode"], 10002);
        assert_eq!(normal["ErrorCode"], 0);
        let seen: Vec<(ErrorCode, u16)> = sim.detail_calls().iter().map(|c| (c.error_code, c.http_status)).collect();
        assert_eq!(seen, [(NO_ERROR_CODE, 503), (ErrorCode(10002), 200), (ErrorCode::OK, 200)]);
        assert_eq!(sim.call_count(), 0);
    }

    // -----------------------------------------------------------------------------------
    // The member player
    // -----------------------------------------------------------------------------------

    const TOKEN: &str = "callback-token";
    const AFTER: &str = crate::callback::AFTER_READ_RECEIPT;

    /// A stand-in for the gateway's `/callback` on `127.0.0.1:0`: every callback's query
    /// and body go to `seen`, and each is answered `OK`.
    struct Receiver {
        url: String,
        seen: tokio::sync::mpsc::UnboundedReceiver<(String, Bytes)>,
        task: JoinHandle<()>,
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Receiver {
        async fn start() -> Receiver {
            let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
            let url = format!("http://{}/callback", listener.local_addr().expect("an address"));
            let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                let mut connections = JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let tx = tx.clone();
                    let service = service_fn(move |req: Request<Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let query = req.uri().query().unwrap_or_default().to_owned();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let _ = tx.send((query, body));
                            let ok = r#"{"ActionStatus":"OK","ErrorInfo":"","ErrorCode":0}"#;
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                                ok.as_bytes(),
                            ))))
                        }
                    });
                    let conn =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    connections.spawn(conn);
                }
            });
            Receiver { url, seen, task }
        }

        /// The next callback: its query parameters and its JSON body.
        async fn next(&mut self) -> (QueryParams, serde_json::Value) {
            let (query, body) = within(self.seen.recv()).await.expect("the receiver runs");
            (QueryParams::parse(&query), serde_json::from_slice(&body).expect("a JSON callback"))
        }
    }

    fn with_player(player: CallbackPlayer) -> SimOptions {
        SimOptions { player: Some(player), ..options() }
    }

    fn player(url: &str, reads_per_second: f64) -> CallbackPlayer {
        CallbackPlayer::new(url, reads_per_second).expect("a valid player")
    }

    #[tokio::test]
    async fn the_player_delivers_signed_reads_and_both_apis_follow() {
        let mut receiver = Receiver::start().await;
        let player = player(&receiver.url, 50.0).with_token(SecretKey::new(TOKEN));
        let started = Instant::now();
        let (sim, url, _server) = Simulator::spawn(with_player(player)).await.expect("spawn");
        sim.set_receipt("g", 1, 2, 3);
        sim.play_group("g", [1]);

        let mut seen = Vec::new();
        for _ in 0..3 {
            let (query, body) = receiver.next().await;
            let request_time = query.get("RequestTime").expect("a RequestTime").to_owned();
            assert_eq!(query.get("Sign"), Some(crate::callback::sign(TOKEN.as_bytes(), &request_time).as_str()));
            assert_eq!(query.get("SdkAppid"), Some("1400000000"));
            assert_eq!(query.get("CallbackCommand"), Some("Group.CallbackAfterReadReceipt"));
            assert_eq!((query.get("contenttype"), query.get("OptPlatform")), (Some("json"), Some("RESTAPI")));
            assert!(request_time.parse::<u64>().is_ok_and(|t| t.abs_diff(unix_now()) <= 5), "{request_time}");
            assert_eq!((body["CallbackCommand"].as_str(), body["GroupId"].as_str()), (Some(AFTER), Some("g")));
            assert!(body["EventTime"].as_u64().is_some(), "{body}");
            let item = &body["GroupMsgReceiptList"][0];
            let member = item["ReadReceiptMembers"][0]["Member_Account"].as_str().unwrap_or_default().to_owned();
            seen.push((item["MsgSeq"].as_u64(), item["ReadNum"].as_u64(), item["UnreadNum"].as_u64(), member));
        }
        let settled = within(sim.wait_for_callbacks(3)).await;

        let expected: Vec<_> = [(3, 2), (4, 1), (5, 0)]
            .into_iter()
            .map(|(read, unread)| (Some(1), Some(read), Some(unread), member_account(read - 1)))
            .collect();
        assert_eq!(seen, expected);
        assert_eq!(settled, Deliveries { delivered: 3, failed: 0 });
        let items = call_ok(&client(), &url, "g", &[1]).await.items.expect("items");
        assert_eq!((items[0].read, items[0].unread), (Some(5), Some(0)));
        let (readers, _) = walk(&client(), &url, "g", 1, 0, 200).await;
        assert_eq!(readers, members(0..5));
        let reads = sim.reads();
        assert_eq!(reads.iter().map(|r| (r.read, r.unread)).collect::<Vec<_>>(), [(3, 2), (4, 1), (5, 0)]);
        // Evenly paced: the third read cannot come before three periods have passed.
        assert!(reads[2].at.duration_since(started) >= Duration::from_millis(60), "{:?}", reads[2].at - started);
        assert!(reads.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[tokio::test]
    async fn messages_the_receipt_api_answered_become_playable() {
        let mut receiver = Receiver::start().await;
        let (sim, url, _server) = Simulator::spawn(with_player(player(&receiver.url, 100.0))).await.expect("spawn");
        sim.set_receipt("g", 9, 0, 1);

        call_ok(&client(), &url, "g", &[9, 2_000_000]).await;
        let (query, body) = receiver.next().await;

        assert_eq!((query.get("Sign"), query.get("RequestTime")), (None, None), "no token, no signature");
        let item = &body["GroupMsgReceiptList"][0];
        assert_eq!(
            (item["MsgSeq"].as_u64(), item["ReadNum"].as_u64(), item["UnreadNum"].as_u64()),
            (Some(9), Some(1), Some(0))
        );
        assert_eq!(sim.reads().len(), 1, "2000000 has no receipt, and 9 has no one left to read it");
    }

    #[tokio::test]
    async fn failed_deliveries_are_counted_and_the_player_goes_on() {
        // A port that was just free: connecting to it is refused.
        let closed = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let url = format!("http://{}/callback", closed.local_addr().expect("an address"));
        drop(closed);
        let player = player(&url, 100.0).with_timeout(Duration::from_millis(500));
        let (sim, sim_url, _server) = Simulator::spawn(with_player(player)).await.expect("spawn");
        sim.set_receipt("g", 1, 0, 10);
        sim.play_group("g", [1]);

        let settled = within(sim.wait_for_callbacks(2)).await;

        assert_eq!(settled.delivered, 0);
        // Each failure is of one read, and the reads went on regardless.
        let failed = sim.callbacks_failed();
        assert!(failed >= 2 && failed <= sim.reads().len(), "{failed} failed, {} reads", sim.reads().len());
        let items = call_ok(&client(), &sim_url, "g", &[1]).await.items.expect("items");
        assert!(items[0].read >= Some(2), "{items:?}");
    }
}
