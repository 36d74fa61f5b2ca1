//! Placing a caller's misses (docs/design.md#single-flight-and-batching): each joins the batch that
//! already carries it, or the group's open batch (opened when none has room); a refused caller's
//! misses are parked in a background batch. The only code that changes the in-flight table and the
//! queue together, under the engine's lock.

use tokio::time::Instant;

use super::batch::{BatchId, BatchKind, BatchPolicy, Caller, Joined, OpenBatch, Parked, Waiter, note};
use super::inflight::GroupState;
use super::queue::Queue;
use crate::clients::ClientSlot;
use crate::tencent::domain::{GroupId, MsgSeq};

/// Join-or-add for a caller (with its request id): joins the batch that carries
/// `seq`, or adds `seq` to the group's open batch (opening one if none has room).
pub fn join(
    g: &mut GroupState,
    queue: &mut Queue,
    group: &GroupId,
    seq: MsgSeq,
    (caller, request): (Caller, &str),
    now: Instant,
    policy: &BatchPolicy,
) -> Option<(MsgSeq, Waiter, Joined)> {
    if let Some((id, waiter)) = g.carrier_of(seq) {
        queue.add_caller(id, caller.deadline, caller.client, request);
        if let Some(served) = g.served_by(id) {
            note(served, request);
        }
        return Some((seq, waiter.clone(), Joined::Coalesced));
    }
    let kind = BatchKind::for_caller(caller.deadline);
    let id = room_or_open(g, queue, group, kind, caller.client, now, policy);
    queue.add_caller(id, caller.deadline, caller.client, request);
    let waiter = queue.push(id, seq, caller.client, now, policy.max_seqs)?;
    g.carry(seq, id, waiter.clone());
    Some((seq, waiter, Joined::Fetched))
}

/// A refused caller's `misses` that nobody fetches yet ride along without a caller:
/// in the group's open batch, or in one new background batch that `expires`. At most
/// one batch's room is taken, so a refused caller cannot grow the backlog unboundedly.
pub fn park(
    g: &mut GroupState,
    queue: &mut Queue,
    group: &GroupId,
    misses: &[MsgSeq],
    parked: Parked,
    now: Instant,
    policy: &BatchPolicy,
) {
    let unplaced: Vec<MsgSeq> = misses.iter().copied().filter(|&s| g.carrier_of(s).is_none()).collect();
    if unplaced.is_empty() {
        return;
    }
    let kind = BatchKind::Background { expires: parked.expires };
    let id = room_or_open(g, queue, group, kind, parked.client, now, policy);
    for seq in unplaced {
        let Some(waiter) = queue.push(id, seq, parked.client, now, policy.max_seqs) else { break };
        g.carry(seq, id, waiter);
    }
}

/// The group's open batch with room, or a new one of `kind`.
fn room_or_open(
    g: &mut GroupState,
    queue: &mut Queue,
    group: &GroupId,
    kind: BatchKind,
    client: ClientSlot,
    now: Instant,
    policy: &BatchPolicy,
) -> BatchId {
    if let Some(id) = g.newest_open().filter(|&id| queue.has_room(id, policy.max_seqs)) {
        return id;
    }
    let id = queue.open(OpenBatch::new(group.clone(), kind, now + policy.window, client));
    g.opened(id);
    id
}
