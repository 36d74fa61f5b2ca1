//! Runs one dispatched batch to its end (docs/design.md#request-pipeline): the upstream call it
//! already paid for, retries and 10004 splits each paid for with a permit from the queue, the cache
//! filled, then every waiting caller woken with the shared outcome.
//!
//! A call Tencent refuses as a whole (10004) is first asked again without the MsgSeqs the
//! gateway added, then split (docs/design.md#msgseqs-tencent-refuses); the calls that
//! isolate a refused MsgSeq are paid by the client that sent it, and the refusal is
//! remembered ([`crate::engine::refusals`]) before any caller hears of it.
//!
//! A batch runs in its own task, owned by nobody's request: a caller that goes away
//! cannot cancel a call others are waiting on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::budget::Budget;
use crate::cache::{GroupAnswer, Page};
use crate::cache::{KeptBy, ReceiptCache};
use crate::clients::ClientSlot;
use crate::engine::Engine;
use crate::engine::admission;
use crate::engine::batch::{BatchOutcome, Dispatch, Failure, Items, Served, Window};
use crate::engine::queue::Billing;
use crate::fleet::{self, SharedTier};
use crate::tencent::code::ErrorCode;
use crate::tencent::domain::AppId;
use crate::tencent::domain::{GroupId, MsgSeq, Receipt};
use crate::upstream::endpoints::Which;
use crate::upstream::retry::{Attempts, Next, Trouble};
use crate::upstream::{Outcome, Upstream};

/// What running one app's receipt batches takes: the signed client, the queue that pays
/// for retries and splits, the budget's send-time check, the cache the answers go to,
/// and the fleet tier they are shared through.
pub struct Fetcher {
    pub id: AppId,
    pub upstream: Upstream,
    pub engine: Arc<Engine>,
    pub budget: Arc<Budget>,
    pub cache: ReceiptCache,
    /// What keeps the items fetched for this app current (`apps.callbacks`).
    pub kept_by: KeptBy,
    pub max_retries: u32,
    /// `receipt_gateway_upstream_batch_size` for this app.
    pub batch_size: prometheus::Histogram,
    pub fleet: Option<Arc<SharedTier>>,
}

/// Runs a dispatched batch: fetch, fill the cache, release the keys, wake the callers;
/// with the fleet tier, the call first takes what other replicas wait for, and its
/// answer is shared with them last.
pub async fn run(app: Arc<Fetcher>, mut batch: Dispatch) {
    // From the dispatcher's decision: the task's start is part of the delivery, and a
    // `no-cache` caller counts the call as no later than this.
    let started = batch.dispatched;
    if let Some(tier) = &app.fleet {
        take_wanted(&app, tier, &mut batch).await;
    }
    let tally = Tally {
        splits: AtomicU32::new(split_allowance(batch.seqs.len() - batch.added.len())),
        calls: AtomicU32::new(0),
        isolating: AtomicU32::new(0),
        added: batch.added.clone(),
        first_on_the_wire_us: AtomicU64::new(0),
        served: batch.served.clone(),
    };
    let items = fetch(&app, &batch.group, batch.seqs.clone(), batch.window, Token::Paid, &tally).await;
    let first_call = tally.calls.load(Ordering::Relaxed) == 1;
    let upstream = Duration::from_micros(tally.first_on_the_wire_us.load(Ordering::Relaxed));
    let outcome =
        Arc::new(BatchOutcome { started, first_call, upstream, ..BatchOutcome::settled(items, Instant::now()) });
    let page = store(&app, &batch.group, &outcome.items, (started, outcome.fetched_at)).await;
    // Before any caller hears of a refusal: its next request is refused without a call.
    let refused = refused(&outcome.items);
    bill_isolation(&app.engine, &batch, &refused, tally.isolating.load(Ordering::Relaxed));
    app.engine.remember_refused(&batch.group, &refused, page.highest_answered(), app.cache.negative_ttl());
    app.engine.complete(&batch, &page);
    let _ = batch.outcome.send(Some(outcome.clone()));
    if let Some(tier) = &app.fleet
        && let Err(e) =
            tier.fleet.store(app.id, &batch.group, &outcome.items, outcome.fetched_at, tier.lifetimes()).await
    {
        tracing::debug!(error = %e, "fleet: answer not shared");
    }
}

/// Tops the call up with MsgSeqs other replicas wait for (docs/design.md#fleet-tier), as far as
/// `batch.max_seqs` allows; they are in flight with this batch from now on.
async fn take_wanted(app: &Fetcher, tier: &SharedTier, batch: &mut Dispatch) {
    // The Redis round trip may use what the most urgent caller the call can still serve
    // can spare beyond the call's latency and the answer's write (the dispatcher sent it
    // with the margin to spare); with too little, others' MsgSeqs wait for the next call.
    let now = Instant::now();
    let estimates = app.engine.estimates();
    let serves =
        if batch.window.urgency >= now + estimates.reach() { batch.window.urgency } else { batch.window.deadline };
    let spare = serves.saturating_duration_since(now).saturating_sub(estimates.latency() + admission::WRITE_BACK);
    if spare < fleet::SHORTEST_CALL {
        return;
    }
    let room = app.engine.policy().max_seqs.saturating_sub(batch.seqs.len());
    let (fleet, id, group, seqs, lifetimes) =
        (tier.fleet.clone(), app.id, batch.group.clone(), batch.seqs.clone(), tier.lifetimes());
    let mut take = tokio::spawn(async move { fleet.take(id, &group, &seqs, room, lifetimes).await });
    let mut taken = match tokio::time::timeout(spare, &mut take).await {
        Ok(Ok(Ok(taken))) => taken,
        Ok(Ok(Err(e))) => return tracing::debug!(error = %e, "fleet: wanted MsgSeqs not taken"),
        Ok(Err(_)) => return,
        Err(_) => {
            // The call leaves without them, but Redis may have run the script: whatever it
            // took is claimed for this replica, so give it back when the answer comes.
            let (fleet, id, group, own) = (tier.fleet.clone(), app.id, batch.group.clone(), batch.seqs.clone());
            tokio::spawn(async move {
                if let Ok(Ok(taken)) = take.await {
                    let all = taken.wanted.into_iter().chain(taken.added);
                    let extra: Vec<MsgSeq> = all.filter(|s| !own.contains(s)).collect();
                    fleet.release(id, &group, &extra, lifetimes).await;
                }
            });
            return tracing::debug!("fleet: Redis too slow for this call's slack; wanted MsgSeqs left for the next");
        }
    };
    // What Tencent refused lately is not added, whoever holds the neighbourhood.
    let refused: Vec<MsgSeq> = app.engine.refused_among(&batch.group, &taken.added);
    if !refused.is_empty() {
        taken.added.retain(|s| !refused.contains(s));
        let (fleet, id, group) = (tier.fleet.clone(), app.id, batch.group.clone());
        tokio::spawn(async move { fleet.release(id, &group, &refused, lifetimes).await });
    }
    let new = |s: &MsgSeq| !batch.seqs.contains(s);
    let wanted: Vec<MsgSeq> = taken.wanted.into_iter().filter(new).take(room).collect();
    let added: Vec<MsgSeq> = taken.added.into_iter().filter(new).take(room - wanted.len()).collect();
    app.engine.carry(batch, &wanted);
    app.engine.carry(batch, &added);
    batch.seqs.extend(&wanted);
    batch.seqs.extend(&added);
    batch.added.extend(added);
}

/// Puts the answers (`items` sorted by MsgSeq) in the cache, and a group-level 10010 /
/// 10015 for the whole group; failures are never cached.
/// The call left at `sent`: an item a callback wrote since then is not replaced.
async fn store(app: &Fetcher, group: &GroupId, items: &Items, (sent, fetched_at): (Instant, Instant)) -> Arc<Page> {
    let answers: Vec<(MsgSeq, Receipt)> = items.iter().filter_map(|(s, r)| Some((*s, *r.as_ref().ok()?))).collect();
    let page = app.cache.insert_fetched(app.id, group, &answers, (sent, fetched_at), app.kept_by).await;
    if let Some((_, Err(Failure::Group { code, info }))) = items.first()
        && matches!(*code, ErrorCode::GROUP_NOT_FOUND | ErrorCode::GROUP_INVALID)
    {
        let answer = GroupAnswer { code: *code, info: info.clone(), fetched_at };
        app.cache.insert_group_answer(app.id, group, answer).await;
    }
    page
}

/// Whether the next attempt already has its token (a dispatched batch's first) or must
/// queue for one, and who pays for it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Token {
    Paid,
    /// The first attempt of a call that isolates a 10004 (asking again without the added
    /// MsgSeqs, a split half): paid by the client whose MsgSeq Tencent refuses, once known.
    Isolating,
    /// A retry: paid by the client the batch was dispatched for.
    Owed,
}

impl Token {
    /// Gets the token for the next attempt; false if the deadline came first.
    async fn take(&mut self, app: &Fetcher, window: Window, tally: &Tally) -> bool {
        let billing = match std::mem::replace(self, Token::Owed) {
            Token::Paid => return true,
            Token::Isolating => Billing::Later,
            Token::Owed => Billing::Now,
        };
        let permit = app.engine.permit(window.urgency, window.client, billing);
        let granted = matches!(tokio::time::timeout_at(window.deadline, permit).await, Ok(Ok(())));
        if granted && billing == Billing::Later {
            tally.isolating.fetch_add(1, Ordering::Relaxed);
        }
        granted
    }
}

/// What one attempt's outcome calls for.
enum Verdict {
    Done(Items),
    /// Sign anew and try again at once.
    RetryNow,
    /// Back off and try again if the deadline allows; else fail so.
    RetryLater(Failure),
    /// A call the gateway added MsgSeqs to, refused with 10004: ask again without them.
    WithoutAdded,
    /// A merged call refused with 10004: find the offending MsgSeqs by halving.
    Split,
}

/// What a batch's attempts have spent, across its split halves.
struct Tally {
    /// The split calls this batch may still make to isolate a 10004.
    splits: AtomicU32,
    /// Upstream calls made.
    calls: AtomicU32,
    /// Calls made to isolate a 10004, not yet charged to anyone ([`Billing::Later`]).
    isolating: AtomicU32,
    /// The MsgSeqs the gateway added to the batch, which nobody asked for.
    added: Vec<MsgSeq>,
    /// How long the first call was on the wire (µs): upstream's part of the batch's
    /// delivery, answered or not.
    first_on_the_wire_us: AtomicU64,
    /// The request ids of the callers served, for each call's log line.
    served: Served,
}

/// Answers `seqs` of `group` with retries and splits, each attempt paid from the budget.
fn fetch<'a>(
    app: &'a Fetcher,
    group: &'a GroupId,
    seqs: Vec<MsgSeq>,
    window: Window,
    mut token: Token,
    tally: &'a Tally,
) -> Pin<Box<dyn Future<Output = Items> + Send + 'a>> {
    Box::pin(async move {
        let mut attempts = Attempts::new(app.max_retries);
        loop {
            if !token.take(app, window, tally).await {
                return fail(&seqs, Failure::NoBudget);
            }
            let first = tally.calls.fetch_add(1, Ordering::Relaxed) == 0;
            let (outcome, on_the_wire) = attempt(app, group, &seqs, &tally.served, attempts.retry_on()).await;
            if first {
                tally.first_on_the_wire_us.store(on_the_wire.as_micros() as u64, Ordering::Relaxed);
            }
            match judge(app, outcome, &seqs, tally, &mut attempts) {
                Verdict::Done(items) => return items,
                Verdict::RetryNow => {}
                Verdict::RetryLater(failure) => {
                    if !attempts.back_off(window.deadline, app.budget.interval()).await {
                        return fail(&seqs, failure);
                    }
                }
                Verdict::WithoutAdded => return without_added(app, group, seqs, window, tally).await,
                Verdict::Split => return split(app, group, seqs, window, tally).await,
            }
        }
    })
}

/// One upstream call, and how long it was on the wire; its latency feeds admission when
/// Tencent answered at all.
async fn attempt(
    app: &Fetcher,
    group: &GroupId,
    seqs: &[MsgSeq],
    served: &Served,
    retry_on: Option<Which>,
) -> (Outcome, Duration) {
    let sent = app.budget.before_send().await;
    let started = Instant::now();
    app.batch_size.observe(seqs.len() as f64);
    let outcome = app.upstream.get_receipts(group, seqs, served, sent, retry_on).await;
    let on_the_wire = started.elapsed();
    if !matches!(outcome, Outcome::NoAnswer { .. }) {
        app.engine.estimates().observe_latency(on_the_wire);
    }
    (outcome, on_the_wire)
}

/// Decides what an attempt's outcome calls for: the items, a group's answer or a 10004
/// here; the rest as for every API ([`Attempts::judge`]).
fn judge(app: &Fetcher, outcome: Outcome, seqs: &[MsgSeq], tally: &Tally, attempts: &mut Attempts) -> Verdict {
    let outcome = match attempts.judge(outcome, app.upstream.signer(), &app.budget) {
        Ok(Next::RetryNow) => return Verdict::RetryNow,
        Ok(Next::RetryLater(Trouble::Throttled)) => return Verdict::RetryLater(Failure::Throttled),
        Ok(Next::RetryLater(Trouble::Unavailable(reason))) => return Verdict::RetryLater(Failure::Unavailable(reason)),
        Ok(Next::Fail(reason)) => return Verdict::Done(fail(seqs, Failure::Unavailable(reason))),
        Err(outcome) => outcome,
    };
    let failure = match outcome {
        Outcome::Items(items) => return Verdict::Done(match_items(seqs, items)),
        Outcome::Group { code, info } => Failure::Group { code, info },
        // What the gateway added must never make a caller fail.
        Outcome::InvalidParameter { .. } if seqs.iter().any(|s| tally.added.contains(s)) => {
            return Verdict::WithoutAdded;
        }
        Outcome::InvalidParameter { info } if seqs.len() == 1 => {
            Failure::Rejected { code: ErrorCode::INVALID_PARAMETER, info }
        }
        Outcome::InvalidParameter { info } if !take_split(&tally.splits) => {
            Failure::Unisolated { info, part: seqs.into() }
        }
        // One caller's bad MsgSeq must not fail the others merged with it.
        Outcome::InvalidParameter { .. } => return Verdict::Split,
        // Judged by `Attempts::judge` above.
        other => Failure::Unavailable(format!("unexpected upstream outcome: {other:?}")),
    };
    Verdict::Done(fail(seqs, failure))
}

/// Asks again, with a token of its own, for the MsgSeqs of a call refused with 10004
/// that somebody wants; those the gateway added are left out ([`Failure::LeftOut`]).
async fn without_added(app: &Fetcher, group: &GroupId, seqs: Vec<MsgSeq>, window: Window, tally: &Tally) -> Items {
    let (added, wanted): (Vec<MsgSeq>, Vec<MsgSeq>) = seqs.into_iter().partition(|s| tally.added.contains(s));
    let mut items = fail(&added, Failure::LeftOut);
    if !wanted.is_empty() {
        items.extend(fetch(app, group, wanted, window, Token::Isolating, tally).await);
    }
    items
}

/// Halves a merged call refused with 10004 and fetches both halves, each with a token
/// of its own. Sorted first: MsgSeqs past a group's last message, the usual refusal,
/// then end up together, and the number of calls does not depend on arrival order.
async fn split(app: &Fetcher, group: &GroupId, mut left: Vec<MsgSeq>, window: Window, tally: &Tally) -> Items {
    left.sort_unstable();
    let right = left.split_off(left.len() / 2);
    let (mut a, b) = tokio::join!(
        fetch(app, group, left, window, Token::Isolating, tally),
        fetch(app, group, right, window, Token::Isolating, tally)
    );
    a.extend(b);
    a
}

/// The MsgSeqs Tencent refused on their own, with what it said.
fn refused(items: &Items) -> Vec<(MsgSeq, String)> {
    let refused = |(seq, r): &(MsgSeq, Result<Receipt, Failure>)| match r {
        Err(Failure::Rejected { info, .. }) => Some((*seq, info.clone())),
        _ => None,
    };
    items.iter().filter_map(refused).collect()
}

/// Charges the `calls` made to isolate a 10004 to the clients that sent the MsgSeqs
/// Tencent refused (evenly), or, if none is known here (another replica's, or the 10004
/// was never narrowed down), to the client the batch was dispatched for.
fn bill_isolation(engine: &Engine, batch: &Dispatch, refused: &[(MsgSeq, String)], calls: u32) {
    if calls == 0 {
        return;
    }
    let mut culprits: Vec<ClientSlot> = Vec::new();
    for (seq, client) in &batch.askers {
        if refused.iter().any(|(s, _)| s == seq) && !culprits.contains(client) {
            culprits.push(*client);
        }
    }
    if culprits.is_empty() {
        culprits.push(batch.window.client);
    }
    let n = culprits.len() as u32;
    for (i, client) in culprits.into_iter().enumerate() {
        engine.bill(client, calls / n + u32::from((i as u32) < calls % n));
    }
}

fn fail(seqs: &[MsgSeq], failure: Failure) -> Items {
    seqs.iter().map(|&s| (s, Err(failure.clone()))).collect()
}

/// How many split calls a batch of `n` MsgSeqs may spend isolating 10004s: enough to
/// find two bad MsgSeqs by halving (two calls per level), not the `2n - 2` it would take
/// when Tencent's 10004 is about the whole call (a GroupId it refuses, say) and every
/// half fails again.
fn split_allowance(n: usize) -> u32 {
    let levels = usize::BITS - n.saturating_sub(1).leading_zeros();
    4 * levels
}

/// Takes one split (two calls) from the allowance, if it has one.
fn take_split(splits: &AtomicU32) -> bool {
    splits.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(2)).is_ok()
}

/// One result per MsgSeq asked for; a MsgSeq Tencent left out is a failure, not a guess.
fn match_items(seqs: &[MsgSeq], mut items: Vec<(MsgSeq, Receipt)>) -> Items {
    items.sort_unstable_by_key(|(s, _)| *s);
    seqs.iter()
        .map(|&seq| {
            let found = items.binary_search_by_key(&seq, |(s, _)| *s).ok().map(|i| items[i].1);
            (seq, found.ok_or_else(|| Failure::Unavailable(format!("upstream answer omitted MsgSeq {}", seq.0))))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_allowance_finds_two_bad_msgseqs_by_halving() {
        assert_eq!(split_allowance(1), 0);
        assert_eq!(split_allowance(2), 4);
        assert_eq!(split_allowance(50), 24);
        let splits = AtomicU32::new(split_allowance(2));
        assert!(take_split(&splits) && take_split(&splits) && !take_split(&splits));
    }
}
