//! One (app, API)'s engine: the tables the stages share, under one short-held lock, and
//! the operations the request path, the dispatcher and the batch tasks call.
//!
//! The tables are the in-flight table ([`inflight`]) and the queue of open batches and
//! permits ([`queue`]); they change together (a caller joining a batch may move it up
//! the queue: [`join`]), so one lock keeps them consistent.
//! It is never held across an `.await`. The admission estimators are atomics, read
//! without it; what Tencent refused ([`refusals`]) has a lock of its own, which the
//! request path takes without the tables' (the dispatcher takes it after them). Each
//! operation here is a short composition of the stages: [`Engine::join`] is where a
//! caller is admitted or refused, on [`admission`]'s forecast.
//!
//! Layout: [`inflight`] (which batch carries each key), [`batch`] (batches and their
//! outcomes), [`admission`] (will an answer make the deadline?), [`queue`] (the fair,
//! deadline-ordered queue; [`fair`]: who pays for each call; `topup`: what a leaving
//! batch carries besides its callers' MsgSeqs), [`join`] (placing a caller's misses),
//! [`dispatcher`] (the task spending the budget's tokens), [`refusals`] (the MsgSeqs
//! Tencent refused lately), and [`flights`] (single flight for answers fetched whole).
//!
//! May import: `cache`, `budget`, `clients`, `tencent`. Imported by `fleet`, `upstream`
//! and `service`; it never calls upstream itself: a dispatched batch is handed to whoever
//! the dispatcher was given (`upstream::fetch` in the gateway, a stand-in in tests).
//!
//! Invariant: a key is in at most one batch at a time, so never two fetches are in flight
//! for it; a token is spent only on work somebody can still use.

pub mod admission;
pub mod batch;
pub mod dispatcher;
pub mod fair;
pub mod flights;
pub mod inflight;
mod join;
pub mod queue;
pub mod refusals;
mod topup;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::Histogram;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::budget::Estimate;
use crate::cache::Page;
use crate::clients::ClientSlot;
use crate::tencent::domain::{GroupId, MsgSeq};
use admission::Estimators;
use batch::{BatchPolicy, Caller, Dispatch, Joined, Parked, Waiter};
use inflight::Groups;
use queue::{Billing, Job, Next, Queue, Share};
use refusals::{Refusal, Refusals};

/// What the lock guards.
struct Tables {
    groups: Groups,
    queue: Queue,
    /// Under the lock too, so that a reload changes it between two operations.
    policy: BatchPolicy,
}

/// A caller's misses for one group, to put in flight.
pub struct Ask<'a> {
    pub group: &'a GroupId,
    /// The group's cache page the caller looked at, if any (kept for cohort top-ups).
    pub page: Option<&'a Arc<Page>>,
    /// Distinct MsgSeqs.
    pub misses: &'a [MsgSeq],
    /// When the caller looked in the cache (None for `no-cache`): an item a batch fetched
    /// since then is taken from the page instead of fetched again.
    pub fetched_since: Option<Instant>,
    pub deadline: Instant,
    /// The caller's client: its line in the queue and its share of the budget.
    pub client: ClientSlot,
    /// The caller's request id, for the log line of the call that serves it.
    pub request: &'a str,
}

/// The queue ahead is too long to serve this request before its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded {
    /// When the queue will have drained enough to serve a new request.
    pub retry_after: Duration,
}

pub struct Engine {
    tables: Mutex<Tables>,
    wake: Notify,
    estimates: Estimators,
    refusals: Mutex<Refusals>,
    /// Whether `refusals` holds anything: most requests need not take its lock.
    refusing: AtomicBool,
}

impl Engine {
    pub fn new(policy: BatchPolicy) -> Self {
        Self {
            tables: Mutex::new(Tables { groups: Groups::default(), queue: Queue::default(), policy }),
            wake: Notify::new(),
            estimates: Estimators::new(policy.upstream_timeout),
            refusals: Mutex::new(Refusals::default()),
            refusing: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // The tables stay consistent between statements, so a panic elsewhere while they
        // were held leaves nothing half-done worth refusing service over.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Taken after the tables' lock when both are needed, never before.
    fn refusals(&self) -> MutexGuard<'_, Refusals> {
        // As for the tables: every critical section leaves the map consistent.
        self.refusals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first of `seqs` of `group` that Tencent refused lately: a request for it is
    /// refused at once, without a call (docs/design.md#msgseqs-tencent-refuses).
    pub fn refused(&self, group: &GroupId, seqs: &[MsgSeq]) -> Option<Refusal> {
        if !self.refusing.load(Ordering::Relaxed) {
            return None;
        }
        let mut refusals = self.refusals();
        let found = refusals.check(group, seqs, Instant::now());
        self.refusing.store(!refusals.is_empty(), Ordering::Relaxed);
        found
    }

    /// Which of `seqs` of `group` Tencent refused lately (none is added to a call).
    pub fn refused_among(&self, group: &GroupId, seqs: &[MsgSeq]) -> Vec<MsgSeq> {
        if !self.refusing.load(Ordering::Relaxed) || seqs.is_empty() {
            return Vec::new();
        }
        let refusals = self.refusals();
        let Some(refused) = refusals.of(group) else { return Vec::new() };
        let now = Instant::now();
        seqs.iter().copied().filter(|&s| refused.refuses(s, now)).collect()
    }

    /// Tencent refused each of `refused` of `group` on its own (with its ErrorInfo);
    /// `known` is the highest MsgSeq the group is known to hold, `near` how long a refusal
    /// close to it is believed ([`refusals`]).
    pub fn remember_refused(
        &self,
        group: &GroupId,
        refused: &[(MsgSeq, String)],
        known: Option<MsgSeq>,
        near: Duration,
    ) {
        if refused.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut refusals = self.refusals();
        for (seq, info) in refused {
            refusals.remember(group, *seq, info, known, near, now);
        }
        self.refusing.store(!refusals.is_empty(), Ordering::Relaxed);
    }

    /// Wakes the dispatcher if the queue says work appeared, after the lock is released.
    fn release(&self, mut tables: MutexGuard<'_, Tables>) {
        let wake = tables.queue.take_wake();
        drop(tables);
        if wake {
            self.wake.notify_one();
        }
    }

    pub fn estimates(&self) -> &Estimators {
        &self.estimates
    }

    /// The batch policy now (a reload may change it: [`Engine::set_policy`]).
    pub fn policy(&self) -> BatchPolicy {
        self.lock().policy
    }

    /// A reloaded batch policy (window, max_seqs, TTL): open batches keep the window they
    /// opened with; what joins or leaves from now on follows the new one. The upstream
    /// timeout stays (it is not reloaded).
    pub fn set_policy(&self, policy: BatchPolicy) {
        let mut tables = self.lock();
        tables.policy = BatchPolicy { upstream_timeout: tables.policy.upstream_timeout, ..policy };
        self.release(tables);
        self.wake.notify_one();
    }

    /// Puts `ask.misses` in flight, joining batches that already carry them. Refuses when
    /// the queue cannot reach this caller's batches before its deadline, given the
    /// budget's `pace`; the refused caller's misses still ride along, without a caller
    /// ([`join::park`]), so under pressure calls
    /// carry as much as they can and the next caller finds more of the group cached.
    pub fn join(&self, ask: Ask<'_>, pace: Estimate) -> Result<Vec<(MsgSeq, Waiter, Joined)>, Overloaded> {
        let now = Instant::now();
        let forecast = self.estimates.forecast(pace);
        let mut tables = self.lock();
        let Tables { groups, queue, policy } = &mut *tables;
        let g = groups.enter(ask.group, ask.page);
        let (mut joined, misses) = g.answered_meanwhile(ask.misses, ask.fetched_since, now);
        let expected = queue
            .ahead_of(g, &misses, ask.deadline, policy.max_seqs, ask.client)
            .map(|ahead| admission::expected_answer(now, ahead, forecast, policy.window));
        if expected.is_some_and(|at| at > ask.deadline) {
            let parked = Parked { client: ask.client, expires: now + policy.background_lifetime() };
            join::park(g, queue, ask.group, &misses, parked, now, policy);
            let retry_after = admission::retry_after(forecast, queue.queued_for(ask.client));
            groups.forget_if_idle(ask.group);
            self.release(tables);
            return Err(Overloaded { retry_after });
        }
        let caller = Caller { deadline: ask.deadline, client: ask.client };
        for &seq in &misses {
            joined.extend(join::join(g, queue, ask.group, seq, (caller, ask.request), now, policy));
        }
        self.release(tables);
        Ok(joined)
    }

    /// The clients' shares of the budget, by slot (at start and on reload).
    pub fn set_shares(&self, shares: Vec<Share>) {
        self.lock().queue.set_shares(shares);
    }

    /// Queues a request for one token (a retry, or a call isolating a MsgSeq Tencent
    /// refuses) in the line of the `client` its batch was dispatched for, ordered by
    /// `urgency` (its batch's earliest caller) like batches are; charged to `client` when
    /// granted, or with [`Billing::Later`] to whom [`Engine::bill`] names.
    pub fn permit(&self, urgency: Instant, client: ClientSlot, billing: Billing) -> oneshot::Receiver<()> {
        let mut tables = self.lock();
        let permit = tables.queue.permit(urgency, client, Instant::now(), billing);
        self.release(tables);
        permit
    }

    /// Charges `client`'s share with `calls` granted with [`Billing::Later`].
    pub fn bill(&self, client: ClientSlot, calls: u32) {
        self.lock().queue.bill(client, calls);
    }

    /// Admits one call of `client` that must be answered by `deadline` and queues its
    /// token (the detail API: one call per request, no batches). Refused, with a truthful
    /// `Retry-After`, when the queue cannot reach it before the deadline.
    pub fn admit_permit(
        &self,
        deadline: Instant,
        client: ClientSlot,
        pace: Estimate,
    ) -> Result<oneshot::Receiver<()>, Overloaded> {
        let now = Instant::now();
        let forecast = self.estimates.forecast(pace);
        let mut tables = self.lock();
        let ahead = tables.queue.permit_ahead(client, deadline);
        if admission::expected_answer(now, ahead, forecast, Duration::ZERO) > deadline {
            let retry_after = admission::retry_after(forecast, tables.queue.queued_for(client));
            self.release(tables);
            return Err(Overloaded { retry_after });
        }
        let permit = tables.queue.permit(deadline, client, now, Billing::Now);
        self.release(tables);
        Ok(permit)
    }

    /// A dispatched batch has its answer: take its keys out of flight. Call after the
    /// answers are in the cache (`page`), so no request can slip between the two and
    /// fetch a key again.
    pub fn complete(&self, batch: &Dispatch, page: &Arc<Page>) {
        self.lock().groups.release(&batch.group, batch.id, &batch.seqs, Some(page));
    }

    /// `seqs` joined dispatched `batch` on its way out (other replicas' misses, from the
    /// fleet tier): they are in flight with it, so no caller here fetches them again.
    pub fn carry(&self, batch: &Dispatch, seqs: &[MsgSeq]) {
        let mut tables = self.lock();
        let g = tables.groups.enter(&batch.group, None);
        for &seq in seqs {
            if g.carrier(seq).is_none() {
                g.carry(seq, batch.id, batch.outcome.subscribe());
            }
        }
    }

    /// Which of `seqs` of `group` wait in a batch that had not left in time for a caller
    /// with `deadline` (still queued, or sent for a later caller too late for an answer to
    /// reach this one): at the deadline, these were refused by the budget (429), not late
    /// upstream (504).
    pub fn unsent(&self, group: &GroupId, seqs: &[MsgSeq], deadline: Instant) -> Vec<MsgSeq> {
        // The dispatcher's own rule for a batch that can still make a deadline.
        let latest_useful = deadline.checked_sub(self.estimates.reach()).unwrap_or(deadline);
        let mut tables = self.lock();
        let Tables { groups, queue, .. } = &mut *tables;
        let Some(g) = groups.get_mut(group) else { return Vec::new() };
        let late = |id| queue.is_open(id) || g.sent_at(id).is_some_and(|at| at > latest_useful);
        seqs.iter().copied().filter(|&s| g.carrier(s).is_some_and(late)).collect()
    }

    /// How long until the queue has drained at the budget's `pace`: a truthful
    /// `Retry-After` for a caller turned away now.
    pub fn backlog(&self, pace: Estimate) -> Duration {
        let queued = self.lock().queue.callers_queued();
        admission::retry_after(self.estimates.forecast(pace), queued)
    }

    /// Waits until some work is ready for a token. True if it was ready at once (the
    /// dispatcher kept busy, so the time between tokens measures the budget).
    /// `spare` says whether background batches may take a token now.
    /// Batches dropped unsent meanwhile are handed to `dropped`.
    pub(crate) async fn wait_for_ready_work(
        &self,
        spare: impl Fn() -> bool,
        dropped: &impl Fn(GroupId, Vec<MsgSeq>),
    ) -> bool {
        let mut at_once = true;
        loop {
            let (next, gone) = {
                let mut tables = self.lock();
                let Tables { groups, queue, policy } = &mut *tables;
                let next = queue.next(groups, Instant::now(), policy.max_seqs, self.estimates.reach(), spare());
                (next, queue.take_dropped())
            };
            for (group, seqs) in gone {
                dropped(group, seqs);
            }
            match next {
                Next::Ready => return at_once,
                Next::At(t) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                Next::Idle => {
                    self.estimates.forget_interval();
                    self.wake.notified().await;
                }
            }
            at_once = false;
        }
    }

    /// Takes the most urgent ready job off the queue, now that a token was granted.
    pub(crate) fn pop(&self, now: Instant, budget_wait: &Histogram, spare: bool) -> Option<Job> {
        let mut tables = self.lock();
        let Tables { groups, queue, policy } = &mut *tables;
        let refusals = self.refusals();
        queue.pop(groups, now, policy, self.estimates.reach(), budget_wait, spare, &refusals)
    }

    /// The batches dropped unsent since the last call.
    pub(crate) fn take_dropped(&self) -> Vec<(GroupId, Vec<MsgSeq>)> {
        self.lock().queue.take_dropped()
    }

    /// Counts of open batches, permits, and keys in flight (for tests and debugging).
    pub fn sizes(&self) -> (usize, usize, usize) {
        let tables = self.lock();
        let (open, permits) = tables.queue.sizes();
        (open, permits, tables.groups.inflight_len())
    }
}

#[cfg(test)]
mod tests;
