//! A request's round through the fleet tier (docs/design.md#fleet-tier): what the local cache
//! missed is looked up in Redis once per round for the whole group; found items are served and
//! copied into the local cache; the rest is split into what this replica fetches (through the local
//! engine, as a lone replica would) and what it waits for another replica to fetch. When Redis
//! cannot answer in time, everything is fetched here.

use std::sync::Arc;

use tokio::time::Instant;

use super::{Answer, Query, Receipts, Slot, acceptable};
use crate::cache::XCache;
use crate::cache::{Cached, GroupAnswer, Known, Page};
use crate::engine::admission;
use crate::fleet;
use crate::fleet::SharedTier;
use crate::telemetry::metrics::Source;
use crate::tencent::domain::{GroupId, MsgSeq};
use crate::tencent::wire::ReceiptResponse;

/// What one round decided.
pub(super) enum Round {
    /// Another replica cached Tencent's answer about the whole group.
    Group(Answer),
    Split {
        /// Fetch these here.
        local: Vec<MsgSeq>,
        /// Wait for another replica's call for these.
        wait: Elsewhere,
        /// The group's local page, if the round filled it.
        page: Option<Arc<Page>>,
    },
}

/// MsgSeqs another replica is fetching, and when its claim on them runs out at the latest.
#[derive(Default)]
pub(super) struct Elsewhere {
    pub seqs: Vec<MsgSeq>,
    pub retry_at: Option<Instant>,
}

/// Asks Redis about `misses` (the request's open slots) and serves what it holds.
pub(super) async fn round(
    app: &Receipts,
    tier: &SharedTier,
    q: &Query<'_>,
    slots: &mut [Slot],
    misses: &[MsgSeq],
    round: usize,
) -> Round {
    let claim = match tier.fleet.claim(app.id, &q.group, misses, tier.lifetimes()).await {
        Ok(claim) => claim,
        Err(e) => {
            tracing::debug!(error = %e, "fleet tier skipped for this request");
            tier.counters.miss.inc_by(misses.len() as u64);
            return Round::Split { local: misses.to_vec(), wait: Elsewhere::default(), page: None };
        }
    };
    if let Some((code, info, fetched_at)) = claim.group {
        app.cache.insert_group_answer(app.id, &q.group, GroupAnswer { code, info: info.clone(), fetched_at }).await;
        tier.counters.shared_hit.inc_by(misses.len() as u64);
        app.metrics.count_items(Source::Hit, q.seqs.len() as u64);
        let age = fetched_at.elapsed().as_secs();
        return Round::Group(Answer { body: ReceiptResponse::fail(code, info), x_cache: XCache::Hit, age });
    }
    let page = if claim.items.is_empty() {
        None
    } else {
        let items = claim.items.iter().map(|(seq, item)| Known {
            seq: *seq,
            receipt: item.receipt,
            fetched_at: item.fetched_at,
            kept_by: item.kept_by,
        });
        Some(app.cache.insert_each(app.id, &q.group, items).await)
    };
    let now = Instant::now();
    let mut served = Vec::new();
    for (seq, item) in &claim.items {
        let Ok(i) = slots.binary_search_by_key(seq, |s| s.seq) else { continue };
        let fresh_for = tier.lifetimes().fresh_for(&item.receipt, item.kept_by);
        let cached =
            Cached { receipt: item.receipt, fetched_at: item.fetched_at, fresh_until: item.fetched_at + fresh_for };
        let slot = &mut slots[i];
        if acceptable(&cached, q.freshness, now) {
            let source = if round == 0 { Source::Hit } else { Source::Coalesced };
            slot.served = Some((cached.receipt, cached.fetched_at, source));
            served.push(*seq);
        } else if slot.stale.is_none_or(|old| old.fetched_at < cached.fetched_at) {
            slot.stale = Some(cached);
        }
    }
    if let Some(page) = &page {
        // Read here: part of the group's cohort on this replica too.
        page.read(&served, now);
    }
    let counter = if round == 0 { &tier.counters.shared_hit } else { &tier.counters.shared_wait };
    counter.inc_by(served.len() as u64);
    // `max-age` may accept an item Redis thought due, and claimed: not fetched after all.
    let (local, needless): (Vec<MsgSeq>, Vec<MsgSeq>) = claim.mine.into_iter().partition(|s| !served.contains(s));
    give_up(app, &q.group, &needless);
    tier.counters.miss.inc_by(local.len() as u64);
    Round::Split { local, wait: Elsewhere { seqs: claim.wait, retry_at: claim.retry_at }, page }
}

/// When the last round of a request must start: a round costs a Redis round trip (at
/// most [`fleet::CALL_TIMEOUT`]) before the answer is written, so a request waiting for
/// another replica's call stops early enough to answer — stale, or 429 — in time.
pub(super) fn last_round(q: &Query<'_>) -> Instant {
    q.deadline.checked_sub(fleet::CALL_TIMEOUT + admission::MARGIN).unwrap_or(q.deadline)
}

/// Waits for another replica's call for `elsewhere`, no later than [`last_round`].
pub(super) async fn wait(app: &Receipts, tier: Option<&SharedTier>, q: &Query<'_>, elsewhere: &Elsewhere) {
    if let Some(tier) = tier.filter(|_| !elsewhere.seqs.is_empty()) {
        tier.fleet.wait(app.id, &q.group, elsewhere.retry_at, last_round(q)).await;
    }
}

/// Gives up this replica's claims on `seqs` in the background, so other replicas need
/// not wait for them to expire (its caller was refused, or did not need them).
pub fn give_up(app: &Receipts, group: &GroupId, seqs: &[MsgSeq]) {
    let Some(tier) = app.fleet.as_ref().filter(|_| !seqs.is_empty()) else { return };
    let (fleet, id, group, seqs, lifetimes) =
        (tier.fleet.clone(), app.id, group.clone(), seqs.to_vec(), tier.lifetimes());
    tokio::spawn(async move { fleet.release(id, &group, &seqs, lifetimes).await });
}
