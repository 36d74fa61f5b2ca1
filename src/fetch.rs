//! Runs one dispatched batch to its end (SPEC 5.2–5.4): the upstream call it already
//! paid for, retries and 10004 splits each paid for with a permit from the queue, the
//! cache filled, then every waiting caller woken with the shared outcome.
//!
//! A batch runs in its own task, owned by nobody's request: a caller that goes away
//! cannot cancel a call others are waiting on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::admission;
use crate::app::{AppRuntime, SharedTier};
use crate::batch::{BatchOutcome, Dispatch, Failure, Items, Served, Window};
use crate::cache::{GroupAnswer, Page};
use crate::code::ErrorCode;
use crate::domain::{GroupId, MsgSeq, Receipt};
use crate::fleet;
use crate::upstream::Outcome;

/// First retry delay; doubled per attempt, with jitter, capped at `BACKOFF_MAX`.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The delay before retry number `retries + 1`: exponential from [`BACKOFF_BASE`],
/// capped at [`BACKOFF_MAX`], with jitter (half to all of it).
pub(crate) fn backoff(retries: u32) -> Duration {
    let full = BACKOFF_BASE.saturating_mul(1 << retries.min(16)).min(BACKOFF_MAX);
    full.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// Runs a dispatched batch: fetch, fill the cache, release the keys, wake the callers;
/// with the fleet tier, the call first takes what other replicas wait for, and its
/// answer is shared with them last.
pub async fn run(app: Arc<AppRuntime>, mut batch: Dispatch) {
    // From the dispatcher's decision: the task's start is part of the delivery, and a
    // `no-cache` caller counts the call as no later than this.
    let started = batch.dispatched;
    if let Some(tier) = &app.fleet {
        take_wanted(&app, tier, &mut batch).await;
    }
    let tally = Tally {
        splits: AtomicU32::new(split_allowance(batch.seqs.len())),
        calls: AtomicU32::new(0),
        served: batch.served.clone(),
    };
    let mut items = fetch(&app, &batch.group, batch.seqs.clone(), batch.window, Token::Paid, &tally).await;
    settle_unisolated(&mut items);
    let first_call = tally.calls.into_inner() == 1;
    let outcome = Arc::new(BatchOutcome { started, first_call, ..BatchOutcome::settled(items, Instant::now()) });
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

/// Tops the call up with MsgSeqs other replicas wait for (SPEC 5.6), as far as
/// `batch.max_seqs` allows; they are in flight with this batch from now on.
async fn take_wanted(app: &AppRuntime, tier: &SharedTier, batch: &mut Dispatch) {
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
async fn store(app: &AppRuntime, group: &GroupId, items: &Items, (sent, fetched_at): (Instant, Instant)) -> Arc<Page> {
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
    async fn take(&mut self, app: &AppRuntime, window: Window) -> bool {
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
    /// The request ids of the callers served, for each call's log line.
    served: Served,
}

/// The retries of one call and its halves' own.
struct Attempts {
    retries: u32,
    resigned: bool,
}

/// Answers `seqs` of `group` with retries and splits, each attempt paid from the budget.
fn fetch<'a>(
    app: &'a AppRuntime,
    group: &'a GroupId,
    seqs: Vec<MsgSeq>,
    window: Window,
    mut token: Token,
    tally: &'a Tally,
) -> Pin<Box<dyn Future<Output = Items> + Send + 'a>> {
    Box::pin(async move {
        let mut attempts = Attempts { retries: 0, resigned: false };
        loop {
            if !token.take(app, window).await {
                return fail(&seqs, Failure::NoBudget);
            }
            tally.calls.fetch_add(1, Ordering::Relaxed);
            let outcome = attempt(app, group, &seqs, &tally.served).await;
            match judge(app, outcome, &seqs, &tally.splits, &mut attempts) {
                Verdict::Done(items) => return items,
                Verdict::RetryNow => {}
                Verdict::RetryLater(failure) => {
                    if !attempts.back_off(app, window.deadline).await {
                        return fail(&seqs, failure);
                    }
                }
                Verdict::Split => return split(app, group, seqs, window, tally).await,
            }
        }
    })
}

/// One upstream call; its latency feeds admission when Tencent answered at all.
async fn attempt(app: &AppRuntime, group: &GroupId, seqs: &[MsgSeq], served: &Served) -> Outcome {
    let sent = app.budget.before_send().await;
    let started = Instant::now();
    app.batch_size.observe(seqs.len() as f64);
    let outcome = app.upstream.get_receipts(group, seqs, served, sent).await;
    if !matches!(outcome, Outcome::NoAnswer { .. }) {
        app.engine.estimates().observe_latency(started.elapsed());
    }
    outcome
}

/// Decides what an attempt's outcome calls for (SPEC 5.3, 5.4).
fn judge(app: &AppRuntime, outcome: Outcome, seqs: &[MsgSeq], splits: &AtomicU32, attempts: &mut Attempts) -> Verdict {
    let failure = match outcome {
        Outcome::Items(items) => return Verdict::Done(match_items(seqs, items)),
        Outcome::Group { code, info } => Failure::Group { code, info },
        Outcome::InvalidParameter { info } if seqs.len() == 1 => {
            Failure::Rejected { code: ErrorCode::INVALID_PARAMETER, info }
        }
        Outcome::InvalidParameter { info } if !take_split(splits) => Failure::Unisolated { info },
        // One caller's bad MsgSeq must not fail the others merged with it.
        Outcome::InvalidParameter { .. } => return Verdict::Split,
        Outcome::UserSigExpired if !std::mem::replace(&mut attempts.resigned, true) => {
            if app.upstream.signer().renew_after_expiry() {
                return Verdict::RetryNow;
            }
            Failure::Unavailable("upstream rejected the UserSig as expired; signing is locked (70050)".into())
        }
        Outcome::UserSigExpired => Failure::Unavailable("upstream rejected the UserSig as expired".into()),
        Outcome::SigningLocked => {
            app.upstream.signer().lock_out();
            Failure::Unavailable("upstream locked signing after repeated failures (70050)".into())
        }
        Outcome::Final { code, info } => {
            Failure::Unavailable(format!("upstream refused the call (ErrorCode {code}): {info}"))
        }
        Outcome::Throttled { code } => {
            app.budget.throttled();
            tracing::debug!(%code, "upstream throttled");
            return Verdict::RetryLater(Failure::Throttled);
        }
        Outcome::Retryable { reason } | Outcome::NoAnswer { reason } => {
            return Verdict::RetryLater(Failure::Unavailable(reason));
        }
    };
    Verdict::Done(fail(seqs, failure))
}

/// Halves a merged call refused with 10004 and fetches both halves, each with a token
/// of its own.
async fn split(app: &AppRuntime, group: &GroupId, mut left: Vec<MsgSeq>, window: Window, tally: &Tally) -> Items {
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

impl Attempts {
    /// Sleeps an exponential, jittered backoff if another attempt still fits the
    /// deadline and `upstream.max_retries` allows one.
    async fn back_off(&mut self, app: &AppRuntime, deadline: Instant) -> bool {
        if self.retries >= app.max_retries {
            return false;
        }
        let backoff = backoff(self.retries);
        if Instant::now() + backoff + app.budget.interval() >= deadline {
            return false;
        }
        self.retries += 1;
        tokio::time::sleep(backoff).await;
        true
    }
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
