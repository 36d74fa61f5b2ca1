//! A batch leaving the queue: detached from its group's open list and topped up, so that
//! every call carries as much as it can — the group's cohort (read lately, due to expire),
//! then, for a cold group, its neighbourhood.

use tokio::time::Instant;

use super::batch::{BatchId, BatchPolicy, Dispatch, Neighbourhood, OpenBatch, Waiter, Window};
use super::inflight::{GroupState, Groups};
use super::refusals::Refusals;
use crate::tencent::domain::MsgSeq;

/// A batch leaving the queue: detached from its group's open list and topped up with
/// the group's cohort (read lately, within half a TTL of expiry, not in flight, not
/// refused by Tencent lately).
pub(super) fn dispatch(
    groups: &mut Groups,
    id: BatchId,
    batch: OpenBatch,
    now: Instant,
    policy: &BatchPolicy,
    refusals: &Refusals,
) -> Dispatch {
    let askers = batch.seqs.iter().copied().zip(batch.askers.iter().copied()).collect();
    let mut seqs = batch.seqs;
    let mut added = Vec::new();
    if let Some(g) = groups.get_mut(&batch.group) {
        g.detach(id, now, batch.served.clone());
        let refused = refusals.of(&batch.group);
        let allowed = |seq: MsgSeq| refused.is_none_or(|r| !r.refuses(seq, now));
        added = top_up(g, id, &seqs, &batch.outcome.subscribe(), now, policy, allowed);
        seqs.extend_from_slice(&added);
    }
    Dispatch {
        id,
        group: batch.group,
        seqs,
        added,
        askers,
        window: Window::of(batch.kind, batch.client, now, policy.upstream_timeout),
        outcome: batch.outcome,
        dispatched: now,
        served: batch.served,
    }
}

/// What fills the rest of a leaving batch of `seqs`: the group's cohort, then its
/// neighbourhood, each MsgSeq one that `allowed` accepts; they are in flight with the
/// batch from now on.
fn top_up(
    g: &mut GroupState,
    id: BatchId,
    seqs: &[MsgSeq],
    waiter: &Waiter,
    now: Instant,
    policy: &BatchPolicy,
    allowed: impl Fn(MsgSeq) -> bool,
) -> Vec<MsgSeq> {
    let room = policy.max_seqs.saturating_sub(seqs.len());
    if room == 0 {
        return Vec::new();
    }
    // Group cohort (docs/design.md#group-cohorts): read lately, within half a TTL of
    // expiry, not in flight (the batch's own are in flight with it); never one nobody read.
    let page = g.page().cloned();
    let mut extra = page.as_ref().map_or_else(Vec::new, |page| {
        let horizon = now + policy.ttl / 2;
        page.due_for_refresh(now, horizon, policy.cohort_memory(), room, |seq| g.carrier(seq).is_none() && allowed(seq))
    });
    let room = room - extra.len();
    if room > 0 && policy.neighbourhood == Neighbourhood::Here {
        let known = |seq: MsgSeq| extra.contains(&seq) || page.as_ref().is_some_and(|p| p.holds(seq)) || !allowed(seq);
        let near = neighbourhood(g, seqs, policy.max_seqs, room, known);
        extra.extend(near);
    }
    for &seq in &extra {
        g.carry(seq, id, waiter.clone());
    }
    extra
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
