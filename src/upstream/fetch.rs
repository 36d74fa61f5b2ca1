//! Runs one dispatched batch to its end (docs/design.md#request-pipeline): the upstream call it
//! already paid for, retries and 10004 splits each paid for with a permit from the queue, the cache
//! filled, then every waiting caller woken with the shared outcome.
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
use crate::engine::Engine;
use crate::engine::admission;
use crate::engine::batch::{BatchOutcome, Dispatch, Failure, Items, Served, Window};
use crate::fleet::{self, SharedTier};
use crate::tencent::code::ErrorCode;
use crate::tencent::domain::AppId;
use crate::tencent::domain::{GroupId, MsgSeq, Receipt};
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
        splits: AtomicU32::new(split_allowance(batch.seqs.len())),
        calls: AtomicU32::new(0),
        first_on_the_wire_us: AtomicU64::new(0),
        served: batch.served.clone(),
    };
    let mut items = fetch(&app, &batch.group, batch.seqs.clone(), batch.window, Token::Paid, &tally).await;
    settle_unisolated(&mut items);
    let first_call = tally.calls.into_inner() == 1;
    let upstream = Duration::from_micros(tally.first_on_the_wire_us.into_inner());
    let outcome =
        Arc::new(BatchOutcome { started, first_call, upstream, ..BatchOutcome::settled(items, Instant::now()) });
    let page = store(&app, &batch.group, &outcome.items, (started, outcome.fetched_at)).await;
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
    let taken = match tokio::time::timeout(spare, &mut take).await {
        Ok(Ok(Ok(taken))) => taken,
        Ok(Ok(Err(e))) => return tracing::debug!(error = %e, "fleet: wanted MsgSeqs not taken"),
        Ok(Err(_)) => return,
        Err(_) => {
            // The call leaves without them, but Redis may have run the script: whatever it
            // took is claimed for this replica, so give it back when the answer comes.
            let (fleet, id, group, own) = (tier.fleet.clone(), app.id, batch.group.clone(), batch.seqs.clone());
            tokio::spawn(async move {
                if let Ok(Ok(taken)) = take.await {
                    let extra: Vec<MsgSeq> = taken.into_iter().filter(|s| !own.contains(s)).collect();
                    fleet.release(id, &group, &extra, lifetimes).await;
                }
            });
            return tracing::debug!("fleet: Redis too slow for this call's slack; wanted MsgSeqs left for the next");
        }
    };
    let extra: Vec<MsgSeq> = taken.into_iter().filter(|s| !batch.seqs.contains(s)).take(room).collect();
    app.engine.carry(batch, &extra);
    batch.seqs.extend(extra);
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
/// queue for one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Token {
    Paid,
    Owed,
}

impl Token {
    /// Gets the token for the next attempt; false if the deadline came first.
    async fn take(&mut self, app: &Fetcher, window: Window) -> bool {
        if std::mem::replace(self, Token::Owed) == Token::Paid {
            return true;
        }
        let permit = app.engine.permit(window.urgency, window.client);
        matches!(tokio::time::timeout_at(window.deadline, permit).await, Ok(Ok(())))
    }
}

/// What one attempt's outcome calls for.
enum Verdict {
    Done(Items),
    /// Sign anew and try again at once.
    RetryNow,
    /// Back off and try again if the deadline allows; else fail so.
    RetryLater(Failure),
    /// A merged call refused with 10004: find the offending MsgSeqs by halving.
    Split,
}

/// What a batch's attempts have spent, across its split halves.
struct Tally {
    /// The split calls this batch may still make to isolate a 10004.
    splits: AtomicU32,
    /// Upstream calls made.
    calls: AtomicU32,
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
            if !token.take(app, window).await {
                return fail(&seqs, Failure::NoBudget);
            }
            let first = tally.calls.fetch_add(1, Ordering::Relaxed) == 0;
            let (outcome, on_the_wire) = attempt(app, group, &seqs, &tally.served).await;
            if first {
                tally.first_on_the_wire_us.store(on_the_wire.as_micros() as u64, Ordering::Relaxed);
            }
            match judge(app, outcome, &seqs, &tally.splits, &mut attempts) {
                Verdict::Done(items) => return items,
                Verdict::RetryNow => {}
                Verdict::RetryLater(failure) => {
                    if !attempts.back_off(window.deadline, app.budget.interval()).await {
                        return fail(&seqs, failure);
                    }
                }
                Verdict::Split => return split(app, group, seqs, window, tally).await,
            }
        }
    })
}

/// One upstream call, and how long it was on the wire; its latency feeds admission when
/// Tencent answered at all.
async fn attempt(app: &Fetcher, group: &GroupId, seqs: &[MsgSeq], served: &Served) -> (Outcome, Duration) {
    app.budget.before_send().await;
    let started = Instant::now();
    app.batch_size.observe(seqs.len() as f64);
    let outcome = app.upstream.get_receipts(group, seqs, served).await;
    let on_the_wire = started.elapsed();
    if !matches!(outcome, Outcome::NoAnswer { .. }) {
        app.engine.estimates().observe_latency(on_the_wire);
    }
    (outcome, on_the_wire)
}

/// Decides what an attempt's outcome calls for: the items, a group's answer or a 10004
/// here; the rest as for every API ([`Attempts::judge`]).
fn judge(app: &Fetcher, outcome: Outcome, seqs: &[MsgSeq], splits: &AtomicU32, attempts: &mut Attempts) -> Verdict {
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
        Outcome::InvalidParameter { info } if seqs.len() == 1 => {
            Failure::Rejected { code: ErrorCode::INVALID_PARAMETER, info }
        }
        Outcome::InvalidParameter { info } if !take_split(splits) => Failure::Unisolated { info },
        // One caller's bad MsgSeq must not fail the others merged with it.
        Outcome::InvalidParameter { .. } => return Verdict::Split,
        // Judged by `Attempts::judge` above.
        other => Failure::Unavailable(format!("unexpected upstream outcome: {other:?}")),
    };
    Verdict::Done(fail(seqs, failure))
}

/// Halves a merged call refused with 10004 and fetches both halves, each with a token
/// of its own.
async fn split(app: &Fetcher, group: &GroupId, mut left: Vec<MsgSeq>, window: Window, tally: &Tally) -> Items {
    let right = left.split_off(left.len() / 2);
    let (mut a, b) = tokio::join!(
        fetch(app, group, left, window, Token::Owed, tally),
        fetch(app, group, right, window, Token::Owed, tally)
    );
    a.extend(b);
    a
}

fn fail(seqs: &[MsgSeq], failure: Failure) -> Items {
    seqs.iter().map(|&s| (s, Err(failure.clone()))).collect()
}

/// What callers see of a 10004 the split allowance could not narrow down. If nothing in
/// the batch got an answer, the 10004 is about the whole call (its group, say): Tencent's
/// error, passed through. If other parts of it did, the unresolved parts may hold
/// innocent MsgSeqs, which must not be told their input was wrong: an upstream failure.
fn settle_unisolated(items: &mut Items) {
    let all_refused =
        items.iter().all(|(_, r)| matches!(r, Err(Failure::Rejected { .. } | Failure::Unisolated { .. })));
    for (_, result) in items.iter_mut() {
        if let Err(Failure::Unisolated { info }) = result {
            *result = Err(if all_refused {
                Failure::Rejected { code: ErrorCode::INVALID_PARAMETER, info: std::mem::take(info) }
            } else {
                Failure::Unavailable(format!(
                    "upstream refused a merged call with 10004 ({info}) and it could not be narrowed down"
                ))
            });
        }
    }
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

    #[test]
    fn an_unisolated_10004_is_tencents_answer_only_when_nothing_in_the_batch_succeeded() {
        let unisolated = || Err(Failure::Unisolated { info: "bad".into() });
        let mut whole: Items = vec![(MsgSeq(1), unisolated()), (MsgSeq(2), unisolated())];
        settle_unisolated(&mut whole);
        assert!(
            whole.iter().all(|(_, r)| matches!(r, Err(Failure::Rejected { code: ErrorCode::INVALID_PARAMETER, .. })))
        );

        let ok = Receipt { code: ErrorCode::OK, read: Some(1), unread: Some(1) };
        let mut partial: Items = vec![(MsgSeq(1), unisolated()), (MsgSeq(2), Ok(ok))];
        settle_unisolated(&mut partial);
        assert!(matches!(partial[0].1, Err(Failure::Unavailable(_))));
        assert_eq!(partial[1].1, Ok(ok));
    }
}
