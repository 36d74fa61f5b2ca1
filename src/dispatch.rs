//! The queue that spends one (app, API)'s budget (SPEC 5.3), and its dispatcher.
//!
//! It owns the open batches and the retry permits (a retry or a split half of a
//! dispatched batch asking for one more token), in one order: callers' work by the
//! earliest deadline it serves, then background batches by expiry. The dispatcher takes
//! one token from the [`Budget`] at a time and spends it on the first ready entry. When a
//! batch leaves, it is topped up with its group's cohort: cached messages read lately that
//! expire within half a TTL, so the group refreshes in one call per TTL.
//!
//! Invariants: a token is spent only on work somebody can still use — a batch whose
//! callers' deadlines would pass before an answer could arrive, or a permit whose retry
//! gave up, leaves the queue unpaid — and background batches take only budget no
//! caller's work is waiting for, not even a batch still filling.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use prometheus::Histogram;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::batch::{BatchId, BatchKind, BatchPolicy, Dispatch, Neighbourhood, OpenBatch, Waiter, Window};
use crate::budget::Budget;
use crate::domain::{GroupId, MsgSeq};
use crate::engine::Engine;
use crate::inflight::{GroupState, Groups};

/// While the shared budget is contended, how often the dispatcher looks again whether
/// background batches may go.
const CONTENTION_RECHECK: Duration = Duration::from_millis(100);

/// A retry permit's identity (a space of its own, apart from batches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PermitId(u64);

/// Callers' work comes before background batches, whatever their times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Lane {
    Callers,
    Background,
}

/// Batches and permits draw their ids from one counter, so at equal times work queues in
/// the order it was created, whatever its kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    Batch(BatchId),
    Permit(PermitId),
}

impl Work {
    fn created(self) -> u64 {
        match self {
            Work::Batch(BatchId(n)) | Work::Permit(PermitId(n)) => n,
        }
    }
}

impl Ord for Work {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.created().cmp(&other.created())
    }
}

impl PartialOrd for Work {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A place in the queue: lane, then time (deadline or expiry), then identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    lane: Lane,
    at: Instant,
    work: Work,
}

impl Entry {
    fn of_batch(id: BatchId, kind: BatchKind) -> Self {
        match kind {
            BatchKind::Callers { earliest, .. } => Self { lane: Lane::Callers, at: earliest, work: Work::Batch(id) },
            BatchKind::Background { expires } => Self { lane: Lane::Background, at: expires, work: Work::Batch(id) },
        }
    }

    /// Where a batch not opened yet would queue for a caller with `deadline`: behind
    /// everything due no later.
    fn new_batch(deadline: Instant) -> Self {
        Self { lane: Lane::Callers, at: deadline, work: Work::Batch(BatchId(u64::MAX)) }
    }
}

struct Permit {
    tx: oneshot::Sender<()>,
    since: Instant,
}

/// The open batches and permits of one (app, API), in dispatch order.
#[derive(Default)]
pub struct Queue {
    order: BTreeSet<Entry>,
    batches: HashMap<BatchId, OpenBatch>,
    permits: HashMap<PermitId, (Entry, Permit)>,
    /// The last id handed out, to a batch or a permit.
    next_id: u64,
    /// Set when work appeared or became ready: the dispatcher must look again.
    wake: bool,
    /// Batches dropped unsent since the dispatcher last looked: their MsgSeqs are free
    /// for others to fetch (with the fleet tier, other replicas waited on them).
    dropped: Vec<(GroupId, Vec<MsgSeq>)>,
}

/// What the dispatcher does next.
pub enum Next {
    Ready,
    At(Instant),
    Idle,
}

/// A unit of work that a token was spent on.
pub enum Job {
    Batch(Dispatch),
    Permit(oneshot::Sender<()>),
}

impl Queue {
    pub fn open(&mut self, batch: OpenBatch) -> BatchId {
        self.next_id += 1;
        let id = BatchId(self.next_id);
        self.order.insert(Entry::of_batch(id, batch.kind));
        self.batches.insert(id, batch);
        self.wake = true;
        id
    }

    /// Whether batch `id` is still waiting for its token.
    pub fn is_open(&self, id: BatchId) -> bool {
        self.batches.contains_key(&id)
    }

    pub fn has_room(&self, id: BatchId, max_seqs: usize) -> bool {
        self.batches.get(&id).is_some_and(|b| b.has_room(max_seqs))
    }

    /// Adds `seq` to open batch `id` if it has room; the waiter for its answer.
    pub fn push(&mut self, id: BatchId, seq: MsgSeq, now: Instant, max_seqs: usize) -> Option<Waiter> {
        let batch = self.batches.get_mut(&id).filter(|b| b.has_room(max_seqs))?;
        let waiter = batch.push(seq, now, max_seqs);
        self.wake |= !batch.has_room(max_seqs);
        Some(waiter)
    }

    /// A caller with `deadline` waits for batch `id` (if it is still open): its deadlines
    /// widen, and it moves up the queue if it became more urgent.
    pub fn add_caller(&mut self, id: BatchId, deadline: Instant) {
        let Some(batch) = self.batches.get_mut(&id) else { return };
        let before = Entry::of_batch(id, batch.kind);
        batch.kind = batch.kind.with_caller(deadline);
        let after = Entry::of_batch(id, batch.kind);
        if before != after {
            self.order.remove(&before);
            self.order.insert(after);
        }
    }

    /// Queues a request for one token, ordered by `urgency` like a caller's batch.
    pub fn permit(&mut self, urgency: Instant, now: Instant) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.next_id += 1;
        let id = PermitId(self.next_id);
        let entry = Entry { lane: Lane::Callers, at: urgency, work: Work::Permit(id) };
        self.order.insert(entry);
        self.permits.insert(id, (entry, Permit { tx, since: now }));
        self.wake = true;
        rx
    }

    /// Whether the dispatcher must be woken; clears the flag.
    pub fn take_wake(&mut self) -> bool {
        std::mem::take(&mut self.wake)
    }

    /// Callers' entries queued (background batches do not hold callers up).
    pub fn callers_queued(&self) -> u32 {
        self.order.iter().take_while(|e| e.lane == Lane::Callers).count() as u32
    }

    /// How many entries are queued ahead of the last batch a caller with `deadline`
    /// would wait for, if `misses` of group `g` joined now; None when every one of them
    /// is already on the wire.
    pub fn ahead_of(&self, g: &GroupState, misses: &[MsgSeq], deadline: Instant, max_seqs: usize) -> Option<u32> {
        let place = |id: BatchId| self.batches.get(&id).map(|b| Entry::of_batch(id, b.kind.with_caller(deadline)));
        let mut unplaced = 0;
        let mut last: Option<Entry> = None;
        for &seq in misses {
            match g.carrier(seq) {
                Some(id) => last = last.max(place(id)),
                None => unplaced += 1,
            }
        }
        if unplaced > 0 {
            let newest = g.newest_open().and_then(|id| Some((id, self.batches.get(&id)?)));
            last = last.max(match newest {
                Some((id, b)) if unplaced <= max_seqs.saturating_sub(b.seqs.len()) => place(id),
                _ => Some(Entry::new_batch(deadline)),
            });
        }
        Some(self.order.range(..last?).count() as u32)
    }

    /// Drops what nobody can use any more, and tells when work is next ready. `spare`
    /// says whether the budget has tokens nobody else waits for (with a shared budget,
    /// other replicas may be waiting).
    pub fn next(&mut self, groups: &mut Groups, now: Instant, max_seqs: usize, reach: Duration, spare: bool) -> Next {
        groups.sweep(now);
        self.drop_useless(groups, now, reach);
        let mut earliest: Option<Instant> = None;
        for entry in &self.order {
            let Work::Batch(id) = entry.work else { return Next::Ready };
            let Some(b) = self.batches.get(&id) else { continue };
            // Background batches take only spare budget: none while a caller's batch
            // is still filling, none while other replicas spend the shared budget.
            if entry.lane == Lane::Background && (earliest.is_some() || !spare) {
                if earliest.is_none() {
                    return Next::At(now + CONTENTION_RECHECK);
                }
                break;
            }
            if b.is_ready(now, max_seqs) {
                return Next::Ready;
            }
            earliest = Some(earliest.map_or(b.ready_at, |e| e.min(b.ready_at)));
        }
        earliest.map_or(Next::Idle, Next::At)
    }

    /// Takes the first ready entry off the queue, tops a batch up with its group's
    /// cohort, and observes how long the work waited for its token in `budget_wait`.
    pub fn pop(
        &mut self,
        groups: &mut Groups,
        now: Instant,
        policy: &BatchPolicy,
        reach: Duration,
        budget_wait: &Histogram,
        spare: bool,
    ) -> Option<Job> {
        self.drop_useless(groups, now, reach);
        let entry = self.first_ready(now, policy.max_seqs, spare)?;
        self.order.remove(&entry);
        match entry.work {
            Work::Permit(id) => {
                let (_, permit) = self.permits.remove(&id)?;
                budget_wait.observe(now.saturating_duration_since(permit.since).as_secs_f64());
                Some(Job::Permit(permit.tx))
            }
            Work::Batch(id) => {
                let batch = self.batches.remove(&id)?;
                if entry.lane == Lane::Callers {
                    // Background batches wait for spare budget by design; that is no wait.
                    budget_wait.observe(now.saturating_duration_since(batch.ready_at).as_secs_f64());
                }
                Some(Job::Batch(dispatch(groups, id, batch, now, policy)))
            }
        }
    }

    /// The first entry that may take a token now.
    fn first_ready(&self, now: Instant, max_seqs: usize, spare: bool) -> Option<Entry> {
        let mut filling = !spare;
        self.order.iter().copied().find(|entry| {
            let Work::Batch(id) = entry.work else { return true };
            let Some(b) = self.batches.get(&id) else { return false };
            let callers = entry.lane == Lane::Callers;
            let ready = b.is_ready(now, max_seqs) && (callers || !filling);
            filling |= callers && !ready;
            ready
        })
    }

    /// Drops permits whose retry gave up, and resolves unsent the batches whose callers'
    /// deadlines (or background lifetimes) would pass before an answer could reach them
    /// (`reach`: [`Estimators::reach`](crate::admission::Estimators::reach)).
    fn drop_useless(&mut self, groups: &mut Groups, now: Instant, reach: Duration) {
        let Self { order, permits, batches, dropped, .. } = self;
        permits.retain(|_, (entry, p)| {
            let alive = !p.tx.is_closed();
            if !alive {
                order.remove(entry);
            }
            alive
        });
        let late: Vec<BatchId> =
            batches.iter().filter(|(_, b)| b.kind.useless_after() < now + reach).map(|(id, _)| *id).collect();
        for id in late {
            let Some(batch) = batches.remove(&id) else { continue };
            order.remove(&Entry::of_batch(id, batch.kind));
            groups.release(&batch.group, id, &batch.seqs, None);
            dropped.push((batch.group.clone(), batch.seqs.clone()));
            batch.expire(now);
        }
    }

    /// The batches dropped unsent since the last call.
    pub fn take_dropped(&mut self) -> Vec<(GroupId, Vec<MsgSeq>)> {
        std::mem::take(&mut self.dropped)
    }

    /// Open batches, permits (for tests and debugging).
    pub fn sizes(&self) -> (usize, usize) {
        (self.batches.len(), self.permits.len())
    }
}

/// A batch leaving the queue: detached from its group's open list and topped up with
/// the group's cohort (read lately, within half a TTL of expiry, not in flight).
fn dispatch(groups: &mut Groups, id: BatchId, batch: OpenBatch, now: Instant, policy: &BatchPolicy) -> Dispatch {
    let requested = batch.seqs.len();
    let mut seqs = batch.seqs;
    if let Some(g) = groups.get_mut(&batch.group) {
        g.detach(id, now);
        top_up(g, id, &mut seqs, &batch.outcome.subscribe(), now, policy);
    }
    Dispatch {
        id,
        group: batch.group,
        seqs,
        requested,
        window: Window::of(batch.kind, now, policy.upstream_timeout),
        outcome: batch.outcome,
    }
}

/// Fills the rest of a leaving batch: with the group's cohort, then with its
/// neighbourhood.
fn top_up(
    g: &mut GroupState,
    id: BatchId,
    seqs: &mut Vec<MsgSeq>,
    waiter: &Waiter,
    now: Instant,
    policy: &BatchPolicy,
) {
    let room = policy.max_seqs.saturating_sub(seqs.len());
    if room == 0 {
        return;
    }
    // Group cohort (SPEC 5.2): read lately, within half a TTL of expiry, not in flight
    // (the batch's own are in flight with it); never one nobody read.
    let page = g.page().cloned();
    let mut extra = page.as_ref().map_or_else(Vec::new, |page| {
        let horizon = now + policy.ttl / 2;
        page.due_for_refresh(now, horizon, policy.cohort_memory(), room, |seq| g.carrier(seq).is_none())
    });
    let room = room - extra.len();
    if room > 0 && policy.neighbourhood == Neighbourhood::Here {
        let known = |seq: MsgSeq| extra.contains(&seq) || page.as_ref().is_some_and(|p| p.holds(seq));
        let near = neighbourhood(g, seqs, policy.max_seqs, room, known);
        extra.extend(near);
    }
    for seq in extra {
        seqs.push(seq);
        g.carry(seq, id, waiter.clone());
    }
}

/// The MsgSeqs just below the highest one requested (within `max_seqs` of it) that the
/// group has not cached: they exist, since a group's MsgSeqs only grow, and a group that
/// nobody has fetched yet (a cold start, or a cache that lost it) is then fetched in one
/// or two calls instead of one per caller. They join the cohort only once someone reads
/// them (the cache keeps them unread); for a warm group there is nothing to add.
fn neighbourhood(
    g: &GroupState,
    seqs: &[MsgSeq],
    max_seqs: usize,
    room: usize,
    known: impl Fn(MsgSeq) -> bool,
) -> Vec<MsgSeq> {
    let Some(&MsgSeq(top)) = seqs.iter().max() else { return Vec::new() };
    let floor = top.saturating_sub(max_seqs as u64).max(1);
    (floor..top)
        .rev()
        .map(MsgSeq)
        .filter(|s| !seqs.contains(s) && g.carrier(*s).is_none() && !known(*s))
        .take(room)
        .collect()
}

/// The dispatcher of one (app, API): forever, wait for ready work, take a token, spend
/// it on the first ready entry; a batch is handed to `send` (`fetch::run` in its own
/// task). Owned and aborted by the gateway's task set.
pub async fn run(
    engine: Arc<Engine>,
    budget: Arc<Budget>,
    budget_wait: Histogram,
    mut send: impl FnMut(Dispatch) + Send,
    dropped: impl Fn(GroupId, Vec<MsgSeq>) + Send + Sync,
) {
    let mut last_grant: Option<Instant> = None;
    loop {
        if !engine.wait_for_ready_work(|| !budget.contended(), &dropped).await {
            // Waiting for work is not the budget's slowness: restart the measurement.
            last_grant = None;
        }
        budget.acquire().await;
        let granted = Instant::now();
        if let Some(previous) = last_grant {
            engine.estimates().observe_interval(granted - previous);
        }
        last_grant = Some(granted);
        match engine.pop(granted, &budget_wait, !budget.contended()) {
            Some(Job::Batch(dispatch)) => send(dispatch),
            // A retry whose caller gave up meanwhile: the token is spent, as it must be
            // counted anyway (it cannot be un-taken from Redis).
            Some(Job::Permit(tx)) => drop(tx.send(())),
            None => {}
        }
        for (group, seqs) in engine.take_dropped() {
            dropped(group, seqs);
        }
    }
}

#[cfg(test)]
impl Queue {
    /// The open batches, for assertions.
    pub(crate) fn open_batches(&self) -> impl Iterator<Item = (&BatchId, &OpenBatch)> {
        self.batches.iter()
    }

    /// Whether batch `id` queues in the callers' lane at `at`.
    pub(crate) fn queues_for_callers_at(&self, id: BatchId, at: Instant) -> bool {
        self.order.contains(&Entry { lane: Lane::Callers, at, work: Work::Batch(id) })
    }
}
