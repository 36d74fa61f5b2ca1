//! The queue that spends one (app, API)'s budget (docs/design.md#budget-and-dispatch, #callers);
//! the task that drives it is the [`dispatcher`](super::dispatcher).
//!
//! It owns the open batches and the retry permits (a retry or a split half of a
//! dispatched batch asking for one more token), in lines: one per client for callers'
//! work, by the earliest deadline it serves, and one for background batches, by expiry.
//! The dispatcher takes one token from the budget at a time and spends it on the
//! client the weighted fair share picks (start-time fair queuing over the clients with
//! work waiting; see `Fair`), on that client's most urgent ready work; background
//! batches only when no caller's work waits. A batch several clients' callers share waits
//! in the line of whichever of them serves it first, and serves every caller in it; that
//! client pays. When a batch leaves, it is topped up
//! with its group's cohort: cached messages read lately that expire within half a TTL,
//! so the group refreshes in one call per TTL.
//!
//! Invariants: a token is spent only on work somebody can still use — a batch whose
//! callers' deadlines would pass before an answer could arrive, or a permit whose retry
//! gave up, leaves the queue unpaid — and background batches take only budget no
//! caller's work is waiting for, not even a batch still filling, and of that no more than
//! the client's allowance ([`BACKGROUND_BURST`]); each is charged to that client's share.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use prometheus::Histogram;
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use super::fair::Share;
use super::fair::{Allowance, Fair};
use super::topup::dispatch;
use crate::clients::ClientSlot;
use crate::engine::batch::{BatchId, BatchKind, BatchPolicy, Dispatch, OpenBatch, Waiter};
use crate::engine::inflight::{GroupState, Groups};
use crate::engine::refusals::Refusals;
use crate::tencent::domain::{GroupId, MsgSeq};

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

/// A place within one line of the queue: time (deadline or expiry), then identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Spot {
    at: Instant,
    work: Work,
}

/// A place in the queue: the callers' lane of one client, or the background lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    lane: Lane,
    /// Whose line, in the callers' lane.
    client: ClientSlot,
    spot: Spot,
}

impl Entry {
    fn of_batch(id: BatchId, kind: BatchKind, client: ClientSlot) -> Self {
        let work = Work::Batch(id);
        match kind {
            BatchKind::Callers { earliest, .. } => {
                Self { lane: Lane::Callers, client, spot: Spot { at: earliest, work } }
            }
            BatchKind::Background { expires } => {
                Self { lane: Lane::Background, client: ClientSlot::DEFAULT, spot: Spot { at: expires, work } }
            }
        }
    }

    /// Where a batch not opened yet would queue for `client`'s caller with `deadline`:
    /// behind everything of that client due no later.
    fn new_batch(deadline: Instant, client: ClientSlot) -> Self {
        Self { lane: Lane::Callers, client, spot: Spot { at: deadline, work: Work::Batch(BatchId(u64::MAX)) } }
    }
}

/// The queue's lines: one per client for callers' work, ordered by deadline, and one
/// background line ordered by expiry.
#[derive(Default)]
struct Lines {
    callers: Vec<BTreeSet<Spot>>,
    background: BTreeSet<Spot>,
}

impl Lines {
    fn insert(&mut self, e: Entry) {
        match e.lane {
            Lane::Callers => {
                let i = e.client.0 as usize;
                if self.callers.len() <= i {
                    self.callers.resize_with(i + 1, BTreeSet::new);
                }
                self.callers[i].insert(e.spot);
            }
            Lane::Background => {
                self.background.insert(e.spot);
            }
        }
    }

    fn remove(&mut self, e: &Entry) {
        match e.lane {
            Lane::Callers => {
                if let Some(line) = self.callers.get_mut(e.client.0 as usize) {
                    line.remove(&e.spot);
                }
            }
            Lane::Background => {
                self.background.remove(&e.spot);
            }
        }
    }

    /// The clients with callers' work queued, and their lines.
    fn busy(&self) -> impl Iterator<Item = (ClientSlot, &BTreeSet<Spot>)> {
        self.callers.iter().enumerate().filter(|(_, l)| !l.is_empty()).map(|(i, l)| (ClientSlot(i as u16), l))
    }

    fn line(&self, client: ClientSlot) -> Option<&BTreeSet<Spot>> {
        self.callers.get(client.0 as usize)
    }
}

struct Permit {
    tx: oneshot::Sender<()>,
    since: Instant,
    billing: Billing,
}

/// When a permit's call is charged to a client's share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Billing {
    /// When it is granted, to the client in whose line it waited.
    Now,
    /// Later, to whoever turns out to have caused it ([`Queue::bill`]): a call that
    /// isolates a MsgSeq Tencent refuses is paid by the client that sent that MsgSeq.
    Later,
}

/// The open batches and permits of one (app, API), in dispatch order.
#[derive(Default)]
pub struct Queue {
    lines: Lines,
    fair: Fair,
    batches: HashMap<BatchId, OpenBatch>,
    permits: HashMap<PermitId, (Entry, Permit)>,
    /// The last id handed out, to a batch or a permit.
    next_id: u64,
    /// Set when work appeared or became ready: the dispatcher must look again.
    wake: bool,
    /// Per client slot: its allowance of background calls.
    allowances: Vec<Allowance>,
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
    /// The clients' shares, by slot (replaced on reload; work queued keeps its client).
    pub fn set_shares(&mut self, shares: Vec<Share>) {
        self.fair.shares = shares;
    }

    pub fn open(&mut self, batch: OpenBatch) -> BatchId {
        self.next_id += 1;
        let id = BatchId(self.next_id);
        self.lines.insert(Entry::of_batch(id, batch.kind, batch.client));
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

    /// When `client`'s allowance next holds a background call.
    fn background_ready_at(&self, client: ClientSlot, now: Instant) -> Instant {
        self.allowances.get(client.0 as usize).copied().unwrap_or_default().ready_at(now)
    }

    /// When background batch `b` may take a spare token: when it is ready and its client's
    /// allowance holds a call.
    fn background_at(&self, b: &OpenBatch, now: Instant, max_seqs: usize) -> Instant {
        let ready = if b.is_ready(now, max_seqs) { now } else { b.ready_at };
        ready.max(self.background_ready_at(b.client, now))
    }

    /// Adds `seq`, asked for by `client`, to open batch `id` if it has room; the waiter
    /// for its answer.
    pub fn push(
        &mut self,
        id: BatchId,
        seq: MsgSeq,
        client: ClientSlot,
        now: Instant,
        max_seqs: usize,
    ) -> Option<Waiter> {
        let batch = self.batches.get_mut(&id).filter(|b| b.has_room(max_seqs))?;
        let waiter = batch.push(seq, client, now, max_seqs);
        self.wake |= !batch.has_room(max_seqs);
        Some(waiter)
    }

    /// `client`'s caller with `deadline` waits for batch `id` (if it is still open): its
    /// deadlines widen, it moves up the queue if it became more urgent, and into the
    /// joining client's line if that one serves it first ([`Queue::joined`]).
    pub fn add_caller(&mut self, id: BatchId, deadline: Instant, client: ClientSlot, request: &str) {
        if let Some(batch) = self.batches.get(&id) {
            crate::engine::batch::note(&batch.served, request);
        }
        let Some((kind, owner)) = self.batches.get(&id).map(|b| (b.kind, b.client)) else { return };
        let before = Entry::of_batch(id, kind, owner);
        let (kind, owner) = self.joined(id, kind, owner, deadline, client);
        let Some(batch) = self.batches.get_mut(&id) else { return };
        (batch.kind, batch.client) = (kind, owner);
        let after = Entry::of_batch(id, kind, owner);
        if before != after {
            self.lines.remove(&before);
            self.lines.insert(after);
        }
    }

    /// Queues a request for one token, ordered by `urgency` in `client`'s line like a
    /// caller's batch, charged as `billing` says.
    pub fn permit(
        &mut self,
        urgency: Instant,
        client: ClientSlot,
        now: Instant,
        billing: Billing,
    ) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.next_id += 1;
        let id = PermitId(self.next_id);
        let entry = Entry { lane: Lane::Callers, client, spot: Spot { at: urgency, work: Work::Permit(id) } };
        self.lines.insert(entry);
        self.permits.insert(id, (entry, Permit { tx, since: now, billing }));
        self.wake = true;
        rx
    }

    /// How many tokens are spent before a permit of `client` with `urgency` queued now
    /// would get one: the entries ahead of it in its line, scaled by the client's share.
    pub fn permit_ahead(&self, client: ClientSlot, urgency: Instant) -> u32 {
        let spot = Spot { at: urgency, work: Work::Permit(PermitId(u64::MAX)) };
        let ahead = self.lines.line(client).map_or(0, |line| line.range(..spot).count()) as u32;
        self.in_tokens(client, ahead)
    }

    /// Whether the dispatcher must be woken; clears the flag.
    pub fn take_wake(&mut self) -> bool {
        std::mem::take(&mut self.wake)
    }

    /// Callers' entries queued (background batches do not hold callers up).
    pub fn callers_queued(&self) -> u32 {
        self.lines.busy().map(|(_, line)| line.len() as u32).sum()
    }

    /// `client`'s entries queued, in tokens of the whole budget: its line, divided by its
    /// share among the clients waiting (itself included).
    pub fn queued_for(&self, client: ClientSlot) -> u32 {
        let own = self.lines.line(client).map_or(0, BTreeSet::len) as u32;
        self.in_tokens(client, own)
    }

    /// `n` entries of `client`'s line, in tokens of the whole budget: while they drain,
    /// each other waiting client takes its weight's worth per token of this one's, up to
    /// what it has queued.
    fn in_tokens(&self, client: ClientSlot, n: u32) -> u32 {
        let own = u64::from(self.fair.weight(client));
        let others: u64 = self
            .lines
            .busy()
            .filter(|(c, _)| *c != client)
            .map(|(c, line)| (u64::from(n) * u64::from(self.fair.weight(c))).div_ceil(own).min(line.len() as u64))
            .sum();
        (u64::from(n) + others).min(u64::from(u32::MAX)) as u32
    }

    /// How many tokens are spent ahead of the last batch `client`'s caller with
    /// `deadline` would wait for, if `misses` of group `g` joined now: the entries ahead
    /// in the line it would wait in, scaled by that client's share; None when every one
    /// of them is already on the wire.
    pub fn ahead_of(
        &self,
        g: &GroupState,
        misses: &[MsgSeq],
        deadline: Instant,
        max_seqs: usize,
        client: ClientSlot,
    ) -> Option<u32> {
        let place = |id: BatchId| {
            self.batches.get(&id).map(|b| {
                let (kind, owner) = self.joined(id, b.kind, b.client, deadline, client);
                Entry::of_batch(id, kind, owner)
            })
        };
        let mut unplaced = 0;
        let mut places: Vec<Entry> = Vec::new();
        for &seq in misses {
            match g.carrier(seq) {
                Some(id) => places.extend(place(id)),
                None => unplaced += 1,
            }
        }
        if unplaced > 0 {
            let newest = g.newest_open().and_then(|id| Some((id, self.batches.get(&id)?)));
            places.extend(match newest {
                Some((id, b)) if unplaced <= max_seqs.saturating_sub(b.seqs.len()) => place(id),
                _ => Some(Entry::new_batch(deadline, client)),
            });
        }
        places.dedup();
        places
            .iter()
            .map(|e| {
                let ahead = self.lines.line(e.client).map_or(0, |line| line.range(..e.spot).count()) as u32;
                self.in_tokens(e.client, ahead)
            })
            .max()
    }

    /// Drops what nobody can use any more, and tells when work is next ready. `spare`
    /// says whether the budget has tokens nobody else waits for (with a shared budget,
    /// other replicas may be waiting).
    pub fn next(&mut self, groups: &mut Groups, now: Instant, max_seqs: usize, reach: Duration, spare: bool) -> Next {
        groups.sweep(now);
        self.drop_useless(groups, now, reach);
        let mut earliest: Option<Instant> = None;
        for (_, line) in self.lines.busy() {
            for spot in line {
                let Work::Batch(id) = spot.work else { return Next::Ready };
                let Some(b) = self.batches.get(&id) else { continue };
                if b.is_ready(now, max_seqs) {
                    return Next::Ready;
                }
                earliest = Some(earliest.map_or(b.ready_at, |e| e.min(b.ready_at)));
            }
        }
        // Background batches take only spare budget: none while a caller's batch is
        // still filling, none while other replicas spend the shared budget.
        if earliest.is_some() {
            return earliest.map_or(Next::Idle, Next::At);
        }
        if !self.lines.background.is_empty() && !spare {
            return Next::At(now + CONTENTION_RECHECK);
        }
        for spot in &self.lines.background {
            let Work::Batch(id) = spot.work else { return Next::Ready };
            let Some(b) = self.batches.get(&id) else { continue };
            let at = self.background_at(b, now, max_seqs);
            if at <= now {
                return Next::Ready;
            }
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
        }
        earliest.map_or(Next::Idle, Next::At)
    }

    /// Charges `client`'s share with `n` calls granted with [`Billing::Later`].
    pub fn bill(&mut self, client: ClientSlot, n: u32) {
        if n > 0 {
            self.fair.bill(client, n);
        }
    }

    /// Takes the next ready entry off the queue — the fair share's client, then its most
    /// urgent ready work — tops a batch up with its group's cohort (never with a MsgSeq
    /// `refusals` holds), charges the call to its client, and observes how long the work
    /// waited for its token in `budget_wait`.
    #[allow(clippy::too_many_arguments)]
    pub fn pop(
        &mut self,
        groups: &mut Groups,
        now: Instant,
        policy: &BatchPolicy,
        reach: Duration,
        budget_wait: &Histogram,
        spare: bool,
        refusals: &Refusals,
    ) -> Option<Job> {
        self.drop_useless(groups, now, reach);
        let entry = self.first_ready(now, policy.max_seqs, spare)?;
        self.lines.remove(&entry);
        match entry.spot.work {
            Work::Permit(id) => {
                let (_, permit) = self.permits.remove(&id)?;
                if permit.billing == Billing::Now {
                    self.fair.serve(entry.client);
                    self.fair.charge(entry.client, 1);
                }
                budget_wait.observe(now.saturating_duration_since(permit.since).as_secs_f64());
                Some(Job::Permit(permit.tx))
            }
            Work::Batch(id) => {
                let batch = self.batches.remove(&id)?;
                if entry.lane == Lane::Background {
                    let i = batch.client.0 as usize;
                    if self.allowances.len() <= i {
                        self.allowances.resize(i + 1, Allowance::default());
                    }
                    self.allowances[i].spend(now);
                }
                if entry.lane == Lane::Callers {
                    // Background batches wait for spare budget by design; that is no wait.
                    budget_wait.observe(now.saturating_duration_since(batch.ready_at).as_secs_f64());
                }
                // A background batch counts against the share of the client whose refused
                // callers it serves, like that client's own calls.
                self.fair.serve(batch.client);
                self.fair.charge(batch.client, 1);
                Some(Job::Batch(dispatch(groups, id, batch, now, policy, refusals)))
            }
        }
    }

    /// The entry that may take a token now: among the clients with ready work, the one
    /// whose next call starts first in the fair share (at a tie, the one whose work is
    /// due first); then background batches, if no caller's work waits at all.
    fn first_ready(&self, now: Instant, max_seqs: usize, spare: bool) -> Option<Entry> {
        let mut best: Option<(f64, Entry)> = None;
        let mut waiting = false;
        for (client, line) in self.lines.busy() {
            waiting = true;
            let ready = line.iter().find(|spot| match spot.work {
                Work::Permit(_) => true,
                Work::Batch(id) => self.batches.get(&id).is_some_and(|b| b.is_ready(now, max_seqs)),
            });
            let Some(&spot) = ready else { continue };
            let start = self.fair.start(client);
            let better = best.is_none_or(|(s, e)| start < s || (start == s && spot < e.spot));
            if better {
                best = Some((start, Entry { lane: Lane::Callers, client, spot }));
            }
        }
        if best.is_some() || waiting || !spare {
            return best.map(|(_, e)| e);
        }
        let spot = self.lines.background.iter().copied().find(|spot| match spot.work {
            Work::Permit(_) => true,
            Work::Batch(id) => self.batches.get(&id).is_some_and(|b| self.background_at(b, now, max_seqs) <= now),
        })?;
        Some(Entry { lane: Lane::Background, client: ClientSlot::DEFAULT, spot })
    }

    /// Drops permits whose retry gave up, and resolves unsent the batches whose callers'
    /// deadlines (or background lifetimes) would pass before an answer could reach them
    /// (`reach`: [`Estimators::reach`](crate::engine::admission::Estimators::reach)).
    fn drop_useless(&mut self, groups: &mut Groups, now: Instant, reach: Duration) {
        let Self { lines, permits, batches, dropped, .. } = self;
        permits.retain(|_, (entry, p)| {
            let alive = !p.tx.is_closed();
            if !alive {
                lines.remove(entry);
            }
            alive
        });
        // Late: no caller could be answered in time. Abandoned: its callers all went
        // away (each waiting caller holds a receiver of the outcome; the in-flight table
        // holds one per MsgSeq) — not turned into a background batch either.
        let useless = |b: &OpenBatch| {
            let abandoned = matches!(b.kind, BatchKind::Callers { .. }) && b.outcome.receiver_count() <= b.seqs.len();
            abandoned || b.kind.useless_after() < now + reach
        };
        let late: Vec<BatchId> = batches.iter().filter(|(_, b)| useless(b)).map(|(id, _)| *id).collect();
        for id in late {
            let Some(batch) = batches.remove(&id) else { continue };
            lines.remove(&Entry::of_batch(id, batch.kind, batch.client));
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

    /// Batch `id` of `kind`, in `owner`'s line, once `client`'s caller with `deadline`
    /// joins it: its kind, and the line it belongs in — the joining client's if that line
    /// would spend fewer tokens before it (so a modest client never waits behind a
    /// heavier client's queue for a batch it shares), and always for a background batch,
    /// which no caller's client paid for. The client whose line it leaves from pays.
    fn joined(
        &self,
        id: BatchId,
        kind: BatchKind,
        owner: ClientSlot,
        deadline: Instant,
        client: ClientSlot,
    ) -> (BatchKind, ClientSlot) {
        let after = kind.with_caller(deadline);
        if matches!(kind, BatchKind::Background { .. }) {
            return (after, client);
        }
        if client == owner {
            return (after, owner);
        }
        let spot = Entry::of_batch(id, after, owner).spot;
        let tokens_before = |c: ClientSlot| {
            let ahead = self.lines.line(c).map_or(0, |line| line.range(..spot).count());
            self.in_tokens(c, ahead as u32)
        };
        (after, if tokens_before(client) < tokens_before(owner) { client } else { owner })
    }
}

#[cfg(test)]
impl Queue {
    /// The open batches, for assertions.
    pub(crate) fn open_batches(&self) -> impl Iterator<Item = (&BatchId, &OpenBatch)> {
        self.batches.iter()
    }

    /// Whether batch `id` queues in `client`'s line of the callers' lane at `at`.
    pub(crate) fn queues_for_callers_at(&self, id: BatchId, at: Instant, client: ClientSlot) -> bool {
        self.lines.line(client).is_some_and(|line| line.contains(&Spot { at, work: Work::Batch(id) }))
    }
}
