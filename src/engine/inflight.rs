//! The in-flight table of one (app, API), per group (docs/design.md#single-flight-and-batching):
//! every (GroupId, MsgSeq) being fetched, and the batch whose answer will carry it.
//!
//! This is the only owner of "one fetch per key". *Invariant: a key is in at most one
//! batch at a time*, so there is never a second fetch in flight for it; a later caller
//! joins that batch (`engine::join`) instead of adding the key again. Keys leave
//! when their batch's answer is in the cache ([`Groups::release`]) or the batch is
//! dropped unsent.
//!
//! It also remembers each group's open batches (only the newest can have room) and its
//! cache page, from which the dispatcher tops batches up with the group's cohort.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::cache::Page;
use crate::engine::batch::{BatchId, BatchOutcome, Joined, Served, Waiter};
use crate::tencent::domain::{GroupId, MsgSeq};

/// How often idle groups are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Every group with something open or in flight.
#[derive(Default)]
pub struct Groups {
    map: HashMap<GroupId, GroupState>,
    next_sweep: Option<Instant>,
}

/// One group's keys in flight and open batches.
#[derive(Default)]
pub struct GroupState {
    /// This group's open batches, oldest first; only the last can have room.
    open: Vec<BatchId>,
    inflight: HashMap<MsgSeq, (BatchId, Waiter)>,
    /// The group's cache page, where its cohort is read from at dispatch.
    page: Option<Arc<Page>>,
    /// When each of its batches on the wire was dispatched, and whom it serves.
    sent: HashMap<BatchId, (Instant, Served)>,
}

impl Groups {
    /// The group's state for a caller that looked at `page` (kept for cohort top-ups).
    pub fn enter(&mut self, group: &GroupId, page: Option<&Arc<Page>>) -> &mut GroupState {
        let g = self.map.entry(group.clone()).or_default();
        if let Some(page) = page {
            g.page = Some(page.clone());
        }
        // A batch whose task died without answering cannot be waited on: forget it.
        g.inflight.retain(|_, (_, w)| w.has_changed().is_ok());
        g
    }

    pub fn get_mut(&mut self, group: &GroupId) -> Option<&mut GroupState> {
        self.map.get_mut(group)
    }

    /// Drops the group's state if nothing of it is open or in flight.
    pub fn forget_if_idle(&mut self, group: &GroupId) {
        if self.map.get(group).is_some_and(GroupState::is_idle) {
            self.map.remove(group);
        }
    }

    /// Forgets idle groups, at most once per [`SWEEP_EVERY`].
    pub fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|t| now < t) {
            return;
        }
        self.next_sweep = Some(now + SWEEP_EVERY);
        self.map.retain(|_, g| !g.is_idle());
    }

    /// Takes `batch`'s keys out of flight (those it still owns) once its answer is in
    /// the cache (`page`), or it was dropped unsent (no page).
    pub fn release(&mut self, group: &GroupId, batch: BatchId, seqs: &[MsgSeq], page: Option<&Arc<Page>>) {
        let Some(g) = self.map.get_mut(group) else { return };
        if let Some(page) = page {
            g.page = Some(page.clone());
        }
        g.open.retain(|&other| other != batch);
        g.sent.remove(&batch);
        for seq in seqs {
            if g.inflight.get(seq).is_some_and(|(owner, _)| *owner == batch) {
                g.inflight.remove(seq);
            }
        }
    }

    /// Keys in flight, over all groups.
    pub fn inflight_len(&self) -> usize {
        self.map.values().map(|g| g.inflight.len()).sum()
    }
}

impl GroupState {
    fn is_idle(&self) -> bool {
        self.open.is_empty() && self.inflight.is_empty() && self.sent.is_empty()
    }

    /// The batch carrying `seq`, if it is in flight.
    pub fn carrier(&self, seq: MsgSeq) -> Option<BatchId> {
        self.inflight.get(&seq).map(|(id, _)| *id)
    }

    /// The newest open batch (the only one that can have room).
    pub fn newest_open(&self) -> Option<BatchId> {
        self.open.last().copied()
    }

    pub fn page(&self) -> Option<&Arc<Page>> {
        self.page.as_ref()
    }

    /// The batch has left the group's open list: dispatched at `now`.
    pub fn detach(&mut self, batch: BatchId, now: Instant, served: Served) {
        self.open.retain(|&other| other != batch);
        self.sent.insert(batch, (now, served));
    }

    /// When batch `id` was dispatched, if it is on the wire.
    pub fn sent_at(&self, id: BatchId) -> Option<Instant> {
        self.sent.get(&id).map(|(at, _)| *at)
    }

    /// Puts `seq` in flight with `batch`, which already holds it (a cohort top-up).
    pub fn carry(&mut self, seq: MsgSeq, batch: BatchId, waiter: Waiter) {
        self.inflight.insert(seq, (batch, waiter));
    }

    /// The batch carrying `seq` and its waiter, if `seq` is in flight.
    pub fn carrier_of(&self, seq: MsgSeq) -> Option<(BatchId, &Waiter)> {
        self.inflight.get(&seq).map(|(id, w)| (*id, w))
    }

    /// Whom batch `id` serves, if it is on the wire.
    pub fn served_by(&self, id: BatchId) -> Option<&Served> {
        self.sent.get(&id).map(|(_, served)| served)
    }

    /// Notes batch `id`, just opened, as the group's newest open batch.
    pub fn opened(&mut self, id: BatchId) {
        self.open.push(id);
    }

    /// Splits `misses` into those a batch answered after `since` (already in the group's
    /// page: returned with a resolved waiter) and those still to fetch. This closes the
    /// gap between a caller's cache lookup and its join, in which a batch may have
    /// finished and released its keys.
    pub fn answered_meanwhile(
        &self,
        misses: &[MsgSeq],
        since: Option<Instant>,
        now: Instant,
    ) -> (Vec<(MsgSeq, Waiter, Joined)>, Vec<MsgSeq>) {
        let (Some(since), Some(page)) = (since, &self.page) else { return (Vec::new(), misses.to_vec()) };
        let unplaced: Vec<MsgSeq> = misses.iter().copied().filter(|s| !self.inflight.contains_key(s)).collect();
        let found = page.read(&unplaced, now);
        let answered: Vec<_> = unplaced
            .iter()
            .zip(found)
            .filter_map(|(seq, item)| item.filter(|c| c.fetched_at >= since).map(|c| (*seq, c)))
            .collect();
        if answered.is_empty() {
            return (Vec::new(), misses.to_vec());
        }
        let fetched_at = answered.iter().map(|(_, c)| c.fetched_at).min().unwrap_or(now);
        let items = answered.iter().map(|(seq, c)| (*seq, Ok(c.receipt))).collect();
        let (_, waiter) = watch::channel(Some(Arc::new(BatchOutcome::settled(items, fetched_at))));
        let rest = misses.iter().copied().filter(|s| answered.iter().all(|(done, _)| done != s)).collect();
        (answered.iter().map(|(s, _)| (*s, waiter.clone(), Joined::Coalesced)).collect(), rest)
    }
}
