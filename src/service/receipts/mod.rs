//! Answers one validated receipt query (docs/design.md#receipt-api, #cache): cache first, misses
//! handed to the coalescer, waiting no longer than the caller's deadline leaves (the answer's
//! write included), then the answer assembled in the caller's order with `X-Cache` and `Age`.
//!
//! Stale items stand in only when a fresh answer cannot be had before the deadline
//! (budget exhausted, upstream failing) and the caller did not forbid it with
//! `Cache-Control`. Answers Tencent gives about a group (10010) are passed through as
//! Tencent would: HTTP 200 with `ActionStatus` `FAIL`. A MsgSeq Tencent refuses (an
//! isolated 10004, or one it refused lately) is the caller's error: 10004 naming it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use crate::budget::Budget;
use crate::cache::{Cached, Freshness, Page, ReceiptCache, XCache};
use crate::clients::ClientSlot;
use crate::engine::admission;
use crate::engine::batch::{BatchOutcome, Failure, Joined, Waiter};
use crate::engine::{Ask, Engine};
use crate::error::GatewayError;
use crate::fleet::SharedTier;
use crate::telemetry::metrics::{AppMetrics, Source};
use crate::tencent::domain::{AppId, GroupId, MsgSeq, Receipt};
use crate::tencent::wire::{ReceiptItem, ReceiptResponse};

mod shared;

pub use shared::give_up;

/// The receipt API of one app as its requests use it: the cache, the engine that queues
/// misses, the budget admission reads, the fleet tier. Answers come from the batches the
/// engine's dispatcher sends (`upstream::fetch`), which this stage never calls.
pub struct Receipts {
    pub id: AppId,
    pub cache: ReceiptCache,
    pub engine: Arc<Engine>,
    pub budget: Arc<Budget>,
    pub fleet: Option<Arc<SharedTier>>,
    pub metrics: AppMetrics,
}

/// A validated query for one app.
pub struct Query<'a> {
    /// The caller's request id (for the log line of the call that serves it).
    pub request_id: &'a str,
    pub group: GroupId,
    /// In the caller's order, duplicates kept.
    pub seqs: Vec<MsgSeq>,
    pub freshness: Freshness,
    pub arrived: Instant,
    pub deadline: Instant,
    /// Who asks: the line its misses queue in, and the share that pays for them.
    pub client: ClientSlot,
}

/// An answer in Tencent's shape (OK, or a passed-through FAIL), with cache headers.
pub struct Answer {
    pub body: ReceiptResponse,
    pub x_cache: XCache,
    /// Whole seconds since the oldest item served was fetched.
    pub age: u64,
}

/// One distinct MsgSeq's way through the request.
pub(crate) struct Slot {
    seq: MsgSeq,
    served: Option<(Receipt, Instant, Source)>,
    /// A cached item past freshness, kept in case nothing fresh arrives in time.
    stale: Option<Cached>,
    failure: Option<Failure>,
}

impl Slot {
    /// Neither served nor failed: still to be asked for.
    fn is_open(&self) -> bool {
        self.served.is_none() && self.failure.is_none()
    }
}

/// A no-cache request may find its keys in flight in calls that started before it
/// arrived; it waits for those and asks again. Two rounds always suffice, since the
/// second joins calls that start after the request arrived; the third is slack.
const MAX_ROUNDS: usize = 3;

/// With the fleet tier, a request may wait for other replicas' calls several times
/// (each wait at most [`POLL_EVERY`](crate::fleet::POLL_EVERY)); the deadline ends it.
const MAX_FLEET_ROUNDS: usize = 64;

pub async fn answer(app: &Receipts, q: Query<'_>) -> Result<Answer, GatewayError> {
    if q.freshness != Freshness::NoCache
        && let Some(g) = app.cache.group_answer(app.id, &q.group).await
    {
        app.metrics.count_items(Source::Hit, q.seqs.len() as u64);
        let age = g.fetched_at.elapsed().as_secs();
        return Ok(Answer { body: ReceiptResponse::fail(g.code, g.info.clone()), x_cache: XCache::Hit, age });
    }
    // Callers usually ask for ascending MsgSeqs already: no copy to sort then.
    let distinct: std::borrow::Cow<'_, [MsgSeq]> = if q.seqs.windows(2).all(|w| w[0] < w[1]) {
        q.seqs.as_slice().into()
    } else {
        let mut distinct = q.seqs.clone();
        distinct.sort_unstable();
        distinct.dedup();
        distinct.into()
    };
    // A page this thread found lately may serve an answer wholly from cache; anything
    // short of that looks the page up in moka (see `cache/recent.rs`).
    if let Some(page) = app.cache.recent_page(app.id, &q.group) {
        let looked = Instant::now();
        if let Some(answer) = all_hits(app, &q, &distinct, &page.read(&distinct, looked), looked) {
            return Ok(answer);
        }
    }
    let page = app.cache.page(app.id, &q.group).await;
    let looked = Instant::now();
    let cached = page.as_ref().map(|p| p.read(&distinct, looked)).unwrap_or_default();
    if let Some(answer) = all_hits(app, &q, &distinct, &cached, looked) {
        return Ok(answer);
    }
    let slots = lookup(&distinct, &cached, q.freshness, looked);
    // Boxed: the misses' way (rounds, waits, the fleet tier) is most of the state of this
    // future, which every hit would otherwise carry and copy (2.5 KB).
    Box::pin(resolve(app, q, slots, page, looked)).await
}

/// The misses' way: each joined to a batch (or found in another replica's call), waited
/// for until the caller must answer ([`answer_by`]), then settled with what came.
async fn resolve(
    app: &Receipts,
    q: Query<'_>,
    mut slots: Vec<Slot>,
    mut page: Option<Arc<Page>>,
    looked: Instant,
) -> Result<Answer, GatewayError> {
    // `no-cache` wants calls that start after it arrived: the shared items cannot help.
    let tier = app.fleet.as_deref().filter(|_| q.freshness != Freshness::NoCache);
    // Tencent's word on a MsgSeq is no cached count: `no-cache` does not ask it again.
    let open: Vec<MsgSeq> = slots.iter().filter(|s| s.is_open()).map(|s| s.seq).collect();
    if let Some(refusal) = app.engine.refused(&q.group, &open) {
        app.metrics.count_items(Source::Failed, q.seqs.len() as u64);
        return Err(refused(&[refusal.seq], &refusal.info));
    }
    let rounds = if tier.is_some() { MAX_FLEET_ROUNDS } else { MAX_ROUNDS };
    let mut waiting = Vec::new();
    // The waiters of the last round's misses joined here, looked at again at the end.
    let mut last_joined = Vec::new();
    for round in 0..rounds {
        let misses: Vec<MsgSeq> = slots.iter().filter(|s| s.is_open()).map(|s| s.seq).collect();
        let last_round = match (round, tier) {
            (0, _) => q.deadline,
            (_, Some(_)) => shared::last_round(&q),
            (_, None) => answer_by(&q),
        };
        if misses.is_empty() || Instant::now() >= last_round {
            break;
        }
        let mut elsewhere = shared::Elsewhere::default();
        let local = match tier {
            None => misses,
            Some(tier) => match shared::round(app, tier, &q, &mut slots, &misses, round).await {
                shared::Round::Group(answer) => return Ok(answer),
                shared::Round::Split { local, wait, page: fed } => {
                    page = fed.or(page);
                    elsewhere = wait;
                    local
                }
            },
        };
        let joined = if local.is_empty() {
            Vec::new()
        } else {
            let fetched_since = (q.freshness != Freshness::NoCache).then_some(looked);
            let ask = Ask {
                group: &q.group,
                page: page.as_ref(),
                misses: &local,
                fetched_since,
                deadline: q.deadline,
                client: q.client,
                request: q.request_id,
            };
            match app.engine.join(ask, app.budget.estimate()) {
                Ok(joined) => joined,
                Err(overloaded) => {
                    shared::give_up(app, &q.group, &local);
                    let error = GatewayError::Overloaded { retry_after: overloaded.retry_after };
                    return settle(app, slots, &q, error);
                }
            }
        };
        waiting = elsewhere.seqs.clone();
        tokio::join!(wait(app, &mut slots, &joined, &q, answer_by(&q)), shared::wait(app, tier, &q, &elsewhere));
        last_joined = joined;
    }
    time_ran_out(app, slots, &q, &waiting, &last_joined)
}

/// The answer when time ran out with slots still open: `waiting` for another replica's
/// call, or joined to the batches of `last_joined` (the last round's).
fn time_ran_out(
    app: &Receipts,
    mut slots: Vec<Slot>,
    q: &Query<'_>,
    waiting: &[MsgSeq],
    last_joined: &[(MsgSeq, Waiter, Joined)],
) -> Result<Answer, GatewayError> {
    // Still queued here, or waiting for another replica's call, when time ran out: the
    // budget (the fleet's) could not serve it in time, as a refusal would have said.
    // Sent in time and still on its way: upstream is late (504), or a stale item stands
    // in; its answer still fills the cache for the next caller.
    let open: Vec<MsgSeq> = slots.iter().filter(|s| s.is_open()).map(|s| s.seq).collect();
    let unsent = if open.is_empty() { Vec::new() } else { app.engine.unsent(&q.group, &open, q.deadline) };
    // The dispatcher may have settled a batch between the end of the wait and the look
    // above (dropped unsent as too late: its items are out of the engine's tables, their
    // outcome `Expired`; or answered): what the batch says now is the truth. The engine
    // resolves a dropped batch under the lock `unsent` took, so one of the two sees it.
    take_answers(&mut slots, last_joined, q);
    for slot in slots.iter_mut().filter(|s| s.is_open() && (waiting.contains(&s.seq) || unsent.contains(&s.seq))) {
        slot.failure = Some(Failure::NoBudget);
    }
    settle(app, slots, q, GatewayError::DeadlineExceeded)
}

/// When a request stops waiting, whatever it waits for (the queue, a call on the wire,
/// another replica's call): [`admission::WRITE_BACK`] before its deadline, to write what
/// it has — stale items, 429 or 504 — by the deadline. An answer upstream gives in those
/// last milliseconds would itself be written at the deadline, late on a busy machine;
/// a call the dispatcher sent in time (with [`admission::MARGIN`] to spare) lands before.
fn answer_by(q: &Query<'_>) -> Instant {
    q.deadline.checked_sub(admission::WRITE_BACK).unwrap_or(q.deadline)
}

/// The answer when the cache serves every MsgSeq (the usual case), built straight from
/// the lookup: what [`assemble`] would make of slots that are all hits.
fn all_hits(
    app: &Receipts,
    q: &Query<'_>,
    distinct: &[MsgSeq],
    cached: &[Option<Cached>],
    now: Instant,
) -> Option<Answer> {
    if cached.len() != distinct.len() {
        return None;
    }
    let mut oldest = now;
    for item in cached {
        let item = item.as_ref().filter(|item| acceptable(item, q.freshness, now))?;
        oldest = oldest.min(item.fetched_at);
    }
    let mut items = Vec::with_capacity(q.seqs.len());
    for &seq in &q.seqs {
        let i = distinct.binary_search(&seq).ok()?;
        items.push(ReceiptItem::new(seq, cached[i]?.receipt));
    }
    app.metrics.count_items(Source::Hit, distinct.len() as u64);
    let age = now.saturating_duration_since(oldest).as_secs();
    Some(Answer { body: ReceiptResponse::ok(items), x_cache: XCache::Hit, age })
}

/// One slot per distinct MsgSeq: served from the cache if acceptable, else open (with
/// the stale entry kept in case nothing fresh arrives in time).
fn lookup(distinct: &[MsgSeq], cached: &[Option<Cached>], freshness: Freshness, now: Instant) -> Vec<Slot> {
    distinct
        .iter()
        .enumerate()
        .map(|(i, &seq)| {
            let mut slot = Slot { seq, served: None, stale: None, failure: None };
            match cached.get(i).copied().flatten() {
                Some(item) if acceptable(&item, freshness, now) => {
                    slot.served = Some((item.receipt, item.fetched_at, Source::Hit));
                }
                item => slot.stale = item,
            }
            slot
        })
        .collect()
}

pub(crate) fn acceptable(entry: &Cached, freshness: Freshness, now: Instant) -> bool {
    freshness.accepts(entry.age(now), entry.is_fresh(now))
}

/// Waits, until `until`, for the batches carrying this round's misses, and puts what
/// they answered in the slots (the rest stay open for the caller to settle); each batch
/// answered by its first call tells admission how much the gateway added to the call.
async fn wait(app: &Receipts, slots: &mut [Slot], joined: &[(MsgSeq, Waiter, Joined)], q: &Query<'_>, until: Instant) {
    let mut waiters: Vec<Waiter> = Vec::new();
    for (_, w, _) in joined {
        if !waiters.iter().any(|other| other.same_channel(w)) {
            waiters.push(w.clone());
        }
    }
    let all = async {
        for w in &mut waiters {
            // An answer that came while this request waited for another says nothing
            // about how long it took to arrive.
            let answered_meanwhile = w.borrow().is_some();
            let Ok(outcome) = w.wait_for(Option::is_some).await else { continue };
            let first = |o: &&Arc<BatchOutcome>| !o.sampled.swap(true, Ordering::Relaxed);
            if let Some(outcome) = outcome.as_ref().filter(|o| o.first_call && !answered_meanwhile).filter(first) {
                app.engine.estimates().observe_added(outcome.started.elapsed().saturating_sub(outcome.upstream));
            }
        }
    };
    let _ = tokio::time::timeout_at(until, all).await;
    take_answers(slots, joined, q);
}

/// Puts what the batches of `joined` answered in the slots still open (the rest stay
/// open for the caller to settle).
fn take_answers(slots: &mut [Slot], joined: &[(MsgSeq, Waiter, Joined)], q: &Query<'_>) {
    for (seq, waiter, how) in joined {
        let Ok(i) = slots.binary_search_by_key(seq, |s| s.seq) else { continue };
        let slot = &mut slots[i];
        if !slot.is_open() {
            continue;
        }
        let outcome = waiter.borrow().clone();
        let Some(outcome) = outcome else {
            // Else time ran out first: the caller settles it.
            if waiter.has_changed().is_err() {
                slot.failure = Some(Failure::Unavailable("the upstream call was abandoned".into()));
            }
            continue;
        };
        match outcome.get(*seq) {
            Some(Ok(_)) if q.freshness == Freshness::NoCache && outcome.started < q.arrived => {
                // Answered by a call older than this request: ask again next round.
            }
            Some(Ok(receipt)) => {
                let source = if *how == Joined::Fetched { Source::Fetched } else { Source::Coalesced };
                slot.served = Some((*receipt, outcome.fetched_at, source));
            }
            // Added to a call Tencent refused, and left out when it was asked again: ask
            // for it next round.
            Some(Err(Failure::LeftOut)) => {}
            Some(Err(failure)) => slot.failure = Some(failure.clone()),
            None => slot.failure = Some(Failure::Unavailable("missing from the upstream answer".into())),
        }
    }
}

/// Which error to report when items failed differently (lower first).
fn rank(e: &GatewayError) -> u8 {
    match e {
        GatewayError::Overloaded { .. } => 0,
        GatewayError::Upstream(_) => 1,
        _ => 2,
    }
}

/// Builds the answer from what the slots hold. Items still unanswered fall back to stale
/// entries when allowed, else the request fails with `unanswered` (or the failure).
fn settle(
    app: &Receipts,
    mut slots: Vec<Slot>,
    q: &Query<'_>,
    unanswered: GatewayError,
) -> Result<Answer, GatewayError> {
    let mut error: Option<GatewayError> = None;
    let asked: Vec<MsgSeq> = slots.iter().map(|s| s.seq).collect();
    for slot in slots.iter_mut().filter(|s| s.served.is_none()) {
        let failure = slot.failure.take();
        // Tencent's own answer about the group goes to the caller as is.
        if let Some(Failure::Group { code, info }) = failure {
            app.metrics.count_items(Source::Failed, q.seqs.len() as u64);
            return Ok(Answer { body: ReceiptResponse::fail(code, info), x_cache: XCache::Miss, age: 0 });
        }
        // A MsgSeq Tencent refused on its own, or a set of them the caller asked for all
        // of (Tencent would refuse its request alone): the caller's input was wrong.
        let refusal = match &failure {
            Some(Failure::Rejected { info, .. }) => Some(refused(&[slot.seq], info)),
            Some(Failure::Unisolated { info, part }) if part.iter().all(|s| asked.binary_search(s).is_ok()) => {
                Some(refused(part, info))
            }
            _ => None,
        };
        if let Some(refusal) = refusal {
            app.metrics.count_items(Source::Failed, q.seqs.len() as u64);
            return Err(refusal);
        }
        match slot.stale {
            Some(entry) if q.freshness == Freshness::Default => {
                slot.served = Some((entry.receipt, entry.fetched_at, Source::Stale));
            }
            _ => {
                let e = failure_error(app, failure, &unanswered);
                // The most actionable error wins: "slow down, retry after N" over
                // "upstream failed" over "deadline passed".
                if error.as_ref().is_none_or(|old| rank(&e) < rank(old)) {
                    error = Some(e);
                }
            }
        }
    }
    if let Some(e) = error {
        app.metrics.count_items(Source::Failed, slots.len() as u64);
        return Err(e);
    }
    Ok(assemble(app, &slots, q))
}

/// The error an item that could not be served stands for.
fn failure_error(app: &Receipts, failure: Option<Failure>, unanswered: &GatewayError) -> GatewayError {
    match failure {
        Some(Failure::Expired | Failure::Throttled | Failure::NoBudget) => {
            GatewayError::Overloaded { retry_after: app.engine.backlog(app.budget.estimate()) }
        }
        Some(Failure::Unavailable(reason)) => GatewayError::Upstream(reason),
        // Refused together with other callers' MsgSeqs: this caller's may be innocent.
        Some(Failure::Unisolated { info, .. }) => GatewayError::Upstream(format!(
            "upstream refused a merged call with 10004 ({info}) and it could not be narrowed down"
        )),
        None | Some(Failure::Group { .. } | Failure::Rejected { .. } | Failure::LeftOut) => unanswered.clone(),
    }
}

/// The most MsgSeqs an error names.
const MAX_NAMED: usize = 10;

/// The caller's error for a MsgSeq Tencent refuses, or for one of `seqs` (docs/design.md#errors):
/// 10004 naming them.
fn refused(seqs: &[MsgSeq], info: &str) -> GatewayError {
    let mut named = seqs.iter().take(MAX_NAMED).map(|s| s.0.to_string()).collect::<Vec<_>>().join(", ");
    if seqs.len() > MAX_NAMED {
        named.push_str(&format!(" and {} more", seqs.len() - MAX_NAMED));
    }
    let which = if seqs.len() == 1 { "MsgSeq" } else { "one of MsgSeqs" };
    GatewayError::BadRequest(format!("MsgSeqList: Tencent refuses {which} {named} (10004: {info})"))
}

/// The OK answer, every slot served: items in the caller's order, `X-Cache`, `Age`, and
/// the item counters by source.
fn assemble(app: &Receipts, slots: &[Slot], q: &Query<'_>) -> Answer {
    let now = Instant::now();
    let mut counts = [0u64; 5];
    let mut oldest = now;
    for (_, fetched_at, source) in slots.iter().filter_map(|s| s.served) {
        counts[source as usize] += 1;
        oldest = oldest.min(fetched_at);
    }
    for source in [Source::Hit, Source::Coalesced, Source::Fetched, Source::Stale] {
        app.metrics.count_items(source, counts[source as usize]);
    }
    let [hit, coalesced, fetched, stale, _] = counts;
    let x_cache = match (hit, coalesced + fetched, stale) {
        (_, _, s) if s > 0 => XCache::Stale,
        (_, 0, _) => XCache::Hit,
        (0, _, _) => XCache::Miss,
        _ => XCache::Partial,
    };
    let items = q
        .seqs
        .iter()
        .filter_map(|&seq| {
            let i = slots.binary_search_by_key(&seq, |s| s.seq).ok()?;
            let (receipt, _, _) = slots[i].served?;
            Some(ReceiptItem::new(seq, receipt))
        })
        .collect();
    Answer { body: ReceiptResponse::ok(items), x_cache, age: now.saturating_duration_since(oldest).as_secs() }
}

#[cfg(test)]
mod tests;
