//! Runs one dispatched batch to its end (SPEC 5.2–5.4): the upstream call it already
//! paid for, retries and 10004 splits each paid for with a permit from the queue, the
//! cache filled, then every waiting caller woken with the shared outcome.
//!
//! A batch runs in its own task, owned by nobody's request: a caller that goes away
//! cannot cancel a call others are waiting on.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::Histogram;

use crate::budget::Budget;
use crate::cache::{GroupAnswer, ReceiptCache};
use crate::coalesce::{BatchOutcome, Coalescer, Dispatch, Failure};
use crate::domain::{AppId, GroupId, MsgSeq, Receipt, Region};
use crate::metrics::AppMetrics;
use crate::upstream::{Outcome, Upstream};

/// First retry delay; doubled per attempt, with jitter, capped at `BACKOFF_MAX`.
const BACKOFF_BASE: Duration = Duration::from_millis(25);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After 70050, no signing-related retries for this long (SPEC 5.3).
const SIGNING_PAUSE: Duration = Duration::from_secs(60);

/// Everything the request path and the batches of one app share.
pub struct AppRuntime {
    pub id: AppId,
    pub region: Option<Region>,
    pub upstream: Upstream,
    pub coalescer: Arc<Coalescer>,
    pub budget: Arc<Budget>,
    pub cache: ReceiptCache,
    pub max_retries: u32,
    pub metrics: AppMetrics,
    pub batch_size: Histogram,
    signing_paused_until: Mutex<Option<Instant>>,
}

impl AppRuntime {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: AppId,
        region: Option<Region>,
        upstream: Upstream,
        coalescer: Arc<Coalescer>,
        budget: Arc<Budget>,
        cache: ReceiptCache,
        max_retries: u32,
        metrics: AppMetrics,
        batch_size: Histogram,
    ) -> Self {
        Self {
            id,
            region,
            upstream,
            coalescer,
            budget,
            cache,
            max_retries,
            metrics,
            batch_size,
            signing_paused_until: Mutex::new(None),
        }
    }

    fn signing_paused(&self) -> bool {
        self.signing_paused_until.lock().map(|p| p.is_some_and(|t| Instant::now() < t)).unwrap_or(false)
    }

    fn pause_signing(&self) {
        if let Ok(mut p) = self.signing_paused_until.lock() {
            *p = Some(Instant::now() + SIGNING_PAUSE);
        }
    }
}

type Items = Vec<(MsgSeq, Result<Receipt, Failure>)>;

/// Runs a dispatched batch: fetch, fill the cache, release the keys, wake the callers.
pub async fn run(app: Arc<AppRuntime>, batch: Dispatch) {
    let started = Instant::now();
    let window = Window { urgency: batch.urgency, deadline: batch.deadline };
    let splits = AtomicU32::new(split_allowance(batch.seqs.len()));
    let mut items = fetch(&app, &batch.group, batch.seqs.clone(), window, Paid::Yes, &splits).await;
    settle_unisolated(&mut items);
    let fetched_at = Instant::now();
    items.sort_unstable_by_key(|(s, _)| *s);
    let answers: Vec<(MsgSeq, Receipt)> = items.iter().filter_map(|(s, r)| Some((*s, *r.as_ref().ok()?))).collect();
    let page = app.cache.insert(app.id, &batch.group, &answers, fetched_at).await;
    if let Some((_, Err(Failure::Group { code: code @ (10010 | 10015), info }))) = items.first() {
        let answer = GroupAnswer { code: *code, info: info.clone(), fetched_at };
        app.cache.insert_group_answer(app.id, &batch.group, answer).await;
    }
    let outcome = BatchOutcome { started, fetched_at, items };
    app.coalescer.complete(&batch, &page);
    let _ = batch.tx.send(Some(Arc::new(outcome)));
}

/// When a batch's retries are due: they queue by its earliest caller's deadline and stop
/// at its latest.
#[derive(Clone, Copy)]
struct Window {
    urgency: Instant,
    deadline: Instant,
}

/// Whether the first attempt already has its token (a dispatched batch) or must ask.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Paid {
    Yes,
    No,
}

/// Answers `seqs` of `group` with retries and splits, each attempt paid from the budget.
///
/// `splits` counts the split calls this batch may still make to isolate a 10004.
fn fetch<'a>(
    app: &'a AppRuntime,
    group: &'a GroupId,
    seqs: Vec<MsgSeq>,
    window: Window,
    paid: Paid,
    splits: &'a AtomicU32,
) -> Pin<Box<dyn Future<Output = Items> + Send + 'a>> {
    Box::pin(async move {
        let fail = |seqs: &[MsgSeq], f: Failure| seqs.iter().map(|&s| (s, Err(f.clone()))).collect::<Items>();
        let mut retries = 0;
        let mut resigned = false;
        let mut paid = paid;
        loop {
            if paid == Paid::No && !wait_for_token(app, window).await {
                return fail(&seqs, Failure::NoBudget);
            }
            paid = Paid::No;
            let started = Instant::now();
            app.batch_size.observe(seqs.len() as f64);
            let outcome = app.upstream.get_receipts(group, &seqs).await;
            if !matches!(outcome, Outcome::NoAnswer { .. }) {
                app.coalescer.observe_latency(started.elapsed());
            }
            let failure = match outcome {
                Outcome::Items(items) => return match_items(&seqs, items),
                Outcome::Group { code, info } => return fail(&seqs, Failure::Group { code, info }),
                Outcome::InvalidParameter { info } if seqs.len() == 1 => {
                    return fail(&seqs, Failure::Rejected { code: 10004, info });
                }
                Outcome::InvalidParameter { info } if !take_split(splits) => {
                    return fail(&seqs, Failure::Unisolated { info });
                }
                Outcome::InvalidParameter { .. } => {
                    // One caller's bad MsgSeq must not fail the others merged with it.
                    let mut left = seqs;
                    let right = left.split_off(left.len() / 2);
                    let (mut a, b) = tokio::join!(
                        fetch(app, group, left, window, Paid::No, splits),
                        fetch(app, group, right, window, Paid::No, splits)
                    );
                    a.extend(b);
                    return a;
                }
                Outcome::UserSigExpired if !resigned && !app.signing_paused() => {
                    resigned = true;
                    app.upstream.resign();
                    continue;
                }
                Outcome::UserSigExpired => Failure::Unavailable("upstream rejected the UserSig as expired".into()),
                Outcome::SigningLocked => {
                    app.pause_signing();
                    Failure::Unavailable("upstream locked signing after repeated failures (70050)".into())
                }
                Outcome::Final { code, info } => {
                    Failure::Unavailable(format!("upstream refused the call (ErrorCode {code}): {info}"))
                }
                Outcome::Throttled { code } => {
                    app.budget.throttled();
                    if retry_later(app, &mut retries, window.deadline).await {
                        continue;
                    }
                    tracing::debug!(code, "throttled until the deadline");
                    Failure::Throttled
                }
                Outcome::Retryable { reason } | Outcome::NoAnswer { reason } => {
                    if retry_later(app, &mut retries, window.deadline).await {
                        continue;
                    }
                    Failure::Unavailable(reason)
                }
            };
            return fail(&seqs, failure);
        }
    })
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
                Failure::Rejected { code: 10004, info: std::mem::take(info) }
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

/// Sleeps an exponential, jittered backoff if another attempt still fits the deadline.
async fn retry_later(app: &AppRuntime, retries: &mut u32, deadline: Instant) -> bool {
    if *retries >= app.max_retries {
        return false;
    }
    let full = BACKOFF_BASE.saturating_mul(1 << (*retries).min(16)).min(BACKOFF_MAX);
    let backoff = full.mul_f64(0.5 + rand::random::<f64>() / 2.0);
    if Instant::now() + backoff + app.budget.interval() >= deadline {
        return false;
    }
    *retries += 1;
    tokio::time::sleep(backoff).await;
    true
}

/// Waits in the queue for a token; false if the deadline came first.
async fn wait_for_token(app: &AppRuntime, window: Window) -> bool {
    let permit = app.coalescer.permit(window.urgency);
    matches!(tokio::time::timeout_at(window.deadline.into(), permit).await, Ok(Ok(())))
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
        assert!(whole.iter().all(|(_, r)| matches!(r, Err(Failure::Rejected { code: 10004, .. }))));

        let ok = Receipt { code: 0, read: Some(1), unread: Some(1) };
        let mut partial: Items = vec![(MsgSeq(1), unisolated()), (MsgSeq(2), Ok(ok))];
        settle_unisolated(&mut partial);
        assert!(matches!(partial[0].1, Err(Failure::Unavailable(_))));
        assert_eq!(partial[1].1, Ok(ok));
    }
}
