//! `answer` against a real cache, engine, budget and dispatcher, with a stand-in for
//! Tencent in place of `upstream::fetch`: it answers each dispatched batch the way
//! `fetch::run` does (answers into the cache, keys out of flight, callers woken), as
//! the test scripts it, and counts the batches it is sent — so every saving is proved by
//! a count of calls. Time is tokio's paused clock: nothing here sleeps for real.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::Histogram;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use super::{Answer, Query, Receipts, answer};
use crate::budget::Budget;
use crate::cache::{Freshness, GroupAnswer, KeptBy, ReceiptCache, XCache};
use crate::clients::ClientSlot;
use crate::config::{BudgetBackend, BudgetConfig, CacheConfig};
use crate::engine::admission::{MARGIN, WRITE_BACK};
use crate::engine::batch::{BatchOutcome, BatchPolicy, Dispatch, Failure, Items, Neighbourhood};
use crate::engine::{Ask, Engine, dispatcher};
use crate::error::GatewayError;
use crate::telemetry::metrics::{API_RECEIPT, Metrics};
use crate::tencent::code::ErrorCode;
use crate::tencent::domain::{AppId, GroupId, MsgSeq, Receipt};
use crate::tencent::wire::{ReceiptItem, ReceiptResponse};

const APP: AppId = AppId(1);
const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);
/// Long enough for an item to be whole seconds old and still fresh (`Age`), and for a
/// cached item not to be due for a cohort refresh (within half a TTL of expiry), which
/// would put it in the call too.
const TTL: Duration = Duration::from_secs(10);
const STALE: Duration = Duration::from_secs(60);
/// The callers' deadline: the default `server.request_timeout_ms`.
const DEADLINE: Duration = Duration::from_secs(2);
/// The default `batch.window_ms`: a batch leaves this long after its first MsgSeq.
const WINDOW: Duration = Duration::from_millis(2);
/// governor's limiter runs on the real clock: a dispatcher waiting for it would let the
/// paused tokio clock jump ahead to the next timer (a caller's deadline). At this rate
/// (the highest configurable) its burst holds thousands of tokens, so it never waits.
const NEVER_SHORT: u32 = 1_000_000;

/// The counts a cached item holds (from an earlier call).
fn cached(seq: u64) -> Receipt {
    Receipt { code: ErrorCode::OK, read: Some(seq), unread: Some(10) }
}

/// The counts Tencent holds now: some members read since.
fn tencent(seq: u64) -> Receipt {
    Receipt { code: ErrorCode::OK, read: Some(seq + 5), unread: Some(5) }
}

/// An OK body with these items, in this order.
fn ok(items: &[(u64, Receipt)]) -> ReceiptResponse {
    ReceiptResponse::ok(items.iter().map(|&(seq, receipt)| ReceiptItem::new(MsgSeq(seq), receipt)).collect())
}

fn group() -> GroupId {
    GroupId::parse("@TGS#demo").unwrap()
}

/// A validated query for `seqs` of [`group`], arriving now with [`DEADLINE`].
fn query(seqs: &[u64], freshness: Freshness) -> Query<'static> {
    let arrived = Instant::now();
    Query {
        request_id: "test",
        group: group(),
        seqs: seqs.iter().copied().map(MsgSeq).collect(),
        freshness,
        arrived,
        deadline: arrived + DEADLINE,
        client: ClientSlot::DEFAULT,
    }
}

/// How the stand-in for Tencent treats every batch it is sent.
#[derive(Clone)]
enum Reply {
    /// After `after`, Tencent's counts ([`tencent`]) for each MsgSeq, except those in
    /// `omit`, which the answer leaves out (an upstream failure for those items, as
    /// `fetch::match_items` makes it).
    Counts { after: Duration, omit: &'static [u64] },
    /// Never: the call is still on the wire at every deadline.
    Silent,
    /// At once, every MsgSeq failing so: what `fetch::run` makes of a group-level answer
    /// (10010) or of retries that ran out.
    Fail(Failure),
}

/// Tencent's counts for every MsgSeq, after a call's usual latency.
fn answers() -> Reply {
    Reply::Counts { after: 20 * MS, omit: &[] }
}

/// The stand-in for `upstream::fetch::run`.
struct StandIn {
    reply: Reply,
    cache: ReceiptCache,
    engine: Arc<Engine>,
    /// The MsgSeqs of every batch it was sent, in order.
    calls: Mutex<Vec<Vec<u64>>>,
    /// Silent batches, kept: a batch dropped unanswered tells its callers the call was
    /// abandoned, which a call still on the wire does not.
    held: Mutex<Vec<Dispatch>>,
}

impl StandIn {
    /// The dispatcher's `send`: like `fetch::run`, each batch runs in a task of its own.
    fn send(self: &Arc<Self>, batch: Dispatch) {
        self.calls.lock().unwrap().push(batch.seqs.iter().map(|s| s.0).collect());
        let (items, after): (Items, Duration) = match &self.reply {
            Reply::Silent => return self.held.lock().unwrap().push(batch),
            Reply::Fail(failure) => (batch.seqs.iter().map(|&s| (s, Err(failure.clone()))).collect(), Duration::ZERO),
            Reply::Counts { after, omit } => {
                let item = |s: MsgSeq| {
                    if omit.contains(&s.0) {
                        Err(Failure::Unavailable(format!("upstream answer omitted MsgSeq {}", s.0)))
                    } else {
                        Ok(tencent(s.0))
                    }
                };
                (batch.seqs.iter().map(|&s| (s, item(s))).collect(), *after)
            }
        };
        tokio::spawn(self.clone().complete(batch, items, after));
    }

    /// What `fetch::run` does once the call is over: the answers (and a group's 10010)
    /// into the cache, the keys out of flight, then every caller woken with the outcome.
    async fn complete(self: Arc<Self>, batch: Dispatch, items: Items, after: Duration) {
        if !after.is_zero() {
            tokio::time::sleep(after).await;
        }
        let started = batch.dispatched;
        let outcome = Arc::new(BatchOutcome {
            started,
            first_call: true,
            upstream: after,
            ..BatchOutcome::settled(items, Instant::now())
        });
        let answers: Vec<(MsgSeq, Receipt)> =
            outcome.items.iter().filter_map(|(s, r)| Some((*s, *r.as_ref().ok()?))).collect();
        let page = self
            .cache
            .insert_fetched(APP, &batch.group, &answers, (started, outcome.fetched_at), KeptBy::Polling)
            .await;
        // As `fetch::store`: a 10010 or 10015 is cached for the whole group.
        if let Some((_, Err(Failure::Group { code, info }))) = outcome.items.first()
            && matches!(*code, ErrorCode::GROUP_NOT_FOUND | ErrorCode::GROUP_INVALID)
        {
            let answer = GroupAnswer { code: *code, info: info.clone(), fetched_at: outcome.fetched_at };
            self.cache.insert_group_answer(APP, &batch.group, answer).await;
        }
        self.engine.complete(&batch, &page);
        let _ = batch.outcome.send(Some(outcome));
    }
}

/// The batches the dispatcher dropped unsent: their group and MsgSeqs.
type Dropped = Arc<Mutex<Vec<(GroupId, Vec<MsgSeq>)>>>;

/// One app's receipt API as `service::app` builds it (no fleet tier), its dispatcher
/// running, the stand-in behind it.
struct Gateway {
    receipts: Arc<Receipts>,
    metrics: Metrics,
    tencent: Arc<StandIn>,
    dropped: Dropped,
    dispatcher: JoinHandle<()>,
}

impl Gateway {
    fn start(reply: Reply) -> Self {
        Self::with_budget(reply, NEVER_SHORT)
    }

    /// With a local budget of `per_second` upstream calls.
    fn with_budget(reply: Reply, per_second: u32) -> Self {
        let metrics = Metrics::new().unwrap();
        let cache = ReceiptCache::new(&CacheConfig {
            ttl: TTL,
            stale: STALE,
            negative_ttl: S,
            callback_ttl: 10 * TTL,
            max_entries: 10_000,
        });
        let engine = Arc::new(Engine::new(BatchPolicy {
            window: WINDOW,
            max_seqs: 50,
            ttl: TTL,
            upstream_timeout: 3 * S,
            neighbourhood: Neighbourhood::Here,
        }));
        let app = APP.to_string();
        let labels = [app.as_str(), API_RECEIPT];
        let config = BudgetConfig {
            per_second: per_second.try_into().unwrap(),
            backend: BudgetBackend::Local,
            fallback_per_second: per_second.try_into().unwrap(),
        };
        let rate = metrics.effective_rate.with_label_values(&labels);
        let budget =
            Arc::new(Budget::new(&config, "1:receipt".into(), rate, metrics.budget_backend_up.clone(), None).unwrap());
        let tencent = Arc::new(StandIn {
            reply,
            cache: cache.clone(),
            engine: engine.clone(),
            calls: Mutex::default(),
            held: Mutex::default(),
        });
        let dropped = Dropped::default();
        let send = {
            let tencent = tencent.clone();
            move |batch| tencent.send(batch)
        };
        let gone = {
            let dropped = dropped.clone();
            move |group, seqs| dropped.lock().unwrap().push((group, seqs))
        };
        let wait: Histogram = metrics.budget_wait.with_label_values(&labels);
        let dispatcher = tokio::spawn(dispatcher::run(engine.clone(), budget.clone(), wait, send, gone));
        let receipts = Receipts { id: APP, cache, engine, budget, fleet: None, metrics: metrics.for_app(APP) };
        Self { receipts: Arc::new(receipts), metrics, tencent, dropped, dispatcher }
    }

    /// Caches `seqs` of [`group`] with [`cached`] counts, fetched now.
    async fn cache(&self, seqs: &[u64]) {
        let answers: Vec<(MsgSeq, Receipt)> = seqs.iter().map(|&s| (MsgSeq(s), cached(s))).collect();
        self.receipts.cache.insert(APP, &group(), &answers, Instant::now(), KeptBy::Polling).await;
    }

    /// Answers `q`; a hang fails the test (on the paused clock, at once).
    async fn answer(&self, q: Query<'static>) -> Result<Answer, GatewayError> {
        timeout(DEADLINE + S, answer(&self.receipts, q)).await.expect("no answer a second past the deadline")
    }

    async fn ask(&self, seqs: &[u64], freshness: Freshness) -> Result<Answer, GatewayError> {
        self.answer(query(seqs, freshness)).await
    }

    /// Another caller, asking concurrently in a task of its own.
    fn spawn_ask(&self, seqs: &[u64]) -> JoinHandle<Result<Answer, GatewayError>> {
        let (receipts, q) = (self.receipts.clone(), query(seqs, Freshness::Default));
        tokio::spawn(async move {
            timeout(DEADLINE + S, answer(&receipts, q)).await.expect("no answer a second past the deadline")
        })
    }

    /// The MsgSeqs of every call Tencent got (sorted: their order in a call means
    /// nothing), in the order of the calls.
    fn calls(&self) -> Vec<Vec<u64>> {
        let mut calls = self.tencent.calls.lock().unwrap().clone();
        calls.iter_mut().for_each(|call| call.sort_unstable());
        calls
    }

    /// `receipt_gateway_items_total{app="1",source}`.
    fn items(&self, source: &str) -> u64 {
        self.metrics.items.with_label_values(&["1", source]).get()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_hit_is_answered_from_the_cache_without_a_call() {
    let gw = Gateway::start(answers());
    gw.cache(&[1, 2, 3]).await;
    tokio::time::advance(2500 * MS).await;

    let answer = gw.ask(&[3, 1, 3], Freshness::Default).await.unwrap();

    assert_eq!(answer.x_cache, XCache::Hit);
    assert_eq!(answer.body, ok(&[(3, cached(3)), (1, cached(1)), (3, cached(3))]));
    assert_eq!(answer.age, 2, "cached 2.5 s ago");
    assert!(gw.calls().is_empty());
    assert_eq!(gw.receipts.engine.sizes(), (0, 0, 0), "nothing queued or in flight either");
}

#[tokio::test(start_paused = true)]
async fn a_partial_hit_fetches_only_the_missing_msgseqs_in_one_call_and_answers_in_the_callers_order() {
    let gw = Gateway::start(answers());
    gw.cache(&[1, 3]).await;
    tokio::time::advance(3500 * MS).await;

    let answer = gw.ask(&[3, 2, 1, 2, 4], Freshness::Default).await.unwrap();

    assert_eq!(gw.calls(), [vec![2, 4]], "one call, carrying the misses alone");
    assert_eq!(answer.x_cache, XCache::Partial);
    assert_eq!(
        answer.body,
        ok(&[(3, cached(3)), (2, tencent(2)), (1, cached(1)), (2, tencent(2)), (4, tencent(4))]),
        "the caller's order, the duplicate kept"
    );
    assert_eq!(answer.age, 3, "from the oldest item served, cached 3.5 s before");
}

/// The stale items are settled on [`WRITE_BACK`] before the deadline, not at it: an
/// answer produced at the deadline is written after it (measured: up to 34 ms late at
/// the client during an upstream hang).
#[tokio::test(start_paused = true)]
async fn stale_items_stand_in_when_the_call_has_not_answered_in_time_to_be_written_by_the_deadline() {
    let gw = Gateway::start(Reply::Silent);
    let fetched = Instant::now();
    gw.cache(&[1, 2]).await;
    tokio::time::advance(TTL + S).await;
    let q = query(&[1, 2], Freshness::Default);
    let deadline = q.deadline;

    let answer = gw.answer(q).await.unwrap();

    assert_eq!(gw.calls(), [vec![1, 2]], "a fresh answer was asked for");
    assert_eq!(Instant::now(), deadline - WRITE_BACK, "settled with the time to write it left");
    assert_eq!(answer.x_cache, XCache::Stale);
    assert_eq!(answer.body, ok(&[(1, cached(1)), (2, cached(2))]), "the old counts");
    assert_eq!(answer.age, fetched.elapsed().as_secs(), "as old as the stale items");
}

/// 504, not 429: the budget sent the batch in time (`Engine::unsent` finds nothing
/// queued or sent too late), so it is upstream that did not answer before the deadline;
/// and `no-cache` forbids the stale items (`settle` serves them only to
/// `Freshness::Default`).
/// And settled, like stale items, with [`WRITE_BACK`] left to write it: a 504 written
/// after the deadline is no answer, while an answer upstream gives in those last
/// milliseconds still fills the cache for the next caller.
#[tokio::test(start_paused = true)]
async fn a_no_cache_request_gets_no_stale_items_and_a_504_when_the_call_has_not_answered_in_time() {
    let gw = Gateway::start(Reply::Silent);
    gw.cache(&[1, 2]).await;
    tokio::time::advance(TTL + S).await;
    let q = query(&[1, 2], Freshness::NoCache);
    let deadline = q.deadline;

    let answered = gw.answer(q).await;

    assert_eq!(gw.calls(), [vec![1, 2]]);
    assert_eq!(answered.err(), Some(GatewayError::DeadlineExceeded));
    assert_eq!(Instant::now(), deadline - WRITE_BACK, "settled with the time to write it left");
}

/// Upstream's time is the latency's (which `fetch::attempt` measures, and the stand-in
/// does not): a call held for seconds, its callers waiting all along, leaves the gateway's
/// own part of the reach at what it took to wake them, as a call answered at once would.
#[tokio::test(start_paused = true)]
async fn a_call_upstream_held_for_seconds_adds_nothing_to_the_gateways_part_of_the_reach() {
    let gw = Gateway::start(Reply::Counts { after: 2500 * MS, omit: &[] });
    let mut q = query(&[1], Freshness::Default);
    q.deadline = q.arrived + 5 * S;

    let answer = timeout(6 * S, answer(&gw.receipts, q)).await.unwrap().unwrap();

    assert_eq!((answer.x_cache, gw.calls()), (XCache::Miss, vec![vec![1]]), "answered by the held call");
    let reach = gw.receipts.engine.estimates().reach();
    assert!(reach < MARGIN + 5 * MS, "{reach:?}");
}

#[tokio::test(start_paused = true)]
async fn stale_items_stand_in_as_soon_as_the_call_fails() {
    let gw = Gateway::start(Reply::Fail(Failure::Unavailable("HTTP 502 after 2 retries".into())));
    gw.cache(&[1, 2]).await;
    tokio::time::advance(TTL + S).await;
    let asked = Instant::now();

    let answer = gw.ask(&[2, 1], Freshness::Default).await.unwrap();

    assert_eq!(gw.calls(), [vec![1, 2]]);
    assert_eq!(asked.elapsed(), WINDOW, "no wait for the deadline once the call failed");
    assert_eq!(answer.x_cache, XCache::Stale);
    assert_eq!(answer.body, ok(&[(2, cached(2)), (1, cached(1))]));
}

/// 502: upstream failed (not the budget, not the deadline), and `no-cache` forbids the
/// stale items.
#[tokio::test(start_paused = true)]
async fn a_no_cache_request_gets_a_502_when_the_call_fails() {
    let reason = "HTTP 502 after 2 retries";
    let gw = Gateway::start(Reply::Fail(Failure::Unavailable(reason.into())));
    gw.cache(&[1, 2]).await;

    let answered = gw.ask(&[1, 2], Freshness::NoCache).await;

    assert_eq!(gw.calls(), [vec![1, 2]], "fresh items are no answer to no-cache either");
    assert_eq!(answered.err(), Some(GatewayError::Upstream(reason.into())));
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_leaves_while_its_call_is_on_the_wire_leaves_the_call_to_the_next_caller() {
    let gw = Gateway::start(Reply::Counts { after: 100 * MS, omit: &[] });
    let left = timeout(50 * MS, gw.ask(&[1], Freshness::Default)).await;
    assert!(left.is_err(), "the first caller went away");
    assert_eq!(gw.calls(), [vec![1]], "its call is on the wire");

    let answer = gw.ask(&[1], Freshness::Default).await.unwrap();

    assert_eq!(answer.body, ok(&[(1, tencent(1))]));
    assert_eq!(answer.x_cache, XCache::Miss);
    assert_eq!(gw.calls().len(), 1, "answered by the first caller's call");
    assert_eq!(gw.items("coalesced"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_queued_batch_goes_for_the_caller_still_waiting_when_another_leaves() {
    let gw = Gateway::start(answers());
    let stays = gw.spawn_ask(&[1]);
    let left = timeout(WINDOW / 2, gw.ask(&[1], Freshness::Default)).await;
    assert!(left.is_err(), "one caller went away");
    assert!(gw.calls().is_empty(), "before the batch left");

    let answer = timeout(DEADLINE, stays).await.unwrap().unwrap().unwrap();

    assert_eq!(gw.calls(), [vec![1]]);
    assert_eq!(answer.body, ok(&[(1, tencent(1))]));
}

/// queue.rs: "a token is spent only on work somebody can still use"; a batch whose
/// callers all went away is dropped unsent (and its MsgSeqs handed to `dropped`, for
/// the fleet tier to release).
#[tokio::test(start_paused = true)]
async fn a_batch_whose_every_caller_left_before_it_was_sent_leaves_the_queue_unpaid() {
    // One call a second: a token taken would put the next one a second away.
    let gw = Gateway::with_budget(answers(), 1);
    let left = timeout(WINDOW / 2, gw.ask(&[1, 2], Freshness::Default)).await;
    assert!(left.is_err(), "the only caller went away");

    tokio::time::sleep(100 * MS).await;

    assert!(gw.calls().is_empty());
    assert_eq!(gw.receipts.budget.estimate().next_token, Duration::ZERO, "no token taken");
    assert_eq!(*gw.dropped.lock().unwrap(), [(group(), vec![MsgSeq(1), MsgSeq(2)])]);
    assert_eq!(gw.receipts.engine.sizes(), (0, 0, 0), "nothing queued or in flight");
}

/// A batch still queued when its caller's wait ends is the budget's refusal (429), also
/// when the dispatcher drops it as too late between the caller's last look at the batch
/// and its look at the queue: the dropped batch's `Expired` says so. (In the fleet's
/// over-budget benchmark, 1 to 4 requests a run were answered 504 that way.)
#[tokio::test(start_paused = true)]
async fn a_batch_dropped_as_too_late_just_as_its_caller_stops_waiting_is_a_429_not_a_504() {
    let gw = Gateway::start(answers());
    // The test takes the dispatcher's part.
    gw.dispatcher.abort();
    let q = query(&[1, 2], Freshness::NoCache);
    let misses = [MsgSeq(1), MsgSeq(2)];
    let slots = super::lookup(&misses, &[], q.freshness, Instant::now());
    let ask = Ask {
        group: &q.group,
        page: None,
        misses: &misses,
        fetched_since: None,
        deadline: q.deadline,
        client: q.client,
        request: q.request_id,
    };
    let joined = gw.receipts.engine.join(ask, gw.receipts.budget.estimate()).unwrap();
    // The caller stops waiting with nothing answered...
    tokio::time::advance(DEADLINE - WRITE_BACK).await;
    assert!(joined.iter().all(|(_, waiter, _)| waiter.borrow().is_none()));
    // ...and the dispatcher, given its next token, drops the batch as too late.
    let wait = gw.metrics.budget_wait.with_label_values(&["1", API_RECEIPT]);
    assert!(gw.receipts.engine.pop(Instant::now(), &wait, true).is_none());
    assert_eq!(gw.receipts.engine.sizes(), (0, 0, 0), "dropped unsent");

    let answer = super::time_ran_out(&gw.receipts, slots, &q, &[], &joined);
    assert!(matches!(answer, Err(GatewayError::Overloaded { .. })), "{:?}", answer.err());
}

#[tokio::test(start_paused = true)]
async fn a_groups_10010_reaches_every_caller_of_the_call_as_tencents_fail_body() {
    let info = "Err_Group_Not_Found";
    let gw = Gateway::start(Reply::Fail(Failure::Group { code: ErrorCode::GROUP_NOT_FOUND, info: info.into() }));
    let other = gw.spawn_ask(&[2]);

    let answer = gw.ask(&[1], Freshness::Default).await.unwrap();
    let others = timeout(DEADLINE, other).await.unwrap().unwrap().unwrap();

    assert_eq!(gw.calls(), [vec![1, 2]], "one call for both");
    for answer in [answer, others] {
        assert_eq!(answer.body, ReceiptResponse::fail(ErrorCode::GROUP_NOT_FOUND, info));
        assert_eq!(answer.x_cache, XCache::Miss);
    }
}

#[tokio::test(start_paused = true)]
async fn a_groups_10010_is_then_answered_from_the_cache_for_any_msgseq() {
    let info = "Err_Group_Not_Found";
    let gw = Gateway::start(Reply::Fail(Failure::Group { code: ErrorCode::GROUP_NOT_FOUND, info: info.into() }));
    gw.ask(&[1], Freshness::Default).await.unwrap();

    let answer = gw.ask(&[7, 8], Freshness::Default).await.unwrap();

    assert_eq!(gw.calls(), [vec![1]], "no second call");
    assert_eq!(answer.body, ReceiptResponse::fail(ErrorCode::GROUP_NOT_FOUND, info));
    assert_eq!(answer.x_cache, XCache::Hit);
}

#[tokio::test(start_paused = true)]
async fn served_items_are_counted_once_each_by_where_they_came_from() {
    // MsgSeq 1 is cached and fresh, 2 cached but past its TTL, 3 on the wire for another
    // caller, 4 nowhere; Tencent answers 3 and 4 and leaves 2 out.
    let gw = Gateway::start(Reply::Counts { after: 100 * MS, omit: &[2] });
    gw.cache(&[2]).await;
    tokio::time::advance(TTL + S).await;
    gw.cache(&[1]).await;
    let other = gw.spawn_ask(&[3]);
    tokio::time::sleep(10 * MS).await;
    assert_eq!(gw.calls(), [vec![3]], "3 is on the wire");

    let answer = gw.ask(&[1, 2, 3, 4], Freshness::Default).await.unwrap();
    timeout(DEADLINE, other).await.unwrap().unwrap().unwrap();

    assert_eq!(gw.calls(), [vec![3], vec![2, 4]]);
    assert_eq!(answer.x_cache, XCache::Stale);
    assert_eq!(answer.body, ok(&[(1, cached(1)), (2, cached(2)), (3, tencent(3)), (4, tencent(4))]));
    let counted = ["hit", "coalesced", "fetched", "stale", "failed"].map(|source| gw.items(source));
    // Fetched: 4 for this caller, 3 for the other.
    assert_eq!(counted, [1, 1, 2, 1, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_10004_not_narrowed_down_is_the_callers_fault_only_if_it_asked_for_all_of_what_was_refused() {
    let part: Arc<[MsgSeq]> = [MsgSeq(1), MsgSeq(2)].into();
    let info = "MsgSeq out of range".to_owned();
    let gw = Gateway::start(Reply::Fail(Failure::Unisolated { info, part }));

    let own = gw.ask(&[2, 1], Freshness::Default).await;
    let mixed = gw.ask(&[2, 3], Freshness::Default).await;

    let Err(GatewayError::BadRequest(text)) = own else { panic!("{:?}", own.err()) };
    assert!(text.contains("one of MsgSeqs 1, 2") && text.contains("out of range"), "{text}");
    assert!(matches!(mixed, Err(GatewayError::Upstream(_))), "{:?}: 3 may be innocent", mixed.err());
}

#[tokio::test(start_paused = true)]
async fn a_msgseq_tencent_refused_lately_is_refused_at_once_without_a_call() {
    let gw = Gateway::start(answers());
    let refused = [(MsgSeq(5), "MsgSeq 5 is out of range".to_owned())];
    gw.receipts.engine.remember_refused(&group(), &refused, None, S);

    let answer = gw.ask(&[1, 5], Freshness::NoCache).await;

    let Err(GatewayError::BadRequest(text)) = answer else { panic!("{:?}", answer.err()) };
    assert!(text.contains("MsgSeq 5 ") && text.contains("out of range"), "{text}");
    assert_eq!(gw.calls(), Vec::<Vec<u64>>::new());
    assert_eq!(gw.items("failed"), 2);
}
